//! The test kit of the passkey suite: a stand-in exchange that records what reaches it, a gate
//! on port 0 with a fresh SQLite file, a manual clock and a test-chosen `[passkeys]` policy, and
//! sessions — one identity header plus one cookie jar each, since ceremonies are bound to the
//! gate session. Authenticators are separate values the test holds, so one person can own
//! several devices and an attacker can share the victim's identity but not the victim's device.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use stepgate::clock::{Clock, ManualClock};
use stepgate::config::Config;
use stepgate::server::Server;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use webauthn_authenticator_rs::{AuthenticatorBackend, WebauthnAuthenticator};
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

use crate::flag_authenticator::FlagAuthenticator;
use crate::testdb::{Backend, TestDb};

/// The identity header the gate trusts in these tests (set by the exchange's edge).
pub const IDENTITY_HEADER: &str = "x-user-id";

pub const HOUR: Duration = Duration::from_secs(3600);
pub const MINUTE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The stand-in exchange.

/// One request the exchange received: method and path.
pub type Received = Arc<Mutex<Vec<String>>>;

/// A tiny exchange API on 127.0.0.1:0 that answers 200 to everything and records it.
pub struct TestUpstream {
    pub addr: SocketAddr,
    received: Received,
}

impl TestUpstream {
    async fn start() -> Self {
        let received: Received = Arc::default();
        let router = Router::new().fallback(record).with_state(received.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in upstream");
        let addr = listener.local_addr().expect("upstream local address");
        tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the stand-in upstream failed");
        });
        Self { addr, received }
    }

    /// `METHOD /path` of everything the exchange received, oldest first.
    pub fn received(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn assert_saw_nothing(&self, context: &str) {
        let received = self.received();
        assert!(
            received.is_empty(),
            "{context}: the exchange must not have been reached, but it received {received:?}"
        );
    }
}

async fn record(State(received): State<Received>, request: Request) -> Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line);
    axum::Json(json!({"upstream": "ok"})).into_response()
}

// ---------------------------------------------------------------------------------------------
// The gate.

/// What a test changes in the gate's configuration.
#[derive(Debug, Clone, Default)]
pub struct GateOptions {
    /// Lines of the global `[passkeys]` section (empty: every default).
    pub passkeys: String,
    /// Extra lines on the `enable-withdrawals` rule: its own credential policy.
    pub rule_policy: String,
    /// Where the gate's manual clock starts; `None`: 90 days before the wall clock (see
    /// [`spawn_gate`] for why).
    pub clock_start: Option<OffsetDateTime>,
}

impl GateOptions {
    pub fn passkeys(lines: &str) -> Self {
        Self {
            passkeys: lines.to_string(),
            ..Self::default()
        }
    }

    pub fn rule_policy(lines: &str) -> Self {
        Self {
            rule_policy: lines.to_string(),
            ..Self::default()
        }
    }
}

/// A running gate in front of a running stand-in exchange.
pub struct TestGate {
    /// Where the tests send requests: `http://127.0.0.1:PORT`.
    pub address: String,
    /// The public origin (the WebAuthn origin): `http://localhost:PORT`.
    pub origin: String,
    pub clock: ManualClock,
    pub upstream: TestUpstream,
    /// The gate's own store, to check what it recorded (security events, audit rows).
    pub store: stepgate::store::Store,
    _database: TestDb,
}

