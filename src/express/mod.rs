//! The express lane: a client connection served without hyper for as long as its requests are
//! plain pass-throughs, which is almost all of an exchange's traffic. Its first request that is
//! anything else (a gate page, a protected route or a release, a body larger than
//! [`SMALL_BODY`] or chunked, `Expect`, an upgrade, HTTP/1.0, a `Connection` naming anything but
//! `close` or `keep-alive`, a head hyper would refuse or longer than `max_header_bytes`) hands
//! the whole connection, with every byte read so far, to hyper and the usual pipeline
//! (`web::dispatch`), which then decides everything afresh.
//!
//! Why: with hyper on both sides, the gate spent ~6 µs of CPU in user space per small
//! pass-through request against nginx's ~2.5 (BENCHMARKS.md), spread over two HTTP state
//! machines, a task per upstream connection and the channels between them. Here one task reads
//! the head (httparse, the parser hyper uses), asks the pipeline's own [`gateway::classify`]
//! whether it is a pass-through, writes the head with the proxy's own header hygiene
//! ([`crate::proxy::Upstream::write_head`]) on a kept upstream connection and copies the answer
//! back, with its framing checked and its connection-scoped headers removed. The framing
//! headers on both sides are the lane's own, written from what it sends, never copied: a
//! client's or upstream's `Connection` naming `Content-Length` cannot unframe a message.
//!
//! What it keeps of hyper's behaviour: `header_timeout` for each head, `max_header_bytes` (a
//! longer head goes to hyper, which answers 431), keep-alive unless either side says `close`,
//! `X-Request-Id` both ways, the metrics and access line (`web::observe`), 502/504 answers
//! from the pipeline's own error type, and no request sent upstream twice once written. A
//! small body is read whole before the request goes upstream (nginx's default, too).

mod chunked;
mod head;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::GateError;
use crate::metrics::Outcome;
use crate::proxy::{ClientIp, ProxyError, RawConnection};
use crate::web::dispatch::Gate;
use crate::web::gateway::{self, Route};
use crate::web::observe::{self, ErrorMarker};
use crate::web::{request_id, ApiError, AppState};
use head::{Framing, Parsed, ParsedResponse};

/// The largest request body the express lane reads whole; larger ones go to hyper, which
/// streams them.
pub const SMALL_BODY: usize = 64 * 1024;
/// An upstream answer head longer than this is refused (502).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size when copying an answer's body.
const COPY_CHUNK: usize = 64 * 1024;
/// Buffers grown past this for one large answer are given back afterwards, so an idle
/// keep-alive connection holds little memory.
const KEEP_CAPACITY: usize = 16 * 1024;

/// How a connection left the express lane.
pub enum Ended {
    /// It is over (closed by either side, timed out, or the gate is shutting down).
    Closed,
    /// Its next request is for hyper: here is the connection with the bytes already read.
    HandOver(Prefixed),
}

