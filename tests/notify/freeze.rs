//! Emergency freeze: one call, with nothing but the user's identity, cancels every held and
//! cooling-off change at once and refuses new protected requests until the freeze is lifted;
//! lifting it is loosening, so it needs the user's passkey and then cools off.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::gate_client::{enable_withdrawals, expect_error, expect_json, GateUser};
use crate::harness::{parse_time, sorted_ids, GateOptions, TestGate, COOLING_OFF};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(
    freezing_cancels_pending_changes_and_refuses_new_ones,
    unfreezing_needs_a_passkey_and_cools_off,
);

pub async fn freeze(gate: &TestGate, user: &GateUser) -> Value {
    let response = user
        .request(&gate.address, Method::POST, "/_stepgate/api/account/freeze")
        .send()
        .await
        .expect("send freeze");
    let body = expect_json(response, StatusCode::OK).await;
    assert_eq!(body["frozen"], true, "freeze answer: {body}");
    body
}

/// `POST /_stepgate/api/account/unfreeze`: 202 with the change to confirm.
pub async fn request_unfreeze(gate: &TestGate, user: &GateUser) -> String {
    let response = user
        .request(
            &gate.address,
            Method::POST,
            "/_stepgate/api/account/unfreeze",
        )
        .send()
        .await
        .expect("send unfreeze");
    let body = expect_json(response, StatusCode::ACCEPTED).await;
    let change_id = body["change_id"]
        .as_str()
        .unwrap_or_else(|| panic!("unfreeze answer without a change_id: {body}"))
        .to_string();
    assert_eq!(
        body["confirm_url"],
        format!("{}/_stepgate/changes/{change_id}", gate.origin),
        "unfreeze answer: {body}"
    );
    assert!(
        body["summary"].as_str().is_some_and(|s| !s.is_empty()),
        "unfreeze answer: {body}"
    );
    change_id
}

/// A protected request from `user`, which the freeze must refuse without holding anything.
async fn assert_protected_requests_refused(gate: &TestGate, user: &GateUser, key: &str) {
    let before = gate.upstream.received().len();
    let response = user.send(&gate.address, &enable_withdrawals(key)).await;
    expect_error(response, StatusCode::FORBIDDEN, "account_frozen").await;
    assert_eq!(
        gate.upstream.received().len(),
        before,
        "a refused protected request reached the exchange"
    );
}