/// A gate with `options` on a fresh SQLite database. Two rules: `enable-withdrawals` (with the
/// test's rule policy) and `raise-limits` (never a policy of its own, so the global one applies).
pub async fn spawn_gate(options: GateOptions) -> TestGate {
    let database = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite is always available");
    let upstream = TestUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate listener");
    let port = listener.local_addr().expect("gate local address").port();

    let config_text = format!(
        r#"
listen = "127.0.0.1:{port}"
public_url = "http://localhost:{port}"
upstream = "http://{upstream}"
database_url = "{db}"

[webauthn]
rp_id = "localhost"
rp_name = "Test Exchange"

[identity]
mode = "header"
header = "{IDENTITY_HEADER}"

[limits]
# The suite starts many ceremonies per user; the per-minute cap is not under test here.
max_ceremonies_per_minute = 1000

[passkeys]
{passkeys}

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
{rule_policy}

[[rules]]
name = "raise-limits"
methods = ["PUT"]
path = "/api/v1/limits/{{account}}"
cooling_off = "24h"
confirm_within = "10m"
summary = "Raise the withdrawal limit of account {{account}}"
"#,
        upstream = upstream.addr,
        db = database.url,
        passkeys = options.passkeys,
        rule_policy = options.rule_policy,
    );
    let config = Config::from_toml_str(&config_text, "test config", &[])
        .unwrap_or_else(|e| panic!("the test config is invalid: {e}\n{config_text}"));

    // Behind the wall clock by default: the gate's session store checks a session's expiry
    // against the injected clock, but tower-sessions writes that expiry from the wall clock
    // (now + 1h), so once the manual clock runs more than an hour ahead every session is dead on
    // arrival and no ceremony can finish (pinned by `sessions::a_ceremony_finishes_after_the_clock_has_moved_on`). Starting three
    // months back leaves every test room to move the clock by days. Tests that need real
    // certificate validity (attestation) start at the wall clock instead.
    let start = options
        .clock_start
        .unwrap_or_else(|| OffsetDateTime::now_utc() - time::Duration::days(90));
    let clock = ManualClock::new(stepgate::clock::truncate_to_millis(start));
    let server = Server::bind(config, Arc::new(clock.clone()), listener)
        .await
        .expect("the gate starts (database connects and migrates)");
    let store = server.state().stepup.store().clone();
    tokio::spawn(async move {
        server.run().await.expect("the gate stopped with an error");
    });

    TestGate {
        address: format!("http://127.0.0.1:{port}"),
        origin: format!("http://localhost:{port}"),
        clock,
        upstream,
        store,
        _database: database,
    }
}

impl TestGate {
    /// A new gate session (a fresh cookie jar) for the identity `user`. Two sessions of the same
    /// name are the same account seen from two browsers — or the victim and a session thief.
    pub fn session(&self, user: &str) -> Session {
        Session {
            user: user.to_string(),
            address: self.address.clone(),
            origin: Url::parse(&self.origin).expect("the public origin is a URL"),
            client: reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("build a reqwest client"),
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

// ---------------------------------------------------------------------------------------------
// The request a user wants to make to the exchange.

/// One request to the exchange's API, kept so it can be sent again byte for byte.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub body: String,
}

/// `PUT /api/v1/api-keys/{key_id}` adding `withdraw`: what `enable-withdrawals` holds.
pub fn enable_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path: format!("/api/v1/api-keys/{key_id}"),
        body: format!(
            "{{\"permissions\": [\"read\", \"trade\", \"withdraw\"], \"label\": \"bot {key_id}\", \
             \"ip_whitelist\": [\"203.0.113.7\"]}}"
        ),
    }
}

