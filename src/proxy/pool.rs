//! Upstream connections: HTTP/1.1 connections kept per thread, lent to one request at a time
//! and taken back once that request's response body has been read to its end.
//!
//! Not hyper-util's pooled client: for every request it hashes a pool key, locks a pool shared
//! by all threads and spawns a task that waits for the connection to turn idle again. With
//! thread-per-core serving (see `server`) a thread's connections are only ever used by that
//! thread, so none of it is needed, and it was a visible share of the gate's CPU per
//! pass-through request (BENCHMARKS.md).
//!
//! What it keeps of that client's behaviour: at most [`MAX_IDLE`] idle connections per thread
//! and upstream, none older than [`IDLE_FOR`]; TCP_NODELAY; and a request that could not be
//! sent because a kept connection had closed meanwhile (the upstream's keep-alive ran out) is
//! sent again on another connection. A request that was written is never sent twice. A
//! connection is lent again only once both the answer and the request's own body have gone
//! through it: an upstream that answers before reading an upload leaves its connection busy
//! with that upload, and a request lent it would wait behind a client's trickle.
//! Idle connections are looked at when a request needs one, so after traffic stops they stay
//! open until the upstream closes them or the next request finds them too old.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::ProxyError;

/// Idle connections kept per thread and upstream (nginx's `keepalive` in the bench).
pub const MAX_IDLE: usize = 256;
/// How long an idle connection is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(90);

/// Where connections go: one per [`super::Upstream`], shared by its clones.
#[derive(Clone)]
pub struct Destination {
    /// Tells one upstream's connections from another's (tests run several gates per process).
    pub key: u64,
    /// Dead once every clone of the upstream is gone: its idle connections are then dropped.
    pub alive: Weak<()>,
    /// `host:port`, resolved on each connect.
    pub address: String,
    pub connect_timeout: Duration,
}

/// Idle connections of one kind (hyper's senders here, raw streams for the express lane in
/// `proxy::raw`), per upstream, on one thread: the most recently used is lent first, and none
/// is kept past [`IDLE_FOR`] or beyond [`MAX_IDLE`].
pub(super) struct IdleLists<C> {
    lists: Vec<Kept<C>>,
}

/// One upstream's idle connections, oldest first.
struct Kept<C> {
    key: u64,
    alive: Weak<()>,
    idle: VecDeque<(C, Instant)>,
}

impl<C> IdleLists<C> {
    pub(super) const fn new() -> Self {
        IdleLists { lists: Vec::new() }
    }

    /// The most recently used idle connection to `destination` still young enough at `now`.
    pub(super) fn take(&mut self, destination: &Destination, now: Instant) -> Option<C> {
        let entry = self
            .lists
            .iter_mut()
            .find(|entry| entry.key == destination.key)?;
        loop {
            let (connection, since) = entry.idle.pop_back()?;
            if now.saturating_duration_since(since) < IDLE_FOR {
                return Some(connection);
            }
        }
    }

    /// Keeps `connection` (whose exchange is complete) for the next request to `destination`,
    /// idle since `now` (a caller may pass an instant it already has: a little early only
    /// makes the connection look older).
    pub(super) fn put(&mut self, destination: &Destination, connection: C, now: Instant) {
        if destination.alive.strong_count() == 0 {
            return;
        }
        let position = match self
            .lists
            .iter()
            .position(|entry| entry.key == destination.key)
        {
            Some(position) => position,
            None => {
                // A new upstream on this thread: forget the ones whose gates have stopped.
                self.lists.retain(|entry| entry.alive.strong_count() > 0);
                self.lists.push(Kept {
                    key: destination.key,
                    alive: destination.alive.clone(),
                    idle: VecDeque::new(),
                });
                self.lists.len() - 1
            }
        };
        let idle = &mut self.lists[position].idle;
        while idle
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_FOR)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back((connection, now));
    }
}

thread_local! {
    static KEPT: RefCell<IdleLists<SendRequest<Body>>> = const { RefCell::new(IdleLists::new()) };
}

