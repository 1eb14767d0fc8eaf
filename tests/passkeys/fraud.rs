//! The fraud story: someone holding the victim's exchange session (same identity, their own
//! browser and their own authenticator) enrols a passkey for the victim and tries to approve a
//! withdrawal-enabling change with it. Either the new passkey needs the victim's confirmation,
//! or — when the victim had none — it is the first passkey, and its quarantine and the cooling-off
//! keep the change from being released before the victim would have been told.

use std::time::Duration;

use reqwest::StatusCode;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{
    allowed_credentials, assert_close, enable_withdrawals, expect_error, expect_error_in,
    expect_json, parse_time, span, spawn_gate, text, try_confirm_forcing, GateOptions, MINUTE,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test]
async fn a_session_thief_cannot_approve_with_a_passkey_of_their_own() {
    let gate = spawn_gate(GateOptions::default()).await;
    let victim = gate.session("victim");
    let mut victims_key = FlagAuthenticator::new();
    victim
        .register_first(&mut victims_key, "My security key")
        .await;
    gate.advance(30 * DAY);

    // The attacker: the victim's identity (a stolen exchange session), their own gate session,
    // their own authenticator.
    let attacker = gate.session("victim");
    let mut attackers_key = FlagAuthenticator::new();
    let pending = attacker
        .register_pending(&mut attackers_key, "Support verification")
        .await;
    let attackers_passkey = text(&pending["id"]);
    let addition = text(&pending["change_id"]);

    let api = enable_withdrawals("k1");
    let withdrawal = attacker.hold(&api).await;
    let start = attacker.start_confirmation(&withdrawal).await;
    assert_eq!(
        allowed_credentials(&start),
        vec![victims_key
            .last_credential_id()
            .expect("victim's credential")],
        "only the victim's passkey is offered: {start}"
    );
    expect_error(
        try_confirm_forcing(&attacker, &withdrawal, &mut attackers_key).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    // Nor can the attacker's passkey approve its own addition.
    expect_error(
        try_confirm_forcing(&attacker, &addition, &mut attackers_key).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    expect_error(
        attacker.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "not_confirmed",
    )
    .await;
    // Nor remove the victim's passkey to make theirs the first one.
    let victims_passkey = attacker
        .passkeys()
        .await
        .into_iter()
        .find(|p| p["state"] == "active")
        .map(|p| text(&p["id"]))
        .expect("the attacker sees the victim's passkey");
    let removal = expect_json(
        attacker.remove(&victims_passkey).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let removal = text(&removal["change_id"]);
    expect_error(
        try_confirm_forcing(&attacker, &removal, &mut attackers_key).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    assert_eq!(victim.passkey_state(&victims_passkey).await, "active");

    // The victim, in their own session, sees the stranger's passkey waiting and both changes,
    // and cancels them without needing a passkey.
    assert_eq!(victim.passkey_state(&attackers_passkey).await, "pending");
    assert_eq!(victim.change_state(&withdrawal).await, "held");
    expect_json(victim.cancel(&addition).await, StatusCode::OK).await;
    expect_json(victim.cancel(&withdrawal).await, StatusCode::OK).await;
    expect_json(victim.cancel(&removal).await, StatusCode::OK).await;
    assert!(victim.passkey(&attackers_passkey).await.is_none());

    // Even after the add cooling-off the attacker's passkey never counts.
    gate.advance(DAY + MINUTE);
    let again = attacker.hold(&enable_withdrawals("k2")).await;
    expect_error_in(
        try_confirm_forcing(&attacker, &again, &mut attackers_key).await,
        StatusCode::FORBIDDEN,
        &["assertion_invalid"],
    )
    .await;
    gate.upstream
        .assert_saw_nothing("nothing the attacker did reached the exchange");
}

/// The victim has no passkey: the attacker's is the first one, active but quarantined. With
/// `quarantine`, the change the attacker confirms at once cannot be released before
/// `max(now + cooling_off (24h), created_at + quarantine)`; the victim cancels in time.
async fn first_passkey_story(quarantine: Duration) {
    let gate = spawn_gate(GateOptions::passkeys(&format!(
        "quarantine = \"{}h\"",
        quarantine.as_secs() / 3600
    )))
    .await;
    let victim = gate.session("victim");
    assert!(
        victim.passkeys().await.is_empty(),
        "the victim never enrolled"
    );

    let attacker = gate.session("victim");
    let mut attackers_key = FlagAuthenticator::new();
    let first = attacker
        .register_first(&mut attackers_key, "Support verification")
        .await;
    let created_at = parse_time(&first["created_at"]);
    assert_close(
        parse_time(&first["quarantined_until"]),
        created_at + span(quarantine),
        "the first passkey is quarantined",
    );

    gate.advance(5 * MINUTE);
    let api = enable_withdrawals("k1");
    let withdrawal = attacker.hold(&api).await;
    let confirmed_at = gate.now();
    let confirmed = attacker.confirm(&withdrawal, &mut attackers_key).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    let release_at = parse_time(&confirmed["release_at"]);
    let earliest = (confirmed_at + span(DAY)).max(created_at + span(quarantine));
    assert_close(
        release_at,
        earliest,
        "release_at = max(now + cooling_off, created_at + quarantine)",
    );

    // Refused now, and refused a minute before release_at.
    expect_error(
        attacker.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    let wait = release_at - gate.now() - time::Duration::minutes(1);
    gate.advance(wait.try_into().expect("release_at is ahead"));
    expect_error(
        attacker.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    gate.upstream
        .assert_saw_nothing("nothing released before max(cooling_off, quarantine)");

    // The victim, told in the meantime, sees the change and the stranger's passkey, and cancels.
    let listed = victim.passkeys().await;
    assert_eq!(
        listed.len(),
        1,
        "the attacker's passkey is visible: {listed:?}"
    );
    assert_eq!(victim.change_state(&withdrawal).await, "cooling_off");
    expect_json(victim.cancel(&withdrawal).await, StatusCode::OK).await;
    gate.advance(2 * MINUTE);
    expect_error(
        attacker.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "change_cancelled",
    )
    .await;
    gate.upstream
        .assert_saw_nothing("the cancelled change never reached the exchange");
}

#[tokio::test]
async fn a_thiefs_first_passkey_waits_out_the_cooling_off_when_it_is_longer() {
    first_passkey_story(DAY).await;
}

#[tokio::test]
async fn a_thiefs_first_passkey_waits_out_its_quarantine_when_it_is_longer() {
    first_passkey_story(3 * DAY).await;
}
