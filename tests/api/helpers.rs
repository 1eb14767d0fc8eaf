//! The test kit: a stand-in exchange that records every request reaching it, a gate started on
//! port 0 with a fresh SQLite file and a manual clock, and test users who carry an identity, a
//! cookie-holding HTTP client (one gate session each) and a software passkey.
//!
//! Shared flows (register a passkey, get a change held, confirm it) live here so the tests read
//! like the story they prove.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::testdb::{Backend, TestDb};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use stepgate::clock::{Clock, ManualClock};
use stepgate::config::Config;
use stepgate::server::Server;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

/// The HMAC secret the signed-identity variant shares with the (imaginary) edge.
pub const HMAC_SECRET: &str = "edge-and-gate-share-this-secret-0123456789";
/// The HS256 secret of the JWT variant.
pub const JWT_SECRET: &str = "the-exchange-signs-sessions-with-this-0123456789";
/// The cookie the JWT variant also reads the session token from.
pub const JWT_COOKIE: &str = "session";

/// The size of the streamed bodies in pass-through tests: 8 MiB.
pub const EIGHT_MIB: usize = 8 * 1024 * 1024;
/// How long the upstream's `/slow` route takes: longer than any gate timeout in the tests.
pub const SLOW_UPSTREAM: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The stand-in upstream (the exchange API).

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ReceivedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| {
            v.to_str()
                .expect("upstream received a header that is not visible ASCII")
        })
    }
}

type Received = Arc<Mutex<Vec<ReceivedRequest>>>;

/// A tiny exchange API on 127.0.0.1:0 that records what reaches it.
///
/// Routes: `GET /download/{bytes}` streams that many pattern bytes; `/slow` answers after
/// [`SLOW_UPSTREAM`]; `/hop-by-hop` answers with connection-scoped headers; everything else
/// answers 200 JSON describing what was received (including the body's SHA-256).
pub struct TestUpstream {
    pub addr: SocketAddr,
    received: Received,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        let received: Received = Arc::default();
        let router = Router::new()
            .route("/download/{bytes}", get(download))
            .route("/slow", any(slow))
            .route("/hop-by-hop", any(hop_by_hop_response))
            .fallback(echo)
            .with_state(received.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in upstream");
        let addr = listener.local_addr().expect("upstream local address");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("the stand-in upstream failed");
        });
        Self {
            addr,
            received,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the upstream has received so far, oldest first.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn assert_saw_nothing(&self, context: &str) {
        let received = self.received();
        assert!(
            received.is_empty(),
            "{context}: the upstream must not have been reached, but it received {:#?}",
            received
                .iter()
                .map(|r| format!("{} {}", r.method, r.path_and_query))
                .collect::<Vec<_>>()
        );
    }

    /// Stops accepting connections and waits until the port is closed.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the stand-in upstream panicked");
        }
    }
}

async fn record(received: &Received, request: Request) -> ReceivedRequest {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("upstream reads the whole request body");
    let entry = ReceivedRequest {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(entry.clone());
    entry
}

async fn echo(State(received): State<Received>, request: Request) -> Response {
    let entry = record(&received, request).await;
    (
        StatusCode::OK,
        [("x-upstream", "exchange")],
        axum::Json(json!({
            "upstream": "ok",
            "method": entry.method.as_str(),
            "path": entry.path_and_query,
            "body_len": entry.body.len(),
            "body_sha256": sha256_hex(&entry.body),
        })),
    )
        .into_response()
}

async fn download(
    State(received): State<Received>,
    Path(bytes): Path<usize>,
    request: Request,
) -> Response {
    record(&received, request).await;
    let chunks = pattern_chunks(bytes).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("a streamed download response")
}

async fn slow(State(received): State<Received>, request: Request) -> Response {
    record(&received, request).await;
    tokio::time::sleep(SLOW_UPSTREAM).await;
    axum::Json(json!({"upstream": "finally"})).into_response()
}

async fn hop_by_hop_response(State(received): State<Received>, request: Request) -> Response {
    record(&received, request).await;
    let mut response = axum::Json(json!({"upstream": "ok"})).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "connection",
        HeaderValue::from_static("x-upstream-private, keep-alive"),
    );
    headers.insert("x-upstream-private", HeaderValue::from_static("internal"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert("x-upstream-public", HeaderValue::from_static("visible"));
    response
}

// ---------------------------------------------------------------------------------------------
// Deterministic bulk data for the streaming tests.

const PATTERN_CHUNK: usize = 64 * 1024;

/// `total` bytes of a fixed pseudo-random pattern, in 64 KiB chunks.
pub fn pattern_chunks(total: usize) -> impl Iterator<Item = Bytes> + Send + 'static {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = total;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let len = left.min(PATTERN_CHUNK);
        left -= len;
        let mut chunk = Vec::with_capacity(len);
        for _ in 0..len {
            // xorshift64: cheap, and far from compressible or repetitive.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.push((state >> 24) as u8);
        }
        Some(Bytes::from(chunk))
    })
}

