//! The notification test kit: a webhook receiver (a real HTTP server on loopback that records
//! every POST, checks its signature and can be told to fail), a recording stand-in exchange,
//! and a gate started in-process on a fresh database with a manual clock, its config also
//! written to a file for the `stepgate audit` commands. The gate can be stopped and started
//! again on the same database, port and config, to prove that a restart loses nothing.
//!
//! The gate's own background sender delivers due webhooks every second, and the tests also
//! call `deliver_due` directly. Both claim rows under a lease, so either may be the one that
//! sends; the tests therefore wait for what the receiver saw rather than for a return value,
//! and then check that nothing more arrives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use stepgate::clock::{Clock, ManualClock};
use stepgate::config::Config;
use stepgate::server::Server;
use stepgate::store::OutboxRow;
use stepgate::web::AppState;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::gate_client::{expect_error, ApiRequest, GateUser};
use crate::testdb::{Backend, TestDb};

/// The secret that signs webhook bodies (and, through a derived key, cancel links).
pub const SIGNING_SECRET: &str = "webhooks-are-signed-with-this-secret-0123456789";
/// The admin API's bearer token.
pub const ADMIN_TOKEN: &str = "support-desk-token-that-is-long-enough-0123456789";
/// The header in which the exchange passes the user's anti-phishing code.
pub const ANTI_PHISHING_HEADER: &str = "x-anti-phishing-code";
/// The rule's cooling-off (24 h) and confirmation window (10 min), as the config says.
pub const COOLING_OFF: Duration = Duration::from_secs(24 * 3600);
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(10 * 60);
/// How long polling waits before giving up: generous, for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);
/// How far in the past the manual clock starts. Browser sessions get their expiry from
/// tower-sessions, which reads the wall clock (now + 1 h), while the gate's session store
/// compares it with the injected clock; a manual clock moved more than an hour past the wall
/// clock would find every session expired, so no passkey ceremony could finish after a long
/// wait. Starting well in the past keeps the tests about this issue's behaviour (reported
/// separately as a bug).
const CLOCK_HEADSTART: Duration = Duration::from_secs(60 * 24 * 3600);
/// Longer than one tick of the gate's background sender (1 s): waiting this long and seeing
/// nothing new means nothing more was going to be sent.
pub const QUIET: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// The webhook receiver.

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub body: String,
    pub payload: Value,
    pub content_type: Option<String>,
    pub signature: Option<String>,
    /// Whether `Stepgate-Signature` is `t=<t>,v1=<HMAC>` over exactly this body.
    pub signature_valid: bool,
    /// The `t=` of the signature.
    pub signed_at: Option<i64>,
    /// What the receiver answered.
    pub answered: StatusCode,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        self.answered.is_success()
    }

    pub fn event(&self) -> &str {
        self.payload["event"].as_str().unwrap_or("")
    }

    pub fn event_id(&self) -> &str {
        self.payload["event_id"].as_str().unwrap_or("")
    }
}

#[derive(Default)]
struct ReceiverState {
    attempts: Mutex<Vec<Attempt>>,
    /// How many of the next POSTs to answer 500 (`u64::MAX`: all of them).
    failures_left: AtomicU64,
}

