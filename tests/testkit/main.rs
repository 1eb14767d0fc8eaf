//! `stepgate::testkit` against real gates (started through `Server::bind`, on a manual clock
//! and SQLite), as an exchange's integration tests would use it. `example` is the complete
//! example test from docs/testkit.md, verbatim (checked below), and must pass as written.
//! Needs the `testkit` feature: `cargo test --features testkit --test testkit`.

mod example;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use stepgate::clock::{Clock, ManualClock};
use stepgate::config::Config;
use stepgate::demo::exchange::issue_session;
use stepgate::server::Server;
use stepgate::testkit::{ApiRequest, Sent, StepUpRequired, TestkitError, VirtualUser};
use tokio::net::TcpListener;

const JWT_SECRET: &str = "testkit-tests-session-secret-0123456789abcdef";

/// The documentation shows the example that runs, not a copy that may drift from it.
#[test]
fn the_documented_example_is_the_example_that_runs() {
    let docs = include_str!("../../docs/testkit.md");
    let example = include_str!("example.rs");
    assert!(
        docs.contains(&format!("```rust\n{example}```")),
        "docs/testkit.md must contain tests/testkit/example.rs verbatim in a ```rust block"
    );
}

/// A gate in front of nothing (the tests here never release), in `mode`'s identity setup.
async fn start_gate(identity: &str) -> (String, String, ManualClock) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate");
    let addr = listener.local_addr().expect("gate address");
    let public_url = format!("http://localhost:{}", addr.port());
    let text = format!(
        r#"listen = "{addr}"
public_url = "{public_url}"
upstream = "http://127.0.0.1:9"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Testkit tests"

[identity]
{identity}

[[rules]]
name = "enable-withdrawals"
methods = ["PUT"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#
    );
    let config = Config::from_toml_str(&text, "testkit test config", &[])
        .unwrap_or_else(|e| panic!("invalid config: {e}\n{text}"));
    let clock = ManualClock::starting_now();
    let server = Server::bind(config, Arc::new(clock.clone()), listener)
        .await
        .expect("the gate starts");
    tokio::spawn(server.run());
    (format!("http://{addr}"), public_url, clock)
}

fn enable_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest::json(
        Method::PUT,
        &format!("/api/v1/api-keys/{key_id}"),
        &json!({"permissions": ["read", "withdraw"]}),
    )
}

fn header_identity() -> String {
    "mode = \"header\"\nheader = \"x-user-id\"".into()
}

fn jwt_identity() -> String {
    format!(
        "mode = \"jwt\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\
         cookie = \"session\"\nclaim = \"sub\""
    )
}

#[tokio::test]
async fn a_cancelled_change_is_never_released() {
    let (gate, public_url, clock) = start_gate(&header_identity()).await;
    let bob = VirtualUser::new(&gate, [("x-user-id", "bob")])
        .and_then(|user| user.with_public_url(&public_url))
        .expect("a virtual user");
    bob.register_passkey("Bob's key").await.expect("register");
    let request = enable_withdrawals("k7");
    let hold = bob.hold(&request).await.expect("held");
    let confirmed = bob.confirm(&hold.change_id).await.expect("confirm");
    assert_eq!(confirmed.state, "cooling_off");
    assert!(!confirmed.release_at.is_empty());

    // Before release_at: the gate's cooling_off refusal, with when to retry.
    let early = bob
        .release(&request, &hold.change_id)
        .await
        .expect("release");
    assert_eq!(early.status, StatusCode::FORBIDDEN);
    assert_eq!(early.error_code().as_deref(), Some("cooling_off"));
    let retry_after = early.retry_after().expect("a Retry-After header");
    assert!(
        (86_000..=86_400).contains(&retry_after),
        "about a day: {retry_after}"
    );

    bob.cancel(&hold.change_id).await.expect("cancel");
    assert_eq!(
        bob.change(&hold.change_id).await.expect("get")["state"],
        "cancelled"
    );
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    let late = bob
        .release(&request, &hold.change_id)
        .await
        .expect("release");
    assert_eq!(late.error_code().as_deref(), Some("change_cancelled"));
}