/// Serves `client` for as long as its requests are plain pass-throughs. Once the gate is
/// shutting down (`AppState::draining`), an idle connection is closed, a busy one after its
/// answer.
pub async fn serve(gate: &Gate, mut client: TcpStream, peer: SocketAddr) -> Ended {
    let state = gate.state();
    let mut inbound = BytesMut::with_capacity(4096);
    let mut scratch = Scratch::default();
    let mut timer = Timer::new();
    let mut parked = parked::Parked::default();
    let client_ip = ClientIp::new(peer.ip());
    loop {
        let head = match read_head(state, &mut client, &mut inbound, &mut timer, &mut parked).await
        {
            HeadRead::Plain(head) => head,
            HeadRead::TooLong(raw) => return Ended::HandOver(Prefixed::new(client, raw, inbound)),
            HeadRead::Unusual => {
                return Ended::HandOver(Prefixed::new(client, Bytes::new(), inbound))
            }
            HeadRead::Over => return Ended::Closed,
        };
        let head::RequestHead {
            raw,
            mut parts,
            content_length,
            close,
        } = head;
        let body_len = content_length.unwrap_or(0);
        let path_and_query = match gateway::classify(state, &mut parts) {
            Ok(Route::PassThrough(path_and_query)) => path_and_query,
            // The pipeline answers refusals and protected requests, from the same bytes.
            Ok(Route::Protected(_)) | Err(_) => {
                return Ended::HandOver(Prefixed::new(client, raw, inbound))
            }
        };
        // A large body is streamed by hyper, even if it happens to have arrived already.
        if body_len > SMALL_BODY {
            return Ended::HandOver(Prefixed::new(client, raw, inbound));
        }
        if inbound.len() < body_len {
            match read_body(state, &mut client, &mut inbound, &mut timer, body_len).await {
                BodyRead::Whole => {}
                BodyRead::Unusual => return Ended::HandOver(Prefixed::new(client, raw, inbound)),
                BodyRead::Over => return Ended::Closed,
            }
        }
        let request = Request {
            method: parts.method,
            path: parts.uri,
            headers: parts.headers,
            path_and_query,
            content_length,
            close_asked: close,
        };
        let on = Connection {
            client: &mut client,
            client_ip: &client_ip,
            draining: &state.draining,
        };
        match pass_through(state, on, &mut inbound, request, &mut scratch, &mut timer).await {
            Ok(()) => scratch.shrink(),
            Err(Over) => return Ended::Closed,
        }
        if inbound.capacity() > KEEP_CAPACITY && inbound.len() < KEEP_CAPACITY {
            let mut smaller = BytesMut::with_capacity(4096);
            smaller.extend_from_slice(&inbound);
            inbound = smaller;
        }
    }
}

/// Buffers a connection reuses from one request to the next.
#[derive(Default)]
struct Scratch {
    /// What is written next: the upstream request, then the client's answer head.
    out: Vec<u8>,
    /// What the upstream sent.
    upstream: BytesMut,
}

impl Scratch {
    fn shrink(&mut self) {
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
        if self.upstream.capacity() > KEEP_CAPACITY {
            self.upstream = BytesMut::new();
        }
    }
}

/// A pass-through request, read and classified.
struct Request {
    method: Method,
    /// The target as sent, for the access line.
    path: http::Uri,
    headers: http::HeaderMap,
    path_and_query: http::uri::PathAndQuery,
    /// The client's, so also the length of the body read whole after the head.
    content_length: Option<usize>,
    /// The client said `Connection: close`.
    close_asked: bool,
}

/// The client connection a request came on.
struct Connection<'a> {
    client: &'a mut TcpStream,
    client_ip: &'a ClientIp,
    /// True once the gate shuts down: the answer then says `close`, and the connection ends.
    draining: &'a AtomicBool,
}

impl Connection<'_> {
    /// Whether the answer about to be written is the connection's last.
    fn closing(&self, close_asked: bool) -> bool {
        close_asked || self.draining.load(Ordering::Relaxed)
    }
}

/// The connection is over: it failed, ended mid-answer, or the answer said `close`.
struct Over;

#[allow(clippy::large_enum_variant)] // As `head::Parsed`: one per request, moved once.
enum HeadRead {
    Plain(head::RequestHead),
    /// A complete head longer than `max_header_bytes`, split off the buffer.
    TooLong(Bytes),
    Unusual,
    Over,
}

async fn read_head(
    state: &AppState,
    client: &mut TcpStream,
    inbound: &mut BytesMut,
    timer: &mut Timer,
    parked: &mut parked::Parked,
) -> HeadRead {
    let limits = &state.config.limits;
    let mut deadline = None;
    loop {
        if !inbound.is_empty() {
            match head::parse_request(inbound) {
                // Longer than hyper allows, though read in pieces that each fitted: hyper
                // answers it (431), from the same bytes.
                Parsed::Plain(head) if head.raw.len() > limits.max_header_bytes => {
                    return HeadRead::TooLong(head.raw)
                }
                Parsed::Plain(head) => return HeadRead::Plain(head),
                Parsed::Unusual => return HeadRead::Unusual,
                // Too long: hyper answers 431.
                Parsed::Partial if inbound.len() >= limits.max_header_bytes => {
                    return HeadRead::Unusual
                }
                Parsed::Partial => {}
            }
        } else if state.draining.load(Ordering::Relaxed) {
            return HeadRead::Over;
        }
        let deadline =
            *deadline.get_or_insert_with(|| after(Instant::now(), limits.header_timeout));
        let idle = inbound.is_empty();
        let drain = idle.then_some((&state.draining, &mut *parked));
        match read_more(client, inbound, deadline, timer, drain).await {
            Read::Data => {}
            Read::Ended | Read::TimedOut | Read::Drained => return HeadRead::Over,
        }
    }
}

