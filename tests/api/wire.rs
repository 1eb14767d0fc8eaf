//! The pass-through path byte by byte: a raw TCP client in front of the gate and a raw TCP
//! upstream behind it that records the exact bytes of every request it receives. These pin
//! what the gate does with ordinary, odd and hostile HTTP/1.1 on the wire: what reaches the
//! upstream (request line, headers, body framing, how many requests), what the client gets
//! back, and when connections are kept or closed. Any rewrite of the server's parser or
//! forwarder must keep every one of them.
//!
//! Not pinned on purpose: the order of distinct header names (a map may reorder them), the
//! case of header names (HTTP says they are case-insensitive), the `Date` header's value, and
//! how a streamed body is cut into chunks. Everything else is compared exactly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::helpers::gate_config;
use serde_json::{json, Value};
use stepgate::clock::ManualClock;
use stepgate::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest any single read in these tests waits: a hang fails the test instead of blocking it.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Bytes on a connection.

/// One side of a TCP connection, with what has been read but not yet used.
struct Wire {
    stream: TcpStream,
    pending: Vec<u8>,
    /// `Some`: a read that waits longer than this panics (the client side). `None`: reads wait
    /// for as long as the peer keeps the connection open (the upstream side, a spawned task).
    patience: Option<Duration>,
    /// Counts every byte read (the upstream's total).
    counter: Option<Arc<AtomicUsize>>,
}

impl Wire {
    /// Reads more; false once the peer closed (EOF) or reset the connection.
    async fn fill(&mut self) -> bool {
        let mut buffer = vec![0u8; 64 * 1024];
        let read = match self.patience {
            Some(patience) => {
                match tokio::time::timeout(patience, self.stream.read(&mut buffer)).await {
                    Ok(read) => read,
                    Err(_) => panic!(
                        "nothing more arrived within {patience:?} (a hang); unread so far: {:?}",
                        lossy(&self.pending)
                    ),
                }
            }
            None => self.stream.read(&mut buffer).await,
        };
        match read {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                if let Some(counter) = &self.counter {
                    counter.fetch_add(n, Ordering::SeqCst);
                }
                self.pending.extend_from_slice(&buffer[..n]);
                true
            }
        }
    }

    /// The next message head, up to and including its empty line; `None` if the connection
    /// ended first (what had arrived stays in `pending`).
    async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = head_end(&self.pending) {
                return Some(self.pending.drain(..end).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next `n` bytes, and whether all of them arrived before the connection ended.
    async fn take(&mut self, n: usize) -> (Vec<u8>, bool) {
        while self.pending.len() < n {
            if !self.fill().await {
                return (std::mem::take(&mut self.pending), false);
            }
        }
        (self.pending.drain(..n).collect(), true)
    }

    /// One line, up to and including its LF; `None` if the connection ended first.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == b'\n') {
                return Some(self.pending.drain(..=at).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// A chunked body: appends its bytes as sent to `raw` and its content to `content`.
    /// True when it ended properly (the last chunk and the empty line after any trailers).
    async fn chunked(&mut self, raw: &mut Vec<u8>, content: &mut Vec<u8>) -> bool {
        loop {
            let Some(line) = self.line().await else {
                raw.append(&mut self.pending);
                return false;
            };
            raw.extend_from_slice(&line);
            let Some(size_line) = line.strip_suffix(b"\r\n") else {
                return false;
            };
            let size_text = String::from_utf8_lossy(size_line);
            let size_text = size_text.split(';').next().unwrap_or_default();
            // Strictly hex digits (`from_str_radix` alone would take a sign).
            if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return false;
            }
            let Ok(size) = usize::from_str_radix(size_text, 16) else {
                return false;
            };
            if size == 0 {
                loop {
                    let Some(trailer) = self.line().await else {
                        raw.append(&mut self.pending);
                        return false;
                    };
                    raw.extend_from_slice(&trailer);
                    if trailer == b"\r\n" {
                        return true;
                    }
                }
            }
            let (data, complete) = self.take(size + 2).await;
            raw.extend_from_slice(&data);
            if !complete || !data.ends_with(b"\r\n") {
                return false;
            }
            content.extend_from_slice(&data[..size]);
        }
    }

    /// Everything until the peer closes the connection.
    async fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.pending)
    }
}

/// Where a head ends: after its first empty line (CRLF, or a bare LF, which is then reported
/// as a problem by [`parse_head`]).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = bytes[from..].iter().position(|&b| b == b'\n') {
        let at = from + offset;
        let rest = &bytes[at + 1..];
        if rest.starts_with(b"\n") {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        from = at + 1;
    }
    None
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A head read strictly: the start line, the header fields (names lower-cased, values without
/// surrounding blanks) and anything that breaks HTTP/1.1's syntax.
struct Head {
    start_line: String,
    fields: Vec<(String, String)>,
    problems: Vec<String>,
}

fn parse_head(head: &[u8]) -> Head {
    let mut problems = Vec::new();
    if !head.ends_with(b"\r\n\r\n") {
        problems.push("the head does not end with CRLF CRLF".to_string());
    }
    // Without the empty line, every line ends with its own LF.
    let body = head.strip_suffix(b"\r\n").unwrap_or(head);
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut lines = body.split(|&b| b == b'\n').map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| {
            problems.push(format!("a line ends with a bare LF: {:?}", lossy(line)));
            line
        });
        line.to_vec()
    });
    let start_line = lossy(&lines.next().unwrap_or_default());
    let mut fields = Vec::new();
    let rest: Vec<Vec<u8>> = lines.collect();
    for line in rest {
        if line.contains(&b'\r') || line.contains(&0) {
            problems.push(format!("a bare CR or a NUL in {:?}", lossy(&line)));
        }
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            problems.push(format!("an obs-fold continuation line: {:?}", lossy(&line)));
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            problems.push(format!("a header line without a colon: {:?}", lossy(&line)));
            continue;
        };
        let name = &line[..colon];
        let is_token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        if name.is_empty() || !name.iter().all(is_token) {
            problems.push(format!(
                "a header name that is not a token: {:?}",
                lossy(name)
            ));
        }
        let value = lossy(&line[colon + 1..])
            .trim_matches(|c| c == ' ' || c == '\t')
            .to_string();
        fields.push((lossy(name).to_ascii_lowercase(), value));
    }
    Head {
        start_line,
        fields,
        problems,
    }
}

/// Header fields as a sorted list, to compare without caring about the order of names.
fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = pairs
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
        .collect();
    fields.sort();
    fields
}

/// Distinct bytes in a recognisable pattern, so a shifted or truncated copy shows.
fn pattern(length: usize) -> Vec<u8> {
    (0..length).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// The raw upstream.

/// One request as the upstream read it off the wire.
#[derive(Debug, Clone)]
struct Seen {
    /// Which connection (from 1, in the order they were accepted).
    connection: usize,
    /// Its place on that connection (from 0).
    index: usize,
    /// The head exactly as received, up to and including its empty line.
    head: Vec<u8>,
    /// The body exactly as received (chunk framing included).
    raw_body: Vec<u8>,
    /// The body's content (chunk framing removed).
    body: Vec<u8>,
    /// Whether the body's framing ended properly: every declared byte, or the last chunk.
    complete: bool,
}

impl Seen {
    fn parsed(&self) -> Head {
        parse_head(&self.head)
    }

    fn request_line(&self) -> String {
        self.parsed().start_line
    }

    /// The request target of the request line.
    fn target(&self) -> String {
        self.request_line()
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// Every header field, sorted; the head must be well-formed HTTP/1.1.
    fn fields(&self) -> Vec<(String, String)> {
        let head = self.parsed();
        assert!(
            head.problems.is_empty(),
            "the upstream received a malformed head: {:?}\n{}",
            head.problems,
            lossy(&self.head)
        );
        let mut fields = head.fields;
        fields.sort();
        fields
    }

    /// The values of one header, in the order received.
    fn all(&self, name: &str) -> Vec<String> {
        self.parsed()
            .fields
            .into_iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value)
            .collect()
    }

    /// The value of a header that must appear at most once.
    fn header(&self, name: &str) -> Option<String> {
        let mut values = self.all(name);
        assert!(values.len() <= 1, "{name} came {} times", values.len());
        values.pop()
    }
}

/// What the upstream does after reading a request.
enum Reply {
    /// Writes these bytes and reads the next request on the same connection.
    Send(Vec<u8>),
    /// Writes these bytes and closes the connection.
    SendAndClose(Vec<u8>),
    /// Never answers; reads on (so a close is noticed) until the gate gives up.
    Silence,
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

struct Upstream {
    url: String,
    /// `host:port`, what the gate must send as `Host`.
    authority: String,
    /// Every byte received, on every connection.
    bytes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// An upstream on 127.0.0.1 that reads each request (head and framed body), records it,
    /// and does what `script` says.
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw upstream");
        let authority = listener
            .local_addr()
            .expect("raw upstream address")
            .to_string();
        let upstream = Upstream {
            url: format!("http://{authority}"),
            authority,
            bytes: Arc::default(),
            seen: Arc::default(),
        };
        let script: Arc<Script> = Arc::new(script);
        let (bytes, seen) = (upstream.bytes.clone(), upstream.seen.clone());
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((stream, _)) = listener.accept().await {
                accepted += 1;
                let number = accepted;
                let wire = Wire {
                    stream,
                    pending: Vec::new(),
                    patience: None,
                    counter: Some(bytes.clone()),
                };
                tokio::spawn(serve_upstream(wire, number, script.clone(), seen.clone()));
            }
        });
        upstream
    }

    /// Answers every request `200` with the request target as the body.
    async fn echoing_target() -> Upstream {
        Upstream::start(|seen| Reply::Send(ok(&seen.target()))).await
    }

    /// Every request received so far, oldest first. Each head must be well-formed HTTP/1.1
    /// (CRLF line ends, no folding, no control characters): whatever the client sent, the
    /// upstream is only ever sent clean syntax.
    fn seen(&self) -> Vec<Seen> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for request in &seen {
            let problems = request.parsed().problems;
            assert!(
                problems.is_empty(),
                "the upstream received a malformed head: {problems:?}\n{}",
                lossy(&request.head)
            );
        }
        seen
    }

    fn request_lines(&self) -> Vec<String> {
        self.seen().iter().map(Seen::request_line).collect()
    }

    /// The one request the upstream received.
    fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            1,
            "exactly one request reached the upstream: {:?}",
            seen.iter().map(Seen::request_line).collect::<Vec<_>>()
        );
        seen.into_iter().next().expect("one request")
    }

    /// Not one byte reached the upstream (given a moment, so a late forward would show).
    async fn assert_saw_nothing(&self, context: &str) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            self.bytes.load(Ordering::SeqCst),
            0,
            "{context}: the upstream received bytes: {:?}",
            self.request_lines()
        );
    }
}

