//! The express lane's upstream side (`crate::express`): plain TCP connections to the upstream,
//! kept per thread like hyper's in `pool`, and the request head written with the same header
//! hygiene as [`Upstream::forward`]. Reading the answer is the express lane's own job.

use std::cell::RefCell;
use std::task::{Context, Poll};
use std::time::Instant;

use http::uri::PathAndQuery;
use http::{HeaderMap, Method};
use tokio::net::TcpStream;

use super::pool::{self, IdleLists};
use super::{ClientIp, ProxyError, Upstream};

thread_local! {
    static KEPT: RefCell<IdleLists<TcpStream>> = const { RefCell::new(IdleLists::new()) };
}

/// A connection lent to one exchange; `reused` when it had carried an earlier one.
pub struct RawConnection {
    pub stream: TcpStream,
    pub reused: bool,
}

impl Upstream {
    /// The most recently used kept connection that still looks open, if any. `now` is the
    /// caller's (the request's start): one clock read fewer per request.
    pub fn kept_raw_connection(&self, now: Instant) -> Option<RawConnection> {
        while let Some(stream) = KEPT.with(|kept| kept.borrow_mut().take(&self.destination, now)) {
            if looks_open(&stream) {
                return Some(RawConnection {
                    stream,
                    reused: true,
                });
            }
        }
        None
    }

    /// A new connection, never a kept one.
    pub async fn new_raw_connection(&self) -> Result<RawConnection, ProxyError> {
        // Boxed: connecting (name resolution included) is rare and its future is large.
        let stream = Box::pin(pool::connect_tcp(&self.destination)).await?;
        Ok(RawConnection {
            stream,
            reused: false,
        })
    }

    /// Keeps a connection whose exchange is complete (answer read to its end, nothing more
    /// arrived) for the next request on this thread, idle since about `now`.
    pub fn keep_raw(&self, stream: TcpStream, now: Instant) {
        KEPT.with(|kept| kept.borrow_mut().put(&self.destination, stream, now));
    }

    /// Appends the HTTP/1.1 head of `method path_and_query` to `out`, with `headers` made
    /// ready exactly as [`Upstream::forward`] makes them (removals first, then `Host` and
    /// `X-Forwarded-*`). The framing is the caller's, never the client's: `content_length`
    /// is the length of the body the caller sends after the head (`None`: no body, and no
    /// `Content-Length`). Other framing (`Transfer-Encoding`) is hop-by-hop and removed.
    pub fn write_head(
        &self,
        out: &mut Vec<u8>,
        method: &Method,
        path_and_query: &PathAndQuery,
        headers: &mut HeaderMap,
        client_ip: &ClientIp,
        content_length: Option<usize>,
    ) {
        self.prepare_request_headers(headers, Some(client_ip), None);
        headers.remove(http::header::CONTENT_LENGTH);
        if let Some(length) = content_length {
            headers.insert(http::header::CONTENT_LENGTH, length.into());
        }
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.base_path.as_bytes());
        out.extend_from_slice(path_and_query.as_str().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers.iter() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether a kept connection can still take a request: nothing has arrived on it since its
/// last answer ended (an upstream that closed it sent EOF, which makes it readable). Costs a
/// system call only when the runtime has seen it turn readable.
fn looks_open(stream: &TcpStream) -> bool {
    let mut context = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut context) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}