/// `PUT /api/v1/limits/{account}`: what `raise-limits` holds (global credential policy).
pub fn raise_limits(account: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path: format!("/api/v1/limits/{account}"),
        body: "{\"daily_withdrawal_limit\": 1000000}".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// One gate session: an identity and a cookie jar.
#[derive(Clone)]
pub struct Session {
    pub user: String,
    address: String,
    origin: Url,
    client: reqwest::Client,
}

impl Session {
    /// A request to the gate with this session's identity header and cookies.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.address, path))
            .header(IDENTITY_HEADER, &self.user)
    }

    async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.request(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("send POST {path}: {e}"))
    }

    // --- listing, renaming ------------------------------------------------------------------

    /// `GET /_stepgate/api/passkeys`: this user's passkeys.
    pub async fn passkeys(&self) -> Vec<Value> {
        let response = self
            .request(Method::GET, "/_stepgate/api/passkeys")
            .send()
            .await
            .expect("send GET passkeys");
        let body = expect_json(response, StatusCode::OK).await;
        body["passkeys"]
            .as_array()
            .unwrap_or_else(|| panic!("GET passkeys without a passkeys array: {body}"))
            .clone()
    }

    /// The listed passkey with `id`, if it is listed.
    pub async fn passkey(&self, id: &str) -> Option<Value> {
        self.passkeys().await.into_iter().find(|p| p["id"] == id)
    }

    /// The `state` of the listed passkey `id` (panics when it is not listed).
    pub async fn passkey_state(&self, id: &str) -> String {
        let passkey = self
            .passkey(id)
            .await
            .unwrap_or_else(|| panic!("passkey {id} is not listed"));
        passkey["state"]
            .as_str()
            .unwrap_or_else(|| panic!("a listed passkey without a state: {passkey}"))
            .to_string()
    }

    pub async fn rename(&self, id: &str, name: &str) -> reqwest::Response {
        self.post_json(
            &format!("/_stepgate/api/passkeys/{id}/rename"),
            json!({"name": name}),
        )
        .await
    }

    pub async fn remove(&self, id: &str) -> reqwest::Response {
        self.post_json(&format!("/_stepgate/api/passkeys/{id}/remove"), json!({}))
            .await
    }

    // --- registering ------------------------------------------------------------------------

    /// `register/start`, which must succeed: `{"ceremony_id","publicKey"}`.
    pub async fn register_start(&self) -> Value {
        let response = self
            .post_json("/_stepgate/api/passkeys/register/start", json!({}))
            .await;
        expect_json(response, StatusCode::OK).await
    }

    pub async fn register_finish(
        &self,
        ceremony_id: &str,
        credential: &Value,
        name: &str,
    ) -> reqwest::Response {
        self.post_json(
            "/_stepgate/api/passkeys/register/finish",
            json!({"ceremony_id": ceremony_id, "credential": credential, "name": name}),
        )
        .await
    }

    /// What `authenticator` answers to the creation options of `start` (as the page sends it).
    pub fn create_credential(
        &self,
        authenticator: &mut dyn AuthenticatorBackend,
        start: &Value,
    ) -> Value {
        let options: CreationChallengeResponse = serde_json::from_value(start.clone())
            .unwrap_or_else(|e| panic!("register/start is not creation options ({e}): {start}"));
        let credential = authenticator
            .do_registration(self.origin.clone(), options)
            .unwrap_or_else(|e| panic!("the authenticator refused to register: {e:?}"));
        serde_json::to_value(credential).expect("serialise RegisterPublicKeyCredential")
    }

    /// The whole registration with `authenticator`; returns register/finish's answer.
    pub async fn register(
        &self,
        authenticator: &mut dyn AuthenticatorBackend,
        name: &str,
    ) -> reqwest::Response {
        let start = self.register_start().await;
        let credential = self.create_credential(authenticator, &start);
        self.register_finish(&ceremony_id_of(&start), &credential, name)
            .await
    }

    /// Registers the user's first passkey: 200, active. Returns the answer.
    pub async fn register_first(
        &self,
        authenticator: &mut dyn AuthenticatorBackend,
        name: &str,
    ) -> Value {
        let body = expect_json(self.register(authenticator, name).await, StatusCode::OK).await;
        assert_eq!(body["state"], "active", "a first passkey is active: {body}");
        assert_eq!(body["name"], name, "register/finish answer: {body}");
        assert!(body["id"].is_string(), "register/finish answer: {body}");
        body
    }

    /// Registers a passkey while the user has an active one: 202, pending, with the built-in
    /// change that must confirm it. Returns the answer.
    pub async fn register_pending(
        &self,
        authenticator: &mut dyn AuthenticatorBackend,
        name: &str,
    ) -> Value {
        let body = expect_json(
            self.register(authenticator, name).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(
            body["state"], "pending",
            "an added passkey is pending: {body}"
        );
        assert!(
            body["id"].is_string() && body["change_id"].is_string(),
            "register/finish (pending) answer: {body}"
        );
        body
    }

    // --- changes ----------------------------------------------------------------------------

    pub async fn send(&self, api: &ApiRequest) -> reqwest::Response {
        self.request(api.method.clone(), &api.path)
            .header("content-type", "application/json")
            .body(api.body.clone())
            .send()
            .await
            .expect("send the API request through the gate")
    }

    /// Sends `api`, which must be held (403 `step_up_required`); returns the change id.
    pub async fn hold(&self, api: &ApiRequest) -> String {
        let body = expect_error(
            self.send(api).await,
            StatusCode::FORBIDDEN,
            "step_up_required",
        )
        .await;
        body["change_id"]
            .as_str()
            .unwrap_or_else(|| panic!("step_up_required without a change_id: {body}"))
            .to_string()
    }

    /// `api` again with `Stepgate-Change: {change_id}`.
    pub async fn release(&self, api: &ApiRequest, change_id: &str) -> reqwest::Response {
        self.request(api.method.clone(), &api.path)
            .header("content-type", "application/json")
            .header("stepgate-change", change_id)
            .body(api.body.clone())
            .send()
            .await
            .expect("send the release through the gate")
    }

    pub async fn confirm_start(&self, change_id: &str) -> reqwest::Response {
        self.post_json(
            &format!("/_stepgate/api/changes/{change_id}/confirm/start"),
            json!({}),
        )
        .await
    }

    pub async fn confirm_finish(
        &self,
        change_id: &str,
        ceremony_id: &str,
        credential: &Value,
    ) -> reqwest::Response {
        self.post_json(
            &format!("/_stepgate/api/changes/{change_id}/confirm/finish"),
            json!({"ceremony_id": ceremony_id, "credential": credential}),
        )
        .await
    }

    /// `confirm/start`, which must succeed: `{"ceremony_id","publicKey"}`.
    pub async fn start_confirmation(&self, change_id: &str) -> Value {
        expect_json(self.confirm_start(change_id).await, StatusCode::OK).await
    }

    /// What `authenticator` answers to the request options of `start`.
    pub fn sign(&self, authenticator: &mut dyn AuthenticatorBackend, start: &Value) -> Value {
        let options: RequestChallengeResponse = serde_json::from_value(start.clone())
            .unwrap_or_else(|e| panic!("confirm/start is not request options ({e}): {start}"));
        let credential = authenticator
            .do_authentication(self.origin.clone(), options)
            .unwrap_or_else(|e| {
                panic!("the authenticator refused to sign (was its credential offered?): {e:?}\n{start}")
            });
        serde_json::to_value(credential).expect("serialise PublicKeyCredential")
    }

    /// The whole confirmation as the page does it: start's answer when start fails, otherwise
    /// finish's answer.
    pub async fn try_confirm(
        &self,
        change_id: &str,
        authenticator: &mut dyn AuthenticatorBackend,
    ) -> reqwest::Response {
        let start = self.confirm_start(change_id).await;
        if start.status() != StatusCode::OK {
            return start;
        }
        let start: Value = start.json().await.expect("confirm/start answers JSON");
        let credential = self.sign(authenticator, &start);
        self.confirm_finish(change_id, &ceremony_id_of(&start), &credential)
            .await
    }

    /// A confirmation that must succeed; returns finish's answer.
    pub async fn confirm(
        &self,
        change_id: &str,
        authenticator: &mut dyn AuthenticatorBackend,
    ) -> Value {
        expect_json(
            self.try_confirm(change_id, authenticator).await,
            StatusCode::OK,
        )
        .await
    }

    pub async fn cancel(&self, change_id: &str) -> reqwest::Response {
        self.post_json(
            &format!("/_stepgate/api/changes/{change_id}/cancel"),
            json!({}),
        )
        .await
    }

    /// `GET /_stepgate/api/changes/{id}` (must be 200).
    pub async fn change(&self, change_id: &str) -> Value {
        let response = self
            .request(Method::GET, &format!("/_stepgate/api/changes/{change_id}"))
            .send()
            .await
            .expect("send GET change");
        expect_json(response, StatusCode::OK).await
    }

    pub async fn change_state(&self, change_id: &str) -> String {
        let change = self.change(change_id).await;
        change["state"]
            .as_str()
            .unwrap_or_else(|| panic!("GET change without a state: {change}"))
            .to_string()
    }

    /// The confirm page of `change_id` as a browser asks for it (must be 200 HTML).
    pub async fn change_page(&self, change_id: &str) -> String {
        let response = self
            .request(Method::GET, &format!("/_stepgate/changes/{change_id}"))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
            .await
            .expect("send GET change page");
        let status = response.status();
        let text = response.text().await.expect("read the change page");
        assert_eq!(status, StatusCode::OK, "the change page: {text}");
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Shared flows.

/// Adds `new` to a user who already has the active `existing`: registers it (pending), confirms
/// the built-in change with `existing`, and waits out the add cooling-off (`add_cooling_off`)
/// on the manual clock. Returns the new passkey's id, which is then active.
pub async fn add_active_passkey(
    gate: &TestGate,
    session: &Session,
    existing: &mut dyn AuthenticatorBackend,
    new: &mut dyn AuthenticatorBackend,
    name: &str,
    add_cooling_off: Duration,
) -> String {
    let pending = session.register_pending(new, name).await;
    let id = text(&pending["id"]);
    let confirmed = session
        .confirm(&text(&pending["change_id"]), existing)
        .await;
    assert_eq!(
        confirmed["state"], "cooling_off",
        "passkey-add confirmed: {confirmed}"
    );
    gate.advance(add_cooling_off + MINUTE);
    assert_eq!(session.passkey_state(&id).await, "active");
    id
}

/// A confirmation signed with `authenticator`'s newest credential whether or not the gate offers
/// it in `allowCredentials`: what a scripted client can always do, so the gate must refuse it on
/// finish, not merely leave it out of the options.
pub async fn try_confirm_forcing(
    session: &Session,
    change_id: &str,
    authenticator: &mut FlagAuthenticator,
) -> reqwest::Response {
    authenticator.force_credential = authenticator.last_credential_id();
    let response = session.try_confirm(change_id, authenticator).await;
    authenticator.force_credential = None;
    response
}

// ---------------------------------------------------------------------------------------------
// Reading answers.

pub fn ceremony_id_of(start: &Value) -> String {
    text(&start["ceremony_id"])
}

/// A JSON string's text (panics on anything else).
pub fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
        .to_string()
}

/// The credential ids a confirm/start answer offers in `allowCredentials`, as raw bytes.
pub fn allowed_credentials(start: &Value) -> Vec<Vec<u8>> {
    start["publicKey"]["allowCredentials"]
        .as_array()
        .unwrap_or_else(|| panic!("request options without allowCredentials: {start}"))
        .iter()
        .map(|c| {
            URL_SAFE_NO_PAD
                .decode(text(&c["id"]).trim_end_matches('='))
                .unwrap_or_else(|e| panic!("an allowCredentials id is not base64url ({e}): {c}"))
        })
        .collect()
}

/// Reads a JSON answer that must have `status`.
pub async fn expect_json(response: reqwest::Response, status: StatusCode) -> Value {
    let (actual, url, body) = read(response).await;
    assert_eq!(
        actual, status,
        "{url}: expected {status}, got {actual} with body {body}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"))
}