async fn serve_upstream(
    mut wire: Wire,
    number: usize,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Seen>>>,
) {
    for index in 0.. {
        let Some(head) = wire.head().await else {
            return;
        };
        let mut seen = Seen {
            connection: number,
            index,
            head,
            raw_body: Vec::new(),
            body: Vec::new(),
            complete: true,
        };
        match request_framing(&seen.head) {
            Framing::Empty => {}
            Framing::Length(length) => {
                let (bytes, complete) = wire.take(length).await;
                seen.raw_body.clone_from(&bytes);
                seen.body = bytes;
                seen.complete = complete;
            }
            Framing::Chunked => {
                seen.complete = wire.chunked(&mut seen.raw_body, &mut seen.body).await;
            }
            Framing::UntilClose | Framing::Unreadable => seen.complete = false,
        }
        log.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seen.clone());
        if !seen.complete {
            return;
        }
        match script(&seen) {
            Reply::Send(bytes) => {
                if wire.stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::SendAndClose(bytes) => {
                let _ = wire.stream.write_all(&bytes).await;
                let _ = wire.stream.shutdown().await;
                return;
            }
            Reply::Silence => {
                wire.read_to_close().await;
                return;
            }
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (by method or status, or nothing declared on a request).
    Empty,
    Length(usize),
    Chunked,
    /// A response without a length: the body runs until the connection closes.
    UntilClose,
    /// Contradictory or malformed framing headers.
    Unreadable,
}

/// A request's framing as a strict reader sees it (RFC 9112 §6.3).
fn request_framing(head: &[u8]) -> Framing {
    let head = parse_head(head);
    framing_of(&head.fields).unwrap_or(Framing::Empty)
}

/// The framing the headers declare, `None` when they declare none.
fn framing_of(fields: &[(String, String)]) -> Option<Framing> {
    let values = |name: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    };
    let encodings = values("transfer-encoding");
    let lengths = values("content-length");
    if !encodings.is_empty() {
        if !lengths.is_empty() || encodings != ["chunked"] {
            return Some(Framing::Unreadable);
        }
        return Some(Framing::Chunked);
    }
    match lengths.as_slice() {
        [] => None,
        [one] => Some(match one.parse::<usize>() {
            Ok(length) if one.bytes().all(|b| b.is_ascii_digit()) => Framing::Length(length),
            _ => Framing::Unreadable,
        }),
        _ => Some(Framing::Unreadable),
    }
}

/// A response: status line, header lines, body.
fn respond(status_line: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{status_line}\r\n").into_bytes();
    for (name, value) in headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    bytes
}

/// `200` with `body` and its length.
fn ok(body: &str) -> Vec<u8> {
    respond(
        "HTTP/1.1 200 OK",
        &[("content-length", &body.len().to_string())],
        body.as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// The gate.

struct Gate {
    /// `127.0.0.1:port`
    address: String,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Gate {
    /// What the gate sends upstream as `X-Forwarded-Host`: its public authority.
    fn public_authority(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

/// A gate in front of `upstream_url` with header identity, a SQLite file in a fresh temporary
/// directory, the `[limits]` lines given, and the one protected rule of the API tests.
async fn start_gate(upstream_url: &str, limits: &str) -> Gate {
    let dir = tempfile::tempdir().expect("temporary directory");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate");
    let port = listener.local_addr().expect("gate address").port();
    let config = gate_config(port, upstream_url, dir.path(), limits);
    let server = Server::bind(config, Arc::new(ManualClock::starting_now()), listener)
        .await
        .expect("the gate starts");
    tokio::spawn(async move { server.run().await.expect("the gate stopped with an error") });
    Gate {
        address: format!("127.0.0.1:{port}"),
        port,
        _dir: dir,
    }
}

/// A gate in front of an upstream that answers every request `200` with its target.
async fn echo_setup(limits: &str) -> (Upstream, Gate) {
    let upstream = Upstream::echoing_target().await;
    let gate = start_gate(&upstream.url, limits).await;
    (upstream, gate)
}

// ---------------------------------------------------------------------------------------------
// The raw client.

/// One answer as the client read it.
#[derive(Debug)]
struct Answer {
    status_line: String,
    status: u16,
    /// Names lower-cased, in the order received.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    /// Every byte of the answer as received, framing included.
    raw: Vec<u8>,
}

impl Answer {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// The value of a header that must appear at most once.
    fn header(&self, name: &str) -> Option<&str> {
        let values = self.all(name);
        assert!(
            values.len() <= 1,
            "{name} came {} times: {self:?}",
            values.len()
        );
        values.first().copied()
    }

    /// Every header but `Date` (exactly one, its value not compared), sorted.
    fn fields(&self) -> Vec<(String, String)> {
        assert_eq!(self.all("date").len(), 1, "one Date header: {self:?}");
        let mut fields: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(name, _)| name != "date")
            .cloned()
            .collect();
        fields.sort();
        fields
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }

    /// The `X-Request-Id` the gate answered with.
    fn request_id(&self) -> String {
        self.header("x-request-id")
            .unwrap_or_else(|| panic!("an answer without X-Request-Id: {self:?}"))
            .to_string()
    }
}

/// One connection to the gate.
struct Client {
    wire: Wire,
}

impl Client {
    async fn open(gate: &Gate) -> Client {
        let stream = TcpStream::connect(&gate.address)
            .await
            .expect("connect to the gate");
        Client {
            wire: Wire {
                stream,
                pending: Vec::new(),
                patience: Some(WAIT),
                counter: None,
            },
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.wire
            .stream
            .write_all(bytes.as_ref())
            .await
            .expect("send to the gate");
    }

    /// Sends a request and reads its answer.
    async fn exchange(&mut self, request: impl AsRef<[u8]>) -> Answer {
        self.send(request).await;
        self.answer().await
    }

    /// The next answer, to a request other than HEAD.
    async fn answer(&mut self) -> Answer {
        match self.read_answer(false).await {
            Ok(answer) => answer,
            Err(partial) => panic!(
                "the connection ended before a whole answer arrived: {:?}",
                lossy(&partial)
            ),
        }
    }

    /// The next answer, to a HEAD request (no body whatever the headers say).
    async fn answer_to_head(&mut self) -> Answer {
        match self.read_answer(true).await {
            Ok(answer) => answer,
            Err(partial) => panic!(
                "the connection ended before a whole answer arrived: {:?}",
                lossy(&partial)
            ),
        }
    }

    /// The next answer, or every byte of it that arrived before the connection ended.
    async fn read_answer(&mut self, to_head: bool) -> Result<Answer, Vec<u8>> {
        let Some(head) = self.wire.head().await else {
            return Err(std::mem::take(&mut self.wire.pending));
        };
        let parsed = parse_head(&head);
        assert!(
            parsed.problems.is_empty(),
            "the gate sent a malformed head: {:?}\n{}",
            parsed.problems,
            lossy(&head)
        );
        let status: u16 = parsed
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", parsed.start_line));
        let framing = if to_head || status < 200 || status == 204 || status == 304 {
            Framing::Empty
        } else {
            framing_of(&parsed.fields).unwrap_or(Framing::UntilClose)
        };
        let mut raw = head.clone();
        let mut body = Vec::new();
        let complete = match framing {
            Framing::Empty => true,
            Framing::Length(length) => {
                let (bytes, complete) = self.wire.take(length).await;
                raw.extend_from_slice(&bytes);
                body = bytes;
                complete
            }
            Framing::Chunked => self.wire.chunked(&mut raw, &mut body).await,
            Framing::UntilClose => {
                body = self.wire.read_to_close().await;
                raw.extend_from_slice(&body);
                true
            }
            Framing::Unreadable => panic!("the gate sent unreadable framing: {}", lossy(&head)),
        };
        if !complete {
            return Err(raw);
        }
        Ok(Answer {
            status_line: parsed.start_line,
            status,
            headers: parsed.fields,
            body,
            framing,
            raw,
        })
    }

    /// The gate closes the connection (EOF or reset) without sending anything more.
    async fn assert_closed(&mut self, context: &str) {
        let rest = self.wire.read_to_close().await;
        assert!(
            rest.is_empty(),
            "{context}: more bytes arrived before the close: {:?}",
            lossy(&rest)
        );
    }
}

/// A GET with a host and nothing else.
fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: gate.example\r\n\r\n")
}

/// A plain `200` answer from the echoing upstream: its target as the body, and the headers
/// the gate adds (the request id is the one the upstream was sent).
fn assert_echoed(answer: &Answer, target: &str, seen: &Seen) {
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{answer:?}");
    assert_eq!(answer.text(), target);
    assert_eq!(answer.framing, Framing::Length(target.len()));
    let sent_id = seen.header("x-request-id").expect("the upstream got an id");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("content-length", &target.len().to_string()),
            ("x-request-id", &sent_id),
        ])
    );
}

/// A gate error in JSON: exact status line, headers and body.
fn assert_gate_error(answer: &Answer, status_line: &str, code: &str, message: &str) {
    assert_eq!(answer.status_line, status_line, "{}", answer.text());
    let id = answer.request_id();
    assert_eq!(
        answer.fields(),
        fields(&[
            ("cache-control", "no-store"),
            ("content-length", &answer.body.len().to_string()),
            ("content-type", "application/json"),
            ("x-request-id", &id),
        ])
    );
    assert_eq!(
        answer.json(),
        json!({ "error": code, "message": message, "request_id": id })
    );
}

/// The parser's own refusal of a request it cannot read: a bare status, no body, and the
/// connection closed (no request id: no request was made of it).
fn assert_bare_refusal(answer: &Answer, status_line: &str) {
    assert_eq!(answer.status_line, status_line, "{answer:?}");
    assert_eq!(
        answer.fields(),
        fields(&[("connection", "close"), ("content-length", "0")])
    );
    assert!(answer.body.is_empty());
}

fn is_uuid(text: &str) -> bool {
    uuid::Uuid::parse_str(text).is_ok() && text.len() == 36
}

/// A request that must be refused before anything is forwarded: `400 Bad Request` from the
/// parser, then the connection is closed, so the smuggled request after it is never read.
async fn assert_refused_unforwarded(gate: &Gate, upstream: &Upstream, request: &[u8], what: &str) {
    let mut client = Client::open(gate).await;
    let mut bytes = request.to_vec();
    // If the gate resynchronised after the bad request, this would reach the upstream.
    bytes.extend_from_slice(get("/smuggled").as_bytes());
    client.send(&bytes).await;
    let answer = match client.read_answer(false).await {
        Ok(answer) => answer,
        Err(partial) => panic!("{what}: no answer before the close: {:?}", lossy(&partial)),
    };
    assert_bare_refusal(&answer, "HTTP/1.1 400 Bad Request");
    client.assert_closed(what).await;
    upstream.assert_saw_nothing(what).await;
}

// ---------------------------------------------------------------------------------------------
// 1. What a plain request carries upstream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reaches_the_upstream_with_its_headers_and_the_forwarding_ones_only() {
    let upstream = Upstream::start(|_| {
        Reply::Send(respond(
            "HTTP/1.1 200 OK",
            &[("content-length", "5"), ("content-type", "text/plain")],
            b"hello",
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;

    let answer = client
        .exchange(concat!(
            "GET /path?q=1 HTTP/1.1\r\n",
            "Host: client.example\r\n",
            "Host: second.example\r\n",
            "User-Agent: wire/1\r\n",
            "Accept: */*\r\n",
            "X-Custom: one\r\n",
            "X-Multi: a\r\n",
            "X-Multi: b\r\n",
            "X-Forwarded-For: 1.2.3.4\r\n",
            "X-Forwarded-Proto: https\r\n",
            "X-Forwarded-Host: evil.example\r\n",
            "X-Request-Id: edge-7f3a:01\r\n",
            "Connection: keep-alive, X-Secret\r\n",
            "X-Secret: named by Connection\r\n",
            "Keep-Alive: timeout=5\r\n",
            "TE: trailers\r\n",
            "Trailer: x-checksum\r\n",
            "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n",
            "Proxy-Connection: keep-alive\r\n",
            "Stepgate-Anything: x\r\n",
            "Stepgate-Approval: forged\r\n",
            "Forwarded: for=6.6.6.6;host=evil.example\r\n",
            "X-Original-URL: /admin\r\n",
            "X_Original_URL: /admin\r\n",
            "X-Rewrite-URL: /admin\r\n",
            "X-Forwarded-URI: /admin\r\n",
            "\r\n"
        ))
        .await;

    let seen = upstream.only();
    assert_eq!(seen.request_line(), "GET /path?q=1 HTTP/1.1");
    assert_eq!(
        seen.fields(),
        fields(&[
            ("host", &upstream.authority),
            ("user-agent", "wire/1"),
            ("accept", "*/*"),
            ("x-custom", "one"),
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("x-forwarded-for", "1.2.3.4, 127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", &gate.public_authority()),
            ("x-request-id", "edge-7f3a:01"),
        ]),
        "{}",
        lossy(&seen.head)
    );
    assert_eq!(
        seen.all("x-multi"),
        ["a", "b"],
        "repeated headers keep their order"
    );
    assert!(seen.raw_body.is_empty() && seen.complete);

    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("content-length", "5"),
            ("content-type", "text/plain"),
            ("x-request-id", "edge-7f3a:01"),
        ])
    );
    assert_eq!(answer.body, b"hello");

    // The connection is kept: a bare second request, without X-Forwarded-For of its own.
    let second = client
        .exchange("GET /second HTTP/1.1\r\nHost: client.example\r\n\r\n")
        .await;
    assert_eq!(second.status_line, "HTTP/1.1 200 OK");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    let id = second.request_id();
    assert!(is_uuid(&id), "a generated id: {id}");
    assert_eq!(
        seen[1].fields(),
        fields(&[
            ("host", &upstream.authority),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", &gate.public_authority()),
            ("x-request-id", &id),
        ])
    );

    // Two X-Forwarded-For lines: one line upstream, the client's address last. (Not pinned:
    // before the express lane the second client line was dropped, `1.1.1.1, 127.0.0.1`.)
    let third = client
        .exchange("GET /xff HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n")
        .await;
    assert_eq!(third.status, 200);
    let forwarded_for = upstream.seen()[2].all("x-forwarded-for");
    assert_eq!(forwarded_for.len(), 1, "{forwarded_for:?}");
    assert!(
        forwarded_for[0].starts_with("1.1.1.1, ") && forwarded_for[0].ends_with(", 127.0.0.1"),
        "{forwarded_for:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_kept_when_sane_and_replaced_otherwise_and_the_upstreams_own_is_overwritten(
) {
    let upstream = Upstream::start(|_| {
        Reply::Send(respond(
            "HTTP/1.1 200 OK",
            &[("content-length", "2"), ("x-request-id", "upstream-own")],
            b"ok",
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;

    let longest = "a".repeat(128);
    let too_long = "a".repeat(200);
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            "X-Request-Id: edge-7f3a:01\r\n".into(),
            Some("edge-7f3a:01"),
        ),
        (
            "X-Request-Id: A-z_0.9:/+=@\r\n".into(),
            Some("A-z_0.9:/+=@"),
        ),
        (format!("X-Request-Id: {longest}\r\n"), Some(&longest)),
        (format!("X-Request-Id: {too_long}\r\n"), None),
        ("X-Request-Id: two words\r\n".into(), None),
        ("X-Request-Id: <script>\r\n".into(), None),
        ("X-Request-Id: one\r\nX-Request-Id: two\r\n".into(), None),
        ("X-Request-Id:\r\n".into(), None),
        (String::new(), None),
    ];
    for (n, (header, kept)) in cases.iter().enumerate() {
        let answer = client
            .exchange(format!("GET /r/{n} HTTP/1.1\r\nHost: a\r\n{header}\r\n"))
            .await;
        let seen = upstream.seen();
        let sent = seen[n]
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{header:?}: no x-request-id upstream"));
        match kept {
            Some(kept) => assert_eq!(&sent, kept, "{header:?}"),
            None => assert!(is_uuid(&sent), "{header:?}: replaced by a UUID, got {sent}"),
        }
        assert_eq!(
            answer.fields(),
            fields(&[("content-length", "2"), ("x-request-id", &sent)]),
            "{header:?}: the client sees the id the upstream was sent, not the upstream's own"
        );
    }
    assert_eq!(upstream.seen().len(), cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_goes_upstream_as_a_plain_request_and_the_connection_goes_on() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;

    let answer = client
        .exchange(concat!(
            "GET /ws HTTP/1.1\r\n",
            "Host: a\r\n",
            "Connection: Upgrade\r\n",
            "Upgrade: websocket\r\n",
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "\r\n"
        ))
        .await;
    let seen = upstream.only();
    assert_echoed(&answer, "/ws", &seen);
    assert_eq!(seen.header("upgrade"), None);
    assert_eq!(seen.header("connection"), None);
    assert_eq!(
        seen.header("sec-websocket-key").as_deref(),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );

    let next = client.exchange(get("/after")).await;
    assert_echoed(&next, "/after", &upstream.seen()[1]);
}

// ---------------------------------------------------------------------------------------------
// 2. Bodies with a Content-Length, and pipelining.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_bodies_arrive_byte_exact_small_and_large() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;

    let small = br#"{"side":"buy","size":"0.1"}"#;
    let mut request = format!(
        "POST /api/v1/orders HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        small.len()
    )
    .into_bytes();
    request.extend_from_slice(small);
    let answer = client.exchange(&request).await;
    assert_echoed(&answer, "/api/v1/orders", &upstream.seen()[0]);

    let large = pattern(200 * 1024);
    let mut request = format!(
        "PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        large.len()
    )
    .into_bytes();
    request.extend_from_slice(&large);
    let answer = client.exchange(&request).await;
    assert_echoed(&answer, "/upload", &upstream.seen()[1]);

    // Either side of 64 KiB (the most a fast path might read whole).
    for size in [64 * 1024, 64 * 1024 + 1] {
        let body = pattern(size);
        let mut request =
            format!("POST /edge/{size} HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n")
                .into_bytes();
        request.extend_from_slice(&body);
        let answer = client.exchange(&request).await;
        let seen = upstream.seen();
        let last = seen.last().expect("forwarded");
        assert_echoed(&answer, &format!("/edge/{size}"), last);
        assert!(last.raw_body == body, "{size} bytes arrived intact");
        assert_eq!(last.header("content-length"), Some(size.to_string()));
    }

    // An empty body declared as such.
    let answer = client
        .exchange("POST /empty HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert_echoed(&answer, "/empty", &upstream.seen()[4]);

    // A GET may carry a body too; it is forwarded like any other.
    let answer = client
        .exchange("GET /with-body HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    assert_echoed(&answer, "/with-body", &upstream.seen()[5]);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[0].request_line(), "POST /api/v1/orders HTTP/1.1");
    assert_eq!(seen[0].header("content-length").as_deref(), Some("27"));
    assert_eq!(
        seen[0].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(seen[0].header("transfer-encoding"), None);
    assert_eq!(seen[0].raw_body, small);
    assert_eq!(seen[1].request_line(), "PUT /upload HTTP/1.1");
    assert_eq!(seen[1].header("content-length").as_deref(), Some("204800"));
    assert_eq!(seen[1].header("transfer-encoding"), None);
    assert!(seen[1].raw_body == large, "the 200 KiB body arrived intact");
    assert_eq!(seen[4].request_line(), "POST /empty HTTP/1.1");
    assert_eq!(seen[4].header("content-length").as_deref(), Some("0"));
    assert_eq!(seen[4].header("transfer-encoding"), None);
    assert!(seen[4].raw_body.is_empty());
    assert_eq!(seen[5].request_line(), "GET /with-body HTTP/1.1");
    assert_eq!(seen[5].header("content-length").as_deref(), Some("3"));
    assert_eq!(seen[5].raw_body, b"abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_answered_in_order_and_forwarded_once_each() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;

    client
        .send(concat!(
            "GET /first HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
            "GET /third HTTP/1.1\r\nHost: a\r\n\r\n",
        ))
        .await;
    let first = client.answer().await;
    let second = client.answer().await;
    let third = client.answer().await;

    let seen = upstream.seen();
    assert_eq!(
        upstream.request_lines(),
        [
            "GET /first HTTP/1.1",
            "POST /second HTTP/1.1",
            "GET /third HTTP/1.1"
        ]
    );
    assert_echoed(&first, "/first", &seen[0]);
    assert_echoed(&second, "/second", &seen[1]);
    assert_echoed(&third, "/third", &seen[2]);
    assert!(seen[0].raw_body.is_empty());
    assert_eq!(seen[1].raw_body, b"hello world");
    assert_eq!(seen[1].header("content-length").as_deref(), Some("11"));
    assert!(seen[2].raw_body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pipelined_requests_are_answered_in_order() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let targets: Vec<String> = (0..50).map(|n| format!("/p/{n}")).collect();
    let all: String = targets.iter().map(|target| get(target)).collect();
    client.send(&all).await;
    for target in &targets {
        let answer = client.answer().await;
        assert_eq!(answer.status, 200, "{target}");
        assert_eq!(&answer.text(), target);
    }
    let expected: Vec<String> = targets
        .iter()
        .map(|t| format!("GET {t} HTTP/1.1"))
        .collect();
    assert_eq!(upstream.request_lines(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_one_byte_at_a_time_is_forwarded_whole() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    client
        .wire
        .stream
        .set_nodelay(true)
        .expect("no Nagle on the client");
    let request =
        "POST /trickle?a=1 HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nContent-Length: 5\r\n\r\nhello";
    for byte in request.bytes() {
        client.send([byte]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = client.answer().await;
    let seen = upstream.only();
    assert_echoed(&answer, "/trickle?a=1", &seen);
    assert_eq!(seen.request_line(), "POST /trickle?a=1 HTTP/1.1");
    assert_eq!(seen.header("x-one").as_deref(), Some("1"));
    assert_eq!(seen.header("content-length").as_deref(), Some("5"));
    assert_eq!(seen.raw_body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_are_recognised_in_any_letter_case() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    // If any of these bodies were not recognised, its bytes would be read as the next request.
    client
        .send(concat!(
            "POST /upper-te HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
            "POST /mixed-cl HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 5\r\n\r\nworld",
            "POST /padded-zeros HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nzeros",
            "GET /last HTTP/1.1\r\nHost: a\r\n\r\n",
        ))
        .await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(client.answer().await);
    }
    assert_eq!(
        upstream.request_lines(),
        [
            "POST /upper-te HTTP/1.1",
            "POST /mixed-cl HTTP/1.1",
            "POST /padded-zeros HTTP/1.1",
            "GET /last HTTP/1.1"
        ]
    );
    let seen = upstream.seen();
    for (answer, seen) in answers.iter().zip(&seen) {
        assert_echoed(answer, &seen.target(), seen);
        assert!(seen.complete);
    }
    assert_eq!(seen[0].body, b"hello");
    assert_eq!(
        seen[0].header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(seen[1].raw_body, b"world");
    assert_eq!(seen[2].raw_body, b"zeros");
    assert_eq!(seen[2].all("content-length").len(), 1);
    assert!(seen[3].raw_body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_forwarded_as_sent() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    for method in ["get", "FOO", "PROPFIND", "DELETE", "OPTIONS"] {
        let answer = client
            .exchange(format!("{method} /m HTTP/1.1\r\nHost: a\r\n\r\n"))
            .await;
        assert_eq!(answer.status, 200, "{method}");
    }
    assert_eq!(
        upstream.request_lines(),
        [
            "get /m HTTP/1.1",
            "FOO /m HTTP/1.1",
            "PROPFIND /m HTTP/1.1",
            "DELETE /m HTTP/1.1",
            "OPTIONS /m HTTP/1.1"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Chunked request bodies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_arrives_with_the_same_content_and_without_its_trailers() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;

    let answer = client
        .exchange(concat!(
            "POST /chunked HTTP/1.1\r\n",
            "Host: a\r\n",
            "Content-Type: text/plain\r\n",
            "Transfer-Encoding: chunked\r\n",
            "\r\n",
            "6;ext=1\r\nhello \r\n",
            "5\r\nworld\r\n",
            "0\r\n",
            "X-Trailer: sneaky\r\n",
            "\r\n"
        ))
        .await;
    let seen = upstream.only();
    assert_echoed(&answer, "/chunked", &seen);
    assert_eq!(seen.request_line(), "POST /chunked HTTP/1.1");
    assert!(seen.complete);
    assert_eq!(seen.body, b"hello world");
    assert_eq!(seen.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(seen.header("content-length"), None);
    assert_eq!(seen.header("content-type").as_deref(), Some("text/plain"));
    assert!(
        !lossy(&seen.raw_body)
            .to_ascii_lowercase()
            .contains("trailer"),
        "trailers are not forwarded: {:?}",
        lossy(&seen.raw_body)
    );
    assert!(seen.raw_body.ends_with(b"0\r\n\r\n"));

    // The connection is still in step.
    let next = client.exchange(get("/after")).await;
    assert_echoed(&next, "/after", &upstream.seen()[1]);
}

/// A chunked body that breaks after its first chunk. The gate streams, so the upstream has
/// the head and may have the first chunk, but never a finished body: its connection is cut.
/// The client gets an error (`502 upstream_failed`, though the fault is the client's)
/// and the connection is closed, so nothing after the broken body is read as a request.
async fn assert_broken_chunked_body_is_never_complete_upstream(broken: &str) {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    client
        .send(format!(
            "POST /broken HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n{broken}"
        ))
        .await;
    if let Ok(answer) = client.read_answer(false).await {
        assert!(answer.status >= 400, "{broken:?}: {answer:?}");
        client.assert_closed(broken).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Streamed (as before and with the express lane, which hands chunked bodies to hyper): the
    // head and at most the good chunk. A gate reading the body whole would send nothing.
    let seen = upstream.seen();
    assert!(seen.len() <= 1, "{:?}", upstream.request_lines());
    for request in seen {
        assert_eq!(request.request_line(), "POST /broken HTTP/1.1");
        assert!(
            !request.complete,
            "{broken:?}: the upstream received a complete request: {:?}",
            lossy(&request.raw_body)
        );
        assert!(
            b"hello".starts_with(&request.body),
            "{:?}",
            lossy(&request.body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_a_bad_chunk_size_never_reaches_the_upstream_complete() {
    assert_broken_chunked_body_is_never_complete_upstream(
        "zz\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_an_overflowing_chunk_size_never_reaches_the_upstream_complete() {
    assert_broken_chunked_body_is_never_complete_upstream(
        "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_client_never_reaches_the_upstream_complete() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    client
        .send("POST /short HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    // Time to start forwarding (a streaming gate has sent the head upstream by now), then
    // stop sending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .wire
        .stream
        .shutdown()
        .await
        .expect("half-close the client");
    // Before the express lane: `502 upstream_failed` (though the fault is the client's),
    // then the close.
    if let Ok(answer) = client.read_answer(false).await {
        assert!(answer.status >= 400, "{answer:?}");
        client.assert_closed("after a body cut short").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Streamed: the head and what came of the body, never a finished request. Read whole
    // first (the express lane): nothing at all.
    let seen = upstream.seen();
    assert!(seen.len() <= 1, "{:?}", upstream.request_lines());
    for request in seen {
        assert!(!request.complete, "{:?}", lossy(&request.raw_body));
        assert!(
            b"abc".starts_with(&request.body),
            "{:?}",
            lossy(&request.body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_ends_in_a_504_within_the_timeouts() {
    let (upstream, gate) =
        echo_setup("header_timeout = \"1s\"\nupstream_timeout = \"1s\"\nbody_timeout = \"1s\"")
            .await;
    let mut client = Client::open(&gate).await;
    let started = Instant::now();
    client
        .send("POST /stalled HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    // The upstream gets the head and what came of the body, and never answers (its body is
    // not finished): the gate gives up after its timeouts and closes the connection.
    let answer = client.answer().await;
    let took = started.elapsed();
    assert_gate_error(
        &answer,
        "HTTP/1.1 504 Gateway Timeout",
        "upstream_timeout",
        "the exchange API did not answer in time",
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    client.assert_closed("after a stalled body").await;
    let seen = upstream.only();
    assert_eq!(seen.request_line(), "POST /stalled HTTP/1.1");
    assert_eq!(seen.header("content-length").as_deref(), Some("10"));
    assert!(!seen.complete);
    assert_eq!(seen.raw_body, b"abc");
}

// ---------------------------------------------------------------------------------------------
// 4. Smuggling attempts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_and_chunked_together_are_read_as_chunked_and_the_connection_closed() {
    for (what, framing) in [
        (
            "length first",
            "Content-Length: 48\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "chunked first",
            "Transfer-Encoding: chunked\r\nContent-Length: 48\r\n",
        ),
    ] {
        let (upstream, gate) = echo_setup("").await;
        let mut client = Client::open(&gate).await;
        client
            .send(format!(
                "POST /a HTTP/1.1\r\nHost: a\r\n{framing}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
            ))
            .await;
        let answer = client.answer().await;
        client.assert_closed(what).await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        // One request, its body the empty chunked one; the length is gone.
        let seen = upstream.only();
        assert_eq!(seen.request_line(), "POST /a HTTP/1.1", "{what}");
        let id = answer.request_id();
        assert_eq!(
            seen.fields(),
            fields(&[
                ("host", &upstream.authority),
                ("transfer-encoding", "chunked"),
                ("x-forwarded-for", "127.0.0.1"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", &gate.public_authority()),
                ("x-request-id", &id),
            ]),
            "{what}"
        );
        assert!(seen.complete, "{what}");
        assert_eq!(seen.raw_body, b"0\r\n\r\n", "{what}");
        // Answered, then the connection is closed: the bytes after the body are never read.
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{what}");
        assert_eq!(answer.text(), "/a");
        assert_eq!(
            answer.fields(),
            fields(&[
                ("connection", "close"),
                ("content-length", "2"),
                ("x-request-id", &id),
            ]),
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    assert_refused_unforwarded(
        &gate,
        &upstream,
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "5 then 6",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_equal_content_lengths_are_forwarded_as_one() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange(
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
    let seen = upstream.only();
    assert_echoed(&answer, "/a", &seen);
    assert_eq!(seen.all("content-length"), ["5"]);
    assert_eq!(seen.raw_body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_content_lengths_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    for value in [
        "+5",
        "5 5",
        "5, 5",
        "-1",
        "0x5",
        "5a",
        "",
        "99999999999999999999",
    ] {
        let request =
            format!("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\nhello");
        assert_refused_unforwarded(&gate, &upstream, request.as_bytes(), value).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encodings_other_than_chunked_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    for encoding in [
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    ] {
        let request =
            format!("POST /a HTTP/1.1\r\nHost: a\r\n{encoding}\r\n5\r\nhello\r\n0\r\n\r\n");
        assert_refused_unforwarded(&gate, &upstream, request.as_bytes(), encoding).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_in_an_http_1_0_request_is_refused() {
    let (upstream, gate) = echo_setup("").await;
    assert_refused_unforwarded(
        &gate,
        &upstream,
        b"POST /a HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.0 chunked",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obs_fold_continuation_line_is_refused() {
    let (upstream, gate) = echo_setup("").await;
    assert_refused_unforwarded(
        &gate,
        &upstream,
        b"POST /a HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\nContent-Length: 5\r\n\r\nhello",
        "obs-fold",
    )
    .await;
    assert_refused_unforwarded(
        &gate,
        &upstream,
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n 5\r\n\r\nhello",
        "folded Content-Length",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitespace_before_a_header_colon_is_refused() {
    let (upstream, gate) = echo_setup("").await;
    for line in [
        "Content-Length : 5",
        "Content-Length\t: 5",
        "Transfer-Encoding : chunked",
    ] {
        let request = format!("POST /a HTTP/1.1\r\nHost: a\r\n{line}\r\n\r\nhello");
        assert_refused_unforwarded(&gate, &upstream, request.as_bytes(), line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_a_header_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    for (what, line) in [
        ("NUL", &b"X-Evil: a\0b"[..]),
        ("bare CR", &b"X-Evil: a\rb"[..]),
        ("non-token name", &b"X(Evil): a"[..]),
        ("empty name", &b": a"[..]),
    ] {
        let mut request = b"GET /a HTTP/1.1\r\nHost: a\r\n".to_vec();
        request.extend_from_slice(line);
        request.extend_from_slice(b"\r\n\r\n");
        assert_refused_unforwarded(&gate, &upstream, &request, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    for line in [
        "GET  /a HTTP/1.1",
        "GET /a  HTTP/1.1",
        "GET /a HTTP/1.1 ",
        "GET /a HTTP/1.2",
        "GET /a HTTP/2.0",
        "GET /a",
        "GET /a b HTTP/1.1",
        "G(T /a HTTP/1.1",
    ] {
        let request = format!("{line}\r\nHost: a\r\n\r\n");
        assert_refused_unforwarded(&gate, &upstream, request.as_bytes(), line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_endings_are_read_as_one_request_and_forwarded_with_crlf() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange("POST /lf HTTP/1.1\nHost: a\nContent-Length: 5\nX-A: b\n\nhello")
        .await;
    let seen = upstream.only();
    assert_echoed(&answer, "/lf", &seen);
    assert_eq!(
        seen.fields(),
        fields(&[
            ("host", &upstream.authority),
            ("content-length", "5"),
            ("x-a", "b"),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", &gate.public_authority()),
            ("x-request-id", &answer.request_id()),
        ])
    );
    assert_eq!(seen.raw_body, b"hello");
    let next = client.exchange(get("/after")).await;
    assert_echoed(&next, "/after", &upstream.seen()[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_with_tabs_and_high_bytes_are_forwarded_unchanged() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange(&b"GET /bytes HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9\r\nX-Tab: a\tb\r\nX-Padded: \t padded \t\r\n\r\n"[..])
        .await;
    let seen = upstream.only();
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    let head = &seen.head;
    assert!(
        head.windows(12).any(|w| w == b"x-latin: caf")
            && head.windows(5).any(|w| w == b"caf\xe9\r"),
        "{head:?}"
    );
    assert_eq!(seen.header("x-tab").as_deref(), Some("a\tb"));
    assert_eq!(seen.header("x-padded").as_deref(), Some("padded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_is_not_forwarded() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    client
        .send("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await;
    // Closed without a word: the gate speaks HTTP/1 only.
    client.assert_closed("an HTTP/2 preface").await;
    upstream.assert_saw_nothing("an HTTP/2 preface").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Head size and slow heads.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_larger_than_max_header_bytes_is_431_and_never_forwarded() {
    let (upstream, gate) = echo_setup("max_header_bytes = \"8KiB\"").await;

    // Exactly the limit without the head's end: the gate cannot have a whole head within it.
    let mut client = Client::open(&gate).await;
    let mut request = b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    request.resize(8 * 1024, b'x');
    client.send(&request).await;
    let answer = client.answer().await;
    assert_bare_refusal(&answer, "HTTP/1.1 431 Request Header Fields Too Large");
    client.assert_closed("an oversized head").await;

    // Whole heads over the limit.
    for size in [9 * 1024, 20 * 1024] {
        let mut client = Client::open(&gate).await;
        let mut request = b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
        request.resize(size, b'x');
        request.extend_from_slice(b"\r\n\r\n");
        client.send(&request).await;
        let answer = client.answer().await;
        assert_bare_refusal(&answer, "HTTP/1.1 431 Request Header Fields Too Large");
        client.assert_closed("an oversized whole head").await;
    }

    // Too many header lines, in a small head.
    let mut client = Client::open(&gate).await;
    let mut request = "GET /many HTTP/1.1\r\nHost: a\r\n".to_string();
    for n in 0..100 {
        request.push_str(&format!("X-{n}: v\r\n"));
    }
    request.push_str("\r\n");
    client.send(&request).await;
    let answer = client.answer().await;
    assert_bare_refusal(&answer, "HTTP/1.1 431 Request Header Fields Too Large");
    client.assert_closed("too many headers").await;

    upstream.assert_saw_nothing("oversized heads").await;

    // Just under the limit goes through, the long value intact.
    let mut client = Client::open(&gate).await;
    let value = "v".repeat(7 * 1024);
    let answer = client
        .exchange(format!(
            "GET /near HTTP/1.1\r\nHost: a\r\nX-Big: {value}\r\n\r\n"
        ))
        .await;
    let seen = upstream.only();
    assert_echoed(&answer, "/near", &seen);
    assert_eq!(seen.header("x-big"), Some(value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_not_finished_within_header_timeout_is_cut_off() {
    let (upstream, gate) = echo_setup("header_timeout = \"1s\"").await;
    let mut client = Client::open(&gate).await;
    let started = Instant::now();
    client.send("GET /slow HTTP/1.1\r\nHost: a\r\n").await;
    // A byte now and then, never the end of the head.
    let trickle = async {
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if client.wire.stream.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    let rest = tokio::time::timeout(Duration::from_secs(5), client.wire.read_to_close())
        .await
        .expect("the gate closed the slow connection");
    let took = started.elapsed();
    // Closed without an answer.
    assert!(rest.is_empty(), "{:?}", lossy(&rest));
    assert!(took >= Duration::from_millis(900), "{took:?}");
    upstream.assert_saw_nothing("a slow head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_header_timeout() {
    let (upstream, gate) = echo_setup("header_timeout = \"1s\"").await;

    // Nothing sent at all.
    let mut silent = Client::open(&gate).await;
    let started = Instant::now();
    silent.assert_closed("a silent connection").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Idle after an answer.
    let mut kept = Client::open(&gate).await;
    let answer = kept.exchange(get("/one")).await;
    assert_echoed(&answer, "/one", &upstream.only());
    let started = Instant::now();
    kept.assert_closed("an idle kept connection").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Closing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_client_is_answered_and_the_connection_closed() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange("GET /bye HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    let seen = upstream.only();
    assert_eq!(seen.header("connection"), None);
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(answer.text(), "/bye");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("connection", "close"),
            ("content-length", "4"),
            ("x-request-id", &seen.header("x-request-id").expect("an id")),
        ])
    );
    client.assert_closed("after Connection: close").await;

    for header in [
        "Connection: CLOSE\r\n",
        "Connection: keep-alive, close\r\n",
        "Connection: keep-alive\r\nConnection: close\r\n",
    ] {
        let mut client = Client::open(&gate).await;
        let answer = client
            .exchange(format!("GET /bye HTTP/1.1\r\nHost: a\r\n{header}\r\n"))
            .await;
        assert_eq!(answer.status, 200, "{header:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{header:?}");
        client.assert_closed(header).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_is_answered_and_closed() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client.exchange("GET /old HTTP/1.0\r\n\r\n").await;
    // Upstream it is an HTTP/1.1 request like any other, with the upstream's host.
    let seen = upstream.only();
    assert_eq!(seen.request_line(), "GET /old HTTP/1.1");
    let id = answer.request_id();
    assert_eq!(
        seen.fields(),
        fields(&[
            ("host", &upstream.authority),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", &gate.public_authority()),
            ("x-request-id", &id),
        ])
    );
    assert_eq!(answer.status_line, "HTTP/1.0 200 OK");
    assert_eq!(
        answer.fields(),
        fields(&[("content-length", "4"), ("x-request-id", &id)])
    );
    assert_eq!(answer.text(), "/old");
    client.assert_closed("after an HTTP/1.0 answer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_asking_for_keep_alive_is_kept() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange("GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(answer.status_line, "HTTP/1.0 200 OK");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("connection", "keep-alive"),
            ("content-length", "4"),
            ("x-request-id", &answer.request_id()),
        ])
    );
    let again = client
        .exchange("GET /again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(again.text(), "/again");
    assert_eq!(
        upstream.request_lines(),
        ["GET /old HTTP/1.1", "GET /again HTTP/1.1"]
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Expect: 100-continue.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_one_100_and_the_body_reaches_the_upstream_once() {
    // The upstream sends its own 100 first: the client must still see exactly one.
    let upstream = Upstream::start(|_| {
        let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        bytes.extend_from_slice(&ok("done"));
        Reply::Send(bytes)
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    client
        .send(
            "PUT /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
    let interim = client.answer().await;
    assert_eq!(interim.status_line, "HTTP/1.1 100 Continue");
    assert!(interim.headers.is_empty(), "{interim:?}");
    client.send("hello").await;
    let answer = client.answer().await;
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(answer.text(), "done");

    let seen = upstream.only();
    assert_eq!(seen.raw_body, b"hello");
    assert_eq!(seen.header("expect").as_deref(), Some("100-continue"));

    let next = client.exchange(get("/after")).await;
    assert_eq!(next.text(), "done");
    assert_eq!(upstream.seen().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 8. What the upstream answers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_reaches_the_client_with_the_same_content() {
    let upstream = Upstream::start(|seen| {
        Reply::Send(respond(
            "HTTP/1.1 200 OK",
            &[
                ("transfer-encoding", "chunked"),
                ("content-type", "text/plain"),
            ],
            format!(
                "6;ext=x\r\nhello \r\n{:x}\r\n{}\r\n0\r\nx-trailer: t\r\n\r\n",
                seen.target().len(),
                seen.target()
            )
            .as_bytes(),
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    for target in ["/one", "/two"] {
        let answer = client.exchange(get(target)).await;
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
        assert_eq!(answer.text(), format!("hello {target}"));
        assert_eq!(answer.framing, Framing::Chunked);
        // The upstream's trailer is not passed on.
        assert!(
            answer.raw.ends_with(b"\r\n0\r\n\r\n") && !lossy(&answer.raw).contains("x-trailer"),
            "{:?}",
            lossy(&answer.raw)
        );
        assert_eq!(
            answer.fields(),
            fields(&[
                ("content-type", "text/plain"),
                ("transfer-encoding", "chunked"),
                ("x-request-id", &answer.request_id()),
            ])
        );
    }
    assert_eq!(
        upstream.request_lines(),
        ["GET /one HTTP/1.1", "GET /two HTTP/1.1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_delimited_by_the_upstreams_close_reaches_the_client_chunked() {
    let upstream = Upstream::start(|seen| {
        Reply::SendAndClose(respond(
            "HTTP/1.1 200 OK",
            &[("content-type", "text/plain")],
            format!("until the end of {}", seen.target()).as_bytes(),
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    for target in ["/one", "/two"] {
        let answer = client.exchange(get(target)).await;
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
        assert_eq!(answer.text(), format!("until the end of {target}"));
        assert_eq!(answer.framing, Framing::Chunked);
        assert_eq!(
            answer.fields(),
            fields(&[
                ("content-type", "text/plain"),
                ("transfer-encoding", "chunked"),
                ("x-request-id", &answer.request_id()),
            ])
        );
    }
    let connections: Vec<usize> = upstream.seen().iter().map(|seen| seen.connection).collect();
    assert_eq!(connections, [1, 2], "a closed connection is not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_saying_close_is_not_reused_and_the_client_connection_is_kept() {
    let upstream = Upstream::start(|seen| {
        Reply::SendAndClose(respond(
            "HTTP/1.1 200 OK",
            &[("connection", "close"), ("content-length", "2")],
            if seen.target() == "/one" {
                b"1!"
            } else {
                b"2!"
            },
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    for (target, body) in [("/one", "1!"), ("/two", "2!")] {
        let answer = client.exchange(get(target)).await;
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
        assert_eq!(answer.text(), body);
        // The upstream's `Connection: close` is about its own connection, not the client's.
        assert_eq!(
            answer.fields(),
            fields(&[
                ("content-length", "2"),
                ("x-request-id", &answer.request_id()),
            ])
        );
    }
    let places: Vec<(usize, usize)> = upstream
        .seen()
        .iter()
        .map(|s| (s.connection, s.index))
        .collect();
    assert_eq!(places, [(1, 0), (2, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answer_keeps_its_content_length_and_has_no_body() {
    let upstream = Upstream::start(|seen| {
        if seen.request_line().starts_with("HEAD ") {
            Reply::Send(respond(
                "HTTP/1.1 200 OK",
                &[("content-length", "1234"), ("content-type", "text/plain")],
                b"",
            ))
        } else {
            Reply::Send(ok(&seen.target()))
        }
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    client.send("HEAD /file HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let answer = client.answer_to_head().await;
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("content-length", "1234"),
            ("content-type", "text/plain"),
            ("x-request-id", &answer.request_id()),
        ])
    );
    let next = client.exchange(get("/after")).await;
    let seen = upstream.seen();
    assert_echoed(&next, "/after", &seen[1]);
    assert_eq!(
        seen.iter()
            .map(|seen| (seen.connection, seen.index, seen.request_line()))
            .collect::<Vec<_>>(),
        [
            (1, 0, "HEAD /file HTTP/1.1".to_string()),
            (1, 1, "GET /after HTTP/1.1".to_string())
        ],
        "the upstream connection stayed in step after the body-less answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_204_and_304_have_no_body_and_the_connection_goes_on() {
    let upstream = Upstream::start(|seen| match seen.target().as_str() {
        "/204" => Reply::Send(respond("HTTP/1.1 204 No Content", &[("x-a", "1")], b"")),
        // Wrongly, with a body.
        "/204-stray" => Reply::Send(respond(
            "HTTP/1.1 204 No Content",
            &[("content-length", "5")],
            b"hello",
        )),
        "/304" => Reply::Send(respond(
            "HTTP/1.1 304 Not Modified",
            &[("etag", "\"v1\""), ("content-length", "100")],
            b"",
        )),
        _ => Reply::Send(ok(&seen.target())),
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;

    let no_content = client.exchange(get("/204")).await;
    assert_eq!(no_content.status_line, "HTTP/1.1 204 No Content");
    assert_eq!(
        no_content.fields(),
        fields(&[("x-a", "1"), ("x-request-id", &no_content.request_id())])
    );
    let not_modified = client
        .exchange("GET /304 HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v1\"\r\n\r\n")
        .await;
    // The upstream's Content-Length on the 304 is not passed on.
    assert_eq!(not_modified.status_line, "HTTP/1.1 304 Not Modified");
    assert_eq!(
        not_modified.fields(),
        fields(&[
            ("etag", "\"v1\""),
            ("x-request-id", &not_modified.request_id()),
        ])
    );
    let next = client.exchange(get("/after")).await;
    let seen = upstream.seen();
    assert_echoed(&next, "/after", &seen[2]);
    assert_eq!(seen[1].header("if-none-match").as_deref(), Some("\"v1\""));
    let places: Vec<(usize, usize)> = seen.iter().map(|s| (s.connection, s.index)).collect();
    assert_eq!(places, [(1, 0), (1, 1), (1, 2)]);

    // A body the upstream sent after a 204 never reaches the client: the next answer on the
    // client's connection is the next request's own (a stray body there would be read as it).
    let stray = client.exchange(get("/204-stray")).await;
    assert_eq!(stray.status_line, "HTTP/1.1 204 No Content");
    assert_eq!(
        stray.fields(),
        fields(&[("x-request-id", &stray.request_id())])
    );
    let next = client.exchange(get("/after-stray")).await;
    assert_eq!(next.status_line, "HTTP/1.1 200 OK");
    assert_eq!(next.text(), "/after-stray");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_answers_from_the_upstream_are_not_passed_on() {
    let upstream = Upstream::start(|seen| {
        let interim: &[u8] = match seen.target().as_str() {
            "/early-hints" => b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n",
            "/unasked-continue" => b"HTTP/1.1 100 Continue\r\n\r\n",
            _ => b"",
        };
        let mut bytes = interim.to_vec();
        bytes.extend_from_slice(&ok(&seen.target()));
        Reply::Send(bytes)
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    for (n, target) in ["/early-hints", "/unasked-continue", "/after"]
        .iter()
        .enumerate()
    {
        let answer = client.exchange(get(target)).await;
        assert!(
            answer.raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{target}: {:?}",
            lossy(&answer.raw)
        );
        assert_echoed(&answer, target, &upstream.seen()[n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_heads_the_gate_cannot_read_strictly_are_502() {
    for (what, head) in [
        (
            "obs-fold",
            "HTTP/1.1 200 OK\r\nx-a: 1\r\n x-injected: 2\r\ncontent-length: 2\r\n\r\n",
        ),
        (
            "space before the colon",
            "HTTP/1.1 200 OK\r\nx-a : 1\r\ncontent-length: 2\r\n\r\n",
        ),
        (
            "NUL in a value",
            "HTTP/1.1 200 OK\r\nx-a: 1\u{0}2\r\ncontent-length: 2\r\n\r\n",
        ),
    ] {
        assert_unreadable_answer_is_502_and_dropped(what, format!("{head}ok")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_readable_answer_heads_reach_the_client_normalised() {
    let upstream = Upstream::start(|seen| {
        Reply::Send(match seen.target().as_str() {
            "/bare-lf" => b"HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 2\n\nok".to_vec(),
            "/padded-length" => b"HTTP/1.1 200 OK\r\ncontent-length:  2  \r\n\r\nok".to_vec(),
            "/equal-lengths" => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok".to_vec()
            }
            "/custom-reason" => {
                b"HTTP/1.1 200 Everything Fine\r\ncontent-length: 2\r\n\r\nok".to_vec()
            }
            "/unknown-status" => b"HTTP/1.1 599 Custom\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            "/no-reason" => b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            _ => ok(&seen.target()),
        })
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    for (target, status_line, extra) in [
        ("/bare-lf", Some("HTTP/1.1 200 OK"), Some(("x-a", "1"))),
        ("/padded-length", Some("HTTP/1.1 200 OK"), None),
        ("/equal-lengths", Some("HTTP/1.1 200 OK"), None),
        ("/custom-reason", Some("HTTP/1.1 200 Everything Fine"), None),
        ("/unknown-status", Some("HTTP/1.1 599 Custom"), None),
        // The code is kept; the reason phrase may be empty or the usual one.
        ("/no-reason", None, None),
    ] {
        let answer = client.exchange(get(target)).await;
        match status_line {
            Some(line) => assert_eq!(answer.status_line, line, "{target}"),
            None => assert_eq!(answer.status, 200, "{target}"),
        }
        assert_eq!(answer.body, b"ok", "{target}");
        let id = answer.request_id();
        let mut expected = vec![("content-length", "2"), ("x-request-id", id.as_str())];
        expected.extend(extra);
        assert_eq!(answer.fields(), fields(&expected), "{target}");
    }
    assert_eq!(upstream.seen().len(), 6);
}

/// A response that says both `Content-Length` and `Transfer-Encoding: chunked` (RFC 9112
/// §6.3: the chunked framing wins, and a proxy must not pass the length on). The client must
/// never get an answer that looks whole but is not the upstream's body: either the whole
/// chunked content, or a 502.
///
/// FAILS against the gate before the express lane (9ce67fa): it passed `content-length: 3`
/// on with the chunked body decoded, so the client got a clean-looking `200` whose body was
/// cut to `hel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_both_a_length_and_chunked_is_never_passed_on_cut_short() {
    for (what, framing) in [
        (
            "length first",
            "content-length: 3\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "chunked first",
            "transfer-encoding: chunked\r\ncontent-length: 3\r\n",
        ),
    ] {
        let framing = framing.to_string();
        let upstream = Upstream::start(move |seen| {
            if seen.target() == "/both" {
                Reply::Send(
                    format!("HTTP/1.1 200 OK\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n").into_bytes(),
                )
            } else {
                Reply::Send(ok(&seen.target()))
            }
        })
        .await;
        let gate = start_gate(&upstream.url, "").await;
        let mut client = Client::open(&gate).await;
        let answer = client.exchange(get("/both")).await;
        match answer.status {
            502 => assert_gate_error(
                &answer,
                "HTTP/1.1 502 Bad Gateway",
                "upstream_failed",
                "the exchange API's answer could not be read",
            ),
            _ => {
                assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{what}");
                assert_eq!(answer.text(), "hello", "{what}: {:?}", lossy(&answer.raw));
            }
        }
        let next = client.exchange(get("/next")).await;
        assert_eq!(next.text(), "/next", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_answer_delimited_by_close_reaches_the_client_whole() {
    let upstream = Upstream::start(|_| {
        Reply::SendAndClose(b"HTTP/1.0 200 OK\r\nx-a: 1\r\n\r\nuntil the close".to_vec())
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    let answer = client.exchange(get("/old-upstream")).await;
    // Not pinned: the answer's version and whether the client connection is kept (before the
    // express lane: `HTTP/1.0`, closed after; with it: `HTTP/1.1`, chunked, kept).
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "until the close");
    assert_eq!(answer.all("x-a"), ["1"]);
    assert_eq!(
        answer.request_id(),
        upstream.only().header("x-request-id").expect("an id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_an_unreadable_length_is_502_and_its_connection_dropped() {
    for (what, headers) in [
        ("not a number", "content-length: abc\r\n"),
        ("two lengths", "content-length: 5\r\ncontent-length: 6\r\n"),
        ("a signed length", "content-length: +5\r\n"),
    ] {
        let answer = format!("HTTP/1.1 200 OK\r\n{headers}\r\nhello!");
        assert_unreadable_answer_is_502_and_dropped(what, answer).await;
    }
}

/// An upstream answering `GET /odd` with `answer` (and anything else with its target): the
/// client gets `502 upstream_failed`, and its next request goes on a new upstream connection.
async fn assert_unreadable_answer_is_502_and_dropped(what: &str, answer: String) {
    let upstream = Upstream::start(move |seen| {
        if seen.target() == "/odd" {
            Reply::Send(answer.clone().into_bytes())
        } else {
            Reply::Send(ok(&seen.target()))
        }
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    let refused = client.exchange(get("/odd")).await;
    assert_gate_error(
        &refused,
        "HTTP/1.1 502 Bad Gateway",
        "upstream_failed",
        "the exchange API's answer could not be read",
    );
    let next = client.exchange(get("/next")).await;
    let seen = upstream.seen();
    assert_echoed(&next, "/next", &seen[1]);
    let places: Vec<(usize, usize)> = seen.iter().map(|s| (s.connection, s.index)).collect();
    assert_eq!(
        places,
        [(1, 0), (2, 0)],
        "{what}: not reused after a broken answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_short_by_the_upstream_never_reaches_the_client_whole() {
    let mut sent = respond("HTTP/1.1 200 OK", &[("content-length", "1000")], b"");
    sent.extend_from_slice(b"0123456789");
    let upstream = Upstream::start(move |_| Reply::SendAndClose(sent.clone())).await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    client.send(get("/cut")).await;
    let partial = match client.read_answer(false).await {
        Ok(answer) => panic!("a whole answer arrived: {answer:?}"),
        Err(partial) => partial,
    };
    // The head went out before the body broke: it promised 1000 bytes, and the connection
    // ends after at most the 10 that came, so no client can take it for a whole answer.
    let end = head_end(&partial)
        .unwrap_or_else(|| panic!("no head before the close: {:?}", lossy(&partial)));
    let head = parse_head(&partial[..end]);
    assert_eq!(head.start_line, "HTTP/1.1 200 OK");
    let mut got = head.fields;
    got.retain(|(name, _)| name != "date" && name != "x-request-id");
    assert_eq!(got, fields(&[("content-length", "1000")]));
    let body = &partial[end..];
    assert!(b"0123456789".starts_with(body), "{:?}", lossy(body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_answer_headers_are_removed_and_the_request_id_is_the_gates() {
    let upstream = Upstream::start(|_| {
        Reply::Send(respond(
            "HTTP/1.1 200 OK",
            &[
                ("connection", "x-private"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic"),
                ("upgrade", "h2c"),
                ("trailer", "x-checksum"),
                ("te", "trailers"),
                ("x-request-id", "upstream-own"),
                ("x-kept", "yes"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("content-length", "2"),
            ],
            b"ok",
        ))
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    let answer = client.exchange(get("/h")).await;
    let sent_id = upstream.only().header("x-request-id").expect("an id");
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("content-length", "2"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("x-kept", "yes"),
            ("x-request-id", &sent_id),
        ])
    );
    assert_eq!(answer.all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(answer.body, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_504() {
    let upstream = Upstream::start(|_| Reply::Silence).await;
    let gate = start_gate(&upstream.url, "upstream_timeout = \"1s\"").await;
    let mut client = Client::open(&gate).await;
    let started = Instant::now();
    let answer = client.exchange(get("/silent")).await;
    let took = started.elapsed();
    assert_gate_error(
        &answer,
        "HTTP/1.1 504 Gateway Timeout",
        "upstream_timeout",
        "the exchange API did not answer in time",
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(upstream.request_lines(), ["GET /silent HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_connections_is_502() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port to close");
    let url = format!("http://{}", closed.local_addr().expect("its address"));
    drop(closed);
    let gate = start_gate(&url, "").await;
    let mut client = Client::open(&gate).await;
    let answer = client.exchange(get("/refused")).await;
    assert_gate_error(
        &answer,
        "HTTP/1.1 502 Bad Gateway",
        "upstream_unreachable",
        "the exchange API cannot be reached",
    );
    // The client connection is fine for the next request.
    let again = client.exchange(get("/refused")).await;
    assert_eq!(again.status, 502);
}

// ---------------------------------------------------------------------------------------------
// 9. The gate's namespace.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gates_namespace_in_any_spelling_never_reaches_the_upstream() {
    let (upstream, gate) = echo_setup("").await;
    let not_found = "there is no such change or passkey for you";
    for (target, status_line, code, message) in [
        (
            "/_stepgate/nope",
            "HTTP/1.1 404 Not Found",
            "not_found",
            not_found,
        ),
        (
            "/_stepgate",
            "HTTP/1.1 404 Not Found",
            "not_found",
            not_found,
        ),
        (
            "/%5fstepgate/x",
            "HTTP/1.1 404 Not Found",
            "not_found",
            not_found,
        ),
        (
            "/%5Fstepgate/x",
            "HTTP/1.1 404 Not Found",
            "not_found",
            not_found,
        ),
        (
            "/%5f%73tepgate/x",
            "HTTP/1.1 404 Not Found",
            "not_found",
            not_found,
        ),
        (
            "/./_stepgate/x",
            "HTTP/1.1 400 Bad Request",
            "invalid_path",
            "the path has a . or .. segment",
        ),
        (
            "/x/../_stepgate/x",
            "HTTP/1.1 400 Bad Request",
            "invalid_path",
            "the path has a . or .. segment",
        ),
        (
            "/_stepgate/../api",
            "HTTP/1.1 400 Bad Request",
            "invalid_path",
            "the path has a . or .. segment",
        ),
        (
            "//_stepgate/x",
            "HTTP/1.1 400 Bad Request",
            "invalid_path",
            "the path has an empty segment (//)",
        ),
        (
            "/_stepgate%2fx",
            "HTTP/1.1 400 Bad Request",
            "invalid_path",
            "the path encodes a separator or NUL (%2F, %5C, %00)",
        ),
    ] {
        let mut client = Client::open(&gate).await;
        let answer = client.exchange(get(target)).await;
        assert_gate_error(&answer, status_line, code, message);
        // The connection goes on.
        let again = client.exchange(get("/_stepgate/nope")).await;
        assert_eq!(again.status, 404, "{target}");
    }
    upstream.assert_saw_nothing("the gate's namespace").await;

    // Pipelined between two plain requests in one write: still never forwarded.
    let mut client = Client::open(&gate).await;
    client
        .send(format!(
            "{}{}{}",
            get("/before"),
            get("/%5fstepgate/x"),
            get("/after")
        ))
        .await;
    let before = client.answer().await;
    let refused = client.answer().await;
    let after = client.answer().await;
    assert_gate_error(&refused, "HTTP/1.1 404 Not Found", "not_found", not_found);
    let seen = upstream.seen();
    assert_echoed(&before, "/before", &seen[0]);
    assert_echoed(&after, "/after", &seen[1]);
    assert_eq!(
        upstream.request_lines(),
        ["GET /before HTTP/1.1", "GET /after HTTP/1.1"]
    );

    // Only the namespace: a longer first segment is an ordinary path.
    let mut client = Client::open(&gate).await;
    let answer = client.exchange(get("/_stepgatex/y")).await;
    assert_echoed(&answer, "/_stepgatex/y", &upstream.seen()[2]);
}

// ---------------------------------------------------------------------------------------------
// 10. Request targets.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_that_are_not_a_plain_path_are_refused() {
    let (upstream, gate) = echo_setup("").await;
    let not_origin = "the request target must be a path starting with /";
    for (request_line, message) in [
        ("GET http://evil.example/x HTTP/1.1", not_origin),
        ("GET http://evil.example HTTP/1.1", not_origin),
        (
            "GET http://evil.example/_stepgate/nope HTTP/1.1",
            not_origin,
        ),
        (
            "GET //evil.example/x HTTP/1.1",
            "the path has an empty segment (//)",
        ),
        ("OPTIONS * HTTP/1.1", not_origin),
        ("GET /a/../b HTTP/1.1", "the path has a . or .. segment"),
        ("GET /a/./b HTTP/1.1", "the path has a . or .. segment"),
        ("GET /a/%2e%2e/b HTTP/1.1", "the path has a . or .. segment"),
        ("GET /a/.. HTTP/1.1", "the path has a . or .. segment"),
        ("GET /a//b HTTP/1.1", "the path has an empty segment (//)"),
        ("GET /a;x=1/b HTTP/1.1", "the path has a ; parameter"),
        ("GET /a%3bx HTTP/1.1", "the path has a ; parameter"),
        (
            "GET /a%2fb HTTP/1.1",
            "the path encodes a separator or NUL (%2F, %5C, %00)",
        ),
        (
            "GET /a%00b HTTP/1.1",
            "the path encodes a separator or NUL (%2F, %5C, %00)",
        ),
        (
            "GET /a%zz HTTP/1.1",
            "the path has a malformed percent-encoding",
        ),
        ("GET /a\\b HTTP/1.1", "the path has a backslash"),
    ] {
        let mut client = Client::open(&gate).await;
        let answer = client
            .exchange(format!("{request_line}\r\nHost: a\r\n\r\n"))
            .await;
        assert_gate_error(&answer, "HTTP/1.1 400 Bad Request", "invalid_path", message);
    }
    upstream
        .assert_saw_nothing("targets that are not a plain path")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_the_connection_goes_on_in_step() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let answer = client
        .exchange("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        .await;
    assert_gate_error(
        &answer,
        "HTTP/1.1 400 Bad Request",
        "invalid_path",
        "the request target must be a path starting with /",
    );
    upstream.assert_saw_nothing("CONNECT").await;
    // No tunnel was opened: the next bytes are an ordinary request.
    let next = client.exchange(get("/after-connect")).await;
    assert_echoed(&next, "/after-connect", &upstream.only());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_forwarded_in_its_canonical_form_and_the_query_as_sent() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    for (sent, forwarded) in [
        (
            "/a%2db/%7euser/%3a?x=%2d&y=%zz",
            "/a-b/~user/%3A?x=%2d&y=%zz",
        ),
        (
            "/api/v1/api%2Dkeys/k1?fields=a",
            "/api/v1/api-keys/k1?fields=a",
        ),
        ("/trailing/", "/trailing/"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/?", "/?"),
        ("/q?a=1?b=/../c", "/q?a=1?b=/../c"),
    ] {
        let answer = client.exchange(get(sent)).await;
        assert_eq!(answer.status, 200, "{sent}");
        assert_eq!(answer.text(), forwarded, "{sent}");
    }
    assert_eq!(
        upstream.request_lines(),
        [
            "GET /a-b/~user/%3A?x=%2d&y=%zz HTTP/1.1",
            "GET /api/v1/api-keys/k1?fields=a HTTP/1.1",
            "GET /trailing/ HTTP/1.1",
            "GET /caf%C3%A9 HTTP/1.1",
            "GET /? HTTP/1.1",
            "GET /q?a=1?b=/../c HTTP/1.1",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_characters_in_a_target_are_forwarded_or_refused() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    // The fragment is dropped; raw UTF-8 and these ASCII marks go through as sent.
    for (sent, forwarded) in [
        (&b"/a#frag"[..], &b"/a"[..]),
        (b"/a?b#c", b"/a?b"),
        (b"/caf\xc3\xa9", b"/caf\xc3\xa9"),
        (b"/a|b", b"/a|b"),
        (b"/a{b}", b"/a{b}"),
        (b"/a\"b", b"/a\"b"),
    ] {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(sent);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        let answer = client.exchange(&request).await;
        let seen = upstream.seen();
        let last = seen.last().expect("forwarded");
        let mut line = b"GET ".to_vec();
        line.extend_from_slice(forwarded);
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert!(
            last.head.starts_with(&line),
            "{:?}: {:?}",
            lossy(sent),
            lossy(&last.head)
        );
        assert_echoed(&answer, &lossy(forwarded), last);
    }
    assert_eq!(upstream.seen().len(), 6);

    // These the parser refuses outright.
    let (upstream, gate) = echo_setup("").await;
    for target in [&b"/a<b>"[..], b"/a\x7f", b"/a\x01"] {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_refused_unforwarded(&gate, &upstream, &request, &lossy(target)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Protected requests on a kept connection.

const WITHDRAW: &str = r#"{"permissions":["withdraw"]}"#;

fn put_key(method: &str, target: &str, extra: &str, body: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The hold answer: exact status line, headers and body fields.
fn assert_held(answer: &Answer, gate: &Gate, key: &str) {
    assert_eq!(
        answer.status_line,
        "HTTP/1.1 403 Forbidden",
        "{}",
        answer.text()
    );
    let body = answer.json();
    let id = body["change_id"].as_str().expect("a change id").to_string();
    assert!(is_uuid(&id), "{id}");
    assert_eq!(
        answer.fields(),
        fields(&[
            ("cache-control", "no-store"),
            ("content-length", &answer.body.len().to_string()),
            ("content-type", "application/json"),
            (
                "www-authenticate",
                &format!(r#"StepUp realm="stepgate", error="step_up_required", change_id="{id}""#)
            ),
            ("x-request-id", &answer.request_id()),
        ])
    );
    let confirm_before = body["confirm_before"]
        .as_str()
        .expect("confirm_before")
        .to_string();
    assert_eq!(
        body,
        json!({
            "error": "step_up_required",
            "message": "This change must be confirmed with your passkey and then waits out a cooling-off period.",
            "change_id": id,
            "confirm_url": format!("http://{}/_stepgate/changes/{id}", gate.public_authority()),
            "summary": format!("Enable withdrawals on API key {key}"),
            "cooling_off_seconds": 86400,
            "confirm_before": confirm_before,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_request_after_pass_through_ones_on_one_connection_is_held() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;

    for n in 0..5 {
        let target = format!("/api/v1/api-keys/k{n}");
        let answer = client.exchange(get(&target)).await;
        assert_echoed(&answer, &target, &upstream.seen()[n]);
    }
    let held = client
        .exchange(put_key(
            "PUT",
            "/api/v1/api-keys/k1",
            "x-user-id: alice\r\n",
            WITHDRAW,
        ))
        .await;
    assert_held(&held, &gate, "k1");

    let after = client.exchange(get("/after-hold")).await;
    assert_echoed(&after, "/after-hold", &upstream.seen()[5]);

    // Without an identity: refused, and never forwarded either.
    let anonymous = client
        .exchange(put_key("PUT", "/api/v1/api-keys/k1", "", WITHDRAW))
        .await;
    assert_gate_error(
        &anonymous,
        "HTTP/1.1 401 Unauthorized",
        "unauthenticated",
        "no identity was presented",
    );
    let after = client.exchange(get("/after-401")).await;
    assert_echoed(&after, "/after-401", &upstream.seen()[6]);

    // All in one write: the protected request between two plain ones is still held.
    let mut pipelined = get("/before-pipelined-hold");
    pipelined.push_str(&put_key(
        "PUT",
        "/api/v1/api-keys/k9",
        "x-user-id: alice\r\n",
        WITHDRAW,
    ));
    pipelined.push_str(&get("/after-pipelined-hold"));
    client.send(&pipelined).await;
    let before = client.answer().await;
    let held = client.answer().await;
    let after = client.answer().await;
    assert_echoed(&before, "/before-pipelined-hold", &upstream.seen()[7]);
    assert_held(&held, &gate, "k9");
    assert_echoed(&after, "/after-pipelined-hold", &upstream.seen()[8]);

    let mut expected: Vec<String> = (0..5)
        .map(|n| format!("GET /api/v1/api-keys/k{n} HTTP/1.1"))
        .collect();
    expected.push("GET /after-hold HTTP/1.1".into());
    expected.push("GET /after-401 HTTP/1.1".into());
    expected.push("GET /before-pipelined-hold HTTP/1.1".into());
    expected.push("GET /after-pipelined-hold HTTP/1.1".into());
    assert_eq!(upstream.request_lines(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_a_protected_request_on_a_kept_connection_are_held_too() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let alice = "x-user-id: alice\r\n";

    let answer = client.exchange(get("/warm-up")).await;
    assert_echoed(&answer, "/warm-up", &upstream.only());

    for (method, target, extra) in [
        ("put", "/api/v1/api-keys/k1", alice.to_string()),
        ("PATCH", "/api/v1/api-keys/k2", alice.to_string()),
        ("PUT", "/api/v1/api%2Dkeys/k3", alice.to_string()),
        (
            "POST",
            "/api/v1/api-keys/k4",
            format!("{alice}X-HTTP-Method-Override: PUT\r\n"),
        ),
        ("POST", "/api/v1/api-keys/k5?_method=PUT", alice.to_string()),
    ] {
        let answer = client
            .exchange(put_key(method, target, &extra, WITHDRAW))
            .await;
        let key = target.rsplit('/').next().unwrap_or_default();
        let key = key.split('?').next().unwrap_or_default();
        assert_held(&answer, &gate, key);
    }

    // Loosening nothing: the same route passes through, body intact.
    let read_only = r#"{"permissions":["read"]}"#;
    let answer = client
        .exchange(put_key("PUT", "/api/v1/api-keys/k1", alice, read_only))
        .await;
    let seen = upstream.seen();
    assert_echoed(&answer, "/api/v1/api-keys/k1", &seen[1]);
    assert_eq!(seen[1].raw_body, read_only.as_bytes());
    assert_eq!(
        upstream.request_lines(),
        ["GET /warm-up HTTP/1.1", "PUT /api/v1/api-keys/k1 HTTP/1.1"]
    );
}

/// A `Connection` header may name any header as connection-scoped, and the proxy removes what
/// it names; naming `Content-Length` must not strip the framing from a body that still goes
/// upstream, or the body is read there as a second request: here a protected change, which
/// the gate would have held, with an identity of the client's choosing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_naming_the_framing_cannot_smuggle_a_request() {
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let smuggled = "PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: x\r\nX-User-Id: mallory\r\n\
                    Content-Type: application/json\r\nContent-Length: 28\r\n\r\n\
                    {\"permissions\":[\"withdraw\"]}";
    for connection in [
        "content-length",
        "Content-Length, keep-alive",
        "x-a, content-length",
    ] {
        let request = format!(
            "POST /api/v1/orders HTTP/1.1\r\nHost: g\r\nConnection: {connection}\r\n\
             Content-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        );
        let answer = client.exchange(&request).await;
        let seen = upstream.seen();
        let last = seen.last().expect("the outer request was forwarded");
        assert_echoed(&answer, "/api/v1/orders", last);
        assert_eq!(
            last.header("content-length"),
            Some(smuggled.len().to_string()),
            "Connection: {connection}"
        );
        assert_eq!(
            last.raw_body,
            smuggled.as_bytes(),
            "Connection: {connection}"
        );
        assert!(
            seen.iter()
                .all(|seen| seen.request_line().starts_with("POST ")),
            "Connection: {connection}: the upstream read a second request: {:?}",
            seen.iter().map(Seen::request_line).collect::<Vec<_>>()
        );
    }
}

/// The same on the way back: an upstream `Connection` naming `Content-Length` must not leave
/// the client's answer without framing on a connection that carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_connection_header_names_its_length_keeps_its_framing() {
    let upstream = Upstream::start(|seen| match seen.target().as_str() {
        "/named" => Reply::Send(respond(
            "HTTP/1.1 200 OK",
            &[("connection", "Content-Length"), ("content-length", "5")],
            b"hello",
        )),
        _ => Reply::Send(ok(&seen.target())),
    })
    .await;
    let gate = start_gate(&upstream.url, "").await;
    let mut client = Client::open(&gate).await;
    let answer = client.exchange(get("/named")).await;
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(answer.text(), "hello");
    let next = client.exchange(get("/after")).await;
    assert_echoed(&next, "/after", &upstream.seen()[1]);
}

/// An upstream that reads `_` as `-` (CGI, WSGI, Rack, older Puma and gunicorn) would take the
/// underscore spelling of a header the gate judges or sets for the real one: a method override
/// the gate never matched on, a second `Content-Type` beside the one the rule judged, framing,
/// or a client address. Such spellings are withheld; other underscore names pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_headers_the_gate_judges_or_sets_never_reach_the_upstream() {
    let (upstream, gate) = echo_setup("").await;
    let twins = [
        "X_HTTP_Method_Override: PUT",
        "x_http_method: PUT",
        "X_Method_Override: PUT",
        "Content_Type: application/x-www-form-urlencoded",
        "Content_Length: 0",
        "Content_Encoding: gzip",
        "X_Forwarded_For: 6.6.6.6",
        "X_Forwarded_Host: evil.example",
        "X_Forwarded_Proto: https",
        "X_Request_Id: forged",
        "Idempotency_Key: forged",
    ];
    // Both lanes: the express lane, and hyper's (a chunked body is handed to it).
    for (lane, framing, body) in [
        ("express", "Content-Length: 2", "{}"),
        (
            "hyper",
            "Transfer-Encoding: chunked",
            "2\r\n{}\r\n0\r\n\r\n",
        ),
    ] {
        let mut client = Client::open(&gate).await;
        let request = format!(
            "POST /api/v1/api-keys/k1 HTTP/1.1\r\nHost: a\r\n{}\r\n\
             Api_Key: kept\r\nContent-Type: application/json\r\n{framing}\r\n\r\n{body}",
            twins.join("\r\n")
        );
        let answer = client.exchange(request).await;
        let seen = upstream.seen();
        let last = seen.last().expect("the request was forwarded");
        assert_echoed(&answer, "/api/v1/api-keys/k1", last);
        let names: Vec<String> = last.fields().into_iter().map(|(name, _)| name).collect();
        for twin in twins {
            let name = twin
                .split(':')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(
                !names.contains(&name),
                "{lane}: {name} reached the upstream"
            );
        }
        assert_eq!(last.header("api_key").as_deref(), Some("kept"), "{lane}");
        assert_eq!(last.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    }
}

/// A gate error answering `HEAD` has no body, whichever lane made it, so the client reads the
/// next answer where it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_to_head_has_no_body_and_the_connection_stays_in_step() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port to close");
    let url = format!("http://{}", closed.local_addr().expect("its address"));
    drop(closed);
    let gate = start_gate(&url, "").await;
    let mut client = Client::open(&gate).await;
    client
        .send("HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let head = client.answer_to_head().await;
    assert_eq!(head.status_line, "HTTP/1.1 502 Bad Gateway");
    let length: usize = head
        .header("content-length")
        .and_then(|length| length.parse().ok())
        .expect("the length the body would have");
    assert!(length > 0);
    let next = client.answer().await;
    assert_gate_error(
        &next,
        "HTTP/1.1 502 Bad Gateway",
        "upstream_unreachable",
        "the exchange API cannot be reached",
    );
    assert_eq!(
        next.body.len(),
        length,
        "the GET's body is the one HEAD left out"
    );
}

/// `max_header_bytes` bounds the whole head, however it arrives: in pieces that each fit, a
/// head over the limit is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_max_header_bytes_sent_in_pieces_is_431() {
    // The default limit, 32 KiB, and a 58 KB head in growing pieces, each read on its own:
    // the read buffer grows by doubling, so the last read finishes the head far past the limit.
    let (upstream, gate) = echo_setup("").await;
    let mut client = Client::open(&gate).await;
    let mut request = b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    request.resize(58 * 1000, b'x');
    request.extend_from_slice(b"\r\n\r\n");
    let mut rest = &request[..];
    for size in [4096, 4096, 8192, 15416] {
        let (piece, after) = rest.split_at(size);
        client.send(piece).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        rest = after;
    }
    client.send(rest).await;
    let answer = client.answer().await;
    assert_bare_refusal(&answer, "HTTP/1.1 431 Request Header Fields Too Large");
    upstream.assert_saw_nothing("a head over the limit").await;
}
