//! The attack kit: a stand-in exchange that records every request reaching it, a gate started
//! on port 0 in front of it with the four rules every table uses, and a raw HTTP/1.1 client
//! that writes the attack's bytes itself. reqwest (like every well-behaved client) normalises
//! paths, refuses absolute-form targets, folds headers and fixes lengths: exactly the things an
//! attacker does not do, so the tables speak to the gate over a bare TCP socket.
//!
//! A table row is a request and the outcome the gate must produce: held (403
//! `step_up_required`, the exchange saw nothing), refused with a status and JSON code (the
//! exchange saw nothing), or passed (the exchange saw exactly that request, at the path the row
//! names). Each row runs against the class's shared gate under its own user, so one row's held
//! change never counts against another's limits.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use stepgate::clock::ManualClock;
use stepgate::config::Config;
use stepgate::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::testdb::{Backend, TestDb};

/// A body that asks for withdrawal permission: every rule's condition holds on it.
pub const WITHDRAW: &[u8] = br#"{"permissions":["read","withdraw"]}"#;
/// A body that only tightens: the rules let it through.
pub const READ_ONLY: &[u8] = br#"{"permissions":["read"]}"#;
/// The header that tells the exchange who the gate verified.
pub const VERIFIED_USER: &str = "x-verified-user";

/// A header value that means "do not send this header": naming `x-user-id` with it sends a
/// request with no identity at all.
pub const OMIT: &str = "\u{0}omit";

/// How long any one exchange with the gate may take before the row counts as failed.
const ROW_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Table rows.

