//! The signed approval, as an exchange would check it: a stand-in exchange that fetches the
//! gate's `/_stepgate/jwks.json` and runs `stepgate::approval::verify` on what it receives
//! accepts the gate's release, and refuses a tampered token, a tampered body, a token signed by
//! another key, and a request without one. Clients cannot inject `Stepgate-Approval`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;
use stepgate::approval::{self, ApprovalError, VerifyOptions};
use stepgate::clock::{Clock, ManualClock};
use tokio::net::TcpListener;

use crate::helpers::{enable_withdrawals, expect_json, ReceivedRequest, TestApp};
use crate::testdb::Backend;

/// The exchange's side: on every request, fetch the gate's JWKS and verify the approval
/// against exactly what arrived. 200 with the claims, or 403 saying why.
struct VerifyingExchange {
    url: String,
}

#[derive(Clone)]
struct ExchangeState {
    jwks_url: String,
    issuer: String,
    /// The exchange's clock agrees with the gate's (the test moves both).
    clock: ManualClock,
}

impl VerifyingExchange {
    async fn start(app: &TestApp) -> VerifyingExchange {
        let state = Arc::new(ExchangeState {
            jwks_url: app.url("/_stepgate/jwks.json"),
            issuer: app.origin.clone(),
            clock: app.clock.clone(),
        });
        let router = Router::new().fallback(check).with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the verifying exchange");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the verifying exchange failed");
        });
        VerifyingExchange { url }
    }

    /// Sends `received` (as the gate forwarded it) with `headers` in place of its own.
    async fn deliver(
        &self,
        received: &ReceivedRequest,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let mut request = reqwest::Client::new()
            .request(
                received.method.clone(),
                format!("{}{}", self.url, received.path_and_query),
            )
            .body(body.to_vec());
        for (name, value) in headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.expect("reach the verifying exchange");
        let status = response.status();
        let body = response.json().await.expect("a JSON answer");
        (status, body)
    }
}

async fn check(State(state): State<Arc<ExchangeState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("read the body");
    let jwks = reqwest::get(&state.jwks_url)
        .await
        .expect("fetch the gate's JWKS")
        .text()
        .await
        .expect("read the JWKS");
    let Some(token) = parts.headers.get(approval::APPROVAL_HEADER) else {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"refused": "no approval"})),
        )
            .into_response();
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let received = approval::ReceivedRequest {
        method: parts.method.as_str(),
        path_and_query,
        headers: &parts.headers,
        body: &body,
    };
    let options = VerifyOptions {
        issuer: Some(state.issuer.clone()),
        ..VerifyOptions::default()
    };
    let now = state.clock.now();
    match approval::verify_with(
        token.to_str().unwrap_or(""),
        &jwks,
        &received,
        now,
        &options,
    ) {
        Ok(claims) => (
            StatusCode::OK,
            axum::Json(serde_json::to_value(claims).unwrap_or_default()),
        )
            .into_response(),
        Err(error) => (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({ "refused": format!("{error:?}") })),
        )
            .into_response(),
    }
}

/// Releases a held, confirmed change through the gate (the manual clock moved past the
/// cooling-off) and returns what the recording upstream received.
async fn released(app: &TestApp) -> (ReceivedRequest, String) {
    let alice = app.user("alice");
    alice.register_passkey().await;
    let api = enable_withdrawals("k1");
    let (change_id, release_at) = alice.hold_and_confirm(&api).await;
    let before = app.upstream.received().len();
    app.clock.set(release_at);
    let answer = alice
        .request(api.method.clone(), &api.path_and_query)
        .header("content-type", &api.content_type)
        .header("stepgate-change", &change_id)
        // A client trying to supply its own approval: it must never reach the upstream.
        .header("stepgate-approval", "client.forged.approval")
        .body(api.body.clone())
        .send()
        .await
        .expect("send the release");
    expect_json(answer, StatusCode::OK).await;
    let received = app.upstream.received();
    assert_eq!(received.len(), before + 1, "one forward: {received:?}");
    (received[before].clone(), change_id)
}

