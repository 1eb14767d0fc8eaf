//! SIGKILL, the crash no shutdown code sees: changes held or cooling off survive it and are
//! released at the right time, and a gate killed while forwarding never causes a second
//! forward without the same `Idempotency-Key`.

use std::os::unix::process::ExitStatusExt;

use reqwest::StatusCode;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::assert_is_release_of;
use crate::gate_client::{enable_withdrawals, expect_error, expect_json};
use crate::harness::{Cluster, COOLING_OFF_PASSED, PATIENCE, RELEASE_LEASE_SECS};

/// The signal number of SIGKILL on every Unix.
const SIGKILL: i32 = 9;

const COOLING_OFF_SECS: i64 = 24 * 3600;

/// Asserts two RFC 3339 times name the same instant. The confirm answer carries the time to
/// the nanosecond while the store keeps milliseconds, so they may differ below a millisecond.
fn assert_same_instant(actual: &Value, expected: &Value, what: &str) {
    let parse = |value: &Value| {
        let text = value
            .as_str()
            .unwrap_or_else(|| panic!("{what}: expected an RFC 3339 string, got {value}"));
        OffsetDateTime::parse(text, &Rfc3339)
            .unwrap_or_else(|e| panic!("{what}: `{text}` is not RFC 3339: {e}"))
    };
    let gap = (parse(actual) - parse(expected)).abs();
    assert!(
        gap < time::Duration::milliseconds(1),
        "{what}: expected {expected}, got {actual}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gate_comes_back_with_held_and_cooling_changes_intact() {
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = cluster.a();
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let held_api = enable_withdrawals("k1");
    let held = alice.hold(&a, &held_api).await;
    let cooling_api = enable_withdrawals("k2");
    let cooling = alice.hold(&a, &cooling_api).await;
    let confirmed = alice.confirm(&a, &cooling).await;
    let release_at = confirmed["release_at"].clone();

    let status = cluster.gates[0].sigkill();
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "the gate must have died of SIGKILL, not exited: {status}"
    );
    assert!(
        reqwest::get(format!("{a}/_stepgate/static/stepgate.css"))
            .await
            .is_err(),
        "the killed gate must not answer any more"
    );

    cluster.restart(0).await;
    assert_eq!(alice.change_state(&a, &held).await, "held");
    let cooling_now = alice.change(&a, &cooling).await;
    assert_eq!(cooling_now["state"], "cooling_off", "{cooling_now}");
    assert_same_instant(
        &cooling_now["release_at"],
        &release_at,
        "the restart must not move release_at",
    );

    // The change held before the crash can still be confirmed, through the new process.
    alice.confirm(&a, &held).await;

    // Five minutes before release_at (the few seconds since the confirmation included), the
    // gate still refuses, and forwards nothing.
    cluster.clock.set_offset(COOLING_OFF_SECS - 300);
    let early = expect_error(
        alice.release(&a, &cooling_api, &cooling).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    assert_same_instant(
        &early["release_at"],
        &release_at,
        "cooling_off's release_at",
    );
    cluster
        .upstream
        .assert_saw_nothing("releases before release_at");

    cluster.clock.set_offset(COOLING_OFF_PASSED);
    expect_json(
        alice.release(&a, &cooling_api, &cooling).await,
        StatusCode::OK,
    )
    .await;
    let received = cluster.upstream.received();
    assert_eq!(received.len(), 1, "one forward: {received:?}");
    assert_is_release_of(&received[0], &cooling_api, &cooling);

    expect_json(alice.release(&a, &held_api, &held).await, StatusCode::OK).await;
    let received = cluster.upstream.received();
    assert_eq!(received.len(), 2, "one forward per change: {received:?}");
    assert_is_release_of(&received[1], &held_api, &held);
    assert_eq!(alice.change_state(&a, &cooling).await, "applied");
    assert_eq!(alice.change_state(&a, &held).await, "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_release_and_answer_never_forwards_without_the_same_idempotency_key() {
    let Some(mut cluster) = Cluster::start(2).await else {
        return;
    };
    let (a, b) = (cluster.a(), cluster.b());
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let api = enable_withdrawals("k1");
    let change_id = alice.hold(&a, &api).await;
    alice.confirm(&a, &change_id).await;
    cluster.clock.set_offset(COOLING_OFF_PASSED);

    // A forwards, the exchange receives the request but never answers, and A dies waiting:
    // nobody knows whether the exchange applied it.
    cluster.upstream.hang_next(&api.path_and_query);
    let in_flight = tokio::spawn(alice.release_request(&a, &api, &change_id).send());
    cluster.upstream.wait_for(&api.path_and_query, 1).await;
    let status = cluster.gates[0].sigkill();
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "A died of SIGKILL: {status}"
    );
    let client_saw = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the in-flight release ends when A dies")
        .expect("the in-flight release task panicked");
    assert!(
        client_saw.is_err(),
        "the client of the killed gate cannot have had an answer: {client_saw:?}"
    );

    // The lease A took is still running: B neither forwards nor pretends to know the outcome.
    assert_eq!(alice.change_state(&b, &change_id).await, "applying");
    let refused = expect_error(
        alice.release(&b, &api, &change_id).await,
        StatusCode::CONFLICT,
        "change_already_applied",
    )
    .await;
    assert_eq!(refused["state"], "applying", "{refused}");
    assert_eq!(
        cluster.upstream.received().len(),
        1,
        "nothing forwarded while the lease runs"
    );

    // Once the lease has run out by the gates' clock, B forwards again, with the same key.
    cluster
        .clock
        .set_offset(COOLING_OFF_PASSED + RELEASE_LEASE_SECS + 60);
    let answer = expect_json(alice.release(&b, &api, &change_id).await, StatusCode::OK).await;
    assert_eq!(answer["upstream"], "ok", "{answer}");
    let received = cluster.upstream.received();
    assert_eq!(
        received.len(),
        2,
        "one forward before the crash, one after: {received:?}"
    );
    for forwarded in &received {
        assert_is_release_of(forwarded, &api, &change_id);
    }
    assert_eq!(
        received[0].body, received[1].body,
        "both forwards carry identical bodies"
    );

    assert_eq!(alice.change_state(&b, &change_id).await, "applied");
    let again = expect_error(
        alice.release(&b, &api, &change_id).await,
        StatusCode::CONFLICT,
        "change_already_applied",
    )
    .await;
    assert_eq!(again["state"], "applied", "{again}");
    assert_eq!(again["upstream_status"], 200, "{again}");
    assert_eq!(
        cluster.upstream.received().len(),
        2,
        "an applied change is never forwarded again"
    );
}
