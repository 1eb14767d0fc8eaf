//! Shutting down with client connections open (`server::Server::run_until`): a keep-alive
//! connection waiting idle for its next request is closed at once, a request in flight is
//! answered in full, and the server returns once both are done, well inside the grace period.
//! Both lanes: the express lane (plain pass-throughs), whose idle connections are parked per
//! thread, and connections handed to hyper (here by a `Connection` header naming another
//! header), which are told through the shutdown channel.

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::gate_config;
use stepgate::clock::ManualClock;
use stepgate::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Well past anything the test waits for: if shutdown waited for it, the test would fail.
const GRACE: &str = "60s";
/// Header lines that send a request, and its connection, to hyper: a `Connection` naming
/// another header.
const HYPER_LANE: &str = "connection: keep-alive, x-hop\r\nx-hop: 1\r\n";
/// How long the test waits for something that should happen at once.
const PROMPTLY: Duration = Duration::from_secs(10);

/// An upstream that answers `/slow` only once released (and says when it has such a request),
/// anything else at once.
async fn upstream() -> (String, mpsc::Receiver<()>, Arc<Semaphore>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let url = format!(
        "http://{}",
        listener.local_addr().expect("upstream address")
    );
    let (arrived, arrivals) = mpsc::channel(4);
    let release = Arc::new(Semaphore::new(0));
    let released = release.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let arrived = arrived.clone();
            let released = released.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                loop {
                    let end = loop {
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        let mut buffer = [0u8; 4096];
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buffer[..n]),
                        }
                    };
                    let head: Vec<u8> = pending.drain(..end).collect();
                    if head.starts_with(b"GET /slow ") {
                        let _ = arrived.send(()).await;
                        if let Ok(permit) = released.acquire().await {
                            permit.forget();
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, arrivals, release)
}

async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    loop {
        let mut buffer = [0u8; 4096];
        let read = stream.read(&mut buffer).await.expect("read from the gate");
        assert!(read > 0, "the gate closed before answering: {answer:?}");
        answer.extend_from_slice(&buffer[..read]);
        if answer.ends_with(b"done") {
            return String::from_utf8_lossy(&answer).into_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once_and_finishes_the_request_in_flight() {
    let (upstream_url, mut arrivals, release) = upstream().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate");
    let address = listener.local_addr().expect("gate address");
    let limits = format!("shutdown_grace = \"{GRACE}\"\nheader_timeout = \"{GRACE}\"");
    let config = gate_config(address.port(), &upstream_url, dir.path(), &limits);
    let server = Server::bind(config, Arc::new(ManualClock::starting_now()), listener)
        .await
        .expect("the gate starts");
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(server.run_until(async move {
        let _ = stopped.await;
    }));

    // A connection that never sent anything; one answered once and now idle, in each lane; and
    // one waiting on the slow upstream, in each lane. Accepted in this order, so the first
    // three wait by the time the upstream has the slow requests.
    let mut silent = TcpStream::connect(address).await.expect("connect");
    let mut idle = TcpStream::connect(address).await.expect("connect");
    let mut idle_hyper = TcpStream::connect(address).await.expect("connect");
    for (stream, lane_header) in [(&mut idle, ""), (&mut idle_hyper, HYPER_LANE)] {
        let request = format!("GET /quick HTTP/1.1\r\nhost: a\r\n{lane_header}\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let first = read_answer(stream).await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    }
    let mut busy = TcpStream::connect(address).await.expect("connect");
    let mut busy_hyper = TcpStream::connect(address).await.expect("connect");
    for (stream, lane_header) in [(&mut busy, ""), (&mut busy_hyper, HYPER_LANE)] {
        let request = format!("GET /slow HTTP/1.1\r\nhost: a\r\n{lane_header}\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        tokio::time::timeout(PROMPTLY, arrivals.recv())
            .await
            .expect("the slow request reaches the upstream");
    }

    stop.send(()).expect("the server is running");
    for (which, stream) in [
        ("silent", &mut silent),
        ("idle", &mut idle),
        ("idle hyper", &mut idle_hyper),
    ] {
        let mut rest = [0u8; 64];
        let closed = tokio::time::timeout(PROMPTLY, stream.read(&mut rest))
            .await
            .unwrap_or_else(|_| {
                panic!("the {which} connection is closed without waiting for the grace period")
            });
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "the {which} connection got bytes instead: {closed:?}"
        );
    }
    assert!(!running.is_finished(), "a request is still in flight");

    release.add_permits(2);
    for stream in [&mut busy, &mut busy_hyper] {
        let answer = tokio::time::timeout(PROMPTLY, read_answer(stream))
            .await
            .expect("the request in flight is answered");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\ndone"), "{answer}");
    }
    let finished = tokio::time::timeout(PROMPTLY, running)
        .await
        .expect("the server returns once the last request is done");
    finished
        .expect("the server task")
        .expect("the server stopped cleanly");
    assert!(
        TcpStream::connect(address).await.is_err(),
        "a stopped gate accepts no connections"
    );
}
