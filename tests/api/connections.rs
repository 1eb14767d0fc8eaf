//! The gate's connections to the upstream (`proxy::pool`): kept and reused between requests,
//! replaced when the upstream closed them, never reused after an answer the client abandoned,
//! and no request ever sent twice. The upstream here is raw TCP, so each test decides exactly
//! how the upstream treats its connections and counts what arrived on which one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::helpers::gate_config;
use stepgate::clock::ManualClock;
use stepgate::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the raw upstream treats a connection after answering.
#[derive(Clone, Copy)]
enum After {
    /// Keeps it open for the next request, closing it once idle this long.
    KeepFor(Duration),
    /// Says `Connection: close` and closes it.
    Close,
}

/// A raw HTTP/1.1 upstream: answers every request `200` with `body_bytes` bytes and records
/// each request line with the number of the connection it came on.
struct RawUpstream {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<(usize, String)>>>,
}

impl RawUpstream {
    async fn start(after: After, body_bytes: usize) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw upstream");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("raw upstream address")
        );
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (counter, log) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(stream, number, after, body_bytes, log.clone()));
            }
        });
        RawUpstream {
            url,
            connections,
            requests,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, String)> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    number: usize,
    after: After,
    body_bytes: usize,
    log: Arc<Mutex<Vec<(usize, String)>>>,
) {
    let mut pending = Vec::new();
    loop {
        // Bodiless requests only (GET): a head ends at the blank line.
        let head_end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut buffer = [0u8; 4096];
            let read = match after {
                After::KeepFor(idle) => {
                    match tokio::time::timeout(idle, stream.read(&mut buffer)).await {
                        Ok(read) => read,
                        // Idle too long: close, as an upstream's keep-alive timeout does.
                        Err(_) => return,
                    }
                }
                After::Close => stream.read(&mut buffer).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buffer[..n]),
            }
        };
        let head: Vec<u8> = pending.drain(..head_end).collect();
        let request_line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        log.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((number, request_line));
        let close = matches!(after, After::Close);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {body_bytes}\r\n{}\r\n",
            if close { "connection: close\r\n" } else { "" }
        );
        if stream.write_all(answer.as_bytes()).await.is_err()
            || stream.write_all(&vec![b'x'; body_bytes]).await.is_err()
        {
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A gate in front of `upstream` (a SQLite database in `dir`); returns its base URL.
async fn gate_in_front_of(upstream: &RawUpstream, dir: &tempfile::TempDir) -> String {
    gate_with_limits(upstream, dir, "").await
}

/// The same, with a `[limits]` table's lines.
async fn gate_with_limits(upstream: &RawUpstream, dir: &tempfile::TempDir, limits: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate");
    let port = listener.local_addr().expect("gate address").port();
    let config = gate_config(port, &upstream.url, dir.path(), limits);
    let server = Server::bind(config, Arc::new(ManualClock::starting_now()), listener)
        .await
        .expect("the gate starts");
    tokio::spawn(async move { server.run().await.expect("the gate stopped with an error") });
    format!("http://127.0.0.1:{port}")
}

/// One keep-alive connection to the gate, so every request of a test is served by the same
/// gate thread (and its kept upstream connections). reqwest's own pool may open a second
/// connection when the first is not yet idle again, which would blur what is measured here.
struct OneConnection {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl OneConnection {
    async fn open(gate: &str) -> OneConnection {
        let address = gate.trim_start_matches("http://");
        let stream = TcpStream::connect(address)
            .await
            .expect("connect to the gate");
        OneConnection {
            stream,
            pending: Vec::new(),
        }
    }

    /// Sends `GET path` and reads the whole answer: its status and body length.
    async fn get(&mut self, path: &str) -> (u16, usize) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("send a request to the gate");
        let head_end = loop {
            if let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8_lossy(&self.pending[..head_end]).to_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .expect("the gate says how long the body is");
        while self.pending.len() < head_end + length {
            self.fill().await;
        }
        self.pending.drain(..head_end + length);
        (status, length)
    }

    async fn fill(&mut self) {
        let mut buffer = [0u8; 65536];
        let read = self
            .stream
            .read(&mut buffer)
            .await
            .expect("read from the gate");
        assert!(read > 0, "the gate closed the connection");
        self.pending.extend_from_slice(&buffer[..read]);
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, usize) {
    let response = client.get(url).send().await.expect("the gate answers");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("the whole body arrives");
    (status, body.len())
}

fn request_lines(upstream: &RawUpstream) -> Vec<String> {
    upstream
        .requests()
        .into_iter()
        .map(|(_, line)| line)
        .collect()
}

fn expected_lines(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("GET /r/{n} HTTP/1.1")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let upstream = RawUpstream::start(After::KeepFor(Duration::from_secs(60)), 5).await;
    let gate = gate_in_front_of(&upstream, &dir).await;
    let mut client = OneConnection::open(&gate).await;

    for n in 0..20 {
        assert_eq!(client.get(&format!("/r/{n}")).await, (200, 5));
    }

    assert_eq!(request_lines(&upstream), expected_lines(20));
    assert_eq!(
        upstream.connections(),
        1,
        "each answer was read to its end, so its connection was free for the next request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_after_each_answer_gets_a_new_connection_each_time() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let upstream = RawUpstream::start(After::Close, 5).await;
    let gate = gate_in_front_of(&upstream, &dir).await;
    let mut client = OneConnection::open(&gate).await;

    for n in 0..10 {
        assert_eq!(client.get(&format!("/r/{n}")).await, (200, 5));
    }

    let requests = upstream.requests();
    assert_eq!(request_lines(&upstream), expected_lines(10));
    let connections: Vec<usize> = requests.iter().map(|(number, _)| *number).collect();
    assert_eq!(connections, (1..=10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_upstream_closed_while_idle_is_replaced() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let upstream = RawUpstream::start(After::KeepFor(Duration::from_millis(100)), 5).await;
    let gate = gate_in_front_of(&upstream, &dir).await;
    let mut client = OneConnection::open(&gate).await;

    assert_eq!(client.get("/r/0").await, (200, 5));
    // Network idleness, not a cooling-off: the upstream's own keep-alive runs out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.get("/r/1").await, (200, 5));

    assert_eq!(
        upstream.requests(),
        vec![
            (1, "GET /r/0 HTTP/1.1".into()),
            (2, "GET /r/1 HTTP/1.1".into())
        ],
        "the second request went once, on a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_client_abandoned_does_not_leave_its_connection_for_the_next_request() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // Large enough that the client can stop reading halfway.
    let upstream = RawUpstream::start(After::KeepFor(Duration::from_secs(60)), 4 << 20).await;
    let gate = gate_in_front_of(&upstream, &dir).await;

    let abandoning = reqwest::Client::new();
    let response = abandoning
        .get(format!("{gate}/r/0"))
        .send()
        .await
        .expect("the gate answers");
    assert_eq!(response.status().as_u16(), 200);
    drop(response);
    drop(abandoning);

    // Fresh clients, so fresh connections to the gate: they are spread over its serving
    // threads, so one of them is served where the abandoned answer was.
    for n in 1..=4 {
        let client = reqwest::Client::new();
        assert_eq!(get(&client, &format!("{gate}/r/{n}")).await, (200, 4 << 20));
    }

    assert_eq!(request_lines(&upstream), expected_lines(5));
    assert!(
        upstream.connections() >= 2,
        "the half-read connection was closed, not lent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_carrying_an_upload_the_upstream_answered_early_is_not_lent() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let upstream = RawUpstream::start(After::KeepFor(Duration::from_secs(60)), 5).await;
    // Long enough that a request lent the busy connection would still be waiting below.
    let gate = gate_with_limits(
        &upstream,
        &dir,
        "connect_timeout = \"30s\"\nupstream_timeout = \"30s\"",
    )
    .await;

    // An upload the client never finishes; the upstream answers as soon as it has the head.
    let mut uploader = TcpStream::connect(gate.trim_start_matches("http://"))
        .await
        .expect("connect to the gate");
    let head = "POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000000\r\n\r\n";
    uploader
        .write_all(head.as_bytes())
        .await
        .expect("send the upload's head");
    uploader
        .write_all(&[b'x'; 1000])
        .await
        .expect("send the start of the upload");
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\nxxxxx") {
        let mut buffer = [0u8; 4096];
        let read = uploader
            .read(&mut buffer)
            .await
            .expect("read the early answer");
        assert!(read > 0, "the gate closed the uploading connection");
        answer.extend_from_slice(&buffer[..read]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Fresh connections land on every serving thread in turn, the uploader's included.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in 0..threads {
        let mut client = OneConnection::open(&gate).await;
        let answered =
            tokio::time::timeout(Duration::from_secs(10), client.get(&format!("/r/{n}")))
                .await
                .expect("a request was lent the connection still carrying the upload");
        assert_eq!(answered, (200, 5));
    }

    let mut expected = vec!["POST /upload HTTP/1.1".to_string()];
    expected.extend(expected_lines(threads));
    assert_eq!(request_lines(&upstream), expected);
    drop(uploader);
}
