//! Heads on the wire for the express lane: a client's request head read into the same types
//! hyper gives the pipeline (or found unusual, for hyper to deal with), and the upstream's
//! answer head checked for its framing and written back with connection-scoped headers removed.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Uri};

use crate::proxy::HOP_BY_HOP;

/// hyper's limit on request headers; a head with more is hyper's to refuse (431).
pub const MAX_HEADERS: usize = 100;

/// A request head the express lane can serve.
pub struct RequestHead {
    /// The head's bytes as read, for hyper if the request is handed over after all.
    pub raw: Bytes,
    pub parts: http::request::Parts,
    /// `Content-Length`, if the client sent one.
    pub content_length: Option<usize>,
    /// The client said `Connection: close`.
    pub close: bool,
}

/// What the bytes read so far hold. Not boxed: one is made per request and moved once, and a
/// box would be an allocation per request on the lane that exists to save those.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A plain HTTP/1.1 request head, split off the front of the buffer.
    Plain(RequestHead),
    /// Not all of the head yet.
    Partial,
    /// Anything the express lane leaves to hyper: a malformed head (hyper answers it), another
    /// HTTP version, `CONNECT`, a target that is not a path, `Transfer-Encoding`, `Expect`,
    /// `Upgrade`, more than one `Content-Length` or one that is not plain digits, a
    /// `Connection` naming anything but `close` and `keep-alive`.
    Unusual,
}

/// Where a piece of the head lies in the buffer, so it can be shared once the head is split off.
type Span = (usize, usize);

/// The head as httparse read it, by position.
struct Found {
    len: usize,
    method: Method,
    target: Span,
    fields: Vec<(HeaderName, Span)>,
    body_len: Option<usize>,
    close: bool,
}

/// Reads a request head from the front of `buffer`; a plain one is split off it (header values
/// become slices of the head's bytes, not copies). Anything else leaves `buffer` as it was.
pub fn parse_request(buffer: &mut BytesMut) -> Parsed {
    let found = match find(buffer) {
        Ok(found) => found,
        Err(NotPlain::Partial) => return Parsed::Partial,
        Err(NotPlain::Unusual) => return Parsed::Unusual,
    };
    let raw = buffer.split_to(found.len).freeze();
    let slice = |(start, length): Span| raw.slice(start..start + length);
    let Ok(path_and_query) = PathAndQuery::from_maybe_shared(slice(found.target)) else {
        return unsplit(buffer, raw);
    };
    let mut headers = HeaderMap::with_capacity(found.fields.len() + 6);
    for (name, value) in found.fields {
        let Ok(value) = HeaderValue::from_maybe_shared(slice(value)) else {
            return unsplit(buffer, raw);
        };
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = found.method;
    parts.uri = Uri::from(path_and_query);
    parts.headers = headers;
    Parsed::Plain(RequestHead {
        raw,
        parts,
        content_length: found.body_len,
        close: found.close,
    })
}

/// Puts a split-off head back in front of the buffer, for hyper.
fn unsplit(buffer: &mut BytesMut, raw: Bytes) -> Parsed {
    let mut whole = BytesMut::with_capacity(raw.len() + buffer.len());
    whole.extend_from_slice(&raw);
    whole.extend_from_slice(buffer);
    *buffer = whole;
    Parsed::Unusual
}

/// Why there is no plain head yet.
enum NotPlain {
    Partial,
    Unusual,
}

fn find(buffer: &[u8]) -> Result<Found, NotPlain> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut storage);
    let len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(NotPlain::Partial),
        Err(_) => return Err(NotPlain::Unusual),
    };
    if request.version != Some(1) {
        return Err(NotPlain::Unusual);
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(NotPlain::Unusual);
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(NotPlain::Unusual);
    };
    if method == Method::CONNECT || !target.starts_with('/') {
        return Err(NotPlain::Unusual);
    }
    // httparse's slices all lie within the head; checked anyway, so a slice from elsewhere
    // (an empty value, say) sends the request to hyper instead of out of bounds.
    let base = buffer.as_ptr() as usize;
    let span = |slice: &[u8]| -> Result<Span, NotPlain> {
        let start = (slice.as_ptr() as usize)
            .checked_sub(base)
            .filter(|start| start.saturating_add(slice.len()) <= len)
            .ok_or(NotPlain::Unusual)?;
        Ok((start, slice.len()))
    };
    let mut found = Found {
        len,
        method,
        target: span(target.as_bytes())?,
        fields: Vec::with_capacity(request.headers.len()),
        body_len: None,
        close: false,
    };
    for field in request.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Err(NotPlain::Unusual);
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (found.body_len, plain_length(field.value)) {
                (None, Some(length)) => found.body_len = Some(length),
                _ => return Err(NotPlain::Unusual),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            // `Connection` may name any header as connection-scoped, and the proxy then
            // removes it (`Connection: content-length` would take the framing with it).
            // Only the two everyday tokens stay here; anything else is hyper's to handle.
            for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    found.close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    return Err(NotPlain::Unusual);
                }
            }
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            return Err(NotPlain::Unusual);
        };
        found.fields.push((name, span(field.value)?));
    }
    Ok(found)
}