/// The SHA-256 (hex) of `pattern_chunks(total)`.
pub fn pattern_sha256(total: usize) -> String {
    let mut hasher = Sha256::new();
    for chunk in pattern_chunks(total) {
        hasher.update(&chunk);
    }
    hex(&hasher.finalize())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The gate.

/// How the gate identifies callers in one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// `x-user-id: alice`, trusted as is.
    Header,
    /// `x-user-id: alice.{ts}.{hmac}` signed with [`HMAC_SECRET`].
    SignedHeader,
    /// `Authorization: Bearer <HS256 JWT>` signed with [`JWT_SECRET`] (or the [`JWT_COOKIE`]).
    Jwt,
}

#[derive(Debug, Clone)]
pub struct AppOptions {
    pub backend: Backend,
    pub identity: IdentityKind,
    pub upstream_timeout: &'static str,
    pub ceremony_ttl: &'static str,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            identity: IdentityKind::Header,
            upstream_timeout: "2s",
            ceremony_ttl: "5m",
        }
    }
}

/// A running gate in front of a running stand-in upstream.
pub struct TestApp {
    /// Where the tests send requests: `http://127.0.0.1:PORT`.
    pub address: String,
    /// The public origin (WebAuthn origin): `http://localhost:PORT`.
    pub origin: String,
    pub clock: ManualClock,
    pub upstream: TestUpstream,
    pub identity: IdentityKind,
    _database: TestDb,
}

/// A gate on `backend` with the default options; `None` when that backend is unavailable
/// outside CI (announced by `TestDb`).
/// The config of a gate on `port` in front of `upstream_url`: header identity (`x-user-id`), a
/// SQLite file in `db_dir`, the `[limits]` lines given and the one protected rule of these
/// tests. For the suites that start a `Server` of their own on raw connections.
pub fn gate_config(
    port: u16,
    upstream_url: &str,
    db_dir: &std::path::Path,
    limits: &str,
) -> Config {
    let database_url = format!("sqlite://{}/gate.db", db_dir.display());
    config_with(port, upstream_url, &database_url, HEADER_IDENTITY, limits)
}

const HEADER_IDENTITY: &str = "mode = \"header\"\nheader = \"x-user-id\"\n";

/// A gate's config: its `[identity]` and `[limits]` lines given, and the one protected rule of
/// these tests (enabling withdrawals on an API key).
fn config_with(
    port: u16,
    upstream_url: &str,
    database_url: &str,
    identity: &str,
    limits: &str,
) -> Config {
    let text = format!(
        r#"
listen = "127.0.0.1:{port}"
public_url = "http://localhost:{port}"
upstream = "{upstream_url}"
database_url = "{database_url}"

[webauthn]
rp_id = "localhost"
rp_name = "Test Exchange"

[identity]
{identity}
[limits]
{limits}

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
    Config::from_toml_str(&text, "test config", &[])
        .unwrap_or_else(|error| panic!("the test config is invalid: {error}\n{text}"))
}

pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(AppOptions {
        backend,
        ..AppOptions::default()
    })
    .await
}

pub async fn spawn_app_with(options: AppOptions) -> Option<TestApp> {
    let database = TestDb::new(options.backend).await?;
    let upstream = TestUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate listener");
    let port = listener.local_addr().expect("gate local address").port();

    let identity = match options.identity {
        IdentityKind::Header => HEADER_IDENTITY.to_string(),
        IdentityKind::SignedHeader => {
            format!("{HEADER_IDENTITY}hmac_secret = \"{HMAC_SECRET}\"\n")
        }
        IdentityKind::Jwt => format!(
            "mode = \"jwt\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\
             cookie = \"{JWT_COOKIE}\"\nclaim = \"sub\"\n"
        ),
    };
    let limits = format!(
        "max_body_bytes = \"64KiB\"\nupstream_timeout = \"{}\"\nceremony_ttl = \"{}\"\n",
        options.upstream_timeout, options.ceremony_ttl
    );
    let config = config_with(port, &upstream.url(), &database.url, &identity, &limits);

    let clock = ManualClock::starting_now();
    let server = Server::bind(config, Arc::new(clock.clone()), listener)
        .await
        .expect("the gate starts (database connects and migrates)");
    tokio::spawn(async move {
        server.run().await.expect("the gate stopped with an error");
    });

    Some(TestApp {
        address: format!("http://127.0.0.1:{port}"),
        origin: format!("http://localhost:{port}"),
        clock,
        upstream,
        identity: options.identity,
        _database: database,
    })
}