/// One attack request.
#[derive(Debug, Clone, Copy)]
pub enum Attack {
    /// Written as `{method} {target} HTTP/1.1`, then `Host: gate.test`, the row's user in
    /// `x-user-id` and `Content-Length` (each only when the row's headers do not name it),
    /// the row's headers in order, and the body.
    Http {
        method: &'static str,
        target: &'static str,
        headers: &'static [(&'static str, &'static str)],
        body: &'static [u8],
    },
    /// Written byte for byte, for what no well-formed request builder can say.
    Raw(&'static [u8]),
    /// Written byte for byte; a pass must deliver this method and body (the body as the
    /// exchange should receive it, after the gate has re-framed it).
    RawExpecting {
        bytes: &'static [u8],
        method: &'static str,
        body: &'static [u8],
    },
}

/// What the exchange must have seen of one header on a passed request.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    /// Exactly one copy, with this value; `{upstream}` and `{public}` stand for the exchange's
    /// and the gate's public authority, `{user}` for the row's user.
    Is(&'static str, &'static str),
    /// No copy at all.
    Absent(&'static str),
}

/// The outcome a row demands.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// 403 `step_up_required`, and the exchange saw nothing.
    Held,
    /// This status with this JSON `error` code, and the exchange saw nothing.
    Refused(u16, &'static str),
    /// This status from hyper itself (no gate JSON), before any of the gate's code ran; the
    /// exchange saw nothing.
    Rejected(u16),
    /// The exchange answered (200) and saw the request once: same method, same body, at
    /// `upstream_path` (path and query), with these header facts.
    Passed {
        upstream_path: &'static str,
        seen: &'static [Seen],
    },
}

/// Shorthand for a pass with no header facts to check.
pub const fn passed(upstream_path: &'static str) -> Expect {
    Expect::Passed {
        upstream_path,
        seen: &[],
    }
}

pub struct Row {
    pub name: &'static str,
    pub attack: Attack,
    pub expect: Expect,
}

/// A JSON request: `Content-Type: application/json` and `body`.
pub const fn json(method: &'static str, target: &'static str, body: &'static [u8]) -> Attack {
    Attack::Http {
        method,
        target,
        headers: &[("content-type", "application/json")],
        body,
    }
}

/// A request with no body and no headers of its own.
pub const fn bare(method: &'static str, target: &'static str) -> Attack {
    Attack::Http {
        method,
        target,
        headers: &[],
        body: b"",
    }
}

/// Runs every row against `gate` (each under the user `{class}-{index}`) and fails once, at
/// the end, naming every row that did not get its outcome.
pub async fn run_table(gate: &Gate, class: &str, rows: &[Row]) {
    let mut failures = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let user = format!("{class}-{index}");
        if let Err(why) = gate.run_row(row, &user).await {
            failures.push(format!("  [{class}] {}: {why}", row.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {class} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    eprintln!("{class}: all {} rows passed", rows.len());
}

// ---------------------------------------------------------------------------------------------
// The stand-in exchange.

/// One request as the exchange received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// Every value of `name`, as text.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

async fn record(State(log): State<Log>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            method: parts.method,
            path_and_query: path_and_query.clone(),
            headers: parts.headers,
            body,
        });
    (
        StatusCode::OK,
        [("x-upstream", "exchange")],
        axum::Json(json!({"upstream": "ok", "path": path_and_query})),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// The gate.

/// Limits the tables run under; small, so the limit rows can reach them quickly.
pub const LIMITS: &str = r#"
[limits]
max_body_bytes = "64KiB"
max_header_bytes = "16KiB"
header_timeout = "1s"
body_timeout = "1s"
max_pending_per_user = 3
max_ceremonies_per_minute = 3
"#;

/// The four rules every table is written against:
/// - A `enable-withdrawals`: PUT/PATCH `/api/v1/api-keys/{key_id}` when `/permissions`
///   contains `withdraw`; case-sensitive path, JSON only.
/// - B `enable-withdrawals-v2`: the same on `/api/v2/keys/{key_id}`, for an upstream that
///   ignores case: `case_insensitive` path and `fold_case` body.
/// - C `enable-withdrawals-v3`: the same on `/api/v3/keys/{key_id}`, also accepting forms.
/// - D `export-addresses`: every GET of `/api/v1/withdrawal-addresses/export`, no conditions.
pub const RULES: &str = r#"
[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {key_id}"

[[rules]]
name = "enable-withdrawals-v2"
methods = ["PUT", "PATCH"]
path = "/api/v2/keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
case_insensitive = true
fold_case = true
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on key {key_id}"

[[rules]]
name = "enable-withdrawals-v3"
methods = ["PUT", "PATCH"]
path = "/api/v3/keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
content_types = ["application/x-www-form-urlencoded"]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on key {key_id}"

[[rules]]
name = "export-addresses"
methods = ["GET"]
path = "/api/v1/withdrawal-addresses/export"
cooling_off = "1h"
confirm_within = "10m"
summary = "Export your withdrawal addresses"
"#;

/// A running gate in front of a running stand-in exchange.
pub struct Gate {
    pub addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    /// The public origin (`http://localhost:PORT`): the WebAuthn origin.
    pub origin: String,
    pub clock: ManualClock,
    log: Log,
    _database: TestDb,
}

impl Gate {
    /// A gate with [`LIMITS`], [`RULES`], header identity `x-user-id` and
    /// `upstream_header = "x-verified-user"`, on a fresh SQLite file.
    pub async fn start() -> Gate {
        let database = TestDb::new(Backend::Sqlite)
            .await
            .expect("SQLite is always available");
        let log: Log = Arc::default();
        let upstream = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in exchange");
        let upstream_addr = upstream.local_addr().expect("exchange address");
        let router = Router::new().fallback(record).with_state(log.clone());
        tokio::spawn(async move {
            axum::serve(upstream, router)
                .await
                .expect("the stand-in exchange failed");
        });

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let port = addr.port();
        let config_text = format!(
            r#"
listen = "127.0.0.1:{port}"
public_url = "http://localhost:{port}"
upstream = "http://{upstream_addr}"
database_url = "{db}"

[webauthn]
rp_id = "localhost"
rp_name = "Test Exchange"

[identity]
mode = "header"
header = "x-user-id"
upstream_header = "{VERIFIED_USER}"
{LIMITS}
{RULES}
"#,
            db = database.url,
        );
        let config = Config::from_toml_str(&config_text, "bypass test config", &[])
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}\n{config_text}"));
        let clock = ManualClock::starting_now();
        let server = Server::bind(config, Arc::new(clock.clone()), listener)
            .await
            .expect("the gate starts");
        tokio::spawn(async move {
            server.run().await.expect("the gate stopped with an error");
        });
        Gate {
            addr,
            upstream_addr,
            origin: format!("http://localhost:{port}"),
            clock,
            log,
            _database: database,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the exchange received since the last [`Gate::clear`].
    pub fn received(&self) -> Vec<Received> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn clear(&self) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Fails when the exchange received anything, naming what.
    pub fn saw_nothing(&self) -> Result<(), String> {
        let received = self.received();
        if received.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the exchange must have seen nothing, but received {:?}",
            received
                .iter()
                .map(|r| format!("{} {}", r.method, r.path_and_query))
                .collect::<Vec<_>>()
        ))
    }

    /// Sends one row's attack as `user` and checks its outcome.
    pub async fn run_row(&self, row: &Row, user: &str) -> Result<(), String> {
        self.clear();
        let (bytes, sent) = build_attack(&row.attack, user);
        let head_only = sent.as_ref().is_some_and(|s| s.method == "HEAD");
        let response = tokio::time::timeout(ROW_TIMEOUT, exchange(self.addr, &bytes, head_only))
            .await
            .map_err(|_| "no answer within the row timeout".to_string())?
            .map_err(|e| format!("the exchange with the gate failed: {e}"))?;
        // Let a forward that is still in flight reach the exchange before we look: a held
        // row must fail if anything at all got through.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.check(&row.expect, &response, sent.as_ref(), user)
    }

    /// Checks one answer against `expect`; `sent` is what a pass must deliver (method, body).
    pub fn check(
        &self,
        expect: &Expect,
        response: &RawResponse,
        sent: Option<&Sent>,
        user: &str,
    ) -> Result<(), String> {
        match *expect {
            Expect::Held => {
                response.expect_error(403, "step_up_required")?;
                self.saw_nothing()
            }
            Expect::Refused(status, code) => {
                response.expect_error(status, code)?;
                self.saw_nothing()
            }
            Expect::Rejected(status) => {
                if response.status != status {
                    return Err(format!("expected {status} from hyper, got {response}"));
                }
                if response.json_error().is_some() {
                    return Err(format!(
                        "expected hyper to refuse before the gate, but the gate answered {response}"
                    ));
                }
                self.saw_nothing()
            }
            Expect::Passed {
                upstream_path,
                seen,
            } => {
                if response.status != 200 || response.header("x-upstream") != Some("exchange") {
                    return Err(format!(
                        "expected the exchange's 200 to come back, got {response}"
                    ));
                }
                let received = self.received();
                let [forwarded] = received.as_slice() else {
                    return Err(format!(
                        "expected the exchange to receive the request once, it received {} requests",
                        received.len()
                    ));
                };
                if forwarded.path_and_query != upstream_path {
                    return Err(format!(
                        "the exchange saw path `{}`, expected `{upstream_path}`",
                        forwarded.path_and_query
                    ));
                }
                if let Some(sent) = sent {
                    if forwarded.method.as_str() != sent.method {
                        return Err(format!(
                            "the exchange saw method {}, the client sent {}",
                            forwarded.method, sent.method
                        ));
                    }
                    if forwarded.body.as_ref() != sent.body {
                        return Err(format!(
                            "the exchange saw body {:?}, the client sent {:?}",
                            String::from_utf8_lossy(&forwarded.body),
                            String::from_utf8_lossy(sent.body)
                        ));
                    }
                }
                for fact in seen {
                    self.check_seen(forwarded, fact, user)?;
                }
                Ok(())
            }
        }
    }

    fn check_seen(&self, forwarded: &Received, fact: &Seen, user: &str) -> Result<(), String> {
        match *fact {
            Seen::Absent(name) => {
                let values = forwarded.values(name);
                if !values.is_empty() {
                    return Err(format!(
                        "the exchange must not see `{name}`, but saw {values:?}"
                    ));
                }
            }
            Seen::Is(name, template) => {
                let expected = template
                    .replace("{upstream}", &self.upstream_addr.to_string())
                    .replace("{public}", &format!("localhost:{}", self.addr.port()))
                    .replace("{user}", user);
                let values = forwarded.values(name);
                if values != [expected.clone()] {
                    return Err(format!(
                        "the exchange must see `{name}: {expected}` once, but saw {values:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The parts of a built request a pass is compared against.
pub struct Sent {
    pub method: &'static str,
    pub body: &'static [u8],
}

fn has_header(headers: &[(&str, &str)], name: &str) -> bool {
    headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// The bytes to write for `attack` as `user`, and what a pass must deliver.
pub fn build_attack(attack: &Attack, user: &str) -> (Vec<u8>, Option<Sent>) {
    match *attack {
        Attack::Raw(bytes) => (bytes.to_vec(), None),
        Attack::RawExpecting {
            bytes,
            method,
            body,
        } => (bytes.to_vec(), Some(Sent { method, body })),
        Attack::Http {
            method,
            target,
            headers,
            body,
        } => {
            let mut out = format!("{method} {target} HTTP/1.1\r\n");
            if !has_header(headers, "host") {
                out.push_str("Host: gate.test\r\n");
            }
            if !has_header(headers, "x-user-id") {
                out.push_str(&format!("x-user-id: {user}\r\n"));
            }
            for (name, value) in headers.iter().filter(|(_, v)| *v != OMIT) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            let framed =
                has_header(headers, "content-length") || has_header(headers, "transfer-encoding");
            if !framed && !body.is_empty() {
                out.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(body);
            (bytes, Some(Sent { method, body }))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw client.

/// An answer as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The gate's `error` code, if this is one of its JSON errors.
    pub fn json_error(&self) -> Option<String> {
        self.json()?.get("error")?.as_str().map(str::to_string)
    }

    /// The error code from the JSON body or, for an answer without a body (to HEAD), from
    /// the `WWW-Authenticate: StepUp … error="…"` challenge.
    pub fn error_code(&self) -> Option<String> {
        self.json_error().or_else(|| {
            let challenge = self.header("www-authenticate")?;
            let (_, rest) = challenge.split_once("error=\"")?;
            rest.split('"').next().map(str::to_string)
        })
    }

    pub fn expect_error(&self, status: u16, code: &str) -> Result<(), String> {
        if self.status == status && self.error_code().as_deref() == Some(code) {
            Ok(())
        } else {
            Err(format!("expected {status} `{code}`, got {self}"))
        }
    }
}

impl std::fmt::Display for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(300).collect();
        write!(f, "{} {body}", self.status)
    }
}

/// Writes `request` on a fresh connection and reads one answer.
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    head_only: bool,
) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    read_response(&mut stream, head_only).await
}

/// Reads one HTTP/1.1 answer: the head, then a body framed by `Content-Length`, chunks, or
/// the end of the connection.
pub async fn read_response(
    stream: &mut TcpStream,
    head_only: bool,
) -> std::io::Result<RawResponse> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed before a complete answer ({} bytes)",
                    buffer.len()
                ),
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut rest = buffer[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("not a status line: {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let response = |body| RawResponse {
        status,
        headers: headers.clone(),
        body,
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response(Vec::new()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let body = read_chunked(stream, &mut rest).await?;
        return Ok(response(body));
    }
    if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("the body ended early".into()));
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(length);
        return Ok(response(rest));
    }
    stream.read_to_end(&mut rest).await?;
    Ok(response(rest))
}

async fn read_chunked(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = find(buffer, b"\r\n") {
                break at;
            }
            fill(stream, buffer).await?;
        };
        let size_text = String::from_utf8_lossy(&buffer[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        buffer.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        while buffer.len() < size + 2 {
            fill(stream, buffer).await?;
        }
        body.extend_from_slice(&buffer[..size]);
        buffer.drain(..size + 2);
    }
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(bad("the chunked body ended early".into()));
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}
