//! Two instances on one database behave as one gate: a ceremony started on one is finished
//! on the other, sixty-four racing releases across both forward once, and a cancel through
//! one is what the other sees next.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Barrier;

use crate::assert_is_release_of;
use crate::gate_client::{enable_withdrawals, expect_error, expect_json, ApiRequest, GateUser};
use crate::harness::{Cluster, COOLING_OFF_PASSED};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_held_on_one_instance_is_confirmed_through_another() {
    let Some(cluster) = Cluster::start(2).await else {
        return;
    };
    let (a, b) = (cluster.a(), cluster.b());
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let api = enable_withdrawals("k1");
    let change_id = alice.hold(&a, &api).await;
    assert_eq!(alice.change_state(&b, &change_id).await, "held");

    // The ceremony's state lives in the database, bound to the session cookie, so B can
    // finish what A started.
    let options = alice.start_confirmation(&a, &change_id).await;
    let credential = alice.sign(&options);
    let finished = alice
        .finish_confirmation(&b, &change_id, &options, &credential)
        .await;
    let confirmed = expect_json(finished, StatusCode::OK).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    assert_eq!(alice.change_state(&a, &change_id).await, "cooling_off");

    expect_error(
        alice.release(&b, &api, &change_id).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    cluster.upstream.assert_saw_nothing("before release_at");

    cluster.clock.set_offset(COOLING_OFF_PASSED);
    let answer = expect_json(alice.release(&b, &api, &change_id).await, StatusCode::OK).await;
    assert_eq!(
        answer["upstream"], "ok",
        "the exchange's own answer: {answer}"
    );

    let received = cluster.upstream.received();
    assert_eq!(received.len(), 1, "exactly one forward: {received:?}");
    assert_is_release_of(&received[0], &api, &change_id);
    assert_eq!(alice.change_state(&a, &change_id).await, "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_releases_across_two_instances_reach_the_upstream_once() {
    // A race only shows a broken guard when the racers overlap, which is a matter of luck:
    // several changes, each raced by sixty-four releases, make a broken guard show reliably.
    const ROUNDS: usize = 4;
    let Some(cluster) = Cluster::start(2).await else {
        return;
    };
    let (a, b) = (cluster.a(), cluster.b());
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let mut changes = Vec::new();
    for round in 0..ROUNDS {
        let api = enable_withdrawals(&format!("k{round}"));
        let change_id = alice.hold(&a, &api).await;
        alice.confirm(&b, &change_id).await;
        changes.push((api, change_id));
    }
    cluster.clock.set_offset(COOLING_OFF_PASSED);

    for (round, (api, change_id)) in changes.iter().enumerate() {
        race_releases(&alice, [&a, &b], api, change_id).await;
        let received = cluster.upstream.received();
        assert_eq!(
            received.len(),
            round + 1,
            "the upstream must see each change exactly once: {received:?}"
        );
        assert_is_release_of(&received[round], api, change_id);
        assert_eq!(alice.change_state(&a, change_id).await, "applied");
        assert_eq!(alice.change_state(&b, change_id).await, "applied");
    }
}

/// Sends sixty-four releases of one due change at once, alternating between the two gates,
/// and asserts exactly one succeeded and every other one was told the change is taken.
async fn race_releases(alice: &GateUser, gates: [&str; 2], api: &ApiRequest, change_id: &str) {
    const RELEASES: usize = 64;
    // Each task first reads the change (opening its own connection to its instance and
    // warming that instance's database pool), then waits at the barrier, so the releases
    // arrive together on warm connections instead of trickling in behind TCP handshakes.
    let barrier = Arc::new(Barrier::new(RELEASES));
    let tasks: Vec<_> = (0..RELEASES)
        .map(|i| {
            let gate = gates[i % 2].to_string();
            let (alice, api, change_id, barrier) = (
                alice.clone(),
                api.clone(),
                change_id.to_string(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                assert_eq!(alice.change_state(&gate, &change_id).await, "cooling_off");
                barrier.wait().await;
                let response = alice.release(&gate, &api, &change_id).await;
                let status = response.status();
                let text = response.text().await.expect("read the release answer");
                (gate, status, text)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("a release task panicked"));
    }

    let successes = answers
        .iter()
        .filter(|(_, status, _)| *status == StatusCode::OK)
        .count();
    assert_eq!(
        successes, 1,
        "exactly one release may succeed; answers: {answers:#?}"
    );
    for (gate, status, text) in &answers {
        if *status == StatusCode::OK {
            continue;
        }
        let body: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{gate}: {status} with a non-JSON body ({e}): {text}"));
        assert!(
            *status == StatusCode::CONFLICT
                && body["error"] == "change_already_applied"
                && (body["state"] == "applying" || body["state"] == "applied"),
            "{gate}: a losing release must be 409 change_already_applied, got {status} {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_one_instance_is_seen_at_once_by_the_other() {
    let Some(cluster) = Cluster::start(2).await else {
        return;
    };
    let (a, b) = (cluster.a(), cluster.b());
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let api = enable_withdrawals("k1");
    let change_id = alice.hold(&a, &api).await;
    alice.confirm(&a, &change_id).await;
    assert_eq!(alice.change_state(&b, &change_id).await, "cooling_off");

    let cancelled = expect_json(alice.cancel(&a, &change_id).await, StatusCode::OK).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    // Nothing in between: no cache on B may still say cooling_off.
    assert_eq!(alice.change_state(&b, &change_id).await, "cancelled");

    cluster.clock.set_offset(COOLING_OFF_PASSED);
    expect_error(
        alice.release(&b, &api, &change_id).await,
        StatusCode::FORBIDDEN,
        "change_cancelled",
    )
    .await;
    cluster
        .upstream
        .assert_saw_nothing("a cancelled change released through the other instance");
}
