//! The upstream side: one pooled HTTP/1.1 client built at start-up, header hygiene in both
//! directions, and upstream failures turned into errors that blame the upstream (502/504),
//! never the gate. Bodies are streamed; nothing here buffers.
//!
//! The pool is per thread: the server serves each connection on one thread (thread-per-core),
//! and an upstream connection reused from another thread would wake that thread twice per
//! request. Each thread keeps its own pooled client for each [`Upstream`].

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use url::Url;

use crate::config::Config;

/// Why forwarding failed. Always the upstream's side.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the exchange API cannot be reached")]
    Unreachable(String),
    #[error("the exchange API did not answer in time")]
    Timeout,
    #[error("the exchange API's answer could not be read")]
    Failed(String),
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies commonly honour.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The gate's own header namespace: clients may send only `Stepgate-Change`, and even that
/// is consumed by the gate and never forwarded.
pub const STEPGATE_CHANGE: &str = "stepgate-change";

/// Headers that make some frameworks act on another URL than the request line's.
pub const URL_OVERRIDE_HEADERS: [&str; 4] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
];

/// Removes headers whose names equal one of `protected` once `_` is read as `-` (CGI, WSGI
/// and nginx with `underscores_in_headers` fold them together), so `x_verified_user` cannot
/// stand in for `x-verified-user`. Only names containing `_` are looked at.
pub fn strip_underscore_twins(headers: &mut HeaderMap, protected: &[&HeaderName]) {
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .filter(|name| {
            let folded = name.as_str().replace('_', "-");
            protected.iter().any(|p| p.as_str() == folded)
        })
        .cloned()
        .collect();
    for name in twins {
        headers.remove(name);
    }
}

/// One request to send upstream.
pub struct Outgoing {
    pub method: Method,
    /// Canonical path plus the raw query, exactly as matched.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Body,
    /// The client's address, appended to `X-Forwarded-For`; `None` for a request the gate
    /// sends on its own (an auto-release), which has no client.
    pub client_ip: Option<IpAddr>,
    /// Set on a release: replaces anything the client sent.
    pub idempotency_key: Option<String>,
    /// Set on a release: the signed `Stepgate-Approval`. Client copies of every `Stepgate-*`
    /// header are removed first, so only the gate's own can reach the upstream.
    pub approval: Option<String>,
}

type UpstreamClient = Client<HttpConnector, Body>;

/// This thread's client for one [`Upstream`], with a weak handle on that upstream's liveness
/// so a stopped gate's entry can be dropped.
type ThreadClient = (u64, std::sync::Weak<()>, UpstreamClient);

thread_local! {
    /// This thread's client per live upstream, by [`Upstream::id`]: one per gate running in
    /// the process (the serving threads outlive any one gate).
    static CLIENTS: std::cell::RefCell<Vec<ThreadClient>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Tells one [`Upstream`]'s per-thread clients from another's (tests run several gates).
static NEXT_UPSTREAM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Clone)]
pub struct Upstream {
    id: u64,
    /// Alive while any clone of this upstream is: per-thread clients of dead ones are dropped.
    alive: std::sync::Arc<()>,
    connect_timeout: Duration,
    scheme_authority: String,
    base_path: String,
    host: HeaderValue,
    forwarded_proto: HeaderValue,
    forwarded_host: HeaderValue,
    timeout: Duration,
    /// `host:port` of the upstream (default port filled in), for readiness probes.
    probe_address: String,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Self, String> {
        let upstream: &Url = &config.upstream;
        let authority = authority_of(upstream)?;
        let public_authority = authority_of(&config.public_url)?;
        Ok(Self {
            id: NEXT_UPSTREAM_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            alive: std::sync::Arc::new(()),
            connect_timeout: config.limits.connect_timeout,
            scheme_authority: format!("{}://{}", upstream.scheme(), authority),
            base_path: upstream.path().trim_end_matches('/').to_string(),
            host: HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
            forwarded_proto: HeaderValue::from_str(config.public_url.scheme())
                .map_err(|e| e.to_string())?,
            forwarded_host: HeaderValue::from_str(&public_authority).map_err(|e| e.to_string())?,
            timeout: config.limits.upstream_timeout,
            probe_address: format!(
                "{}:{}",
                upstream.host_str().ok_or("URL has no host")?,
                upstream.port_or_known_default().unwrap_or(80)
            ),
        })
    }

