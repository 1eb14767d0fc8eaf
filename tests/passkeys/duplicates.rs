//! A credential id is unique across all users: registering a credential the gate already knows,
//! for the same user or another one, is refused with `409 duplicate_credential`.

use reqwest::StatusCode;

use crate::flag_authenticator::FlagAuthenticator;
use crate::helpers::{ceremony_id_of, expect_error, expect_error_in, spawn_gate, GateOptions};

#[tokio::test]
async fn the_same_users_credential_cannot_be_registered_again() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut key = FlagAuthenticator::new();
    alice.register_first(&mut key, "Desk key").await;

    // The same credential (same id, same key), correctly signed over a fresh challenge. For the
    // same user webauthn-rs already refuses it (it is in excludeCredentials), but with an error
    // about algorithms; the gate must still say what happened.
    key.reuse_credential = key.last_credential_id();
    let refused = expect_error(
        alice.register(&mut key, "Desk key again").await,
        StatusCode::CONFLICT,
        "duplicate_credential",
    )
    .await;
    assert_eq!(alice.passkeys().await.len(), 1, "{refused}");
}

#[tokio::test]
async fn another_users_credential_cannot_be_registered() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut key = FlagAuthenticator::new();
    alice.register_first(&mut key, "Desk key").await;

    // Correctly signed over bob's fresh challenge: only the gate's own uniqueness check across
    // users can refuse it.
    key.reuse_credential = key.last_credential_id();
    let bob = gate.session("bob");
    expect_error(
        bob.register(&mut key, "Borrowed key").await,
        StatusCode::CONFLICT,
        "duplicate_credential",
    )
    .await;
    assert!(bob.passkeys().await.is_empty(), "bob got nothing");
    assert_eq!(
        alice.passkeys().await.len(),
        1,
        "alice's passkey is untouched"
    );
}

#[tokio::test]
async fn a_replayed_registration_is_refused_for_another_user() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut key = FlagAuthenticator::new();
    let start = alice.register_start().await;
    let credential = alice.create_credential(&mut key, &start);
    assert_eq!(
        alice
            .register_finish(&ceremony_id_of(&start), &credential, "Desk key")
            .await
            .status(),
        StatusCode::OK
    );

    // Alice's registration, byte for byte, into a fresh ceremony of bob's. Its signature is over
    // alice's challenge, so refusing it as a failed registration (400, before the id is looked
    // at) is as right as refusing it as a duplicate (409); registering it would not be.
    let bob = gate.session("bob");
    let start = bob.register_start().await;
    let response = bob
        .register_finish(&ceremony_id_of(&start), &credential, "Replayed")
        .await;
    if response.status() == StatusCode::CONFLICT {
        expect_error(response, StatusCode::CONFLICT, "duplicate_credential").await;
    } else {
        expect_error_in(response, StatusCode::BAD_REQUEST, &["registration_failed"]).await;
    }
    assert!(
        bob.passkeys().await.is_empty(),
        "nothing registered for bob"
    );
}
