//! An exchange's integration test with stepgate in front of its API, driven by
//! `stepgate::testkit::VirtualUser`. (In this repository: the example in docs/testkit.md.)

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{json, Value};
use stepgate::clock::ManualClock;
use stepgate::config::Config;
use stepgate::server::Server;
use stepgate::testkit::{ApiRequest, Sent, VirtualUser};
use tokio::net::TcpListener;

/// What reached the exchange: (API key, body, Idempotency-Key).
type Received = Arc<Mutex<Vec<(String, Value, Option<String>)>>>;

/// Stands in for your exchange's API: it records every API-key update that reaches it.
/// In your own tests, start your real service here instead.
async fn start_exchange() -> (String, Received) {
    let received = Received::default();
    let record = received.clone();
    let app = Router::new().route(
        "/api/v1/api-keys/{key_id}",
        put(
            move |Path(key_id): Path<String>, headers: HeaderMap, Json(body): Json<Value>| {
                let record = record.clone();
                async move {
                    let idempotency_key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    record
                        .lock()
                        .unwrap()
                        .push((key_id, body.clone(), idempotency_key));
                    Json(json!({"updated": true, "key": body}))
                }
            },
        ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// Starts the gate in front of `exchange` with your production rules, but on a free port,
/// an in-memory SQLite database and a clock the test moves. Returns the gate's address, its
/// public URL (the WebAuthn origin) and the clock.
async fn start_gate(exchange: &str) -> (String, String, ManualClock) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let public_url = format!("http://localhost:{}", addr.port());
    let config = format!(
        r#"
listen = "{addr}"
public_url = "{public_url}"
upstream = "{exchange}"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Example Exchange"

[identity]
mode = "header"
header = "x-user-id"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#
    );
    let config = Config::from_toml_str(&config, "test gate", &[]).unwrap();
    let clock = ManualClock::starting_now();
    let server = Server::bind(config, Arc::new(clock.clone()), listener)
        .await
        .unwrap();
    tokio::spawn(server.run());
    (format!("http://{addr}"), public_url, clock)
}

#[tokio::test]
async fn enabling_withdrawals_takes_a_passkey_and_a_day() -> Result<(), Box<dyn Error>> {
    let (exchange, received) = start_exchange().await;
    let (gate, public_url, clock) = start_gate(&exchange).await;

    // Alice, as your edge would identify her, with a software passkey.
    let alice = VirtualUser::new(&gate, [("x-user-id", "alice")])?.with_public_url(&public_url)?;
    alice.register_passkey("Alice's test key").await?;

    // Giving key k1 the withdraw permission is held: the exchange sees nothing.
    let enable = ApiRequest::json(
        Method::PUT,
        "/api/v1/api-keys/k1",
        &json!({"permissions": ["read", "withdraw"]}),
    );
    let Sent::StepUpRequired(hold) = alice.send(&enable).await? else {
        panic!("the gate must hold a request that enables withdrawals");
    };
    assert_eq!(hold.summary, "Enable withdrawals on API key k1");
    assert!(received.lock().unwrap().is_empty());

    // Alice confirms it with her passkey; releasing it now is too early.
    alice.confirm(&hold.change_id).await?;
    let early = alice.release(&enable, &hold.change_id).await?;
    assert_eq!(early.status, StatusCode::FORBIDDEN);
    assert_eq!(early.error_code().as_deref(), Some("cooling_off"));
    assert!(received.lock().unwrap().is_empty());

    // A day later the identical request goes through, once, with the change id as its
    // Idempotency-Key.
    clock.advance(Duration::from_secs(24 * 60 * 60));
    let released = alice.release(&enable, &hold.change_id).await?;
    assert_eq!(released.status, StatusCode::OK, "{}", released.text());
    assert_eq!(
        *received.lock().unwrap(),
        vec![(
            "k1".to_string(),
            json!({"permissions": ["read", "withdraw"]}),
            Some(hold.change_id.clone()),
        )]
    );
    let again = alice.release(&enable, &hold.change_id).await?;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(received.lock().unwrap().len(), 1);

    // Taking the permission away again is instant.
    let restrict = ApiRequest::json(
        Method::PUT,
        "/api/v1/api-keys/k1",
        &json!({"permissions": ["read"]}),
    );
    let Sent::Answered(answer) = alice.send(&restrict).await? else {
        panic!("tightening must not be held");
    };
    assert_eq!(answer.status, StatusCode::OK);
    Ok(())
}
