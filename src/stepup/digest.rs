//! The digest that binds a confirmation to one exact request. A release must produce the same
//! digest as the held request, so nothing the upstream acts on can change in between.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::policy::METHOD_OVERRIDE_HEADERS;

/// The parts of a request the upstream acts on, in canonical form.
pub struct CanonicalRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a [u8]>,
    /// Headers that change how the upstream reads the request (see [`reading_headers`]).
    pub reading_headers: &'a [(String, Vec<u8>)],
    pub body: &'a [u8],
}

/// The headers besides `Content-Type` that change how an upstream reads a request: its coding
/// and any method override. A release that adds or alters one would be another request.
pub fn reading_headers(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    std::iter::once("content-encoding")
        .chain(METHOD_OVERRIDE_HEADERS)
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |value| (name.to_string(), value.as_bytes().to_vec()))
        })
        .collect()
}

/// Hex SHA-256 over the length-prefixed parts, so no two different requests share an input
/// (a `/a` + `b` query cannot collide with `/ab`).
pub fn request_digest(request: &CanonicalRequest<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"stepgate-request-v1");
    let mut part = |bytes: Option<&[u8]>| match bytes {
        None => hasher.update([0u8]),
        Some(bytes) => {
            hasher.update([1u8]);
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
    };
    part(Some(request.method.as_bytes()));
    part(Some(request.path.as_bytes()));
    part(request.query.map(str::as_bytes));
    part(request.content_type);
    part(Some(&(request.reading_headers.len() as u64).to_be_bytes()));
    for (name, value) in request.reading_headers {
        part(Some(name.as_bytes()));
        part(Some(value));
    }
    part(Some(request.body));
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(path: &str, query: Option<&str>, body: &[u8]) -> String {
        request_digest(&CanonicalRequest {
            method: "PUT",
            path,
            query,
            content_type: Some(b"application/json"),
            reading_headers: &[],
            body,
        })
    }

    #[test]
    fn every_part_counts() {
        let base = digest("/a", None, b"{}");
        assert_eq!(base, digest("/a", None, b"{}"));
        assert_ne!(base, digest("/a", Some(""), b"{}"));
        assert_ne!(base, digest("/a", None, b"{} "));
        assert_ne!(digest("/a", Some("b"), b""), digest("/ab", None, b""));
        let overridden = request_digest(&CanonicalRequest {
            method: "PUT",
            path: "/a",
            query: None,
            content_type: Some(b"application/json"),
            reading_headers: &[("x-http-method-override".into(), b"DELETE".to_vec())],
            body: b"{}",
        });
        assert_ne!(base, overridden, "a method override makes another request");
    }
}