enum BodyRead {
    Whole,
    Unusual,
    Over,
}

/// Reads the rest of a small body; one larger than [`SMALL_BODY`], or slower than
/// `header_timeout`, is left to hyper, which streams it.
async fn read_body(
    state: &AppState,
    client: &mut TcpStream,
    inbound: &mut BytesMut,
    timer: &mut Timer,
    body_len: usize,
) -> BodyRead {
    let deadline = after(Instant::now(), state.config.limits.header_timeout);
    inbound.reserve(body_len - inbound.len());
    while inbound.len() < body_len {
        match read_more(client, inbound, deadline, timer, None).await {
            Read::Data => {}
            Read::TimedOut => return BodyRead::Unusual,
            Read::Ended | Read::Drained => return BodyRead::Over,
        }
    }
    BodyRead::Whole
}

/// `start + wait`, or a year from `start` for a wait too long to add (a configured timeout has
/// no upper bound).
fn after(start: Instant, wait: std::time::Duration) -> Instant {
    start
        .checked_add(wait)
        .or_else(|| start.checked_add(std::time::Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(start)
}

enum Read {
    Data,
    /// EOF or an error.
    Ended,
    TimedOut,
    Drained,
}

/// Reads what `stream` has into `buffer`, waiting until `deadline` and, when `drain` is given,
/// until the gate shuts down. Nothing is armed or registered when there is data already.
async fn read_more(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    deadline: Instant,
    timer: &mut Timer,
    drain: Option<(&AtomicBool, &mut parked::Parked)>,
) -> Read {
    if buffer.capacity() - buffer.len() < 1024 {
        buffer.reserve(4096);
    }
    let mut reading = std::pin::pin!(stream.read_buf(buffer));
    let mut drain = drain;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(read) = reading.as_mut().poll(cx) {
            return Poll::Ready(match read {
                Ok(0) | Err(_) => Read::Ended,
                Ok(_) => Read::Data,
            });
        }
        if let Some((draining, parked)) = &mut drain {
            if parked.poll(cx, draining).is_ready() {
                return Poll::Ready(Read::Drained);
            }
        }
        timer.poll_until(cx, deadline).map(|()| Read::TimedOut)
    })
    .await
}

/// A connection's one timer. Every wait has a deadline (the next head, the upstream's answer),
/// but arming a timer per wait costs a timer-wheel insertion and removal per request; this one
/// stays armed and is moved only when it would fire too late, or when it fired early for a
/// deadline since moved (so about once per `header_timeout` on a busy connection).
struct Timer {
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        }
    }

    /// Ready once `deadline` has passed.
    fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            if self.sleep.deadline() > deadline {
                self.sleep.as_mut().reset(deadline);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

/// Connections waiting idle for their next request, per serving thread, so a shutdown can wake
/// them to close (a `watch` wait would lock and unlock a mutex twice per request instead).
mod parked {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll, Waker};

    thread_local! {
        static WAITING: RefCell<Slots> = const { RefCell::new(Slots { wakers: Vec::new(), free: Vec::new() }) };
    }

    struct Slots {
        wakers: Vec<Option<Waker>>,
        free: Vec<usize>,
    }

    /// A connection's place among this thread's parked ones, taken at its first wait (its
    /// task's waker does not change) and left when the connection ends.
    #[derive(Default)]
    pub struct Parked {
        slot: Option<usize>,
    }

    impl Parked {
        /// Ready when `draining` is set; otherwise parks this task to be woken by [`wake_all`].
        pub fn poll(&mut self, cx: &mut Context<'_>, draining: &AtomicBool) -> Poll<()> {
            if draining.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            if self.slot.is_none() {
                let waker = cx.waker().clone();
                self.slot = Some(WAITING.with(|waiting| {
                    let mut waiting = waiting.borrow_mut();
                    match waiting.free.pop() {
                        Some(slot) => {
                            waiting.wakers[slot] = Some(waker);
                            slot
                        }
                        None => {
                            waiting.wakers.push(Some(waker));
                            waiting.wakers.len() - 1
                        }
                    }
                }));
            }
            Poll::Pending
        }
    }

    impl Drop for Parked {
        fn drop(&mut self) {
            if let Some(slot) = self.slot {
                WAITING.with(|waiting| {
                    let mut waiting = waiting.borrow_mut();
                    waiting.wakers[slot] = None;
                    waiting.free.push(slot);
                });
            }
        }
    }

    /// Wakes every connection parked on this thread: each looks at its own gate's drain flag.
    pub fn wake_all() {
        let wakers: Vec<Waker> =
            WAITING.with(|waiting| waiting.borrow().wakers.iter().flatten().cloned().collect());
        for waker in wakers {
            waker.wake();
        }
    }
}