#[tokio::test]
async fn a_session_cookie_or_a_bearer_token_identifies_the_user() {
    let (gate, public_url, clock) = start_gate(&jwt_identity()).await;
    let token = issue_session(JWT_SECRET.as_bytes(), "carol", clock.now()).expect("a token");

    // The exchange's session cookie, in the same jar as the gate's own session cookie.
    let by_cookie = VirtualUser::new(&gate, std::iter::empty::<(&str, &str)>())
        .and_then(|user| user.with_public_url(&public_url))
        .expect("a virtual user");
    by_cookie.add_cookie(&format!("session={token}"));
    by_cookie
        .register_passkey("Carol's key")
        .await
        .expect("register");
    let hold = by_cookie
        .hold(&enable_withdrawals("k1"))
        .await
        .expect("held");
    by_cookie.confirm(&hold.change_id).await.expect("confirm");

    // A bearer token works the same way; a cookie given as a header is refused up front,
    // because it would hide the gate's session cookie.
    let dave_token = issue_session(JWT_SECRET.as_bytes(), "dave", clock.now()).expect("a token");
    let bearer = format!("Bearer {dave_token}");
    let by_bearer = VirtualUser::new(&gate, [("authorization", bearer.as_str())])
        .and_then(|user| user.with_public_url(&public_url))
        .expect("a virtual user");
    by_bearer
        .register_passkey("Dave's key")
        .await
        .expect("register");
    let hold = by_bearer
        .hold(&enable_withdrawals("k2"))
        .await
        .expect("held");
    by_bearer.confirm(&hold.change_id).await.expect("confirm");
    let refused = VirtualUser::new(&gate, [("cookie", format!("session={token}"))]);
    assert!(matches!(refused, Err(TestkitError::Setup(_))));
}

#[tokio::test]
async fn a_second_passkey_is_a_change_the_first_one_confirms() {
    let (gate, public_url, _clock) = start_gate(&header_identity()).await;
    let erin = VirtualUser::new(&gate, [("x-user-id", "erin")])
        .and_then(|user| user.with_public_url(&public_url))
        .expect("a virtual user");
    let first = erin.register_passkey("first").await.expect("register");
    assert_eq!(
        first.pending_change, None,
        "the first passkey is active at once"
    );
    let second = erin.register_passkey("second").await.expect("register");
    let change = second
        .pending_change
        .expect("a second passkey waits for a confirmation");
    let confirmed = erin.confirm(&change).await.expect("confirm");
    assert_eq!(confirmed.state, "cooling_off");
}

#[tokio::test]
async fn the_wrong_origin_is_refused_with_a_hint() {
    let (gate, _public_url, _clock) = start_gate(&header_identity()).await;
    // Without with_public_url the passkey would sign for 127.0.0.1, which is not under the
    // gate's rp_id (localhost): the error says what to do.
    let frank = VirtualUser::new(&gate, [("x-user-id", "frank")]).expect("a virtual user");
    let error = frank
        .register_passkey("wrong origin")
        .await
        .expect_err("the authenticator refuses another origin");
    assert!(
        matches!(error, TestkitError::Authenticator(_))
            && error.to_string().contains("with_public_url"),
        "{error}"
    );
}

#[tokio::test]
async fn an_unprotected_request_is_answered_not_held() {
    let (gate, _public_url, _clock) = start_gate(&header_identity()).await;
    let grace = VirtualUser::new(&gate, [("x-user-id", "grace")]).expect("a virtual user");
    // Nothing listens upstream: the gate's own 502 comes back, and it is not a hold.
    let sent = grace
        .send(&ApiRequest::empty(Method::GET, "/api/v1/balance"))
        .await
        .expect("send");
    let Sent::Answered(answer) = sent else {
        panic!("a GET is never held");
    };
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(StepUpRequired::from_answer(&answer).is_none());
}
