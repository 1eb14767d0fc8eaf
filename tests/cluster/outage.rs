//! The database cut off under a running gate: everything that needs it fails closed with
//! 503 JSON (nothing protected is forwarded), pass-through keeps streaming, and the gate
//! recovers by itself when the database is reachable again.

use std::time::Instant;

use reqwest::{Method, StatusCode};

use crate::assert_is_release_of;
use crate::forwarder::TcpForwarder;
use crate::gate_client::{enable_withdrawals, expect_error, expect_json, restrict_to_reading};
use crate::harness::{Cluster, COOLING_OFF_PASSED, PATIENCE};
use crate::testdb::{Backend, TestDb};

/// A one-gate cluster whose gate reaches PostgreSQL only through a forwarder the test can
/// cut; `None` when PostgreSQL is unreachable outside CI.
pub async fn cluster_behind_forwarder() -> Option<(Cluster, TcpForwarder)> {
    let database = TestDb::new(Backend::Postgres).await?;
    let mut via_forwarder = url::Url::parse(&database.url).expect("the database URL parses");
    let target = format!(
        "{}:{}",
        via_forwarder
            .host_str()
            .expect("the database URL has a host"),
        via_forwarder.port().unwrap_or(5432)
    );
    let forwarder = TcpForwarder::start(target).await;
    via_forwarder
        .set_host(Some("127.0.0.1"))
        .expect("set the forwarder's host");
    via_forwarder
        .set_port(Some(forwarder.port))
        .expect("set the forwarder's port");
    let cluster = Cluster::start_on(database, via_forwarder.to_string(), 1, "1s").await;
    Some((cluster, forwarder))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_cut_off_protected_routes_fail_closed_and_others_pass() {
    let Some((cluster, mut forwarder)) = cluster_behind_forwarder().await else {
        return;
    };
    let a = cluster.a();
    let alice = cluster.user("alice");

    // A confirmed and due change, so the most dangerous request (a release) is tried too.
    alice.register_passkey(&a).await;
    let due_api = enable_withdrawals("k1");
    let due = alice.hold(&a, &due_api).await;
    alice.confirm(&a, &due).await;
    cluster.clock.set_offset(COOLING_OFF_PASSED);

    forwarder.cut().await;

    let held_api = enable_withdrawals("k2");
    let started = Instant::now();
    expect_error(
        alice.send(&a, &held_api).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;
    assert!(
        started.elapsed() < PATIENCE,
        "the refusal must come after about database_timeout, took {:?}",
        started.elapsed()
    );
    expect_error(
        alice.release(&a, &due_api, &due).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;
    cluster
        .upstream
        .assert_saw_nothing("protected requests while the database is away");

    let list = alice
        .request(&a, Method::GET, "/_stepgate/api/changes")
        .send()
        .await
        .expect("send GET changes");
    expect_error(
        list,
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;
    let page = alice
        .request(&a, Method::GET, "/_stepgate/changes")
        .header("accept", "text/html")
        .send()
        .await
        .expect("send GET the changes page");
    assert_eq!(
        page.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the changes page without a database"
    );

    // Pass-through needs no database: a market query and a tightening both reach the exchange.
    let ticker = alice
        .request(&a, Method::GET, "/api/v1/ticker?symbol=BTC-EUR")
        .send()
        .await
        .expect("send a pass-through GET");
    expect_json(ticker, StatusCode::OK).await;
    let tighten = restrict_to_reading("k3");
    expect_json(alice.send(&a, &tighten).await, StatusCode::OK).await;
    let received = cluster.upstream.received();
    assert_eq!(
        received
            .iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect::<Vec<_>>(),
        [
            "GET /api/v1/ticker?symbol=BTC-EUR",
            "PUT /api/v1/api-keys/k3"
        ],
        "only the pass-through requests reached the exchange"
    );
    assert_eq!(received[1].body.as_ref(), tighten.body.as_slice());

    // Back on the same address: the very next protected request is served by the same
    // process, whose pool reconnects on demand. No restart, no retry.
    forwarder.restore().await;
    let recovered = alice.send(&a, &held_api).await;
    let held = expect_error(recovered, StatusCode::FORBIDDEN, "step_up_required").await;
    assert!(held["change_id"].is_string(), "{held}");

    expect_json(alice.release(&a, &due_api, &due).await, StatusCode::OK).await;
    let received = cluster.upstream.received();
    assert_eq!(received.len(), 3, "{received:?}");
    assert_is_release_of(&received[2], &due_api, &due);
}