/// The exchange's notification endpoint: `POST /hook` on 127.0.0.1:0.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        let state = Arc::new(ReceiverState::default());
        let router = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the webhook receiver failed");
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answer the next `n` POSTs with 500.
    pub fn fail_next(&self, n: u64) {
        self.state.failures_left.store(n, Ordering::SeqCst);
    }

    /// Answer every POST with 500 until told otherwise.
    pub fn fail_always(&self) {
        self.fail_next(u64::MAX);
    }

    /// Answer every POST with 200 from now on.
    pub fn succeed(&self) {
        self.fail_next(0);
    }

    /// Every POST so far, oldest first.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The POSTs the receiver accepted (answered 2xx): what the exchange acted on.
    pub fn delivered(&self) -> Vec<Attempt> {
        self.attempts()
            .into_iter()
            .filter(Attempt::succeeded)
            .collect()
    }

    /// The accepted deliveries of `event`.
    pub fn delivered_events(&self, event: &str) -> Vec<Attempt> {
        self.delivered()
            .into_iter()
            .filter(|a| a.event() == event)
            .collect()
    }

    /// The one accepted delivery of `event` about `change_id`; fails if there is not exactly
    /// one.
    pub fn the_delivery(&self, event: &str, change_id: &str) -> Attempt {
        let matching: Vec<Attempt> = self
            .delivered_events(event)
            .into_iter()
            .filter(|a| a.payload["change"]["id"] == change_id)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "expected exactly one delivered `{event}` for change {change_id}, got {:#?}\nall deliveries: {:#?}",
            matching.iter().map(|a| &a.payload).collect::<Vec<_>>(),
            self.delivered().iter().map(|a| &a.payload).collect::<Vec<_>>()
        );
        matching.into_iter().next().expect("one delivery")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let signature = header(&headers, "stepgate-signature");
    let (signature_valid, signed_at) = match &signature {
        Some(signature) => check_signature(signature, &body),
        None => (false, None),
    };
    let fail = state
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
            0 => None,
            u64::MAX => Some(u64::MAX),
            n => Some(n - 1),
        })
        .is_ok();
    let answered = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let payload = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Attempt {
            body: text,
            payload,
            content_type: header(&headers, "content-type"),
            signature,
            signature_valid,
            signed_at,
            answered,
        });
    (answered, axum::Json(json!({ "received": !fail }))).into_response()
}

/// Verifies `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` the way an
/// exchange would: recompute with the shared secret and compare.
fn check_signature(signature: &str, body: &[u8]) -> (bool, Option<i64>) {
    let signed_at = signature
        .split(',')
        .find_map(|part| part.strip_prefix("t="))
        .and_then(|t| t.parse::<i64>().ok());
    let valid = signed_at.is_some_and(|t| {
        stepgate::notify::sign_webhook(SIGNING_SECRET.as_bytes(), t, body) == signature
    });
    (valid, signed_at)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// The stand-in exchange.

/// The exchange API on 127.0.0.1:0: records what reaches it and answers 200 JSON.
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let received: Arc<Mutex<Vec<String>>> = Arc::default();
        let router = Router::new()
            .fallback(record_and_answer)
            .with_state(received.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in exchange");
        let addr = listener.local_addr().expect("upstream address");
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the stand-in exchange failed");
        });
        Self {
            addr,
            received,
            task,
        }
    }

    /// `METHOD path` of everything received so far, oldest first.
    pub fn received(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_and_answer(
    State(received): State<Arc<Mutex<Vec<String>>>>,
    request: Request,
) -> Response {
    let line = format!("{} {}", request.method(), request.uri());
    // Keys named `refused-…` are ones the exchange refuses (an auto-release that fails).
    let refuse = request.uri().path().contains("/refused-");
    received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line);
    if refuse {
        return (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({ "upstream": "refused" })),
        )
            .into_response();
    }
    axum::Json(json!({ "upstream": "ok" })).into_response()
}

// ---------------------------------------------------------------------------------------------
// The gate.

#[derive(Debug, Clone)]
pub struct GateOptions {
    /// `[notifications] max_attempts`.
    pub max_attempts: u32,
    /// Whether the config names `anti_phishing_header`.
    pub anti_phishing: bool,
    /// Whether the admin API listens (on 127.0.0.1:0).
    pub admin: bool,
    /// `[freeze] unfreeze_cooling_off`.
    pub unfreeze_cooling_off: &'static str,
    /// Whether a second webhook (another receiver) is configured.
    pub second_webhook: bool,
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            anti_phishing: false,
            admin: false,
            unfreeze_cooling_off: "24h",
            second_webhook: false,
        }
    }
}