async fn changes_of(gate: &TestGate, user: &GateUser) -> Vec<Value> {
    let response = user
        .request(&gate.address, Method::GET, "/_stepgate/api/changes")
        .send()
        .await
        .expect("send GET changes");
    let body = expect_json(response, StatusCode::OK).await;
    body["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("GET changes without a changes array: {body}"))
        .clone()
}

async fn freezing_cancels_pending_changes_and_refuses_new_ones(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let held = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    let cooling_api = enable_withdrawals("k2");
    let cooling = alice.hold(&gate.address, &cooling_api).await;
    alice.confirm(&gate.address, &cooling).await;
    let bob = gate.user("bob");
    let bobs = bob.hold(&gate.address, &enable_withdrawals("k9")).await;

    // Alice, on any device where she is logged in (no gate session, no passkey), stops it all.
    let panicking_alice = gate.user("alice");
    let body = freeze(&gate, &panicking_alice).await;
    let mut expected = vec![held.clone(), cooling.clone()];
    expected.sort();
    assert_eq!(
        sorted_ids(&body["cancelled"]),
        expected,
        "freeze answer: {body}"
    );
    assert_eq!(alice.change_state(&gate.address, &held).await, "cancelled");
    assert_eq!(
        alice.change_state(&gate.address, &cooling).await,
        "cancelled"
    );
    assert!(gate.is_frozen(&alice).await);
    // Only her account.
    assert_eq!(bob.change_state(&gate.address, &bobs).await, "held");
    assert!(!gate.is_frozen(&bob).await);

    // New protected requests are refused and nothing is held.
    let changes_before = changes_of(&gate, &alice).await.len();
    assert_protected_requests_refused(&gate, &alice, "k3").await;
    assert_eq!(changes_of(&gate, &alice).await.len(), changes_before);
    // A frozen account gains no passkeys.
    let response = alice
        .request(
            &gate.address,
            Method::POST,
            "/_stepgate/api/passkeys/register/start",
        )
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("send register/start");
    expect_error(response, StatusCode::FORBIDDEN, "account_frozen").await;
    // The cancelled change is never released, even after its cooling-off.
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    let response = alice.release(&gate.address, &cooling_api, &cooling).await;
    assert!(
        response.status().is_client_error(),
        "releasing a change the freeze cancelled: {}",
        response.status()
    );
    assert!(
        gate.upstream.received().is_empty(),
        "nothing protected reached the exchange: {:?}",
        gate.upstream.received()
    );
    assert!(gate.is_frozen(&alice).await, "a freeze does not wear off");

    // Trading is not a protected request: it still streams through.
    let response = alice
        .request(&gate.address, Method::GET, "/api/v1/balances")
        .send()
        .await
        .expect("send an unprotected request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gate.upstream.received(), ["GET /api/v1/balances"]);
    // Bob is not frozen.
    bob.hold(&gate.address, &enable_withdrawals("k10")).await;

    gate.deliver_all().await;
    let frozen = gate.receiver.delivered_events("account.frozen");
    assert_eq!(frozen.len(), 1, "account.frozen is sent once");
    assert_eq!(frozen[0].payload["user_id"], "alice");
    assert!(frozen[0].signature_valid);
    gate.receiver.the_delivery("change.cancelled", &held);
    gate.receiver.the_delivery("change.cancelled", &cooling);
}

async fn unfreezing_needs_a_passkey_and_cools_off(backend: Backend) {
    let options = GateOptions {
        unfreeze_cooling_off: "6h",
        ..GateOptions::default()
    };
    let Some(gate) = TestGate::start(backend, options).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    freeze(&gate, &alice).await;

    // Asking is not enough: an unconfirmed unfreeze never takes effect.
    let unconfirmed = request_unfreeze(&gate, &alice).await;
    assert!(gate.is_frozen(&alice).await);
    assert_protected_requests_refused(&gate, &alice, "k1").await;
    gate.advance(Duration::from_secs(7 * 3600));
    assert!(
        gate.is_frozen(&alice).await,
        "an unfreeze nobody confirmed lifted the freeze"
    );
    assert_eq!(
        alice.change_state(&gate.address, &unconfirmed).await,
        "expired"
    );

    // A forged assertion does not confirm it.
    let unfreeze = request_unfreeze(&gate, &alice).await;
    assert_ne!(
        unfreeze, unconfirmed,
        "a new unfreeze after the old one expired"
    );
    let options = alice.start_confirmation(&gate.address, &unfreeze).await;
    let mut forged = alice.sign(&options);
    let signature = forged["response"]["signature"]
        .as_str()
        .expect("an assertion has a signature")
        .to_string();
    let mut bytes = signature.into_bytes();
    let middle = bytes.len() / 2;
    bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
    forged["response"]["signature"] = Value::String(String::from_utf8(bytes).expect("ASCII"));
    let response = alice
        .finish_confirmation(&gate.address, &unfreeze, &options, &forged)
        .await;
    assert!(
        response.status().is_client_error(),
        "a forged assertion must be refused, got {}",
        response.status()
    );
    assert_eq!(alice.change_state(&gate.address, &unfreeze).await, "held");

    // Alice's passkey confirms it; then it cools off for unfreeze_cooling_off (6 h here).
    let confirmed_at = gate.now();
    let confirmed = alice.confirm(&gate.address, &unfreeze).await;
    let release_at = parse_time(&confirmed["release_at"]);
    assert_eq!(
        release_at,
        confirmed_at + Duration::from_secs(6 * 3600),
        "an unfreeze cools off for [freeze] unfreeze_cooling_off: {confirmed}"
    );
    gate.advance(Duration::from_secs(6 * 3600 - 60));
    assert!(
        gate.is_frozen(&alice).await,
        "the freeze was lifted before the cooling-off ended"
    );
    assert_protected_requests_refused(&gate, &alice, "k2").await;
    assert_eq!(
        alice.change_state(&gate.address, &unfreeze).await,
        "cooling_off"
    );

    gate.advance(Duration::from_secs(120));
    assert!(
        !gate.is_frozen(&alice).await,
        "the freeze is lifted once the confirmed unfreeze has cooled off"
    );
    assert_eq!(
        alice.change_state(&gate.address, &unfreeze).await,
        "applied"
    );
    // Protected requests are held (not refused) again, and passkeys can be added again.
    alice.hold(&gate.address, &enable_withdrawals("k3")).await;
    let response = alice
        .request(
            &gate.address,
            Method::POST,
            "/_stepgate/api/passkeys/register/start",
        )
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("send register/start");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        gate.upstream.received().is_empty(),
        "the unfreeze itself is never forwarded: {:?}",
        gate.upstream.received()
    );

    gate.deliver_all().await;
    assert_eq!(gate.receiver.delivered_events("account.frozen").len(), 1);
    let unfrozen = gate.receiver.delivered_events("account.unfrozen");
    assert_eq!(unfrozen.len(), 1, "account.unfrozen is sent once");
    assert_eq!(unfrozen[0].payload["user_id"], "alice");
    assert!(unfrozen[0].signature_valid);
}