impl TestApp {
    /// A user with their own gate session (cookie jar) and their own software passkey that
    /// claims user verification.
    pub fn user(&self, name: &str) -> TestUser {
        TestUser {
            name: name.to_string(),
            address: self.address.clone(),
            origin: self.origin.clone(),
            clock: self.clock.clone(),
            identity: self.identity,
            client: cookie_client(),
            passkey: Arc::new(Mutex::new(SoftPasskey::new(true))),
            credential_id: Arc::default(),
        }
    }

    /// A client that presents no identity at all.
    pub fn anonymous(&self) -> reqwest::Client {
        cookie_client()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build a reqwest client")
}

// ---------------------------------------------------------------------------------------------
// The request a user wants to make to the exchange.

/// One request to the exchange's API, kept so it can be sent again byte for byte.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub path_and_query: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// `PUT /api/v1/api-keys/{key_id}` that adds `withdraw` (and whitelists an IP, as the fraudster
/// would ask). Odd spacing on purpose: the release must carry these exact bytes.
pub fn enable_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path_and_query: format!("/api/v1/api-keys/{key_id}"),
        content_type: "application/json".into(),
        body: format!(
            "{{\"permissions\": [\"read\", \"trade\", \"withdraw\"],  \"label\": \"bot {key_id}\", \
             \"ip_whitelist\": [\"203.0.113.7\"]}}"
        )
        .into_bytes(),
    }
}