async fn an_exchange_accepts_the_gates_approval_and_refuses_tampering(backend: Backend) {
    let Some(app) = crate::helpers::spawn_app(backend).await else {
        return;
    };
    let (forwarded, change_id) = released(&app).await;
    let token = forwarded
        .header("stepgate-approval")
        .expect("every release carries Stepgate-Approval")
        .to_string();
    assert_ne!(
        token, "client.forged.approval",
        "the client's copy was dropped"
    );
    let exchange = VerifyingExchange::start(&app).await;

    // The release as the gate sent it: accepted, with the claims binding this change.
    let (status, claims) = exchange
        .deliver(&forwarded, &forwarded.headers, &forwarded.body)
        .await;
    assert_eq!(status, StatusCode::OK, "the gate's own release: {claims}");
    assert_eq!(claims["jti"], change_id.as_str());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["rule"], "enable-withdrawals");
    assert_eq!(claims["iss"], app.origin.as_str());
    assert!(claims["confirmed_at"].as_i64() < claims["release_at"].as_i64());

    // The same approval on another body (a different key, more permissions): refused.
    let other_body = String::from_utf8(forwarded.body.to_vec())
        .expect("a JSON body")
        .replace("bot k1", "bot k2");
    let (status, refused) = exchange
        .deliver(&forwarded, &forwarded.headers, other_body.as_bytes())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(
        refused["refused"],
        format!("{:?}", ApprovalError::DigestMismatch)
    );

    // A claim altered in the token (another user): the signature no longer holds.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).expect("base64url claims"))
            .expect("JSON claims");
    payload["sub"] = "mallory".into();
    parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut tampered = forwarded.headers.clone();
    tampered.insert(
        "stepgate-approval",
        HeaderValue::from_str(&parts.join(".")).expect("a header value"),
    );
    let (status, refused) = exchange
        .deliver(&forwarded, &tampered, &forwarded.body)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(
        refused["refused"],
        format!("{:?}", ApprovalError::BadSignature)
    );

    // A well-formed approval for this very request, signed by a key that is not the gate's
    // (under the gate's kid): refused.
    let jwks: Value = reqwest::get(app.url("/_stepgate/jwks.json"))
        .await
        .expect("fetch the JWKS")
        .json()
        .await
        .expect("JSON");
    let kid = jwks["keys"][0]["kid"].as_str().expect("a kid").to_string();
    let impostor = approval::ApprovalSigner::new(
        approval::SigningKey::from_pem(approval::SigningKey::generate_ed25519_pem().as_bytes())
            .expect("a fresh key"),
        Some(kid),
        app.origin.clone(),
        std::time::Duration::from_secs(300),
    );
    let mut change = stepgate_change_like(&forwarded, &change_id, &app);
    change.user_id = "alice".into();
    let forged = impostor
        .sign(&change, app.now())
        .expect("the impostor signs");
    let mut foreign = forwarded.headers.clone();
    foreign.insert(
        "stepgate-approval",
        HeaderValue::from_str(&forged).expect("a header value"),
    );
    let (status, refused) = exchange
        .deliver(&forwarded, &foreign, &forwarded.body)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(
        refused["refused"],
        format!("{:?}", ApprovalError::BadSignature)
    );

    // Straight to the exchange, around the gate: no approval, refused.
    let mut bare = forwarded.headers.clone();
    bare.remove("stepgate-approval");
    let (status, _) = exchange.deliver(&forwarded, &bare, &forwarded.body).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// A change as the gate stored it, rebuilt from what the upstream received, for signing with
/// another key.
fn stepgate_change_like(
    received: &ReceivedRequest,
    change_id: &str,
    app: &TestApp,
) -> stepgate::stepup::Change {
    let now = app.now();
    let digest = approval::ReceivedRequest {
        method: received.method.as_str(),
        path_and_query: &received.path_and_query,
        headers: &received.headers,
        body: &received.body,
    }
    .digest();
    stepgate::stepup::Change {
        id: change_id.parse().expect("a uuid"),
        user_id: "alice".into(),
        rule: "enable-withdrawals".into(),
        method: received.method.to_string(),
        path: received.path_and_query.clone(),
        query: None,
        headers: Vec::new(),
        body: received.body.to_vec(),
        digest,
        summary: String::new(),
        state: stepgate::stepup::State::Applying,
        cooling_off: std::time::Duration::ZERO,
        release_within: std::time::Duration::ZERO,
        created_at: now,
        confirm_before: now,
        confirmed_at: Some(now),
        release_at: Some(now),
        release_before: None,
        finished_at: None,
        lease_until: None,
        release_attempts: 1,
        outcome_status: None,
        quarantined_until: None,
    }
}

async fn clients_cannot_send_an_approval_to_the_upstream(backend: Backend) {
    let Some(app) = crate::helpers::spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    // Pass-through (no rule matches), in several spellings a client might try.
    let answer = alice
        .request(Method::GET, "/api/v1/balances")
        .header("stepgate-approval", "client.forged.approval")
        .header("Stepgate-Approval", "second.copy.here")
        .send()
        .await
        .expect("send a pass-through request");
    expect_json(answer, StatusCode::OK).await;
    // A protected route whose body no rule holds (tightening) is forwarded too.
    let tighten = alice
        .request(Method::PUT, "/api/v1/api-keys/k1")
        .header("content-type", "application/json")
        .header("stepgate-approval", "client.forged.approval")
        .body(r#"{"permissions":["read"]}"#)
        .send()
        .await
        .expect("send a tightening change");
    expect_json(tighten, StatusCode::OK).await;
    let received = app.upstream.received();
    assert_eq!(received.len(), 2, "{received:?}");
    for request in &received {
        assert!(
            request.headers.get("stepgate-approval").is_none(),
            "only releases carry an approval, and only the gate's: {:?}",
            request.headers
        );
    }

    // On a release, the one approval that arrives is the gate's and it verifies.
    let (forwarded, change_id) = released(&app).await;
    let approvals: Vec<_> = forwarded
        .headers
        .get_all("stepgate-approval")
        .iter()
        .collect();
    assert_eq!(approvals.len(), 1, "exactly one approval header");
    let jwks = reqwest::get(app.url("/_stepgate/jwks.json"))
        .await
        .expect("fetch the JWKS")
        .text()
        .await
        .expect("read it");
    let claims = approval::verify(
        approvals[0].to_str().expect("ASCII"),
        &jwks,
        &approval::ReceivedRequest {
            method: forwarded.method.as_str(),
            path_and_query: &forwarded.path_and_query,
            headers: &forwarded.headers,
            body: &forwarded.body,
        },
        app.now(),
    )
    .expect("the forwarded approval is the gate's");
    assert_eq!(claims.jti, change_id);
}

crate::on_both_backends!(
    an_exchange_accepts_the_gates_approval_and_refuses_tampering,
    clients_cannot_send_an_approval_to_the_upstream,
);
