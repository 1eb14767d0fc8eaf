//! Origin discipline: an assertion is bound to `public_url`. clientData saying `crossOrigin:
//! true` (the ceremony ran in a frame of another site) or naming any other origin — another
//! port on localhost included — is refused, and the refusal costs the passkey nothing.

use reqwest::StatusCode;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{enable_withdrawals, expect_error, spawn_gate, GateOptions, Session};

/// Registers an honest passkey for a fresh user; returns the session and the authenticator.
async fn user_with_passkey(
    gate: &crate::helpers::TestGate,
    name: &str,
) -> (Session, FlagAuthenticator) {
    let session = gate.session(name);
    let mut key = FlagAuthenticator::new();
    session.register_first(&mut key, "Desk key").await;
    (session, key)
}

#[tokio::test]
async fn a_cross_origin_assertion_is_refused() {
    let gate = spawn_gate(GateOptions::default()).await;
    let (alice, mut key) = user_with_passkey(&gate, "alice").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;

    key.cross_origin = true;
    expect_error(
        alice.try_confirm(&withdrawal, &mut key).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    assert_eq!(alice.change_state(&withdrawal).await, "held");

    key.cross_origin = false;
    let confirmed = alice.confirm(&withdrawal, &mut key).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn an_assertion_for_another_origin_is_refused() {
    let gate = spawn_gate(GateOptions::default()).await;
    let (alice, mut key) = user_with_passkey(&gate, "alice").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;

    let port = gate.origin.rsplit(':').next().expect("a port");
    for foreign in [
        "http://localhost:1".to_string(),
        "http://evil.example".to_string(),
        format!("http://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        key.origin_override = Some(foreign.clone());
        let body = expect_error(
            alice.try_confirm(&withdrawal, &mut key).await,
            StatusCode::FORBIDDEN,
            "assertion_invalid",
        )
        .await;
        assert_eq!(
            alice.change_state(&withdrawal).await,
            "held",
            "{foreign}: {body}"
        );
    }

    key.origin_override = None;
    let confirmed = alice.confirm(&withdrawal, &mut key).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}
