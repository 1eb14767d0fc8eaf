//! Clone detection and what every successful assertion updates: a signature counter that does
//! not move forward disables the credential (it is no longer offered and cannot confirm), and
//! the stored counter and last use move with every assertion.

use reqwest::StatusCode;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{
    add_active_passkey, allowed_credentials, assert_close, enable_withdrawals, expect_error,
    expect_error_in, parse_time, spawn_gate, try_confirm_forcing, GateOptions, HOUR,
};

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[tokio::test]
async fn a_replayed_counter_disables_the_credential() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let desk_id = alice.register_first(&mut desk, "Desk key").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut phone = FlagAuthenticator::new();
    add_active_passkey(&gate, &alice, &mut desk, &mut phone, "Phone", DAY).await;

    // Someone copies the desk key's secret; then the real one is used...
    let mut clone = desk.clone();
    let first = alice.hold(&enable_withdrawals("k1")).await;
    alice.confirm(&first, &mut desk).await;

    // ...and the copy signs with a counter the gate has already seen.
    let second = alice.hold(&enable_withdrawals("k2")).await;
    let refused = expect_error(
        alice.try_confirm(&second, &mut clone).await,
        StatusCode::FORBIDDEN,
        "passkey_disabled",
    )
    .await;
    assert_eq!(alice.change_state(&second).await, "held", "{refused}");
    assert_eq!(alice.passkey_state(&desk_id).await, "disabled");
    // The clone is a security event, and it is in the audit log for later notification.
    let events = gate
        .store
        .security_events_of("alice")
        .await
        .expect("security events");
    let desk_uuid = uuid::Uuid::parse_str(&desk_id).expect("passkey id");
    assert_eq!(
        events,
        vec![("passkey.disabled".to_string(), Some(desk_uuid))]
    );
    let (audit, _) = gate.store.audit_log().await.expect("audit log");
    assert_eq!(
        audit
            .iter()
            .filter(|row| row.kind == "passkey.disabled")
            .count(),
        1,
        "one passkey.disabled audit row"
    );

    // Disabled for good: not offered, and refused even with a counter that moves forward again.
    let start = alice.start_confirmation(&second).await;
    assert!(
        !allowed_credentials(&start).contains(&desk.last_credential_id().expect("desk")),
        "a disabled passkey is not offered: {start}"
    );
    expect_error_in(
        try_confirm_forcing(&alice, &second, &mut desk).await,
        StatusCode::FORBIDDEN,
        &["passkey_disabled", "assertion_invalid"],
    )
    .await;
    assert_eq!(alice.change_state(&second).await, "held");

    // The user's other passkey is untouched.
    let confirmed = alice.confirm(&second, &mut phone).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn the_counter_and_last_use_are_updated_after_every_assertion() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    let desk_id = alice.register_first(&mut desk, "Desk key").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let listed = alice.passkey(&desk_id).await.expect("listed");
    assert!(listed["last_used_at"].is_null(), "unused: {listed}");

    gate.advance(HOUR);
    let first = alice.hold(&enable_withdrawals("k1")).await;
    let used_at = gate.now();
    alice.confirm(&first, &mut desk).await;
    let listed = alice.passkey(&desk_id).await.expect("listed");
    assert_close(parse_time(&listed["last_used_at"]), used_at, "first use");

    gate.advance(HOUR);
    let second = alice.hold(&enable_withdrawals("k2")).await;
    let used_again_at = gate.now();
    alice.confirm(&second, &mut desk).await;
    let listed = alice.passkey(&desk_id).await.expect("listed");
    assert_close(
        parse_time(&listed["last_used_at"]),
        used_again_at,
        "second use",
    );
    assert_eq!(desk.counter(), 2);

    // The gate stored 2, not just the first counter it saw: a repeated 2 is a clone.
    desk.set_counter(1);
    let third = alice.hold(&enable_withdrawals("k3")).await;
    expect_error(
        alice.try_confirm(&third, &mut desk).await,
        StatusCode::FORBIDDEN,
        "passkey_disabled",
    )
    .await;
    assert_eq!(alice.passkey_state(&desk_id).await, "disabled");
}

#[tokio::test]
async fn an_authenticator_without_a_counter_is_not_a_clone() {
    // Counter 0 on every assertion means "no counter" (as synced passkeys do): never a clone.
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut synced = FlagAuthenticator::synced();
    let id = alice.register_first(&mut synced, "Cloud passkey").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    for key in ["k1", "k2"] {
        // set_counter(u32::MAX) makes the next assertion wrap to 0.
        synced.set_counter(u32::MAX);
        let change = alice.hold(&enable_withdrawals(key)).await;
        let confirmed = alice.confirm(&change, &mut synced).await;
        assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    }
    assert_eq!(alice.passkey_state(&id).await, "active");
}