/// Wakes this thread's idle express-lane connections so they see a shutdown (run on every
/// serving thread once the drain flag is set).
pub fn wake_parked() {
    parked::wake_all();
}

/// Forwards one request and copies the answer back. An upstream failure before its answer
/// began is answered (502/504) and the connection lives on; one after it ends the connection,
/// as the client cannot be told otherwise.
async fn pass_through(
    state: &AppState,
    on: Connection<'_>,
    inbound: &mut BytesMut,
    mut request: Request,
    scratch: &mut Scratch,
    timer: &mut Timer,
) -> Result<(), Over> {
    let started = Instant::now();
    let (id, id_value) = observe::tag_request(&mut request.headers);
    let out = &mut scratch.out;
    out.clear();
    state.upstream.write_head(
        out,
        &request.method,
        &request.path_and_query,
        &mut request.headers,
        on.client_ip,
        request.content_length,
    );
    let body_len = request.content_length.unwrap_or(0);
    out.extend_from_slice(&inbound[..body_len]);
    inbound.advance(body_len);
    let deadline = after(started, state.config.limits.upstream_timeout);
    let asked = Asked {
        head_request: request.method == Method::HEAD,
        closing: &|| on.closing(request.close_asked),
        id: id_value.as_ref().map(HeaderValue::as_bytes),
    };
    let answered = exchange(state, scratch, &asked, (started, deadline), timer).await;
    let (mut connection, answer) = match answered {
        Ok(answered) => answered,
        Err(error) => {
            let response = error_answer(state, &id, error);
            let took = started.elapsed();
            let status = response.status().as_u16();
            let marker = response.extensions().get::<ErrorMarker>().copied();
            observe::finish_pipeline(
                state,
                || observe::request_span(&id),
                &request.method,
                request.path.path(),
                status,
                observe::pipeline_outcome(&response, marker),
                marker,
                took,
            );
            let closing = on.closing(request.close_asked);
            let head_request = request.method == Method::HEAD;
            return write_gate_answer(on.client, response, id_value, closing, head_request).await;
        }
    };
    observe::finish_pipeline(
        state,
        || observe::request_span(&id),
        &request.method,
        request.path.path(),
        answer.status,
        Outcome::Passed,
        None,
        started.elapsed(),
    );
    let upstream = &mut scratch.upstream;
    upstream.advance(answer.len);
    let out = &mut scratch.out;
    let copied = copy_body(
        answer.framing,
        &mut connection.stream,
        on.client,
        upstream,
        out,
    )
    .await;
    match copied {
        Ok(Copied { reusable }) => {
            if reusable && answer.reusable {
                // The request's start stands in for now: the connection only looks older.
                state.upstream.keep_raw(connection.stream, started);
            }
        }
        Err(_) => return Err(Over),
    }
    if answer.closing {
        let _ = on.client.shutdown().await;
        return Err(Over);
    }
    Ok(())
}

/// What the client asked that shapes the answer.
struct Asked<'a> {
    head_request: bool,
    /// Whether the answer is the connection's last, asked when its head is written.
    closing: &'a (dyn Fn() -> bool + Sync),
    /// The `X-Request-Id` for the answer.
    id: Option<&'a [u8]>,
}

