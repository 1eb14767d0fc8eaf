//! One approval, one release: many simultaneous releases of the same due change reach the
//! exchange exactly once.

use crate::testdb::Backend;

use axum::http::StatusCode;
use serde_json::Value;

use crate::helpers::{enable_withdrawals, spawn_app};

const RELEASES: usize = 50;

async fn fifty_concurrent_releases_of_one_change_reach_the_exchange_once(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let change = enable_withdrawals("k1");
    let (id, release_at) = alice.hold_and_confirm(&change).await;
    app.clock.set(release_at);

    // Every task waits at the barrier so the requests leave together.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(RELEASES));
    let tasks: Vec<_> = (0..RELEASES)
        .map(|_| {
            let (alice, change, id, barrier) =
                (alice.clone(), change.clone(), id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let response = alice.release(&change, &id).await;
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, body)
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(RELEASES);
    for task in tasks {
        outcomes.push(task.await.expect("a release task panicked"));
    }

    let released = outcomes
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    let already_applied = outcomes
        .iter()
        .filter(|(status, body)| {
            *status == StatusCode::CONFLICT && body["error"] == "change_already_applied"
        })
        .count();
    let others: Vec<_> = outcomes
        .iter()
        .filter(|(status, body)| {
            *status != StatusCode::OK
                && !(*status == StatusCode::CONFLICT && body["error"] == "change_already_applied")
        })
        .collect();
    assert_eq!(app.upstream.received().len(), 1, "exactly one forwarded");
    assert_eq!(released, 1, "exactly one release succeeds");
    assert_eq!(
        already_applied,
        RELEASES - 1,
        "all others are 409 change_already_applied; unexpected answers: {others:?}"
    );
    assert_eq!(alice.change_state(&id).await, "applied");
}

crate::on_both_backends!(fifty_concurrent_releases_of_one_change_reach_the_exchange_once);
