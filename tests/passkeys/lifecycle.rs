//! Several passkeys per user: the list and its facts, renaming, a second passkey as a built-in
//! protected change (confirmed with an existing passkey, then cooled off), cancelling that
//! addition, removal (confirmed, then immediate), and removing the last passkey.

use reqwest::StatusCode;

use crate::flag_authenticator::{aaguid, FlagAuthenticator};
use crate::helpers::{
    add_active_passkey, allowed_credentials, assert_close, ceremony_id_of, enable_withdrawals,
    expect_error, expect_error_in, expect_json, parse_time, span, spawn_gate, text,
    try_confirm_forcing, GateOptions, HOUR, MINUTE,
};

const DESK_MODEL: &str = "6d44ba9b-f6ec-2e49-b930-0c8fe920cb73";
const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[tokio::test]
async fn the_list_shows_each_passkey_with_its_facts() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    assert!(alice.passkeys().await.is_empty(), "no passkey yet");

    let mut desk = FlagAuthenticator::new().with_aaguid(aaguid(DESK_MODEL));
    let registered_at = gate.now();
    let first = alice.register_first(&mut desk, "Desk key").await;
    let created_at = parse_time(&first["created_at"]);
    assert_close(created_at, registered_at, "created_at of the first passkey");
    assert_close(
        parse_time(&first["quarantined_until"]),
        created_at + span(DAY),
        "a first passkey is quarantined for `quarantine` (24h by default)",
    );

    let listed = alice.passkeys().await;
    assert_eq!(listed.len(), 1, "one passkey: {listed:?}");
    let desk_entry = &listed[0];
    assert_eq!(desk_entry["id"], first["id"], "{desk_entry}");
    assert_eq!(desk_entry["name"], "Desk key", "{desk_entry}");
    assert_close(
        parse_time(&desk_entry["created_at"]),
        created_at,
        "listed created_at",
    );
    assert!(
        desk_entry["last_used_at"].is_null(),
        "never used yet: {desk_entry}"
    );
    assert_eq!(desk_entry["backup_eligible"], false, "{desk_entry}");
    assert_eq!(desk_entry["aaguid"], DESK_MODEL, "{desk_entry}");
    assert_eq!(desk_entry["state"], "active", "{desk_entry}");
    assert_close(
        parse_time(&desk_entry["quarantined_until"]),
        created_at + span(DAY),
        "listed quarantined_until",
    );

    // A synced passkey is listed as backup-eligible (here while its addition is pending).
    let mut phone = FlagAuthenticator::synced();
    let pending = alice.register_pending(&mut phone, "Phone").await;
    let listed = alice.passkeys().await;
    assert_eq!(listed.len(), 2, "both passkeys: {listed:?}");
    let phone_entry = alice
        .passkey(&text(&pending["id"]))
        .await
        .expect("the pending passkey is listed");
    assert_eq!(phone_entry["backup_eligible"], true, "{phone_entry}");
    assert_eq!(phone_entry["state"], "pending", "{phone_entry}");
    assert_eq!(phone_entry["name"], "Phone", "{phone_entry}");

    // Every user sees only their own.
    assert!(gate.session("bob").passkeys().await.is_empty());
}

#[tokio::test]
async fn a_passkey_is_renamed_without_a_passkey_and_only_by_its_owner() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let id = text(&alice.register_first(&mut desk, "Desk key").await["id"]);

    let renamed = expect_json(alice.rename(&id, "Office key").await, StatusCode::OK).await;
    assert_eq!(renamed["id"], id.as_str(), "{renamed}");
    assert_eq!(renamed["name"], "Office key", "{renamed}");
    let listed = alice.passkey(&id).await.expect("still listed");
    assert_eq!(listed["name"], "Office key", "{listed}");
    assert_eq!(
        listed["state"], "active",
        "renaming changes nothing else: {listed}"
    );

    // Another user can neither rename nor remove it, nor learn that it exists.
    let bob = gate.session("bob");
    expect_error(
        bob.rename(&id, "Mine now").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(bob.remove(&id).await, StatusCode::NOT_FOUND, "not_found").await;
    let listed = alice.passkey(&id).await.expect("still listed");
    assert_eq!(listed["name"], "Office key", "{listed}");
}

