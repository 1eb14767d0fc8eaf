//! Holding: what a held request's answer says, what the gate stores and shows, and which
//! bodies it refuses outright (too large, not JSON) without ever forwarding them.

use crate::testdb::Backend;

use std::time::Duration;

use axum::http::{Method, StatusCode};

use crate::helpers::{
    assert_close, enable_withdrawals, expect_error, header_text, parse_rfc3339, spawn_app,
    ApiRequest,
};

async fn a_held_change_is_described_in_the_403_and_never_reaches_the_exchange(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let held = alice.hold(&enable_withdrawals("k1")).await;
    let id = &held.change_id;
    assert_eq!(
        held.www_authenticate,
        format!(r#"StepUp realm="stepgate", error="step_up_required", change_id="{id}""#)
    );
    let body = &held.body;
    assert_eq!(
        body["confirm_url"],
        format!("{}/_stepgate/changes/{id}", app.origin),
        "the confirm URL is on the public origin: {body}"
    );
    assert_eq!(body["summary"], "Enable withdrawals on API key k1");
    assert_eq!(body["cooling_off_seconds"], 86_400);
    assert_close(
        parse_rfc3339(&body["confirm_before"]),
        app.now() + Duration::from_secs(600),
        "confirm_before is the hold time plus confirm_within (10m)",
    );

    // PATCH is covered by the same rule; each hold is its own change. (A second later, so
    // "newest first" has a newest.)
    app.clock.advance(Duration::from_secs(1));
    let patch = ApiRequest::json(
        Method::PATCH,
        "/api/v1/api-keys/k2",
        r#"{"permissions":["withdraw"]}"#,
    );
    let second = alice.hold(&patch).await;
    assert_ne!(second.change_id, held.change_id);
    assert_eq!(second.body["summary"], "Enable withdrawals on API key k2");

    app.upstream.assert_saw_nothing("after two holds");

    let change: serde_json::Value =
        crate::helpers::expect_json(alice.get_change(id).await, StatusCode::OK).await;
    assert_eq!(change["state"], "held");
    assert_eq!(change["summary"], "Enable withdrawals on API key k1");
    assert_close(
        parse_rfc3339(&change["created_at"]),
        app.now(),
        "created_at",
    );

    let listed = alice.list_changes().await;
    let ids: Vec<&str> = listed.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(
        ids,
        vec![second.change_id.as_str(), id.as_str()],
        "newest first"
    );
}

async fn gate_answers_are_never_cached(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let hold = alice.send(&enable_withdrawals("k1")).await;
    let list = alice
        .request(Method::GET, "/_stepgate/api/changes")
        .send()
        .await
        .expect("GET changes");
    let page = alice
        .request(Method::GET, "/_stepgate/passkeys")
        .send()
        .await
        .expect("GET passkeys page");
    let unauthenticated = app
        .anonymous()
        .get(app.url("/_stepgate/api/changes"))
        .send()
        .await
        .expect("GET changes without identity");

    for response in [hold, list, page, unauthenticated] {
        let cache_control = header_text(&response, "cache-control").unwrap_or_default();
        assert!(
            cache_control.contains("no-store"),
            "{} {}: Cache-Control must be no-store, got `{cache_control}`",
            response.status(),
            response.url().path()
        );
    }
}

async fn a_body_over_the_limit_is_refused_413_and_never_forwarded(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    // Valid JSON asking for withdraw, padded past 64 KiB.
    let padding = "x".repeat(64 * 1024);
    let too_large = enable_withdrawals("k1").with_body(&format!(
        r#"{{"permissions":["read","withdraw"],"note":"{padding}"}}"#
    ));
    let response = alice.send(&too_large).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;

    // The same, streamed without a Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = too_large
        .body
        .chunks(8 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let streamed = alice
        .request(Method::PUT, "/api/v1/api-keys/k1")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("send a streamed oversized body");
    expect_error(streamed, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;

    app.upstream
        .assert_saw_nothing("after two oversized bodies");
    assert!(
        alice.list_changes().await.is_empty(),
        "nothing was held either"
    );
}

async fn a_body_that_is_not_strict_json_is_refused_400_and_never_forwarded(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let change = enable_withdrawals("k1");

    let not_json = change.with_body(r#"permissions=withdraw"#);
    expect_error(
        alice.send(&not_json).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    )
    .await;

    // Duplicate keys: a parser that keeps the first and one that keeps the last disagree.
    let duplicate_keys =
        change.with_body(r#"{"permissions":["read"],"permissions":["read","withdraw"]}"#);
    expect_error(
        alice.send(&duplicate_keys).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    )
    .await;

    let truncated = change.with_body(r#"{"permissions":["withdraw""#);
    expect_error(
        alice.send(&truncated).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    )
    .await;

    app.upstream
        .assert_saw_nothing("after three invalid bodies");
    assert!(
        alice.list_changes().await.is_empty(),
        "nothing was held either"
    );
}

/// `Connection` makes the named headers hop-by-hop, so the gate would drop them before
/// forwarding. On a protected route that could strip the very `Content-Type` the decision was
/// made on, letting the exchange read the body some other way: refused outright.
async fn a_connection_header_naming_other_headers_is_refused_on_protected_routes(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let removing = ApiRequest {
        method: Method::PUT,
        path_and_query: "/api/v1/api-keys/k1".into(),
        content_type: "application/json".into(),
        body: r#"{"permissions":["read"]}"#.into(),
    };
    for connection in ["content-type", "keep-alive, Content-Type", "x-anything"] {
        let response = alice
            .request(removing.method.clone(), &removing.path_and_query)
            .header("content-type", &removing.content_type)
            .header("connection", connection)
            .body(removing.body.clone())
            .send()
            .await
            .expect("send");
        expect_error(response, StatusCode::BAD_REQUEST, "bad_request").await;
    }
    assert!(app.upstream.received().is_empty(), "nothing was forwarded");
    // The connection options themselves are fine.
    let response = alice
        .request(removing.method.clone(), &removing.path_and_query)
        .header("content-type", &removing.content_type)
        .header("connection", "keep-alive")
        .body(removing.body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.upstream.received().len(), 1);
}

crate::on_both_backends!(
    a_connection_header_naming_other_headers_is_refused_on_protected_routes,
    a_held_change_is_described_in_the_403_and_never_reaches_the_exchange,
    gate_answers_are_never_cached,
    a_body_over_the_limit_is_refused_413_and_never_forwarded,
    a_body_that_is_not_strict_json_is_refused_400_and_never_forwarded
);