/// Sends `scratch.out` upstream and reads the answer head into `scratch.upstream`, writing the
/// client's head into `scratch.out`.
async fn exchange(
    state: &AppState,
    scratch: &mut Scratch,
    asked: &Asked<'_>,
    (started, deadline): (Instant, Instant),
    timer: &mut Timer,
) -> Result<(RawConnection, head::ResponseHead), ProxyError> {
    let upstream = &state.upstream;
    let mut connection = match upstream.kept_raw_connection(started) {
        Some(kept) => kept,
        None => by(deadline, upstream.new_raw_connection()).await?,
    };
    match write_until(&mut connection.stream, &scratch.out, deadline, timer).await {
        Written::All => {}
        Written::TimedOut => return Err(ProxyError::Timeout),
        // A kept connection the upstream had closed before any of the request went out: it
        // goes once more, on a new connection. Once a byte is out it never goes twice.
        Written::Failed { sent: 0, .. } if connection.reused => {
            connection = by(deadline, upstream.new_raw_connection()).await?;
            match write_until(&mut connection.stream, &scratch.out, deadline, timer).await {
                Written::All => {}
                Written::TimedOut => return Err(ProxyError::Timeout),
                Written::Failed { error, .. } => return Err(ProxyError::Failed(error.to_string())),
            }
        }
        Written::Failed { error, .. } => return Err(ProxyError::Failed(error.to_string())),
    }
    let buffer = &mut scratch.upstream;
    buffer.clear();
    loop {
        if !buffer.is_empty() {
            scratch.out.clear();
            match head::parse_response(
                buffer,
                asked.head_request,
                &mut scratch.out,
                &match asked.id {
                    Some(id) => [request_id::HEADER.as_bytes(), b": ", id, b"\r\n"],
                    None => [&b""[..]; 4],
                },
                (asked.closing)(),
            ) {
                Ok(ParsedResponse::Complete(answer)) => return Ok((connection, answer)),
                Ok(ParsedResponse::Interim(len)) => {
                    buffer.advance(len);
                    continue;
                }
                Ok(ParsedResponse::Partial) if buffer.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ProxyError::Failed("the answer's head is too long".into()))
                }
                Ok(ParsedResponse::Partial) => {}
                Err(bad) => return Err(ProxyError::Failed(bad.to_string())),
            }
        }
        match read_more(&mut connection.stream, buffer, deadline, timer, None).await {
            Read::Data => {}
            Read::TimedOut => return Err(ProxyError::Timeout),
            Read::Ended | Read::Drained => {
                return Err(ProxyError::Failed(
                    "the connection closed before a complete answer".into(),
                ))
            }
        }
    }
}

/// Connecting counts against the upstream timeout too, as on the hyper lane.
async fn by(
    deadline: Instant,
    connecting: impl Future<Output = Result<RawConnection, ProxyError>>,
) -> Result<RawConnection, ProxyError> {
    match tokio::time::timeout_at(deadline.into(), connecting).await {
        Ok(connected) => connected,
        Err(_) => Err(ProxyError::Timeout),
    }
}

enum Written {
    All,
    TimedOut,
    /// The write failed after `sent` bytes had gone out.
    Failed {
        error: std::io::Error,
        sent: usize,
    },
}

/// Writes all of `data` by `deadline`: an upstream that stops reading a request must not hold
/// the connection past the upstream timeout.
async fn write_until(
    stream: &mut TcpStream,
    data: &[u8],
    deadline: Instant,
    timer: &mut Timer,
) -> Written {
    let mut sent = 0;
    std::future::poll_fn(|cx| {
        while sent < data.len() {
            match Pin::new(&mut *stream).poll_write(cx, &data[sent..]) {
                Poll::Ready(Ok(0)) => {
                    let error = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Poll::Ready(Written::Failed { error, sent });
                }
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Written::Failed { error, sent }),
                Poll::Pending => {
                    return timer.poll_until(cx, deadline).map(|()| Written::TimedOut);
                }
            }
        }
        Poll::Ready(Written::All)
    })
    .await
}

struct Copied {
    /// The upstream connection ended the answer cleanly and sent nothing after it.
    reusable: bool,
}