/// A `Content-Length` of digits only, as RFC 9110 §8.6 spells it.
fn plain_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How an upstream answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: an answer to `HEAD`, a 204 or a 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An upstream answer head, already written out for the client.
pub struct ResponseHead {
    /// Its length in the upstream buffer.
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The upstream may keep the connection open for another request.
    pub reusable: bool,
    /// The head says `connection: close` to the client: its connection ends after the body.
    pub closing: bool,
}

/// What the upstream's bytes so far hold.
pub enum ParsedResponse {
    Complete(ResponseHead),
    /// An interim answer (1xx other than 101) of this length: skipped, as RFC 9110 §15.2 asks
    /// of a client that did not expect one.
    Interim(usize),
    Partial,
}

/// Why an upstream answer head cannot be passed on.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    #[error("the answer's head is malformed: {0}")]
    Malformed(httparse::Error),
    #[error("the answer's status {0} is not one HTTP defines")]
    Status(u16),
    #[error("the answer switches protocols, which was never asked for")]
    Upgrade,
    #[error("the answer's Content-Length is invalid or contradicts itself")]
    Length,
    #[error("the answer's Transfer-Encoding is not chunked alone, or comes with a Content-Length")]
    TransferEncoding,
}

/// Reads the upstream's answer head at the start of `buffer` and, when complete, writes the
/// client's head to `out`: the status line, the upstream's headers less the hop-by-hop ones,
/// those its `Connection` names and `X-Request-Id` (the gate's own goes instead), then `extra`
/// (already formatted lines) and the framing the client needs. `head_request` says whether the
/// request was `HEAD`.
pub fn parse_response(
    buffer: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
    extra: &[&[u8]],
    closing: bool,
) -> Result<ParsedResponse, BadResponse> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut storage);
    let len = match response.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(error) => return Err(BadResponse::Malformed(error)),
    };
    let status = response.code.unwrap_or(0);
    if status < 100 {
        return Err(BadResponse::Status(status));
    }
    if status == 101 {
        return Err(BadResponse::Upgrade);
    }
    if (100..200).contains(&status) {
        return Ok(ParsedResponse::Interim(len));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut reusable = response.version == Some(1);
    for field in response.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = plain_length(field.value).ok_or(BadResponse::Length)? as u64;
            if length.is_some_and(|seen| seen != value) {
                return Err(BadResponse::Length);
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !field.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(BadResponse::TransferEncoding);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            reusable &= !field
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    if chunked && length.is_some() {
        return Err(BadResponse::TransferEncoding);
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        reusable = false;
        Framing::UntilClose
    };

    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    match response.reason {
        Some(reason) if !reason.is_empty() => out.extend_from_slice(reason.as_bytes()),
        _ => {
            let canonical = http::StatusCode::from_u16(status)
                .ok()
                .and_then(|code| code.canonical_reason())
                .unwrap_or("");
            out.extend_from_slice(canonical.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    // The names the upstream's `Connection` lists are connection-scoped too (RFC 9110 §7.6.1).
    let named: Vec<&[u8]> = response
        .headers
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("connection"))
        .flat_map(|field| field.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let mut has_date = false;
    for field in response.headers.iter() {
        let name = field.name;
        // The framing is written below from what was parsed above, never copied: a
        // `Connection` naming `Content-Length` must not take the client's framing with it.
        if name.eq_ignore_ascii_case("content-length")
            || HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop))
            || name.eq_ignore_ascii_case(crate::web::request_id::HEADER)
            || named
                .iter()
                .any(|token| token.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        has_date |= name.eq_ignore_ascii_case("date");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(field.value);
        out.extend_from_slice(b"\r\n");
    }
    for line in extra {
        out.extend_from_slice(line);
    }
    if !has_date {
        super::date::write_line(out);
    }
    match (framing, length) {
        // An answer to HEAD says how long the body would be. A 204 or 304 says nothing of a
        // body (as hyper, on the other lane, also leaves out).
        (Framing::Length(length), _) | (Framing::Empty, Some(length))
            if status != 204 && status != 304 =>
        {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(length.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ParsedResponse::Complete(ResponseHead {
        len,
        status,
        framing,
        reusable,
        closing,
    }))
}

/// A status code's three digits (httparse reads exactly three).
fn itoa3(status: u16) -> [u8; 3] {
    [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

/// `header::CONTENT_LENGTH` spelled for a response the gate writes itself.
pub fn content_length_line(length: usize) -> Vec<u8> {
    format!("{}: {length}\r\n", header::CONTENT_LENGTH).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Parsed, BytesMut) {
        let mut buffer = BytesMut::from(text.as_bytes());
        let parsed = parse_request(&mut buffer);
        (parsed, buffer)
    }

    #[test]
    fn a_plain_head_is_split_off_with_its_body_and_the_next_request_left() {
        let text = "POST /orders?x=1 HTTP/1.1\r\nHost: a\r\nX-Custom: v\r\nContent-Length: 2\r\n\r\n{}GET /next HTTP/1.1\r\n\r\n";
        let (parsed, rest) = parse(text);
        let Parsed::Plain(head) = parsed else {
            panic!("a plain head")
        };
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri.path(), "/orders");
        assert_eq!(head.parts.uri.query(), Some("x=1"));
        assert_eq!(head.parts.headers["x-custom"], "v");
        assert_eq!(head.parts.headers.len(), 3);
        assert_eq!(head.content_length, Some(2));
        assert!(!head.close);
        assert_eq!(
            &head.raw[..],
            &text.as_bytes()[..text.find("{}").unwrap_or(0)]
        );
        assert_eq!(&rest[..], b"{}GET /next HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn connection_close_is_noticed_among_other_tokens() {
        let (parsed, _) = parse("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        let Parsed::Plain(head) = parsed else {
            panic!("a plain head")
        };
        assert!(head.close);
    }

    #[test]
    fn an_unfinished_head_is_partial_and_left_in_place() {
        let (parsed, rest) = parse("GET / HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(parsed, Parsed::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: a\r\n");
    }

    /// Everything framing-related or unusual goes to hyper with the buffer untouched, so hyper
    /// reads exactly the bytes the client sent.
    #[test]
    fn unusual_heads_are_left_whole_for_hyper() {
        for text in [
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://evil.example/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            // `Connection` can make the proxy drop any header, the framing included.
            "POST / HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n{}",
            "GET / HTTP/1.1\r\nConnection: x-user-id\r\nX-User-Id: a\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A : 1\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
        ] {
            let (parsed, rest) = parse(text);
            assert!(matches!(parsed, Parsed::Unusual), "{text:?}");
            assert_eq!(&rest[..], text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn more_headers_than_hyper_allows_go_to_hyper() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for n in 0..=MAX_HEADERS {
            text.push_str(&format!("x-h{n}: v\r\n"));
        }
        text.push_str("\r\n");
        assert!(matches!(parse(&text).0, Parsed::Unusual));
    }

    fn answer(text: &str, head_request: bool) -> Result<(ParsedResponse, String), BadResponse> {
        let mut out = Vec::new();
        let parsed = parse_response(
            text.as_bytes(),
            head_request,
            &mut out,
            &[b"x-request-id: gate-id\r\n"],
            false,
        )?;
        Ok((parsed, String::from_utf8_lossy(&out).into_owned()))
    }

    fn framing_of(text: &str, head_request: bool) -> Framing {
        match answer(text, head_request) {
            Ok((ParsedResponse::Complete(head), _)) => head.framing,
            _ => panic!("a complete answer: {text:?}"),
        }
    }

    #[test]
    fn answer_framing_follows_rfc_9112() {
        let length = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(framing_of(length, false), Framing::Length(5));
        assert_eq!(framing_of(length, true), Framing::Empty);
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing_of(chunked, false), Framing::Chunked);
        let until_close = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(framing_of(until_close, false), Framing::UntilClose);
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            Framing::Empty
        );
    }

    #[test]
    fn only_an_answer_that_can_carry_another_keeps_its_connection() {
        let reusable = |text: &str| match answer(text, false) {
            Ok((ParsedResponse::Complete(head), _)) => head.reusable,
            _ => panic!("a complete answer: {text:?}"),
        };
        assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn contradictory_or_unsupported_framing_is_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 099 Too Low\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        ] {
            assert!(answer(text, false).is_err(), "{text:?}");
        }
    }

    #[test]
    fn interim_answers_are_skipped() {
        let text = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n";
        match answer(text, false) {
            Ok((ParsedResponse::Interim(len), _)) => {
                assert_eq!(&text[len..], "HTTP/1.1 200 OK\r\n")
            }
            _ => panic!("an interim answer"),
        }
    }

    #[test]
    fn connection_scoped_answer_headers_are_left_out_and_the_gate_id_goes_in() {
        let text = "HTTP/1.1 201 Made\r\nConnection: x-private, keep-alive\r\nX-Private: 1\r\n\
                    Keep-Alive: timeout=5\r\nProxy-Connection: x\r\nX-Request-Id: upstream-id\r\n\
                    Content-Length: 2\r\nContent-Length: 2\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\
                    X-Kept: yes\r\n\r\nok";
        let Ok((ParsedResponse::Complete(head), out)) = answer(text, false) else {
            panic!("a complete answer")
        };
        assert_eq!(head.status, 201);
        assert_eq!(&text[head.len..], "ok");
        assert_eq!(
            out,
            "HTTP/1.1 201 Made\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\
             X-Kept: yes\r\nx-request-id: gate-id\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn a_date_is_added_when_the_upstream_sent_none_and_chunked_when_needed() {
        let Ok((ParsedResponse::Complete(_), out)) = answer("HTTP/1.1 200 OK\r\n\r\n", false)
        else {
            panic!("a complete answer")
        };
        assert!(out.contains("\r\ndate: "), "{out}");
        assert!(out.ends_with("transfer-encoding: chunked\r\n\r\n"), "{out}");
    }
}
