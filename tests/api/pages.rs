//! The gate's pages, as a browser asks for them: the confirm page says in plain words what is
//! being changed, and the passkeys page lists what the user registered.

use crate::testdb::Backend;

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{enable_withdrawals, expect_json, header_text, spawn_app, TestUser};

/// GETs a gate page the way a browser does; it must be a 200 HTML page.
async fn html_page(user: &TestUser, path: &str) -> String {
    let page = user
        .request(Method::GET, path)
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .expect("GET a gate page");
    let status = page.status();
    let content_type = header_text(&page, "content-type").unwrap_or_default();
    let html = page.text().await.expect("read the page");
    assert_eq!(status, StatusCode::OK, "{path}: {html}");
    assert!(
        content_type.starts_with("text/html"),
        "{path} is HTML, got {content_type}"
    );
    html
}

async fn the_confirm_page_shows_the_change_in_plain_words(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let held = alice.hold(&enable_withdrawals("k1")).await;

    let html = html_page(&alice, &format!("/_stepgate/changes/{}", held.change_id)).await;
    assert!(
        html.contains("Enable withdrawals on API key k1"),
        "the page names the change: {html}"
    );
    assert!(
        html.to_lowercase().contains("support"),
        "the page warns that support will never ask for this: {html}"
    );
    // What the request asks for, read from the stored body where the rule looks.
    assert!(
        html.contains("Asks for permissions") && html.contains("read, trade, withdraw"),
        "the page shows the requested permissions: {html}"
    );
}

async fn registered_passkeys_are_listed_on_the_passkeys_page(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let before = html_page(&alice, "/_stepgate/passkeys").await;
    assert!(!before.contains("Alice's laptop"), "nothing listed yet");

    // The page's script may start a registration with an empty body.
    let start = alice
        .request(Method::POST, "/_stepgate/api/passkeys/register/start")
        .send()
        .await
        .expect("send register/start without a body");
    let options = expect_json(start, StatusCode::OK).await;
    let credential = alice.create_credential(&options);
    let response = alice
        .request(Method::POST, "/_stepgate/api/passkeys/register/finish")
        .json(&json!({
            "ceremony_id": options["ceremony_id"],
            "credential": credential,
            "name": "Alice's laptop",
        }))
        .send()
        .await
        .expect("send register/finish");
    let registered = expect_json(response, StatusCode::OK).await;
    assert_eq!(registered["name"], "Alice's laptop");
    assert!(registered["created_at"].is_string(), "{registered}");

    let after = html_page(&alice, "/_stepgate/passkeys").await;
    assert!(
        after.contains("Alice&#39;s laptop")
            || after.contains("Alice&#x27;s laptop")
            || after.contains("Alice's laptop"),
        "the passkeys page lists the new passkey: {after}"
    );

    // Bob's page is his own.
    let bob = app.user("bob");
    let bobs = html_page(&bob, "/_stepgate/passkeys").await;
    assert!(
        !bobs.contains("laptop"),
        "bob sees only his passkeys: {bobs}"
    );
}

crate::on_both_backends!(
    the_confirm_page_shows_the_change_in_plain_words,
    registered_passkeys_are_listed_on_the_passkeys_page
);
