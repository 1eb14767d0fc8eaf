//! The request id: taken from the edge's `X-Request-Id` when it is a sane token, otherwise
//! generated; carried in a task-local for the whole request so error answers and pages can
//! show it without every handler passing it along.

use std::future::Future;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const HEADER: &str = "x-request-id";
pub const HEADER_NAME: HeaderName = HeaderName::from_static(HEADER);

/// Ids from the edge longer than this, or with other characters, are replaced: they end up in
/// logs, headers and pages.
const MAX_LEN: usize = 128;

/// Held as its header value: it is sent both ways on every request, and the edge's own is
/// kept without a copy. Only ever made of the characters [`is_acceptable`] allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The edge's id when it is acceptable, else a fresh one.
    pub fn from_headers(headers: &HeaderMap) -> RequestId {
        let mut values = headers.get_all(HEADER_NAME).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => match value.to_str() {
                Ok(text) if is_acceptable(text) => RequestId(value.clone()),
                _ => RequestId::generate(),
            },
            _ => RequestId::generate(),
        }
    }

    /// A random UUID from the thread's cryptographic RNG: unguessable enough for an id that
    /// is no secret, without the system call `Uuid::new_v4` makes on every request.
    pub fn generate() -> RequestId {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        id.hyphenated().encode_lower(&mut text);
        // Owned by the shared bytes themselves: one allocation, and every clone (the id goes
        // upstream, back to the client and into the logs) only counts a reference.
        RequestId(
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
                .unwrap_or(HeaderValue::from_static("unknown")),
        )
    }

    pub fn as_str(&self) -> &str {
        // Acceptable ids are ASCII, so this never falls back.
        self.0.to_str().unwrap_or("unknown")
    }

    pub fn header_value(&self) -> Option<HeaderValue> {
        Some(self.0.clone())
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_acceptable(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

tokio::task_local! {
    static CURRENT: RequestId;
}

/// Runs `work` with `id` as the current request id.
pub async fn scope<F: Future>(id: RequestId, work: F) -> F::Output {
    CURRENT.scope(id, work).await
}

/// Runs `work` (synchronous) with `id` as the current request id.
pub fn scope_sync<R>(id: RequestId, work: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(id, work)
}

/// The id of the request being served, if any.
pub fn current() -> Option<RequestId> {
    CURRENT.try_with(RequestId::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(HEADER, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn a_sane_edge_id_is_kept() {
        let id = RequestId::from_headers(&headers(&["edge-7f3a:01"]));
        assert_eq!(id.as_str(), "edge-7f3a:01");
    }

    #[test]
    fn odd_long_or_repeated_edge_ids_are_replaced() {
        for bad in [
            headers(&["two words"]),
            headers(&["<script>"]),
            headers(&[&"a".repeat(MAX_LEN + 1)]),
            headers(&["one", "two"]),
            headers(&[""]),
        ] {
            let id = RequestId::from_headers(&bad);
            assert!(uuid::Uuid::parse_str(id.as_str()).is_ok(), "{id}");
        }
    }

    #[tokio::test]
    async fn the_current_id_is_visible_inside_the_scope_only() {
        let id = RequestId::generate();
        let seen = scope(id.clone(), async { current() }).await;
        assert_eq!(seen, Some(id));
        assert_eq!(current(), None);
    }
}
