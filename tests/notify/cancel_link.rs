//! One-click cancel: the link in a notification cancels its change with one POST, without a
//! session, an identity or a passkey; opening it (a GET, which mail scanners prefetch) does
//! not; its token cancels that one change and nothing else, and stops working when it expires,
//! is altered, or is posted from another site. The links are taken from real webhook
//! deliveries, as the exchange would put them in an e-mail.

use std::time::Duration;

use reqwest::{Method, StatusCode};

use crate::gate_client::{enable_withdrawals, expect_error, GateUser};
use crate::harness::{status_and_text, TestGate, CONFIRM_WITHIN, COOLING_OFF};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(
    the_link_cancels_without_a_session_and_opening_it_does_not,
    a_token_cancels_only_its_own_change,
    a_tampered_or_expired_token_is_refused,
    a_cross_site_post_does_not_cancel,
);

/// The rule's release window after `release_at` (its default, 7 days).
const RELEASE_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// The cancel link that the delivered `event` about `change_id` carried, pointed at the gate.
async fn link_from(gate: &TestGate, event: &str, change_id: &str) -> String {
    gate.deliver_all().await;
    let delivery = gate.receiver.the_delivery(event, change_id);
    let url = delivery.payload["cancel_url"]
        .as_str()
        .unwrap_or_else(|| panic!("{event} without a cancel_url: {}", delivery.payload));
    gate.reachable(url)
}

/// `(path, token)` of a cancel link.
fn split_link(link: &str) -> (&str, &str) {
    link.split_once("?token=")
        .unwrap_or_else(|| panic!("the cancel link {link} has no ?token="))
}

/// Holds and confirms `enable_withdrawals(key)`; returns the change id.
async fn cooling_off_change(gate: &TestGate, user: &GateUser, key: &str) -> String {
    let change_id = user.hold(&gate.address, &enable_withdrawals(key)).await;
    user.confirm(&gate.address, &change_id).await;
    change_id
}

async fn send(gate: &TestGate, method: Method, url: &str) -> (StatusCode, String) {
    let response = gate
        .stranger()
        .request(method, url)
        .send()
        .await
        .expect("send to the cancel link");
    status_and_text(response).await
}

async fn assert_refused(gate: &TestGate, url: &str, why: &str) {
    for method in [Method::GET, Method::POST] {
        let (status, text) = send(gate, method.clone(), url).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{why}: {method} {url} must be 404, got {status}: {text}"
        );
    }
}

async fn the_link_cancels_without_a_session_and_opening_it_does_not(backend: Backend) {
    let Some(gate) = TestGate::start(backend, Default::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let api = enable_withdrawals("k1");
    let change_id = cooling_off_change(&gate, &alice, "k1").await;
    let link = link_from(&gate, "change.confirmed", &change_id).await;

    // Opening the link (twice, as a mail scanner and then the user would) shows the change...
    for _ in 0..2 {
        let response = gate
            .stranger()
            .get(&link)
            .send()
            .await
            .expect("GET the cancel link");
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(content_type.starts_with("text/html"), "{content_type}");
        let page = response.text().await.expect("read the page");
        assert!(
            page.contains("Enable withdrawals on API key k1"),
            "the page says what would be cancelled: {page}"
        );
    }
    // ...and cancels nothing.
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cooling_off",
        "a GET of the cancel link must not cancel"
    );

    // The button: a POST from a browser with no session, identity or passkey.
    let (status, page) = send(&gate, Method::POST, &link).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.to_lowercase().contains("cancelled"),
        "the result page says it is cancelled: {page}"
    );
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cancelled"
    );
    gate.deliver_all().await;
    gate.receiver.the_delivery("change.cancelled", &change_id);

    // Pressing it again changes nothing and breaks nothing.
    let (status, page) = send(&gate, Method::POST, &link).await;
    assert!(!status.is_server_error(), "{status}: {page}");
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cancelled"
    );

    // The cancelled change is never released.
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    let response = alice.release(&gate.address, &api, &change_id).await;
    assert!(
        response.status().is_client_error(),
        "{:?}",
        response.status()
    );
    assert!(
        gate.upstream.received().is_empty(),
        "a cancelled change reached the exchange: {:?}",
        gate.upstream.received()
    );
}