impl ApiRequest {
    pub fn json(method: Method, path_and_query: &str, body: &str) -> Self {
        Self {
            method,
            path_and_query: path_and_query.to_string(),
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn with_body(&self, body: &str) -> Self {
        Self {
            body: body.as_bytes().to_vec(),
            ..self.clone()
        }
    }

    pub fn with_path(&self, path_and_query: &str) -> Self {
        Self {
            path_and_query: path_and_query.to_string(),
            ..self.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test users.

/// What a held request's 403 told the client.
#[derive(Debug, Clone)]
pub struct Held {
    pub change_id: String,
    pub www_authenticate: String,
    pub body: Value,
}

/// A started passkey ceremony: its id and the full `{"ceremony_id","publicKey"}` answer.
#[derive(Debug, Clone)]
pub struct Ceremony {
    pub ceremony_id: String,
    pub options: Value,
}

/// One user of the exchange. Clones share the session and the passkey.
#[derive(Clone)]
pub struct TestUser {
    pub name: String,
    address: String,
    origin: String,
    clock: ManualClock,
    identity: IdentityKind,
    client: reqwest::Client,
    passkey: Arc<Mutex<SoftPasskey>>,
    credential_id: Arc<Mutex<Option<String>>>,
}

impl TestUser {
    /// The same person in a second browser: same identity and passkey, another gate session.
    pub fn in_another_session(&self) -> TestUser {
        TestUser {
            client: cookie_client(),
            ..self.clone()
        }
    }

    /// The identity header this user presents right now (signatures and tokens are minted
    /// against the gate's clock, so moving the clock never makes them stale by accident).
    pub fn identity_header(&self) -> (&'static str, String) {
        let now = self.clock.now();
        match self.identity {
            IdentityKind::Header => ("x-user-id", self.name.clone()),
            IdentityKind::SignedHeader => (
                "x-user-id",
                stepgate::identity::sign_identity_header(&self.name, HMAC_SECRET.as_bytes(), now),
            ),
            IdentityKind::Jwt => (
                "authorization",
                format!(
                    "Bearer {}",
                    jwt(
                        &json!({"sub": self.name, "exp": now.unix_timestamp() + 3600}),
                        JWT_SECRET
                    )
                ),
            ),
        }
    }

    /// A request to the gate carrying this user's identity and session.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let (name, value) = self.identity_header();
        self.client
            .request(method, format!("{}{}", self.address, path))
            .header(name, value)
    }

    pub async fn send(&self, api: &ApiRequest) -> reqwest::Response {
        self.request(api.method.clone(), &api.path_and_query)
            .header("content-type", &api.content_type)
            .body(api.body.clone())
            .send()
            .await
            .expect("send the API request through the gate")
    }

    /// Repeats `api` with `Stepgate-Change: {change_id}`.
    pub async fn release(&self, api: &ApiRequest, change_id: &str) -> reqwest::Response {
        self.request(api.method.clone(), &api.path_and_query)
            .header("content-type", &api.content_type)
            .header("stepgate-change", change_id)
            .body(api.body.clone())
            .send()
            .await
            .expect("send the release through the gate")
    }

    /// Sends `api`, which must be held: 403 `step_up_required`.
    pub async fn hold(&self, api: &ApiRequest) -> Held {
        let response = self.send(api).await;
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().expect("WWW-Authenticate is ASCII").to_string())
            .unwrap_or_default();
        let body = expect_error(response, StatusCode::FORBIDDEN, "step_up_required").await;
        let change_id = body["change_id"]
            .as_str()
            .unwrap_or_else(|| panic!("step_up_required without a change_id: {body}"))
            .to_string();
        Held {
            change_id,
            www_authenticate,
            body,
        }
    }

    // --- passkeys ---------------------------------------------------------------------------

    pub async fn start_registration(&self) -> Ceremony {
        let response = self
            .request(Method::POST, "/_stepgate/api/passkeys/register/start")
            .json(&json!({}))
            .send()
            .await
            .expect("send register/start");
        let options = expect_json(response, StatusCode::OK).await;
        Ceremony {
            ceremony_id: ceremony_id_of(&options),
            options,
        }
    }

    /// What this user's authenticator answers to creation options.
    pub fn create_credential(&self, options: &Value) -> Value {
        let options: CreationChallengeResponse = serde_json::from_value(options.clone())
            .unwrap_or_else(|e| panic!("register/start is not CreationChallengeResponse: {e}"));
        let credential = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_registration(self.origin_url(), options)
            .unwrap_or_else(|e| panic!("the soft passkey refused to register: {e:?}"));
        serde_json::to_value(credential).expect("serialise RegisterPublicKeyCredential")
    }

    pub async fn finish_registration(
        &self,
        ceremony_id: &str,
        credential: &Value,
    ) -> reqwest::Response {
        self.request(Method::POST, "/_stepgate/api/passkeys/register/finish")
            .json(&json!({
                "ceremony_id": ceremony_id,
                "credential": credential,
                "name": "My key",
            }))
            .send()
            .await
            .expect("send register/finish")
    }

    /// Registers this user's soft passkey with the gate; returns the gate's answer.
    pub async fn register_passkey(&self) -> Value {
        let ceremony = self.start_registration().await;
        let credential = self.create_credential(&ceremony.options);
        let response = self
            .finish_registration(&ceremony.ceremony_id, &credential)
            .await;
        let body = expect_json(response, StatusCode::OK).await;
        assert_eq!(body["name"], "My key", "register/finish answer: {body}");
        assert!(body["id"].is_string(), "register/finish answer: {body}");
        let raw_id = credential["rawId"]
            .as_str()
            .expect("the credential has a rawId")
            .to_string();
        *self
            .credential_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(raw_id);
        body
    }

    /// The base64url id of the passkey this user registered.
    pub fn credential_id(&self) -> String {
        self.credential_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .expect("this user has registered a passkey")
    }

    // --- confirming a change ----------------------------------------------------------------

    pub async fn confirm_start(&self, change_id: &str) -> reqwest::Response {
        self.request(
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/confirm/start"),
        )
        .json(&json!({}))
        .send()
        .await
        .expect("send confirm/start")
    }

    /// Starts a confirmation ceremony, which must succeed.
    pub async fn start_confirmation(&self, change_id: &str) -> Ceremony {
        let options = expect_json(self.confirm_start(change_id).await, StatusCode::OK).await;
        Ceremony {
            ceremony_id: ceremony_id_of(&options),
            options,
        }
    }

    /// What this user's authenticator answers to request options (the whole
    /// `{"ceremony_id","publicKey"}` answer, possibly edited by the test).
    pub fn sign(&self, options: &Value) -> Value {
        let options: RequestChallengeResponse = serde_json::from_value(options.clone())
            .unwrap_or_else(|e| panic!("confirm/start is not RequestChallengeResponse: {e}"));
        let credential = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_authentication(self.origin_url(), options)
            .unwrap_or_else(|e| panic!("the soft passkey refused to sign: {e:?}"));
        serde_json::to_value(credential).expect("serialise PublicKeyCredential")
    }

    pub async fn confirm_finish(
        &self,
        change_id: &str,
        ceremony_id: &str,
        credential: &Value,
    ) -> reqwest::Response {
        self.request(
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/confirm/finish"),
        )
        .json(&json!({"ceremony_id": ceremony_id, "credential": credential}))
        .send()
        .await
        .expect("send confirm/finish")
    }

    /// The whole confirmation as the page does it. Returns the first answer that is not a
    /// success (start's or finish's), or finish's success.
    pub async fn try_confirm(&self, change_id: &str) -> reqwest::Response {
        let start = self.confirm_start(change_id).await;
        if start.status() != StatusCode::OK {
            return start;
        }
        let options: Value = start.json().await.expect("confirm/start answers JSON");
        let credential = self.sign(&options);
        self.confirm_finish(change_id, &ceremony_id_of(&options), &credential)
            .await
    }

    /// Confirms a held change with this user's passkey; returns `{"state","release_at"}`.
    pub async fn confirm(&self, change_id: &str) -> Value {
        let body = expect_json(self.try_confirm(change_id).await, StatusCode::OK).await;
        assert_eq!(
            body["state"], "cooling_off",
            "confirm/finish answer: {body}"
        );
        body
    }

    /// Holds `api` and confirms it: the change is then cooling off. Returns the change id and
    /// its `release_at`.
    pub async fn hold_and_confirm(&self, api: &ApiRequest) -> (String, OffsetDateTime) {
        let held = self.hold(api).await;
        let confirmed = self.confirm(&held.change_id).await;
        (held.change_id, parse_rfc3339(&confirmed["release_at"]))
    }

    // --- reading and cancelling changes -----------------------------------------------------

    pub async fn cancel(&self, change_id: &str) -> reqwest::Response {
        self.request(
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/cancel"),
        )
        .send()
        .await
        .expect("send cancel")
    }

    pub async fn get_change(&self, change_id: &str) -> reqwest::Response {
        self.request(Method::GET, &format!("/_stepgate/api/changes/{change_id}"))
            .send()
            .await
            .expect("send GET change")
    }

    /// The change's `state`, read through the API.
    pub async fn change_state(&self, change_id: &str) -> String {
        let body = expect_json(self.get_change(change_id).await, StatusCode::OK).await;
        assert_eq!(body["id"], change_id, "GET change answer: {body}");
        body["state"]
            .as_str()
            .unwrap_or_else(|| panic!("GET change without a state: {body}"))
            .to_string()
    }

    pub async fn list_changes(&self) -> Vec<Value> {
        let response = self
            .request(Method::GET, "/_stepgate/api/changes")
            .send()
            .await
            .expect("send GET changes");
        let body = expect_json(response, StatusCode::OK).await;
        body["changes"]
            .as_array()
            .unwrap_or_else(|| panic!("GET changes without a changes array: {body}"))
            .clone()
    }

    fn origin_url(&self) -> Url {
        Url::parse(&self.origin).expect("the public origin is a URL")
    }
}

fn ceremony_id_of(options: &Value) -> String {
    options["ceremony_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a ceremony answer without ceremony_id: {options}"))
        .to_string()
}

/// An HS256 JWT over `claims`.
pub fn jwt(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a test JWT")
}

// ---------------------------------------------------------------------------------------------
// Reading answers.

/// Reads a JSON answer that must have `status`.
pub async fn expect_json(response: reqwest::Response, status: StatusCode) -> Value {
    let (actual, url, text) = read(response).await;
    assert_eq!(
        actual, status,
        "{url}: expected {status}, got {actual} with body {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"))
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

async fn read(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let url = response.url().path().to_string();
    let text = response.text().await.expect("read the answer's body");
    (status, url, text)
}

pub fn header_text(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("header is visible ASCII").to_string())
}

pub fn parse_rfc3339(value: &Value) -> OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 string, got {value}"));
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|e| panic!("`{text}` is not RFC 3339: {e}"))
}

/// Asserts `actual` is within a second of `expected` (the store may round to milliseconds,
/// the JSON to seconds).
pub fn assert_close(actual: OffsetDateTime, expected: OffsetDateTime, what: &str) {
    let gap = (actual - expected).abs();
    assert!(
        gap <= time::Duration::seconds(1),
        "{what}: expected about {expected}, got {actual}"
    );
}
