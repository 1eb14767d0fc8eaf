//! The upstream side: forwarding over this thread's kept connections (`pool`), header
//! hygiene in both directions, and upstream failures turned into errors that blame the
//! upstream (502/504), never the gate. Bodies are streamed; nothing here buffers.

mod pool;
mod raw;

pub use raw::RawConnection;

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
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
/// non-standard ones proxies commonly honour. Lower case.
pub const HOP_BY_HOP: [&str; 9] = [
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

/// Whether a (lower-case) header name is one of [`HOP_BY_HOP`].
fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// The gate's own header namespace: clients may send only `Stepgate-Change`, and even that
/// is consumed by the gate and never forwarded.
pub const STEPGATE_CHANGE: HeaderName = HeaderName::from_static("stepgate-change");

/// Headers that make some frameworks act on another URL than the request line's.
pub const URL_OVERRIDE_HEADERS: [&str; 4] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Whether a client's request header is removed before forwarding: hop-by-hop headers, the
/// gate's namespace (`Stepgate-*`), RFC 7239 `Forwarded` (it could contradict the
/// X-Forwarded-Host/Proto the gate sets: only the gate describes how the request arrived) and
/// the URL-override headers (IIS, Symfony, Laravel and some Spring setups route by these
/// instead of the request line, which would make the exchange act on a path the gate never
/// judged). Underscore spellings count as the names they fold to (CGI, WSGI and nginx with
/// `underscores_in_headers` read `x_original_url` as `x-original-url`).
fn is_withheld_from_upstream(name: &str) -> bool {
    let withheld = |name: &str| {
        is_hop_by_hop(name)
            || name.starts_with("stepgate-")
            || name == "forwarded"
            || URL_OVERRIDE_HEADERS.contains(&name)
    };
    withheld(name)
        || (name.contains('_') && {
            let folded = name.replace('_', "-");
            withheld(&folded) || JUDGED_OR_SET.contains(&folded.as_str())
        })
}

/// Headers the gate judges a request by or sets itself. Their underscore spellings are
/// withheld: an upstream that folds `_` into `-` would otherwise read `X_HTTP_Method_Override`
/// as an override the gate never matched on, `Content_Type` beside the `Content-Type` the rule
/// judged, `Content_Length` as framing, or `X_Forwarded_For` as a client address the gate
/// never wrote. (The identity header's twins are removed in `web::gateway::classify`.)
const JUDGED_OR_SET: [&str; 12] = [
    "content-type",
    "content-length",
    "content-encoding",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "idempotency-key",
    crate::policy::METHOD_OVERRIDE_HEADERS[0],
    crate::policy::METHOD_OVERRIDE_HEADERS[1],
    crate::policy::METHOD_OVERRIDE_HEADERS[2],
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
    pub path_and_query: PathAndQuery,
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

/// A client's address as `X-Forwarded-For` names it, made once per client connection by the
/// express lane rather than formatted per request.
pub struct ClientIp {
    ip: IpAddr,
    text: HeaderValue,
}

impl ClientIp {
    pub fn new(ip: IpAddr) -> ClientIp {
        // An address's text is always a valid header value.
        let text = HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientIp { ip, text }
    }
}

/// Tells one [`Upstream`]'s kept connections from another's (tests run several gates).
static NEXT_UPSTREAM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Clone)]
pub struct Upstream {
    /// Alive while any clone of this upstream is: kept connections of dead ones are dropped.
    _alive: std::sync::Arc<()>,
    destination: pool::Destination,
    connect_timeout: Duration,
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
        if upstream.scheme() != "http" {
            return Err(format!(
                "the upstream must be an http:// URL, not {}://",
                upstream.scheme()
            ));
        }
        let probe_address = format!(
            "{}:{}",
            upstream.host_str().ok_or("URL has no host")?,
            upstream.port_or_known_default().unwrap_or(80)
        );
        let alive = std::sync::Arc::new(());
        Ok(Self {
            destination: pool::Destination {
                key: NEXT_UPSTREAM_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                alive: std::sync::Arc::downgrade(&alive),
                address: probe_address.clone(),
                connect_timeout: config.limits.connect_timeout,
            },
            _alive: alive,
            connect_timeout: config.limits.connect_timeout,
            base_path: upstream.path().trim_end_matches('/').to_string(),
            host: HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
            forwarded_proto: HeaderValue::from_str(config.public_url.scheme())
                .map_err(|e| e.to_string())?,
            forwarded_host: HeaderValue::from_str(&public_authority).map_err(|e| e.to_string())?,
            timeout: config.limits.upstream_timeout,
            probe_address,
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

    /// Sends one request and returns the upstream's answer with its body still streaming.
    pub async fn forward(&self, outgoing: Outgoing) -> Result<Response<Body>, ProxyError> {
        // Origin-form: the connection already says which host; `Host` is set below.
        let uri = if self.base_path.is_empty() {
            Uri::from(outgoing.path_and_query)
        } else {
            Uri::try_from(format!("{}{}", self.base_path, outgoing.path_and_query))
                .map_err(|e| ProxyError::Failed(e.to_string()))?
        };
        let mut headers = outgoing.headers;
        let client_ip = outgoing.client_ip.map(ClientIp::new);
        self.prepare_request_headers(&mut headers, client_ip.as_ref(), outgoing.idempotency_key);
        if let Some(approval) = outgoing.approval {
            // After the client's `Stepgate-*` headers were removed in `prepare_request_headers`.
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

        let mut response = match tokio::time::timeout(
            self.timeout,
            pool::send(&self.destination, request),
        )
        .await
        {
            Err(_) => return Err(ProxyError::Timeout),
            Ok(result) => result?,
        };
        remove_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    fn prepare_request_headers(
        &self,
        headers: &mut HeaderMap,
        client_ip: Option<&ClientIp>,
        idempotency_key: Option<String>,
    ) {
        // Removals first, so a client cannot use `Connection: X-Forwarded-For` to remove a
        // header the gate adds below: the gate's headers are set after the removal.
        remove_where(headers, is_withheld_from_upstream);
        headers.insert(header::HOST, self.host.clone());

        if let Some(client) = client_ip {
            let forwarded_for = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::to_str) {
                Some(Ok(existing)) if !existing.trim().is_empty() => {
                    HeaderValue::try_from(format!("{existing}, {}", client.ip)).ok()
                }
                _ => Some(client.text.clone()),
            };
            if let Some(value) = forwarded_for {
                headers.insert(X_FORWARDED_FOR, value);
            }
        }
        headers.insert(X_FORWARDED_PROTO, self.forwarded_proto.clone());
        headers.insert(X_FORWARDED_HOST, self.forwarded_host.clone());
        if let Some(key) = idempotency_key {
            if let Ok(value) = HeaderValue::try_from(key) {
                headers.insert(IDEMPOTENCY_KEY, value);
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
    remove_where(headers, is_hop_by_hop);
}

/// Removes every header the `Connection` header names and every header `doomed` picks, in one
/// pass over the names present: most requests carry a handful of headers, and looking each
/// listed name up (parsing and hashing it) cost more than the forward's own work did.
fn remove_where(headers: &mut HeaderMap, doomed: fn(&str) -> bool) {
    let mut names: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    names.extend(headers.keys().filter(|name| doomed(name.as_str())).cloned());
    for name in names {
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
        remove_where(&mut headers, is_withheld_from_upstream);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("content-type"));
    }

    /// The pool speaks plain TCP: a configuration changed in code to name an https upstream
    /// (its fields are public) must be refused, not sent in clear text.
    #[test]
    fn an_upstream_that_is_not_http_is_refused() {
        let mut config = Config::from_toml_str(crate::config::tests::MINIMAL, "test", &[])
            .expect("a valid config");
        assert!(Upstream::new(&config).is_ok());
        config.upstream = Url::parse("https://exchange.internal:9443/").expect("a URL");
        let refused = Upstream::new(&config)
            .err()
            .expect("an https upstream is refused");
        assert!(refused.contains("http://"), "{refused}");
    }

    #[test]
    fn underscore_spellings_of_withheld_headers_are_withheld_too() {
        let mut headers = HeaderMap::new();
        for name in [
            "x_original_url",
            "x_rewrite_url",
            "x_forwarded_uri",
            "stepgate_change",
            "stepgate_approval",
            "transfer_encoding",
            "proxy_authorization",
            "x_http_method_override",
            "x_http_method",
            "x_method_override",
            "content_type",
            "content_length",
            "content_encoding",
            "x_forwarded_for",
            "x_forwarded_host",
            "x_forwarded_proto",
            "x_request_id",
            "idempotency_key",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("/admin"),
            );
        }
        headers.insert("x_custom_thing", HeaderValue::from_static("kept"));
        remove_where(&mut headers, is_withheld_from_upstream);
        assert_eq!(
            headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            vec!["x_custom_thing"]
        );
    }
}
