//! The OpenAPI document against reality: it is served as public, cacheable JSON, and a walk
//! through the real API (hold, confirm, release, refusals, passkeys, freeze) checks that every
//! answer's status is documented for its operation and that its body fits the documented
//! schema, required properties, types and formats included. The route list itself is checked
//! by the unit tests in `src/web/openapi.rs`; this proves the shapes.

use std::time::Duration;

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{enable_withdrawals, parse_rfc3339, spawn_app, TestUser};
use crate::openapi_check::OpenApi;
use crate::testdb::Backend;

/// Sends `request`; returns the status, the `WWW-Authenticate`/`Retry-After` headers and the
/// JSON body.
async fn answer(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.expect("send to the gate");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("read the answer");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a {status} answer that is not JSON ({e}): {text}"));
    (status, headers, body)
}

/// Calls `method template` (with `path` filled in) as `user` and checks the answer against the
/// document; returns the status and body.
async fn call(
    api: &OpenApi,
    user: &TestUser,
    method: Method,
    template: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = user.request(method.clone(), path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let (status, _, body) = answer(request).await;
    api.assert_answer(method.as_str(), template, status, &body);
    (status, body)
}

#[tokio::test]
async fn the_document_is_served_as_public_cacheable_json() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    // No identity, no session: the document is public.
    let response = app
        .anonymous()
        .get(app.url("/_stepgate/openapi.json"))
        .send()
        .await
        .expect("GET the document");
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(header("content-type"), "application/json");
    assert!(
        header("cache-control").contains("max-age=")
            && !header("cache-control").contains("no-store"),
        "the document is cacheable: {}",
        header("cache-control")
    );
    assert!(
        response.headers().get("set-cookie").is_none(),
        "serving the document starts no session"
    );
    let served: Value = response.json().await.expect("the document is JSON");
    assert!(
        served["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "openapi: {}",
        served["openapi"]
    );
    assert_eq!(
        served,
        stepgate::web::openapi::document(),
        "the served document is the one the route tests check"
    );
}

#[tokio::test]
async fn real_answers_fit_the_document() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let served: Value = app
        .anonymous()
        .get(app.url("/_stepgate/openapi.json"))
        .send()
        .await
        .expect("GET the document")
        .json()
        .await
        .expect("the document is JSON");
    let api = OpenApi::new(served);
    let alice = app.user("alice");

    // No identity: 401 in the error shape.
    let (status, _, body) = answer(app.anonymous().get(app.url("/_stepgate/api/changes"))).await;
    assert_eq!(status, 401);
    api.assert_answer("GET", "/_stepgate/api/changes", status, &body);

    // Passkeys: an empty list, then a registration ceremony.
    let (status, _) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/passkeys",
        "/_stepgate/api/passkeys",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, options) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/passkeys/register/start",
        "/_stepgate/api/passkeys/register/start",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    let credential = alice.create_credential(&options);
    let finish = json!({ "ceremony_id": options["ceremony_id"], "credential": credential, "name": "My key" });
    let (status, passkey) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/passkeys/register/finish",
        "/_stepgate/api/passkeys/register/finish",
        Some(finish.clone()),
    )
    .await;
    assert_eq!(status, 200, "{passkey}");
    // The same ceremony again: refused, in the documented shape.
    let (status, _) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/passkeys/register/finish",
        "/_stepgate/api/passkeys/register/finish",
        Some(finish),
    )
    .await;
    assert!(
        status >= 400,
        "a used ceremony must be refused, got {status}"
    );
    let passkey_id = passkey["id"].as_str().expect("a passkey id").to_string();
    let (status, _) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/passkeys/{id}/rename",
        &format!("/_stepgate/api/passkeys/{passkey_id}/rename"),
        Some(json!({ "name": "Blue key" })),
    )
    .await;
    assert_eq!(status, 200);
    let (status, list) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/passkeys",
        "/_stepgate/api/passkeys",
        None,
    )
    .await;
    assert_eq!(
        (status, list["passkeys"].as_array().map(Vec::len)),
        (200, Some(1))
    );

    // The hold answer: every property the document requires, and its challenge header.
    let change = enable_withdrawals("k1");
    let (status, headers, held) = answer(
        alice
            .request(change.method.clone(), &change.path_and_query)
            .header("content-type", &change.content_type)
            .body(change.body.clone()),
    )
    .await;
    assert_eq!(status, 403, "{held}");
    api.assert_fits(&api.protected_schema("PUT", 403), &held, "the hold answer");
    assert_eq!(held["error"], "step_up_required");
    assert!(
        headers.contains_key("www-authenticate"),
        "the hold has WWW-Authenticate"
    );
    let id = held["change_id"].as_str().expect("change_id").to_string();

    // Reading changes, and a change that does not exist.
    let change_path = format!("/_stepgate/api/changes/{id}");
    let (status, read) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/changes/{id}",
        &change_path,
        None,
    )
    .await;
    assert_eq!((status, read["state"].as_str()), (200, Some("held")));
    let (status, _) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/changes",
        "/_stepgate/api/changes",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/changes/{id}",
        &format!("/_stepgate/api/changes/{}", uuid::Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Releasing before confirming: refused in the protected request's documented shape.
    let (status, _, refused) = answer(
        alice
            .request(change.method.clone(), &change.path_and_query)
            .header("content-type", &change.content_type)
            .header("stepgate-change", &id)
            .body(change.body.clone()),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("not_confirmed"))
    );
    api.assert_fits(&api.protected_schema("PUT", 403), &refused, "not_confirmed");

    // Confirming: both ceremony answers.
    let (status, options) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/changes/{id}/confirm/start",
        &format!("{change_path}/confirm/start"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    let assertion = alice.sign(&options);
    let (status, confirmed) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/changes/{id}/confirm/finish",
        &format!("{change_path}/confirm/finish"),
        Some(json!({ "ceremony_id": options["ceremony_id"], "credential": assertion })),
    )
    .await;
    assert_eq!(status, 200, "{confirmed}");
    let (status, read) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/changes/{id}",
        &change_path,
        None,
    )
    .await;
    assert_eq!((status, read["state"].as_str()), (200, Some("cooling_off")));

    // Too early: cooling_off with release_at and Retry-After.
    let release = || {
        alice
            .request(change.method.clone(), &change.path_and_query)
            .header("content-type", &change.content_type)
            .header("stepgate-change", &id)
            .body(change.body.clone())
    };
    let (status, headers, early) = answer(release()).await;
    assert_eq!(
        (status, early["error"].as_str()),
        (403, Some("cooling_off"))
    );
    api.assert_fits(&api.protected_schema("PUT", 403), &early, "cooling_off");
    assert!(early["release_at"].is_string() && headers.contains_key("retry-after"));

    // Released once; the second release is refused with what happened.
    app.clock
        .set(parse_rfc3339(&confirmed["release_at"]) + Duration::from_secs(1));
    let response = release().send().await.expect("release");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the exchange's own answer"
    );
    let (status, _, again) = answer(release()).await;
    assert_eq!(
        (status, again["error"].as_str()),
        (409, Some("change_already_applied"))
    );
    api.assert_fits(
        &api.protected_schema("PUT", 409),
        &again,
        "change_already_applied",
    );

    // Cancelling an applied change is refused; cancelling a held one works.
    let (status, _) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/changes/{id}/cancel",
        &format!("{change_path}/cancel"),
        None,
    )
    .await;
    assert!(
        status >= 400,
        "an applied change cannot be cancelled, got {status}"
    );
    let second = alice.hold(&enable_withdrawals("k2")).await;
    let (status, cancelled) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/changes/{id}/cancel",
        &format!("/_stepgate/api/changes/{}/cancel", second.change_id),
        None,
    )
    .await;
    assert_eq!(
        (status, cancelled["state"].as_str()),
        (200, Some("cancelled"))
    );
    // Confirming a cancelled change: refused in the documented shape.
    let (status, _) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/changes/{id}/confirm/start",
        &format!("/_stepgate/api/changes/{}/confirm/start", second.change_id),
        Some(json!({})),
    )
    .await;
    assert!(
        status >= 400,
        "a cancelled change cannot be confirmed, got {status}"
    );

    // Removing the only passkey is a change to confirm.
    let (status, started) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/passkeys/{id}/remove",
        &format!("/_stepgate/api/passkeys/{passkey_id}/remove"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{started}");

    // A cross-site POST is refused before anything else.
    let (status, _, body) = answer(
        alice
            .request(Method::POST, "/_stepgate/api/account/freeze")
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(status, 403);
    api.assert_answer("POST", "/_stepgate/api/account/freeze", status, &body);

    // Freeze, the account, a hold refused while frozen, and the unfreeze to confirm.
    let (status, _) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/account",
        "/_stepgate/api/account",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, frozen) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/account/freeze",
        "/_stepgate/api/account/freeze",
        None,
    )
    .await;
    assert_eq!((status, frozen["frozen"].as_bool()), (200, Some(true)));
    let (status, account) = call(
        &api,
        &alice,
        Method::GET,
        "/_stepgate/api/account",
        "/_stepgate/api/account",
        None,
    )
    .await;
    assert_eq!((status, account["frozen"].as_bool()), (200, Some(true)));
    let (status, _, refused) = answer(
        alice
            .request(Method::PUT, "/api/v1/api-keys/k3")
            .header("content-type", "application/json")
            .body(r#"{"permissions":["withdraw"]}"#),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("account_frozen"))
    );
    api.assert_fits(
        &api.protected_schema("PUT", 403),
        &refused,
        "account_frozen",
    );
    let (status, _) = call(
        &api,
        &alice,
        Method::POST,
        "/_stepgate/api/account/unfreeze",
        "/_stepgate/api/account/unfreeze",
        None,
    )
    .await;
    assert_eq!(status, 202);
}