/// A running gate in front of the stand-in exchange, sending webhooks to the receiver.
pub struct TestGate {
    /// Where the tests send requests: `http://127.0.0.1:PORT`.
    pub address: String,
    /// The public origin (`public_url`, the WebAuthn origin): `http://localhost:PORT`.
    pub origin: String,
    pub clock: ManualClock,
    pub receiver: Receiver,
    /// The second webhook's receiver, when configured.
    pub second_receiver: Option<Receiver>,
    pub upstream: Upstream,
    /// The config file, as `stepgate audit --config` reads it.
    pub config_path: PathBuf,
    pub database_url: String,
    state: AppState,
    admin_addr: Option<SocketAddr>,
    port: u16,
    config_text: String,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    _config_dir: tempfile::TempDir,
    _database: TestDb,
}

impl TestGate {
    /// A gate on a fresh database of `backend`; `None` when that backend is unavailable
    /// outside CI (announced by `TestDb`).
    pub async fn start(backend: Backend, options: GateOptions) -> Option<TestGate> {
        let database = TestDb::new(backend).await?;
        let receiver = Receiver::start().await;
        let second_receiver = if options.second_webhook {
            Some(Receiver::start().await)
        } else {
            None
        };
        let upstream = Upstream::start().await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate listener");
        let port = listener.local_addr().expect("gate address").port();
        let mut hooks = vec![receiver.url()];
        hooks.extend(second_receiver.as_ref().map(Receiver::url));
        let config_text = config_text(port, &upstream, &hooks, &database.url, &options);
        let config_dir = tempfile::tempdir().expect("a directory for the config file");
        let config_path = config_dir.path().join("stepgate.toml");
        std::fs::write(&config_path, &config_text).expect("write the config file");
        let clock = ManualClock::new(stepgate::clock::truncate_to_millis(
            OffsetDateTime::now_utc() - CLOCK_HEADSTART,
        ));
        let (state, admin_addr, running) = launch(&config_text, &clock, listener).await;
        Some(TestGate {
            address: format!("http://127.0.0.1:{port}"),
            origin: format!("http://localhost:{port}"),
            clock,
            receiver,
            second_receiver,
            upstream,
            config_path,
            database_url: database.url.clone(),
            state,
            admin_addr,
            port,
            config_text,
            running: Some(running),
            _config_dir: config_dir,
            _database: database,
        })
    }

