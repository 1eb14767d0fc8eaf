//! Everything no rule protects streams straight through: tightening a key, other endpoints,
//! multi-megabyte bodies both ways. Nothing is held, connection-scoped headers stay behind and
//! the exchange learns who the client was from `X-Forwarded-*`.

use crate::testdb::Backend;

use axum::http::{Method, StatusCode};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::helpers::{
    expect_json, header_text, pattern_chunks, pattern_sha256, spawn_app, ApiRequest, EIGHT_MIB,
};

async fn removing_the_withdrawal_permission_passes_straight_through(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let tighten = ApiRequest::json(
        Method::PUT,
        "/api/v1/api-keys/k1",
        r#"{"permissions": ["read"]}"#,
    );
    let answer = expect_json(alice.send(&tighten).await, StatusCode::OK).await;
    assert_eq!(answer["upstream"], "ok", "the exchange answered: {answer}");

    let patch = ApiRequest::json(
        Method::PATCH,
        "/api/v1/api-keys/k2",
        r#"{"permissions":["read","trade"],"label":"withdrawals off"}"#,
    );
    expect_json(alice.send(&patch).await, StatusCode::OK).await;

    let received = app.upstream.received();
    assert_eq!(received.len(), 2, "each request reached the exchange once");
    assert_eq!(received[0].method, Method::PUT);
    assert_eq!(received[0].path_and_query, "/api/v1/api-keys/k1");
    assert_eq!(received[0].body.as_ref(), tighten.body.as_slice());
    assert_eq!(received[1].method, Method::PATCH);
    assert_eq!(received[1].body.as_ref(), patch.body.as_slice());
    assert!(
        received[0].headers.get("idempotency-key").is_none(),
        "nothing was released, so no Idempotency-Key"
    );
    assert!(alice.list_changes().await.is_empty(), "nothing was held");
}

async fn other_endpoints_pass_through_without_identity(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let client = app.anonymous();

    // A GET on the protected path: the rule only covers PUT and PATCH.
    let read = client
        .get(app.url("/api/v1/api-keys/k1?fields=permissions"))
        .send()
        .await
        .expect("GET an API key");
    assert_eq!(
        header_text(&read, "x-upstream").as_deref(),
        Some("exchange")
    );
    expect_json(read, StatusCode::OK).await;

    let order = client
        .post(app.url("/api/v1/orders"))
        .header("content-type", "application/json")
        .body(r#"{"side":"buy","pair":"BTC-EUR","size":"0.1"}"#)
        .send()
        .await
        .expect("POST an order");
    expect_json(order, StatusCode::OK).await;

    let received = app.upstream.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].path_and_query,
        "/api/v1/api-keys/k1?fields=permissions"
    );
    assert_eq!(received[1].method, Method::POST);
    assert_eq!(
        received[1].body.as_ref(),
        br#"{"side":"buy","pair":"BTC-EUR","size":"0.1"}"#
    );
}

async fn a_streamed_eight_mebibyte_upload_arrives_intact(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    // No Content-Length: the body is sent chunked, as it is produced.
    let chunks = pattern_chunks(EIGHT_MIB).map(Ok::<_, std::io::Error>);
    let response = alice
        .request(Method::POST, "/api/v1/exports/upload")
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("upload 8 MiB through the gate");
    let answer = expect_json(response, StatusCode::OK).await;

    let expected = pattern_sha256(EIGHT_MIB);
    assert_eq!(
        answer["body_len"], EIGHT_MIB,
        "the exchange's view: {answer}"
    );
    assert_eq!(answer["body_sha256"], expected.as_str());
    let received = app.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.len(), EIGHT_MIB);
    assert!(alice.list_changes().await.is_empty(), "nothing was held");
}

async fn a_streamed_eight_mebibyte_download_arrives_intact(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let response = app
        .anonymous()
        .get(app.url(&format!("/download/{EIGHT_MIB}")))
        .send()
        .await
        .expect("download 8 MiB through the gate");
    assert_eq!(response.status(), StatusCode::OK);

    let mut hasher = Sha256::new();
    let mut length = 0usize;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("read a chunk of the download");
        length += chunk.len();
        hasher.update(&chunk);
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(length, EIGHT_MIB);
    assert_eq!(digest, pattern_sha256(EIGHT_MIB));
}

async fn hop_by_hop_request_headers_stay_behind_and_forwarding_headers_are_set(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let port = app.address.rsplit(':').next().expect("a port").to_string();
    let response = app
        .anonymous()
        .get(app.url("/api/v1/markets"))
        .header("connection", "x-secret, keep-alive")
        .header("x-secret", "hunter2")
        .header("keep-alive", "timeout=30")
        .header("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA==")
        .header("x-request-id", "req-42")
        .header("forwarded", "for=6.6.6.6;host=evil.example;proto=https")
        .send()
        .await
        .expect("send a request with hop-by-hop headers");
    expect_json(response, StatusCode::OK).await;

    let received = app.upstream.received();
    assert_eq!(received.len(), 1);
    let forwarded = &received[0];
    for name in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(
            forwarded.headers.get(name).is_none(),
            "`{name}` is connection-scoped and must not be forwarded: {:?}",
            forwarded.headers
        );
    }
    if let Some(connection) = forwarded.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-secret"),
            "the client's Connection header was forwarded: {connection}"
        );
    }
    assert_eq!(
        forwarded.header("x-request-id"),
        Some("req-42"),
        "end-to-end headers are forwarded"
    );
    assert_eq!(forwarded.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        forwarded.header("forwarded"),
        None,
        "a client's RFC 7239 Forwarded header never reaches the exchange"
    );
    assert_eq!(forwarded.header("x-forwarded-proto"), Some("http"));
    // Either the Host the client asked for or the configured public authority (which does
    // not trust a client-chosen Host) is a faithful X-Forwarded-Host; anything else is not.
    let forwarded_host = forwarded.header("x-forwarded-host");
    let asked = format!("127.0.0.1:{port}");
    let public = format!("localhost:{port}");
    assert!(
        forwarded_host == Some(asked.as_str()) || forwarded_host == Some(public.as_str()),
        "X-Forwarded-Host should be {asked} or {public}, got {forwarded_host:?}"
    );
}

async fn hop_by_hop_response_headers_stay_behind(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };

    // The stand-in really does send them (so this test can fail).
    let direct = reqwest::get(format!("{}/hop-by-hop", app.upstream.url()))
        .await
        .expect("call the upstream directly");
    assert_eq!(
        header_text(&direct, "x-upstream-private").as_deref(),
        Some("internal")
    );

    let response = app
        .anonymous()
        .get(app.url("/hop-by-hop"))
        .send()
        .await
        .expect("call through the gate");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header_text(&response, "x-upstream-public").as_deref(),
        Some("visible"),
        "end-to-end response headers come back"
    );
    assert!(
        response.headers().get("x-upstream-private").is_none(),
        "a header the upstream named in Connection must not reach the client: {:?}",
        response.headers()
    );
    if let Some(connection) = header_text(&response, "connection") {
        assert!(
            !connection.contains("x-upstream-private"),
            "the upstream's Connection header was passed on: {connection}"
        );
    }
}

crate::on_both_backends!(
    removing_the_withdrawal_permission_passes_straight_through,
    other_endpoints_pass_through_without_identity,
    a_streamed_eight_mebibyte_upload_arrives_intact,
    a_streamed_eight_mebibyte_download_arrives_intact,
    hop_by_hop_request_headers_stay_behind_and_forwarding_headers_are_set,
    hop_by_hop_response_headers_stay_behind
);
