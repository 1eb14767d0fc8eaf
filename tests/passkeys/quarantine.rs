//! Quarantine: a passkey younger than `[passkeys] quarantine` may confirm, but the change's
//! `release_at` is then the later of `now + cooling_off` and `created_at + quarantine`, and the
//! answer and the confirm page say so.

use reqwest::StatusCode;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{
    assert_close, enable_withdrawals, expect_error, expect_json, parse_time, span, spawn_gate,
    GateOptions, HOUR, MINUTE,
};

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[tokio::test]
async fn when_the_cooling_off_ends_later_the_quarantine_changes_nothing() {
    // cooling_off 24h (the rule), quarantine 24h (the default).
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    gate.advance(HOUR);

    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed_at = gate.now();
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    assert_close(
        parse_time(&confirmed["release_at"]),
        confirmed_at + span(DAY),
        "release_at = now + cooling_off (it ends after created_at + quarantine)",
    );
}

#[tokio::test]
async fn a_young_passkey_moves_release_at_to_the_end_of_its_quarantine() {
    let gate = spawn_gate(GateOptions::passkeys("quarantine = \"48h\"")).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let first = alice.register_first(&mut desk, "Desk key").await;
    let created_at = parse_time(&first["created_at"]);
    let quarantine_ends = created_at + span(2 * DAY);
    assert_close(
        parse_time(&first["quarantined_until"]),
        quarantine_ends,
        "quarantined_until = created_at + 48h",
    );
    gate.advance(HOUR);

    let api = enable_withdrawals("k1");
    let withdrawal = alice.hold(&api).await;
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    assert_close(
        parse_time(&confirmed["release_at"]),
        quarantine_ends,
        "release_at = created_at + quarantine, later than now + cooling_off",
    );
    assert_close(
        parse_time(&confirmed["quarantined_until"]),
        quarantine_ends,
        "the answer says the passkey's quarantine set release_at",
    );
    let change = alice.change(&withdrawal).await;
    assert_close(
        parse_time(&change["release_at"]),
        quarantine_ends,
        "the stored change has the same release_at",
    );

    let page = alice.change_page(&withdrawal).await.to_lowercase();
    assert!(
        page.contains("quarantine") || page.contains("new passkey"),
        "the confirm page explains why the wait is longer: {page}"
    );

    // The cooling-off alone would be over here; the quarantine is not.
    gate.advance(DAY + MINUTE);
    expect_error(
        alice.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    gate.advance(DAY - HOUR - 2 * MINUTE);
    expect_error(
        alice.release(&api, &withdrawal).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    gate.upstream
        .assert_saw_nothing("released before the quarantine ended");

    gate.advance(2 * MINUTE);
    expect_json(alice.release(&api, &withdrawal).await, StatusCode::OK).await;
    assert_eq!(
        gate.upstream.received(),
        vec!["PUT /api/v1/api-keys/k1".to_string()],
        "released once the quarantine is over"
    );
}

#[tokio::test]
async fn a_passkey_past_its_quarantine_confirms_with_the_plain_cooling_off() {
    let gate = spawn_gate(GateOptions::passkeys("quarantine = \"48h\"")).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    gate.advance(3 * DAY);

    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed_at = gate.now();
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_close(
        parse_time(&confirmed["release_at"]),
        confirmed_at + span(DAY),
        "an old passkey: release_at = now + cooling_off",
    );
    assert!(
        confirmed["quarantined_until"].is_null(),
        "no quarantine to report: {confirmed}"
    );
}
