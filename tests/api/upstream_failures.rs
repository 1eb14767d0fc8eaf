//! When the exchange is down or slow the gate says so in JSON (502 / 504), never a bare 500.

use crate::testdb::Backend;

use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::helpers::{expect_error, expect_json, spawn_app, spawn_app_with, AppOptions};

async fn a_stopped_upstream_is_502_upstream_unreachable(backend: Backend) {
    let Some(mut app) = spawn_app(backend).await else {
        return;
    };
    app.upstream.stop().await;

    let response = app
        .anonymous()
        .get(app.url("/api/v1/markets"))
        .send()
        .await
        .expect("send a request while the upstream is down");
    expect_error(response, StatusCode::BAD_GATEWAY, "upstream_unreachable").await;

    let alice = app.user("alice");
    let tighten = crate::helpers::ApiRequest::json(
        axum::http::Method::PUT,
        "/api/v1/api-keys/k1",
        r#"{"permissions":["read"]}"#,
    );
    expect_error(
        alice.send(&tighten).await,
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
    )
    .await;
}

async fn a_slow_upstream_is_504_upstream_timeout(backend: Backend) {
    let Some(app) = spawn_app_with(AppOptions {
        backend,
        upstream_timeout: "1s",
        ..AppOptions::default()
    })
    .await
    else {
        return;
    };

    // Fast answers are unaffected by the timeout.
    let fast = app
        .anonymous()
        .get(app.url("/api/v1/markets"))
        .send()
        .await
        .expect("send a fast request");
    expect_json(fast, StatusCode::OK).await;

    let started = Instant::now();
    let response = app
        .anonymous()
        .get(app.url("/slow"))
        .send()
        .await
        .expect("send a request the upstream answers slowly");
    let waited = started.elapsed();
    expect_error(response, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "the gate gives up after about the 1s upstream_timeout, took {waited:?}"
    );
}

crate::on_both_backends!(
    a_stopped_upstream_is_502_upstream_unreachable,
    a_slow_upstream_is_504_upstream_timeout
);
