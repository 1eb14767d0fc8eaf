//! `release = "auto"`: the user is told what became of a change the gate forwarded by itself —
//! `change.auto_released` when the exchange accepted it, `change.auto_release_failed` when it
//! answered otherwise — once, and instead of `change.applied`. Nothing is forwarded early.

use reqwest::{Method, StatusCode};

use crate::gate_client::{expect_error, ApiRequest};
use crate::harness::{GateOptions, TestGate, COOLING_OFF};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(the_user_is_told_what_became_of_an_auto_release);

fn auto_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path_and_query: format!("/api/v1/auto-keys/{key_id}"),
        content_type: "application/json".into(),
        body: br#"{"permissions": ["read", "withdraw"]}"#.to_vec(),
    }
}

async fn the_user_is_told_what_became_of_an_auto_release(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let accepted = gate_hold_and_confirm(&gate, &alice, "k1").await;
    let refused = gate_hold_and_confirm(&gate, &alice, "refused-k2").await;

    // Still cooling off: a round forwards nothing.
    assert_eq!(gate.auto_release_round().await, 0);
    assert!(gate.upstream.received().is_empty());

    gate.advance(COOLING_OFF);
    assert_eq!(gate.auto_release_round().await, 2, "both are due");
    assert_eq!(
        gate.auto_release_round().await,
        0,
        "and gone once forwarded"
    );
    let mut received = gate.upstream.received();
    received.sort();
    assert_eq!(
        received,
        vec![
            "PUT /api/v1/auto-keys/k1".to_string(),
            "PUT /api/v1/auto-keys/refused-k2".to_string()
        ]
    );

    gate.deliver_until("both outcomes", |delivered| {
        delivered
            .iter()
            .filter(|a| a.event().starts_with("change.auto_release"))
            .count()
            >= 2
    })
    .await;
    let ok = gate
        .receiver
        .the_delivery("change.auto_released", &accepted);
    assert_eq!(
        ok.payload["change"]["upstream_status"], 200,
        "{:?}",
        ok.payload
    );
    assert_eq!(ok.payload["change"]["state"], "applied");
    let failed = gate
        .receiver
        .the_delivery("change.auto_release_failed", &refused);
    assert_eq!(failed.payload["change"]["upstream_status"], 422);
    assert!(
        gate.receiver.delivered_events("change.applied").is_empty(),
        "an auto-release is reported in its own words, not also as change.applied"
    );

    // The change is applied either way: the exchange decided, and the gate never retries a
    // delivered request.
    expect_error(
        alice
            .release(&gate.address, &auto_withdrawals("refused-k2"), &refused)
            .await,
        StatusCode::CONFLICT,
        "change_already_applied",
    )
    .await;
}

async fn gate_hold_and_confirm(
    gate: &TestGate,
    user: &crate::gate_client::GateUser,
    key_id: &str,
) -> String {
    let change_id = user.hold(&gate.address, &auto_withdrawals(key_id)).await;
    user.confirm(&gate.address, &change_id).await;
    change_id
}