/// Sends `request` (origin-form URI, `Host` set) and returns the answer with its body still
/// streaming; the connection goes back to this thread's pool when that body ends.
pub async fn send(
    destination: &Destination,
    request: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    // An upstream may answer before it has read the whole request body (a 401, a 413): then
    // the connection is still busy sending it when the answer ends, and must not be lent.
    let (mut request, request_sent) = if request.body().is_end_stream() {
        (request, None)
    } else {
        let sent = Arc::new(AtomicBool::new(false));
        let flag = sent.clone();
        (
            request.map(|body| Body::new(SentBody { body, sent: flag })),
            Some(sent),
        )
    };
    loop {
        let (mut sender, reused) = match take_idle(destination).await {
            Some(sender) => (sender, true),
            // Boxed: connecting (name resolution included) is rare and its future is large.
            None => (Box::pin(connect(destination)).await?, false),
        };
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(lend(response, sender, destination, request_sent)),
            Err(mut error) => match error.take_message() {
                // Never written: the kept connection closed before it could be used. The idle
                // list is finite, so this ends (on a fresh connection at the latest).
                Some(unsent) if reused => request = unsent,
                _ => return Err(ProxyError::Failed(error.error().to_string())),
            },
        }
    }
}

/// The most recently used idle connection that can take a request, if any.
async fn take_idle(destination: &Destination) -> Option<SendRequest<Body>> {
    loop {
        let now = Instant::now();
        let mut sender = KEPT.with(|kept| kept.borrow_mut().take(destination, now))?;
        if sender.is_closed() {
            continue;
        }
        if sender.is_ready() {
            return Some(sender);
        }
        // Its connection task has not yet noticed the previous exchange is over: a moment.
        // Bounded, so a connection stuck for any other reason is dropped, not waited on.
        if let Ok(Ok(())) = tokio::time::timeout(destination.connect_timeout, sender.ready()).await
        {
            return Some(sender);
        }
    }
}

async fn connect(destination: &Destination) -> Result<SendRequest<Body>, ProxyError> {
    let stream = connect_tcp(destination).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| ProxyError::Unreachable(error.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A new TCP connection to the upstream, within the connect timeout.
pub(super) async fn connect_tcp(
    destination: &Destination,
) -> Result<tokio::net::TcpStream, ProxyError> {
    let stream = match tokio::time::timeout(
        destination.connect_timeout,
        tokio::net::TcpStream::connect(&destination.address),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(ProxyError::Unreachable(error.to_string())),
        Err(_) => {
            return Err(ProxyError::Unreachable(format!(
                "no connection within {} ms",
                destination.connect_timeout.as_millis()
            )))
        }
    };
    // Small requests and answers go out at once instead of waiting for an ACK (Nagle).
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Puts a connection whose exchange is complete back on this thread's idle list.
fn give_back(sender: SendRequest<Body>, destination: &Destination) {
    if sender.is_closed() {
        return;
    }
    KEPT.with(|kept| kept.borrow_mut().put(destination, sender, Instant::now()));
}

/// The upstream's answer, whose body hands the connection back when it ends (and the request's
/// body, if it had one, was sent to its end).
fn lend(
    response: Response<Incoming>,
    sender: SendRequest<Body>,
    destination: &Destination,
    request_sent: Option<Arc<AtomicBool>>,
) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let lent = Lent {
        sender,
        destination: destination.clone(),
        request_sent,
    };
    if body.is_end_stream() {
        // No body to wait for (HEAD, 204, 304, `Content-Length: 0`).
        lent.give_back();
        return Response::from_parts(parts, Body::new(body));
    }
    let body = LentBody {
        body,
        lent: Some(lent),
    };
    Response::from_parts(parts, Body::new(body))
}

/// A connection lent to one exchange.
struct Lent {
    sender: SendRequest<Body>,
    destination: Destination,
    /// Set once the request's body has been sent to its end; `None` when it had none.
    request_sent: Option<Arc<AtomicBool>>,
}

impl Lent {
    /// Called when the answer's body has ended: the connection is free unless the request's
    /// body is still going out (dropped then: hyper closes it once that body is done).
    fn give_back(self) {
        let request_done = self
            .request_sent
            .is_none_or(|sent| sent.load(Ordering::Acquire));
        if request_done {
            give_back(self.sender, &self.destination);
        }
    }
}

/// A response body streaming from a lent connection. At its end the connection is given back;
/// if it fails or is dropped before its end, the connection is not (hyper closes it).
struct LentBody {
    body: Incoming,
    lent: Option<Lent>,
}

impl HttpBody for LentBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lent) = self.lent.take() {
                    lent.give_back();
                }
            }
            Poll::Ready(Some(Err(_))) => self.lent = None,
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => {
                // The last frame: the connection is free before the caller polls again.
                if let Some(lent) = self.lent.take() {
                    lent.give_back();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that says when it has been read to its end (by hyper, sending it upstream).
struct SentBody {
    body: Body,
    sent: Arc<AtomicBool>,
}

impl HttpBody for SentBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            self.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
