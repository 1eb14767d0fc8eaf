//! The gate session across time: ceremonies are bound to the session cookie, so a session the
//! gate itself just issued must stay usable however the injected clock relates to the wall
//! clock. Every passkey flow that waits out a cooling-off and then runs a ceremony needs this.

use std::time::Duration;

use time::OffsetDateTime;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{enable_withdrawals, spawn_gate, GateOptions, HOUR};

#[tokio::test]
async fn a_ceremony_finishes_after_the_clock_has_moved_on() {
    // The manual clock starts at the wall clock, as in the other suites, and then moves on by
    // two hours: less than a cooling-off.
    let gate = spawn_gate(GateOptions {
        clock_start: Some(OffsetDateTime::now_utc()),
        ..GateOptions::default()
    })
    .await;
    gate.advance(2 * HOUR);

    // A brand-new session, so nothing issued before the move is involved.
    let alice = gate.session("alice");
    let mut desk = FlagAuthenticator::new();
    alice.register_first(&mut desk, "Desk key").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    // And a session that lived through a day of the clock (its holder active all along).
    gate.advance(Duration::from_secs(24 * 3600));
    let withdrawal = alice.hold(&enable_withdrawals("k2")).await;
    let confirmed = alice.confirm(&withdrawal, &mut desk).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}