#[tokio::test]
async fn a_second_passkey_waits_for_a_confirmation_with_the_first_and_its_cooling_off() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    gate.advance(2 * HOUR);

    let mut travel = FlagAuthenticator::new();
    let pending = alice.register_pending(&mut travel, "Travel key").await;
    let travel_id = text(&pending["id"]);
    let change_id = text(&pending["change_id"]);
    assert_eq!(pending["name"], "Travel key", "{pending}");
    assert!(
        text(&pending["confirm_url"]).ends_with(&format!("/_stepgate/changes/{change_id}")),
        "the same confirm page as every change: {pending}"
    );
    assert!(
        text(&pending["summary"]).contains("Travel key"),
        "the summary names the passkey: {pending}"
    );
    assert_eq!(alice.passkey_state(&travel_id).await, "pending");

    let change = alice.change(&change_id).await;
    assert_eq!(change["state"], "held", "{change}");
    assert!(
        alice.change_page(&change_id).await.contains("Travel key"),
        "the confirm page says which passkey is being added"
    );

    // Confirmed with the existing passkey; the new one is not even offered.
    let start = alice.start_confirmation(&change_id).await;
    let offered = allowed_credentials(&start);
    assert!(
        offered.contains(&desk.last_credential_id().expect("desk credential")),
        "the active passkey is offered: {start}"
    );
    assert!(
        !offered.contains(&travel.last_credential_id().expect("travel credential")),
        "the pending passkey is not offered for its own addition: {start}"
    );
    let confirmed_at = gate.now();
    let credential = alice.sign(&mut desk, &start);
    let finish = expect_json(
        alice
            .confirm_finish(&change_id, &ceremony_id_of(&start), &credential)
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(finish["state"], "cooling_off", "{finish}");
    let release_at = parse_time(&finish["release_at"]);
    assert_close(
        release_at,
        confirmed_at + span(DAY),
        "release_at = confirmation + add_cooling_off (24h)",
    );

    // Still pending through the cooling-off...
    assert_eq!(alice.passkey_state(&travel_id).await, "pending");
    gate.advance(DAY - MINUTE);
    assert_eq!(alice.passkey_state(&travel_id).await, "pending");

    // ...and active on its own once it is over: no release request needed.
    gate.advance(2 * MINUTE);
    assert_eq!(alice.passkey_state(&travel_id).await, "active");
    assert_eq!(alice.change_state(&change_id).await, "applied");

    // Now it can confirm.
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut travel).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn a_pending_passkey_cannot_confirm_anything() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    let mut travel = FlagAuthenticator::new();
    let pending = alice.register_pending(&mut travel, "Travel key").await;
    let addition = text(&pending["change_id"]);

    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let start = alice.start_confirmation(&withdrawal).await;
    assert!(
        !allowed_credentials(&start)
            .contains(&travel.last_credential_id().expect("travel credential")),
        "a pending passkey is not offered: {start}"
    );
    expect_error(
        try_confirm_forcing(&alice, &withdrawal, &mut travel).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    assert_eq!(alice.change_state(&withdrawal).await, "held");

    // Nor can it approve its own addition.
    expect_error(
        try_confirm_forcing(&alice, &addition, &mut travel).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    assert_eq!(alice.change_state(&addition).await, "held");
    assert_eq!(alice.passkey_state(&text(&pending["id"])).await, "pending");
    gate.upstream
        .assert_saw_nothing("a pending passkey confirmed nothing");
}

#[tokio::test]
async fn cancelling_the_addition_means_the_passkey_never_becomes_active() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;

    // Cancelled before it was confirmed.
    let mut stray = FlagAuthenticator::new();
    let pending = alice.register_pending(&mut stray, "Stray key").await;
    let cancelled = expect_json(
        alice.cancel(&text(&pending["change_id"])).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(
        alice.passkey(&text(&pending["id"])).await.is_none(),
        "a cancelled addition is not listed"
    );

    // Cancelled during its cooling-off.
    let mut tablet = FlagAuthenticator::new();
    let pending = alice.register_pending(&mut tablet, "Tablet").await;
    let tablet_id = text(&pending["id"]);
    let addition = text(&pending["change_id"]);
    let confirmed = alice.confirm(&addition, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    expect_json(alice.cancel(&addition).await, StatusCode::OK).await;
    assert!(alice.passkey(&tablet_id).await.is_none(), "not listed");

    gate.advance(DAY + HOUR);
    assert!(
        alice.passkey(&tablet_id).await.is_none(),
        "a cancelled addition never becomes active"
    );
    assert_eq!(alice.change_state(&addition).await, "cancelled");
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let response = try_confirm_forcing(&alice, &withdrawal, &mut tablet).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{:?}", response);
    assert_eq!(alice.change_state(&withdrawal).await, "held");
}

#[tokio::test]
async fn removing_a_passkey_needs_a_confirmation_and_then_is_immediate() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    let mut phone = FlagAuthenticator::new();
    let phone_id = add_active_passkey(&gate, &alice, &mut desk, &mut phone, "Phone", DAY).await;

    let removal = expect_json(alice.remove(&phone_id).await, StatusCode::ACCEPTED).await;
    assert_eq!(removal["state"], "held", "{removal}");
    let removal_id = text(&removal["change_id"]);
    assert!(
        text(&removal["confirm_url"]).ends_with(&format!("/_stepgate/changes/{removal_id}")),
        "{removal}"
    );
    assert!(removal["summary"].is_string(), "{removal}");
    assert_eq!(
        alice.passkey_state(&phone_id).await,
        "active",
        "asking removes nothing yet"
    );

    // Confirmed with the very passkey being removed: it is still one of the user's passkeys.
    let start = alice.start_confirmation(&removal_id).await;
    assert!(
        allowed_credentials(&start).contains(&phone.last_credential_id().expect("phone")),
        "the passkey being removed is offered: {start}"
    );
    let credential = alice.sign(&mut phone, &start);
    let finish = expect_json(
        alice
            .confirm_finish(&removal_id, &ceremony_id_of(&start), &credential)
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        finish["state"], "applied",
        "tightening is instant: {finish}"
    );

    // Gone at once: no cooling-off, no release request.
    assert!(alice.passkey(&phone_id).await.is_none(), "removed");
    assert_eq!(alice.change_state(&removal_id).await, "applied");
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    expect_error_in(
        try_confirm_forcing(&alice, &withdrawal, &mut phone).await,
        StatusCode::FORBIDDEN,
        &["assertion_invalid", "passkey_disabled"],
    )
    .await;
    assert_eq!(alice.change_state(&withdrawal).await, "held");

    // The remaining passkey still works.
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn removing_the_last_passkey_is_allowed_and_the_next_is_a_first_passkey_again() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let desk_id = text(&alice.register_first(&mut desk, "Desk key").await["id"]);
    gate.advance(3 * DAY);

    let removal = expect_json(alice.remove(&desk_id).await, StatusCode::ACCEPTED).await;
    let finish = alice.confirm(&text(&removal["change_id"]), &mut desk).await;
    assert_eq!(finish["state"], "applied", "{finish}");
    assert!(alice.passkeys().await.is_empty(), "no passkey left");

    // Nothing to step up with, so no step-up: active at once, but quarantined.
    let mut replacement = FlagAuthenticator::new();
    let registered_at = gate.now();
    let first = alice.register_first(&mut replacement, "New key").await;
    assert_close(
        parse_time(&first["quarantined_until"]),
        registered_at + span(DAY),
        "a first passkey again: quarantined",
    );
    let listed = alice.passkeys().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "active", "{listed:?}");
}

