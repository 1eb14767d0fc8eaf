//! Who the caller is: protected routes and gate pages refuse anyone the gate cannot identify
//! (401 `unauthenticated`), in each identity mode, while unprotected traffic needs no identity.

use crate::testdb::Backend;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::json;

use crate::helpers::{
    enable_withdrawals, expect_error, expect_json, jwt, spawn_app, spawn_app_with, AppOptions,
    IdentityKind, TestApp, HMAC_SECRET, JWT_COOKIE, JWT_SECRET,
};

/// Sends the protected change and a gate API call with `identity` as the value of `header`;
/// both must be 401 `unauthenticated`.
async fn assert_refused(app: &TestApp, header: &str, identity: &str, what: &str) {
    let change = enable_withdrawals("k1");
    let client = app.anonymous();
    let protected = client
        .put(app.url(&change.path_and_query))
        .header("content-type", "application/json")
        .header(header, identity)
        .body(change.body.clone())
        .send()
        .await
        .expect("send the protected request");
    let status = protected.status();
    let body = protected.text().await.expect("body");
    assert!(
        status == StatusCode::UNAUTHORIZED && body.contains("\"unauthenticated\""),
        "{what}: the protected route must answer 401 unauthenticated, got {status} {body}"
    );
    let api = client
        .get(app.url("/_stepgate/api/changes"))
        .header(header, identity)
        .send()
        .await
        .expect("send the gate API request");
    let status = api.status();
    let body = api.text().await.expect("body");
    assert!(
        status == StatusCode::UNAUTHORIZED && body.contains("\"unauthenticated\""),
        "{what}: the gate API must answer 401 unauthenticated, got {status} {body}"
    );
}

async fn without_identity_protected_routes_and_gate_pages_are_401_but_other_traffic_passes(
    backend: Backend,
) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let client = app.anonymous();
    let change = enable_withdrawals("k1");

    let protected = client
        .put(app.url(&change.path_and_query))
        .header("content-type", "application/json")
        .body(change.body.clone())
        .send()
        .await
        .expect("send the protected request");
    expect_error(protected, StatusCode::UNAUTHORIZED, "unauthenticated").await;

    let id = uuid::Uuid::new_v4();
    for (method, path) in [
        (Method::GET, "/_stepgate/api/changes".to_string()),
        (Method::GET, format!("/_stepgate/api/changes/{id}")),
        (
            Method::POST,
            "/_stepgate/api/passkeys/register/start".to_string(),
        ),
        (Method::POST, format!("/_stepgate/api/changes/{id}/cancel")),
    ] {
        let response = client
            .request(method.clone(), app.url(&path))
            .send()
            .await
            .expect("send the gate request");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert!(
            status == StatusCode::UNAUTHORIZED && body.contains("\"unauthenticated\""),
            "{method} {path} without identity: expected 401 unauthenticated, got {status} {body}"
        );
    }

    assert_refused(&app, "x-user-id", "", "an empty identity header").await;
    app.upstream
        .assert_saw_nothing("after requests without identity");

    // Traffic no rule protects does not need an identity.
    let markets = client
        .get(app.url("/api/v1/markets?pair=BTC-EUR"))
        .send()
        .await
        .expect("send an unprotected request");
    expect_json(markets, StatusCode::OK).await;
    let received = app.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path_and_query, "/api/v1/markets?pair=BTC-EUR");
}