/// Writes the answer head in `out` and the body after it in `upstream` (plus what follows on
/// the connection) to the client.
async fn copy_body(
    framing: Framing,
    from: &mut TcpStream,
    client: &mut TcpStream,
    upstream: &mut BytesMut,
    out: &mut Vec<u8>,
) -> std::io::Result<Copied> {
    let ended_early = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    match framing {
        Framing::Empty => {
            client.write_all(out).await?;
            Ok(Copied {
                reusable: upstream.is_empty(),
            })
        }
        Framing::Length(length) => {
            let take = (upstream.len() as u64).min(length) as usize;
            out.extend_from_slice(&upstream[..take]);
            upstream.advance(take);
            let mut left = length - take as u64;
            let mut reusable = upstream.is_empty();
            client.write_all(out).await?;
            while left > 0 {
                upstream.clear();
                upstream.reserve(COPY_CHUNK);
                if from.read_buf(upstream).await? == 0 {
                    return Err(ended_early());
                }
                let take = (upstream.len() as u64).min(left) as usize;
                reusable = take == upstream.len();
                client.write_all(&upstream[..take]).await?;
                left -= take as u64;
            }
            Ok(Copied { reusable })
        }
        Framing::Chunked => {
            let mut decoder = chunked::Decoder::default();
            let malformed = |error: chunked::Malformed| std::io::Error::other(error);
            let used = decoder.feed(upstream, out).map_err(malformed)?;
            upstream.advance(used);
            client.write_all(out).await?;
            while !decoder.is_done() {
                upstream.clear();
                upstream.reserve(COPY_CHUNK);
                if from.read_buf(upstream).await? == 0 {
                    return Err(ended_early());
                }
                out.clear();
                let used = decoder.feed(upstream, out).map_err(malformed)?;
                upstream.advance(used);
                client.write_all(out).await?;
            }
            Ok(Copied {
                reusable: upstream.is_empty(),
            })
        }
        Framing::UntilClose => {
            chunked::encode(upstream, out);
            client.write_all(out).await?;
            loop {
                upstream.clear();
                upstream.reserve(COPY_CHUNK);
                if from.read_buf(upstream).await? == 0 {
                    client.write_all(chunked::LAST).await?;
                    return Ok(Copied { reusable: false });
                }
                out.clear();
                chunked::encode(upstream, out);
                client.write_all(out).await?;
            }
        }
    }
}

/// The pipeline's own answer to an upstream failure, made in the request's span and id.
fn error_answer(state: &AppState, id: &request_id::RequestId, error: ProxyError) -> Response {
    let span = observe::request_span(id);
    let _entered = span.enter();
    request_id::scope_sync(id.clone(), || {
        ApiError(GateError::Upstream(error)).into_response_at(state.clock.now())
    })
}

/// Writes an answer the gate made itself (a small, complete body) to the client; without the
/// body when the request was `HEAD`.
async fn write_gate_answer(
    client: &mut TcpStream,
    response: Response,
    id_value: Option<http::HeaderValue>,
    closing: bool,
    head_request: bool,
) -> Result<(), Over> {
    let (mut parts, body) = response.into_parts();
    if let Some(value) = id_value {
        parts.headers.insert(request_id::HEADER_NAME, value);
    }
    let body = axum::body::to_bytes(body, MAX_RESPONSE_HEAD)
        .await
        .unwrap_or_default();
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    parts.headers.remove(http::header::CONTENT_LENGTH);
    for (name, value) in parts.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&head::content_length_line(body.len()));
    date::write_line(&mut out);
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // An answer to HEAD says how long its body would be, and has none.
    if !head_request {
        out.extend_from_slice(&body);
    }
    if client.write_all(&out).await.is_err() || closing {
        let _ = client.shutdown().await;
        return Err(Over);
    }
    Ok(())
}

/// A client connection handed to hyper: reads give the bytes the express lane had already
/// read (the head, then the rest) before any from the socket.
pub struct Prefixed {
    stream: TcpStream,
    head: Bytes,
    rest: BytesMut,
}

impl Prefixed {
    fn new(stream: TcpStream, head: Bytes, rest: BytesMut) -> Prefixed {
        Prefixed { stream, head, rest }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.head.is_empty() {
            let take = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head.split_to(take));
            return Poll::Ready(Ok(()));
        }
        if !this.rest.is_empty() {
            let take = this.rest.len().min(buf.remaining());
            buf.put_slice(&this.rest.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The `Date` header's value, made once a second per thread (hyper does the same).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    /// Appends the whole `date: …` line to `out`.
    pub fn write_line(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second || cached.1.is_empty() {
                *cached = (second, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(cached.1.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
    }
}