/// Reads a gate error that must be `status` with `{"error": code, "message": ...}`.
pub async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let (actual, url, text) = read(response).await;
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{url}: expected {status} `{code}`, got {actual} with a non-JSON body ({e}): {text}")
    });
    assert!(
        actual == status && body["error"] == code,
        "{url}: expected {status} `{code}`, got {actual} with body {text}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{url}: the `{code}` error has no human message: {text}"
    );
    body
}

/// Reads a gate error that must be `status` with one of `codes` (where the contract names the
/// refusal but not which of the gate's codes carries it).
pub async fn expect_error_in(
    response: reqwest::Response,
    status: StatusCode,
    codes: &[&str],
) -> Value {
    let (actual, url, text) = read(response).await;
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{url}: expected {status} {codes:?}, got {actual} with a non-JSON body ({e}): {text}"
        )
    });
    assert!(
        actual == status && codes.iter().any(|code| body["error"] == *code),
        "{url}: expected {status} {codes:?}, got {actual} with body {text}"
    );
    body
}

async fn read(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let url = response.url().path().to_string();
    let text = response.text().await.expect("read the answer's body");
    (status, url, text)
}

pub fn parse_time(value: &Value) -> OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 string, got {value}"));
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|e| panic!("`{text}` is not RFC 3339: {e}"))
}

/// Asserts `actual` is within a second of `expected` (the store keeps milliseconds, the JSON may
/// keep seconds).
pub fn assert_close(actual: OffsetDateTime, expected: OffsetDateTime, what: &str) {
    let gap = (actual - expected).abs();
    assert!(
        gap <= time::Duration::seconds(1),
        "{what}: expected about {expected}, got {actual}"
    );
}

/// `std` duration as a `time` duration, for arithmetic on timestamps.
pub fn span(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).expect("a test duration fits")
}