#[tokio::test]
async fn an_addition_not_confirmed_in_time_expires_and_the_passkey_never_becomes_active() {
    // `[passkeys] confirm_within` (10m by default) bounds the built-in changes too.
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    let mut late = FlagAuthenticator::new();
    let pending = alice.register_pending(&mut late, "Late key").await;
    let late_id = text(&pending["id"]);
    let addition = text(&pending["change_id"]);

    gate.advance(11 * MINUTE);
    expect_error(
        alice.try_confirm(&addition, &mut desk).await,
        StatusCode::FORBIDDEN,
        "change_expired",
    )
    .await;
    gate.advance(2 * DAY);
    let listed = alice.passkey(&late_id).await;
    assert!(
        listed.as_ref().is_none_or(|p| p["state"] != "active"),
        "an expired addition never activates: {listed:?}"
    );
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let response = try_confirm_forcing(&alice, &withdrawal, &mut late).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{response:?}");
}

#[tokio::test]
async fn with_only_a_disabled_passkey_the_next_registration_is_a_first_passkey() {
    // "Already has an active passkey" decides between first (active, quarantined) and added
    // (pending). A user whose only passkey was disabled as a clone has nothing to confirm an
    // addition with: a pending passkey would lock them out for good.
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let desk_id = text(&alice.register_first(&mut desk, "Desk key").await["id"]);
    let mut clone = desk.clone();
    let first = alice.hold(&enable_withdrawals("k1")).await;
    alice.confirm(&first, &mut desk).await;
    let second = alice.hold(&enable_withdrawals("k2")).await;
    expect_error(
        alice.try_confirm(&second, &mut clone).await,
        StatusCode::FORBIDDEN,
        "passkey_disabled",
    )
    .await;
    assert_eq!(alice.passkey_state(&desk_id).await, "disabled");

    let mut replacement = FlagAuthenticator::new();
    let registered_at = gate.now();
    let registered = alice.register_first(&mut replacement, "New key").await;
    assert_close(
        parse_time(&registered["quarantined_until"]),
        registered_at + span(DAY),
        "quarantined like any first passkey",
    );
}