async fn a_token_cancels_only_its_own_change(backend: Backend) {
    let Some(gate) = TestGate::start(backend, Default::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let first = cooling_off_change(&gate, &alice, "k1").await;
    let second = cooling_off_change(&gate, &alice, "k2").await;
    let bob = gate.user("bob");
    let bobs = bob.hold(&gate.address, &enable_withdrawals("k3")).await;

    let first_link = link_from(&gate, "change.confirmed", &first).await;
    let (_, first_token) = split_link(&first_link);
    for other in [&second, &bobs] {
        let forged = format!(
            "{}/_stepgate/cancel/{other}?token={first_token}",
            gate.address
        );
        assert_refused(&gate, &forged, "another change's token").await;
    }
    assert_eq!(
        alice.change_state(&gate.address, &second).await,
        "cooling_off"
    );
    assert_eq!(bob.change_state(&gate.address, &bobs).await, "held");

    // The token still does what it is for, and only that.
    let (status, page) = send(&gate, Method::POST, &first_link).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(alice.change_state(&gate.address, &first).await, "cancelled");
    assert_eq!(
        alice.change_state(&gate.address, &second).await,
        "cooling_off"
    );
    assert_eq!(bob.change_state(&gate.address, &bobs).await, "held");
}

async fn a_tampered_or_expired_token_is_refused(backend: Backend) {
    let Some(gate) = TestGate::start(backend, Default::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let change_id = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    // The link sent while the change was held expires when it must be confirmed by.
    let held_link = link_from(&gate, "change.held", &change_id).await;
    alice.confirm(&gate.address, &change_id).await;
    let confirmed_link = link_from(&gate, "change.confirmed", &change_id).await;

    let (path, token) = split_link(&confirmed_link);
    let (expires, mac) = token
        .split_once('.')
        .unwrap_or_else(|| panic!("expected an <expiry>.<mac> token, got {token}"));
    let last = mac.chars().last().expect("a non-empty MAC");
    let flipped = if last == '0' { '1' } else { '0' };
    let tampered_mac = format!("{path}?token={expires}.{}{flipped}", &mac[..mac.len() - 1]);
    assert_refused(&gate, &tampered_mac, "a token with an altered MAC").await;
    let later: i64 = expires.parse::<i64>().expect("a numeric expiry") + 30 * 24 * 3600;
    let extended = format!("{path}?token={later}.{mac}");
    assert_refused(&gate, &extended, "a token with an extended expiry").await;
    assert_refused(&gate, &format!("{path}?token="), "an empty token").await;
    let (status, text) = send(&gate, Method::POST, path).await;
    assert!(
        status.is_client_error(),
        "a link without a token must be refused, got {status}: {text}"
    );
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cooling_off"
    );

    // Past confirm_before the held-time link has expired, although the change it names is
    // still cancellable (it is cooling off): the token's own expiry is what refuses it.
    gate.advance(CONFIRM_WITHIN + Duration::from_secs(60));
    assert_refused(&gate, &held_link, "an expired token (held-time link)").await;
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cooling_off"
    );

    // The confirmed-time link lasts until the change can no longer be cancelled: past its
    // release window the change has expired, and so has the link.
    gate.advance(COOLING_OFF + RELEASE_WITHIN + Duration::from_secs(60));
    assert_refused(
        &gate,
        &confirmed_link,
        "an expired token (after release_before)",
    )
    .await;
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "expired"
    );
}

async fn a_cross_site_post_does_not_cancel(backend: Backend) {
    let Some(gate) = TestGate::start(backend, Default::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let change_id = cooling_off_change(&gate, &alice, "k1").await;
    let link = link_from(&gate, "change.confirmed", &change_id).await;

    let response = gate
        .stranger()
        .post(&link)
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("POST from another site");
    expect_error(response, StatusCode::FORBIDDEN, "cross_origin").await;
    let response = gate
        .stranger()
        .post(&link)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("POST from another site");
    expect_error(response, StatusCode::FORBIDDEN, "cross_origin").await;
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cooling_off"
    );

    // The page's own button posts with the gate's origin: that works.
    let response = gate
        .stranger()
        .post(&link)
        .header("origin", &gate.origin)
        .send()
        .await
        .expect("POST from the cancel page");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        alice.change_state(&gate.address, &change_id).await,
        "cancelled"
    );
}