    /// Whether a TCP connection to the upstream can be opened within the connect timeout.
    /// Readiness asks this; it sends no request, so the upstream sees nothing.
    pub async fn probe(&self) -> Result<(), ProxyError> {
        match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.probe_address),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(ProxyError::Unreachable(error.to_string())),
            Err(_) => Err(ProxyError::Timeout),
        }
    }

    /// This thread's pooled client (HTTP/1.1, TCP_NODELAY, up to 256 idle connections kept
    /// 90 s), made on the thread's first forward.
    fn client(&self) -> UpstreamClient {
        CLIENTS.with(|clients| {
            let mut clients = clients.borrow_mut();
            if let Some((_, _, client)) = clients.iter().find(|(id, _, _)| *id == self.id) {
                return client.clone();
            }
            clients.retain(|(_, alive, _)| alive.strong_count() > 0);
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(self.connect_timeout));
            connector.set_nodelay(true);
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256)
                .build(connector);
            clients.push((
                self.id,
                std::sync::Arc::downgrade(&self.alive),
                client.clone(),
            ));
            client
        })
    }

    /// Sends one request and returns the upstream's answer with its body still streaming.
    pub async fn forward(&self, outgoing: Outgoing) -> Result<Response<Body>, ProxyError> {
        let uri: Uri = format!(
            "{}{}{}",
            self.scheme_authority, self.base_path, outgoing.path_and_query
        )
        .parse()
        .map_err(|e: http::uri::InvalidUri| ProxyError::Failed(e.to_string()))?;
        let mut headers = outgoing.headers;
        self.prepare_request_headers(&mut headers, outgoing.client_ip, outgoing.idempotency_key);
        if let Some(approval) = outgoing.approval {
            // After `strip_gate_namespace`, which ran inside `prepare_request_headers`.
            match HeaderValue::from_str(&approval) {
                Ok(value) => {
                    headers.insert(crate::approval::APPROVAL_HEADER, value);
                }
                // A compact JWS is base64url and dots; anything else is our bug, and a release
                // without its approval must not go out.
                Err(_) => {
                    return Err(ProxyError::Failed(
                        "the gate's approval is not a valid header value".into(),
                    ))
                }
            }
        }

        let mut request = Request::new(outgoing.body);
        *request.method_mut() = outgoing.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let response =
            match tokio::time::timeout(self.timeout, self.client().request(request)).await {
                Err(_) => return Err(ProxyError::Timeout),
                Ok(Err(e)) if e.is_connect() => return Err(ProxyError::Unreachable(e.to_string())),
                Ok(Err(e)) => return Err(ProxyError::Failed(e.to_string())),
                Ok(Ok(response)) => response,
            };
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    fn prepare_request_headers(
        &self,
        headers: &mut HeaderMap,
        client_ip: Option<IpAddr>,
        idempotency_key: Option<String>,
    ) {
        // Hop-by-hop first, so a client cannot use `Connection: X-Forwarded-For` to remove a
        // header the gate adds below: the gate's headers are set after the removal.
        remove_hop_by_hop(headers);
        strip_gate_namespace(headers);
        // RFC 7239 `Forwarded` from a client could contradict the X-Forwarded-Host/Proto the
        // gate sets below; only the gate describes how the request arrived.
        headers.remove(header::FORWARDED);
        // Frameworks (IIS, Symfony, Laravel, some Spring setups) route by these instead of
        // the request line, which would make the exchange act on a path the gate never judged.
        for name in URL_OVERRIDE_HEADERS {
            headers.remove(name);
        }
        headers.insert(header::HOST, self.host.clone());

        if let Some(client_ip) = client_ip {
            let client_ip = client_ip.to_string();
            let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(existing) if !existing.trim().is_empty() => {
                    format!("{existing}, {client_ip}")
                }
                _ => client_ip,
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
                headers.insert("x-forwarded-for", value);
            }
        }
        headers.insert("x-forwarded-proto", self.forwarded_proto.clone());
        headers.insert("x-forwarded-host", self.forwarded_host.clone());
        if let Some(key) = idempotency_key {
            if let Ok(value) = HeaderValue::from_str(&key) {
                headers.insert("idempotency-key", value);
            }
        }
    }
}

fn authority_of(url: &Url) -> Result<String, String> {
    let host = url.host_str().ok_or("URL has no host")?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes every `Stepgate-*` header: the gate's namespace is never forwarded.
pub fn strip_gate_namespace(headers: &mut HeaderMap) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("stepgate-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_and_gate_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("stepgate-change", HeaderValue::from_static("abc"));
        headers.insert("stepgate-internal", HeaderValue::from_static("x"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        remove_hop_by_hop(&mut headers);
        strip_gate_namespace(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("content-type"));
    }
}