    /// Stops this gate (in-flight requests finish, the background sender stops) and starts a
    /// new one on the same database, port, config and clock: what a restart of the process
    /// looks like from outside.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the gate's port again after the restart");
        let (state, admin_addr, running) = launch(&self.config_text, &self.clock, listener).await;
        self.state = state;
        self.admin_addr = admin_addr;
        self.running = Some(running);
    }

    /// Stops the gate: it no longer serves, sweeps or sends (the tests can still read its
    /// database through it).
    pub async fn stop(&mut self) {
        if let Some((shutdown, task)) = self.running.take() {
            let _ = shutdown.send(());
            task.await.expect("the gate task panicked");
        }
    }

    pub fn user(&self, name: &str) -> GateUser {
        GateUser::new(name, &self.origin)
    }

    /// A client with no identity, no session and no cookies: someone clicking a link in an
    /// e-mail on another device.
    pub fn stranger(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build a reqwest client")
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// One auto-release round, as each instance's worker runs it. Returns how many changes it
    /// forwarded.
    pub async fn auto_release_round(&self) -> usize {
        let (_keep_running, stop) = tokio::sync::watch::channel(false);
        stepgate::auto_release::release_due(&self.state, &stop)
            .await
            .expect("an auto-release round")
    }

    /// A link the gate made for `public_url` (`http://localhost:PORT/...`), pointed at the
    /// address the tests reach the gate on.
    pub fn reachable(&self, link: &str) -> String {
        let rest = link.strip_prefix(&self.origin).unwrap_or_else(|| {
            panic!(
                "the link {link} is not on the gate's public origin {}",
                self.origin
            )
        });
        format!("{}{rest}", self.address)
    }

    // --- webhooks -------------------------------------------------------------------------

    /// One delivery round, as the background sender does it. Returns how many it delivered.
    pub async fn deliver_once(&self) -> usize {
        self.state
            .stepup
            .notifier()
            .deliver_due(self.state.stepup.store(), &self.clock)
            .await
            .expect("deliver_due reaches the database")
    }

    /// Runs delivery rounds until the receiver's attempts satisfy `done` (the gate's own
    /// background sender may be the one that sends).
    pub async fn deliver_until(&self, what: &str, done: impl Fn(&[Attempt]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.deliver_once().await;
            let attempts = self.receiver.attempts();
            if done(&attempts) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {what}; the receiver saw {:#?}\noutbox: {:#?}",
                attempts
                    .iter()
                    .map(|a| (a.event(), a.answered))
                    .collect::<Vec<_>>(),
                self.outbox_all().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs delivery rounds until `done` holds for this gate (for conditions that involve
    /// both receivers).
    pub async fn deliver_until_gate(&self, what: &str, done: impl Fn(&TestGate) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.deliver_once().await;
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {what}; outbox: {:#?}",
                self.outbox_all().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Delivers until no pending row is left untried: every due delivery was sent and then
    /// accepted or rescheduled (a row in flight still shows no attempt, so this also waits
    /// for a send by the background sender to finish).
    pub async fn deliver_all(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.deliver_once().await;
            let pending = self.outbox("pending").await;
            if pending.iter().all(|row| row.attempts > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for the outbox to drain: {:#?}",
                self.outbox_all().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Outbox rows in `state` (`pending`, `delivered`, `dead`).
    pub async fn outbox(&self, state: &str) -> Vec<OutboxRow> {
        self.state
            .stepup
            .store()
            .outbox_in_state(state)
            .await
            .expect("read the outbox")
    }

    pub async fn outbox_all(&self) -> Vec<OutboxRow> {
        let mut all = Vec::new();
        for state in ["pending", "delivered", "dead"] {
            all.extend(self.outbox(state).await);
        }
        all
    }

    /// Waits until the outbox rows in `state` satisfy `done`.
    pub async fn wait_for_outbox(
        &self,
        state: &str,
        what: &str,
        done: impl Fn(&[OutboxRow]) -> bool,
    ) -> Vec<OutboxRow> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let rows = self.outbox(state).await;
            if done(&rows) {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {what}; outbox: {:#?}",
                self.outbox_all().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // --- the admin API ----------------------------------------------------------------------

    /// `http://127.0.0.1:ADMIN_PORT` (the admin API must be configured).
    pub fn admin_address(&self) -> String {
        let addr = self
            .admin_addr
            .expect("this gate was started without the admin API");
        format!("http://{addr}")
    }

    /// A request to the admin API carrying the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.stranger()
            .request(method, format!("{}{path}", self.admin_address()))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
    }

    // --- the audit log ----------------------------------------------------------------------

    /// The audit rows as the store reads them, oldest first.
    pub async fn audit_rows(&self) -> Vec<stepgate::audit::AuditRow> {
        self.state
            .stepup
            .store()
            .audit_log()
            .await
            .expect("read the audit log")
            .0
    }

    // --- users ------------------------------------------------------------------------------

    /// `user` sends `api` with the anti-phishing code header, as the exchange's edge would;
    /// the request must be held. Returns the change id.
    pub async fn hold_with_code(&self, user: &GateUser, api: &ApiRequest, code: &str) -> String {
        let response = user
            .request(&self.address, api.method.clone(), &api.path_and_query)
            .header("content-type", &api.content_type)
            .header(ANTI_PHISHING_HEADER, code)
            .body(api.body.clone())
            .send()
            .await
            .expect("send the protected request");
        let body = expect_error(response, StatusCode::FORBIDDEN, "step_up_required").await;
        body["change_id"]
            .as_str()
            .unwrap_or_else(|| panic!("step_up_required without a change_id: {body}"))
            .to_string()
    }

    /// `GET /_stepgate/api/account` for `user`: whether the account is frozen.
    pub async fn is_frozen(&self, user: &GateUser) -> bool {
        let response = user
            .request(
                &self.address,
                reqwest::Method::GET,
                "/_stepgate/api/account",
            )
            .send()
            .await
            .expect("send GET account");
        let body = crate::gate_client::expect_json(response, StatusCode::OK).await;
        body["frozen"]
            .as_bool()
            .unwrap_or_else(|| panic!("GET account without a boolean `frozen`: {body}"))
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        if let Some((shutdown, task)) = self.running.take() {
            let _ = shutdown.send(());
            task.abort();
        }
    }
}

type Running = (oneshot::Sender<()>, JoinHandle<()>);

async fn launch(
    config_text: &str,
    clock: &ManualClock,
    listener: TcpListener,
) -> (AppState, Option<SocketAddr>, Running) {
    let config = Config::from_toml_str(config_text, "test config", &[])
        .unwrap_or_else(|e| panic!("the test config is invalid: {e}\n{config_text}"));
    let server = Server::bind(config, Arc::new(clock.clone()), listener)
        .await
        .expect("the gate starts (database connects and migrates)");
    let state = server.state().clone();
    let admin_addr = server.admin_local_addr();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run_until(async move {
                let _ = stopped.await;
            })
            .await
            .expect("the gate stopped with an error");
    });
    (state, admin_addr, (shutdown, task))
}

fn config_text(
    port: u16,
    upstream: &Upstream,
    hooks: &[String],
    database_url: &str,
    options: &GateOptions,
) -> String {
    let admin = if options.admin {
        format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n")
    } else {
        String::new()
    };
    let anti_phishing = if options.anti_phishing {
        format!("anti_phishing_header = \"{ANTI_PHISHING_HEADER}\"\n")
    } else {
        String::new()
    };
    format!(
        r#"
listen = "127.0.0.1:{port}"
public_url = "http://localhost:{port}"
upstream = "http://{upstream}"
database_url = "{database_url}"
{admin}
[limits]
upstream_timeout = "5s"
# Auto-release rounds are run by the tests themselves (`auto_release_round`).
auto_release_interval = "1h"

[webauthn]
rp_id = "localhost"
rp_name = "Test Exchange"

[identity]
mode = "header"
header = "x-user-id"

[notifications]
webhooks = {hooks:?}
signing_secret = "{SIGNING_SECRET}"
max_attempts = {max_attempts}
retry_base = "2s"
{anti_phishing}
[freeze]
unfreeze_cooling_off = "{unfreeze}"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"

[[rules]]
name = "auto-withdrawals"
methods = ["PUT"]
path = "/api/v1/auto-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
release = "auto"
"#,
        upstream = upstream.addr,
        max_attempts = options.max_attempts,
        unfreeze = options.unfreeze_cooling_off,
    )
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// The change ids in a JSON array of strings, sorted.
pub fn sorted_ids(value: &Value) -> Vec<String> {
    let mut ids: Vec<String> = value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {value}"))
        .iter()
        .map(|id| {
            id.as_str()
                .unwrap_or_else(|| panic!("expected an id string, got {id}"))
                .to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// Parses RFC 3339 text from a JSON answer.
pub fn parse_time(value: &Value) -> OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 time, got {value}"));
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("`{text}` is not RFC 3339: {e}"))
}

/// The status and body text of an answer.
pub async fn status_and_text(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let text = response.text().await.expect("read the answer's body");
    (status, text)
}