async fn gate_pages_without_identity_are_401_json(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let client = app.anonymous();
    let id = uuid::Uuid::new_v4();
    for path in [
        "/_stepgate/passkeys".to_string(),
        format!("/_stepgate/changes/{id}"),
    ] {
        let response = client
            .get(app.url(&path))
            .send()
            .await
            .expect("send the page request");
        expect_error(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    }
}

async fn signed_identity_refuses_unsigned_forged_and_stale_values(backend: Backend) {
    let Some(app) = spawn_app_with(AppOptions {
        backend,
        identity: IdentityKind::SignedHeader,
        ..AppOptions::default()
    })
    .await
    else {
        return;
    };

    // A correctly signed identity works.
    let alice = app.user("alice");
    let held = alice.hold(&enable_withdrawals("k1")).await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");

    let now = app.now();
    let signed = stepgate::identity::sign_identity_header("alice", HMAC_SECRET.as_bytes(), now);
    assert_refused(&app, "x-user-id", "alice", "an unsigned user id").await;
    let other_secret = "not-the-edge-secret-but-just-as-long-0123456789";
    assert_refused(
        &app,
        "x-user-id",
        &stepgate::identity::sign_identity_header("alice", other_secret.as_bytes(), now),
        "a value signed with another secret",
    )
    .await;
    assert_refused(
        &app,
        "x-user-id",
        &signed.replacen("alice", "mallory", 1),
        "alice's signature on mallory's name",
    )
    .await;
    let (rest, signature) = signed.rsplit_once('.').expect("user.ts.sig");
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    assert_refused(
        &app,
        "x-user-id",
        &format!("{rest}.{flipped}{}", &signature[1..]),
        "a tampered signature",
    )
    .await;
    assert_refused(
        &app,
        "x-user-id",
        &stepgate::identity::sign_identity_header(
            "alice",
            HMAC_SECRET.as_bytes(),
            now - Duration::from_secs(3600),
        ),
        "a value signed an hour ago",
    )
    .await;

    // A captured header goes stale as the gate's clock moves on.
    app.clock.advance(Duration::from_secs(3600));
    assert_refused(
        &app,
        "x-user-id",
        &signed,
        "a captured header, an hour later",
    )
    .await;

    app.upstream.assert_saw_nothing("after forged identities");
    assert_eq!(alice.list_changes().await.len(), 1, "only alice's own hold");
}

async fn jwt_identity_accepts_valid_tokens_and_refuses_expired_or_badly_signed_ones(
    backend: Backend,
) {
    let Some(app) = spawn_app_with(AppOptions {
        backend,
        identity: IdentityKind::Jwt,
        ..AppOptions::default()
    })
    .await
    else {
        return;
    };
    let now = app.now().unix_timestamp();

    // A valid bearer token identifies alice; her hold is hers alone.
    let alice = app.user("alice");
    let held = alice.hold(&enable_withdrawals("k1")).await;
    let bob = app.user("bob");
    expect_error(
        bob.get_change(&held.change_id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // The same token from the session cookie works too.
    let token = jwt(&json!({"sub": "alice", "exp": now + 3600}), JWT_SECRET);
    let via_cookie = app
        .anonymous()
        .get(app.url("/_stepgate/api/changes"))
        .header("cookie", format!("{JWT_COOKIE}={token}"))
        .send()
        .await
        .expect("GET changes with the session cookie");
    let listed = expect_json(via_cookie, StatusCode::OK).await;
    assert_eq!(
        listed["changes"][0]["id"], held.change_id,
        "the cookie identifies alice: {listed}"
    );

    let bearer = |token: String| format!("Bearer {token}");
    assert_refused(
        &app,
        "authorization",
        &bearer(jwt(&json!({"sub": "alice", "exp": now - 3600}), JWT_SECRET)),
        "an expired token",
    )
    .await;
    assert_refused(
        &app,
        "authorization",
        &bearer(jwt(
            &json!({"sub": "alice", "exp": now + 3600}),
            "some-other-secret-that-is-long-enough-0123456789",
        )),
        "a token signed with another secret",
    )
    .await;
    assert_refused(
        &app,
        "authorization",
        &bearer(jwt(&json!({"sub": "alice"}), JWT_SECRET)),
        "a token without exp",
    )
    .await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(json!({"sub": "alice", "exp": now + 3600}).to_string())
    );
    assert_refused(
        &app,
        "authorization",
        &bearer(unsigned),
        "an unsigned (alg none) token",
    )
    .await;
    let mut tampered = token.clone();
    tampered.push('x');
    assert_refused(&app, "authorization", &bearer(tampered), "a tampered token").await;

    // Expiry is judged by the gate's clock: the token that worked above dies with time.
    app.clock.advance(Duration::from_secs(2 * 3600));
    assert_refused(
        &app,
        "authorization",
        &bearer(token),
        "a token past its exp on the gate's clock",
    )
    .await;

    app.upstream.assert_saw_nothing("after bad tokens");
    assert_eq!(alice.list_changes().await.len(), 1, "only alice's own hold");
}

crate::on_both_backends!(
    without_identity_protected_routes_and_gate_pages_are_401_but_other_traffic_passes,
    gate_pages_without_identity_are_401_json,
    signed_identity_refuses_unsigned_forged_and_stale_values,
    jwt_identity_accepts_valid_tokens_and_refuses_expired_or_badly_signed_ones
);
