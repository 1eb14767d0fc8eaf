//! What the browser talks to: the real gate (started through [`Server`], as `stepgate serve`
//! does) in front of the demo exchange, on a manual clock; a webhook receiver that keeps what
//! the gate sends (its `cancel_url` is the one-click cancel link a user would get by mail);
//! and "another site" on a second port for framing and cross-site tests.
//!
//! The browser goes to `http://localhost:PORT` (WebAuthn refuses `127.0.0.1`); the other site
//! is `http://127.0.0.1:OTHER` (another site, not just another origin) with a frameable
//! control page on `http://localhost:OTHER` (another origin).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use stepgate::clock::{Clock, ManualClock};
use stepgate::config::Config;
use stepgate::demo::exchange;
use stepgate::server::Server;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The HS256 secret the demo exchange signs sessions with and the gate verifies.
const SESSION_SECRET: &str = "browser-tests-exchange-session-secret-0123456789";
/// Signs webhook bodies and one-click cancel links.
const SIGNING_SECRET: &str = "browser-tests-webhook-signing-secret-0123456789";

/// The gate's summary for a held `withdraw` grant on `key_id`.
pub fn summary_for(key_id: &str) -> String {
    format!("Enable withdrawals on API key {key_id}")
}

pub struct Site {
    /// The gate as the browser sees it: `http://localhost:PORT`.
    pub gate: String,
    /// The same gate for the test's own HTTP calls (`localhost` may resolve to `::1` first).
    pub gate_direct: String,
    pub clock: ManualClock,
    /// Another site: `http://127.0.0.1:OTHER`.
    pub other_site: String,
    /// Another origin on the same server, for the frameable control page.
    pub other_origin: String,
    webhooks: Arc<Mutex<Vec<Value>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Site {
    pub async fn start() -> Site {
        let clock = ManualClock::starting_now();
        let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let webhooks: Arc<Mutex<Vec<Value>>> = Arc::default();

        let exchange_listener = bind().await;
        let exchange_addr = exchange_listener.local_addr().expect("exchange address");
        let exchange_app = exchange::router(SESSION_SECRET, shared_clock.clone());
        let exchange_task = tokio::spawn(async move {
            let _ = axum::serve(exchange_listener, exchange_app).await;
        });

        let other_listener = bind().await;
        let other_addr = other_listener.local_addr().expect("other site address");
        let other_app = other_site(webhooks.clone());
        let other_task = tokio::spawn(async move {
            let _ = axum::serve(other_listener, other_app).await;
        });

        let gate_listener = bind().await;
        let gate_addr = gate_listener.local_addr().expect("gate address");
        let config_text = gate_config(gate_addr, exchange_addr, other_addr);
        let config = Config::from_toml_str(&config_text, "browser test config", &[])
            .unwrap_or_else(|e| panic!("the browser test config is invalid: {e}\n{config_text}"));
        let server = Server::bind(config, shared_clock, gate_listener)
            .await
            .expect("the gate starts");
        let gate_task = tokio::spawn(async move {
            let _ = server.run().await;
        });

        Site {
            gate: format!("http://localhost:{}", gate_addr.port()),
            gate_direct: format!("http://{gate_addr}"),
            clock,
            other_site: format!("http://{other_addr}"),
            other_origin: format!("http://localhost:{}", other_addr.port()),
            webhooks,
            tasks: vec![exchange_task, other_task, gate_task],
        }
    }

    /// The test's own view of `user`'s account, through the gate's JSON API with the same
    /// session token the exchange would issue.
    pub fn api(&self, user: &str) -> Api {
        let token = exchange::issue_session(SESSION_SECRET.as_bytes(), user, self.clock.now())
            .expect("sign a session token");
        Api {
            base: self.gate_direct.clone(),
            cookie: format!("{}={token}", exchange::SESSION_COOKIE),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("build a reqwest client"),
        }
    }

    /// Waits for the gate's `change.confirmed` webhook for `change_id`; returns its
    /// `cancel_url`, the one-click cancel link a user gets by mail.
    pub async fn cancel_url(&self, change_id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self
                .webhooks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .find(|event| {
                    event["event"] == "change.confirmed" && event["change"]["id"] == change_id
                })
                .and_then(|event| event["cancel_url"].as_str().map(str::to_string));
            if let Some(url) = found {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "no change.confirmed webhook with a cancel_url for {change_id} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Calls to the gate's JSON API as one user.
pub struct Api {
    base: String,
    cookie: String,
    client: reqwest::Client,
}

impl Api {
    pub async fn get(&self, path: &str) -> Value {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        let text = response.text().await.expect("read the answer");
        assert!(status.is_success(), "GET {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"))
    }

    pub async fn change_state(&self, change_id: &str) -> String {
        let change = self
            .get(&format!("/_stepgate/api/changes/{change_id}"))
            .await;
        change["state"]
            .as_str()
            .unwrap_or_else(|| panic!("a change without a state: {change}"))
            .to_string()
    }

    /// The exchange's record of the user's keys: `[{"id","label","permissions"}]`.
    pub async fn keys(&self) -> Vec<Value> {
        let keys = self.get("/api/v1/api-keys").await;
        keys["keys"].as_array().cloned().unwrap_or_default()
    }

    pub async fn key_ids(&self) -> Vec<String> {
        self.keys()
            .await
            .iter()
            .filter_map(|key| key["id"].as_str().map(str::to_string))
            .collect()
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port")
}

/// The gate as an exchange would configure it: the exchange's session JWT (a cookie)
/// identifies the user, one rule holds any API-key update that grants `withdraw`, and
/// webhooks carry one-click cancel links.
fn gate_config(gate: SocketAddr, exchange: SocketAddr, other: SocketAddr) -> String {
    let port = gate.port();
    let cookie = exchange::SESSION_COOKIE;
    format!(
        r#"listen = "{gate}"
public_url = "http://localhost:{port}"
upstream = "http://{exchange}"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Demo Exchange"

[identity]
mode = "jwt"
algorithm = "HS256"
secret = "{SESSION_SECRET}"
cookie = "{cookie}"
claim = "sub"

[notifications]
webhooks = ["http://{other}/hooks"]
signing_secret = "{SIGNING_SECRET}"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#
    )
}

#[derive(Deserialize)]
struct Target {
    url: String,
    /// For the framing page: a frameable page on yet another origin.
    control: Option<String>,
}

/// Another site: a page that frames a URL next to a frameable control page, a page with a
/// form that posts to a URL, and the webhook receiver.
fn other_site(webhooks: Arc<Mutex<Vec<Value>>>) -> Router {
    Router::new()
        .route("/frame", get(framing_page))
        .route("/frameable", get(frameable_page))
        .route("/post", get(posting_page))
        .route("/hooks", post(receive_webhook))
        .with_state(webhooks)
}

async fn framing_page(Query(target): Query<Target>) -> Response {
    let url = attribute(&target.url);
    let control = attribute(target.control.as_deref().unwrap_or("/frameable"));
    Html(format!(
        "<!doctype html><html><head><title>Another site</title></head><body>\
         <h1>Another site</h1>\
         <iframe id=\"framed\" src=\"{url}\" width=\"800\" height=\"500\"></iframe>\
         <iframe id=\"control\" src=\"{control}\" width=\"400\" height=\"200\"></iframe>\
         </body></html>"
    ))
    .into_response()
}

async fn frameable_page() -> Response {
    Html("<!doctype html><html><body><p id=\"control-text\">A page that may be framed.</p></body></html>")
        .into_response()
}

async fn posting_page(Query(target): Query<Target>) -> Response {
    let url = attribute(&target.url);
    Html(format!(
        "<!doctype html><html><head><title>Win a prize</title></head><body>\
         <form method=\"post\" action=\"{url}\"><button id=\"forged\" type=\"submit\">Claim</button></form>\
         </body></html>"
    ))
    .into_response()
}

async fn receive_webhook(
    State(webhooks): State<Arc<Mutex<Vec<Value>>>>,
    Json(event): Json<Value>,
) -> Response {
    webhooks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(event);
    axum::http::StatusCode::NO_CONTENT.into_response()
}

/// Enough escaping for a URL inside a double-quoted attribute.
fn attribute(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}
