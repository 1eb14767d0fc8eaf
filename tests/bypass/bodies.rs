//! Body attacks: a protected change whose body the gate and the exchange might parse into two
//! different documents. Every request whose method and path match a rule is parsed by one
//! strict parser before any condition is evaluated; what lenient parsers disagree on (duplicate
//! keys, encodings, media types, framing) is refused, never interpreted.
//!
//! The class is the JSON interoperability work (Bishop Fox, "An Exploration of JSON
//! Interoperability Vulnerabilities", 2021: duplicate keys, BOMs, comments, invalid UTF-8 and
//! surrogates read differently by two parsers), content-type confusion (a framework that parses
//! any body as JSON, or as a form, whatever the header says), and request smuggling through
//! conflicting framing (RFC 9112 §6.3; hyper's own CVE-2021-32715 on `Content-Length: +N`).

use crate::helpers::{json, passed, run_table, Attack, Expect, Gate, Row, Seen, WITHDRAW};

use Expect::{Held, Refused, Rejected};

const KEY: &str = "/api/v1/api-keys/k1";
const FOLDING_KEY: &str = "/api/v2/keys/k1";
const FORM_KEY: &str = "/api/v3/keys/k1";
const FORM: &str = "application/x-www-form-urlencoded";

const INVALID: Expect = Refused(400, "invalid_body");
const UNSUPPORTED: Expect = Refused(415, "unsupported_media_type");

/// A withdraw body under `content_type` (and any further headers) on rule A.
const fn typed(
    headers: &'static [(&'static str, &'static str)],
    path: &'static str,
    body: &'static [u8],
) -> Attack {
    Attack::Http {
        method: "PUT",
        target: path,
        headers,
        body,
    }
}

pub static ROWS: &[Row] = &[
    // --- Media types. A framework that parses by sniffing (or always as JSON) would act on a
    // body the gate never judged; so only JSON (or a form where the rule lists it) is read.
    Row {
        name: "no Content-Type",
        attack: typed(&[], KEY, WITHDRAW),
        expect: UNSUPPORTED,
    },
    Row {
        name: "text/plain (the CORS-simple type) carrying JSON",
        attack: typed(&[("content-type", "text/plain")], KEY, WITHDRAW),
        expect: UNSUPPORTED,
    },
    Row {
        name: "multipart/form-data",
        attack: typed(
            &[("content-type", "multipart/form-data; boundary=X")],
            KEY,
            b"--X\r\nContent-Disposition: form-data; name=\"permissions\"\r\n\r\nwithdraw\r\n--X--\r\n",
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "a form on a rule that does not list forms",
        attack: typed(&[("content-type", FORM)], KEY, b"permissions=withdraw"),
        expect: UNSUPPORTED,
    },
    Row {
        name: "charset=utf-16",
        attack: typed(
            &[("content-type", "application/json; charset=utf-16")],
            KEY,
            WITHDRAW,
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "a second charset parameter that is not UTF-8",
        attack: typed(
            &[("content-type", "application/json; charset=utf-8; charset=utf-7")],
            KEY,
            WITHDRAW,
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "a list of media types in one header",
        attack: typed(
            &[("content-type", "application/json, text/plain")],
            KEY,
            WITHDRAW,
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "two Content-Type headers",
        attack: typed(
            &[
                ("content-type", "application/json"),
                ("content-type", "text/plain"),
            ],
            KEY,
            WITHDRAW,
        ),
        expect: Refused(400, "bad_request"),
    },
    Row {
        name: "charset=UTF-8 is read",
        attack: typed(
            &[("content-type", "Application/JSON; charset=\"UTF-8\"")],
            KEY,
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "application/merge-patch+json is read",
        attack: typed(
            &[("content-type", "application/merge-patch+json")],
            KEY,
            WITHDRAW,
        ),
        expect: Held,
    },
    // --- Content codings: the gate would judge the compressed bytes, the exchange the
    // inflated ones.
    Row {
        name: "Content-Encoding: gzip",
        attack: typed(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            KEY,
            WITHDRAW,
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "Content-Encoding: br",
        attack: typed(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "br"),
            ],
            KEY,
            WITHDRAW,
        ),
        expect: UNSUPPORTED,
    },
    Row {
        name: "two Content-Encoding headers",
        attack: typed(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ],
            KEY,
            WITHDRAW,
        ),
        expect: Refused(400, "bad_request"),
    },
    Row {
        name: "Content-Encoding: identity is read",
        attack: typed(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
            ],
            KEY,
            WITHDRAW,
        ),
        expect: Held,
    },
    // --- Duplicate keys: first-wins parsers (the gate, if it were lenient) and last-wins
    // parsers (the exchange) read two different permission lists.
    Row {
        name: "duplicate key, harmless value first",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["read"],"permissions":["withdraw"]}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "duplicate key nested deeper",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["read"],"meta":{"a":1,"a":2}}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "duplicate key spelled with a \\u escape",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["read"],"permission\u0073":["withdraw"]}"#,
        ),
        expect: INVALID,
    },
    // --- Encodings and syntax that parsers disagree on.
    Row {
        name: "invalid UTF-8 inside a string",
        attack: json("PUT", KEY, b"{\"permissions\":[\"withdraw\",\"\xff\"]}"),
        expect: INVALID,
    },
    Row {
        name: "UTF-8 byte-order mark",
        attack: json("PUT", KEY, b"\xEF\xBB\xBF{\"permissions\":[\"withdraw\"]}"),
        expect: INVALID,
    },
    Row {
        name: "UTF-16 body without a charset",
        attack: json(
            "PUT",
            KEY,
            b"\xFF\xFE{\x00\"\x00p\x00\"\x00:\x001\x00}\x00",
        ),
        expect: INVALID,
    },
    Row {
        name: "lone surrogate escape",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["withdraw"],"label":"\ud800"}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "comment (JSON5-style parsers accept it)",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["read"] /*,"permissions":["withdraw"]*/}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "trailing garbage after the document",
        attack: json("PUT", KEY, br#"{"permissions":["read"]} xyz"#),
        expect: INVALID,
    },
    Row {
        name: "a second document after the first",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["read"]}{"permissions":["withdraw"]}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "nesting 65 deep",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["withdraw"],"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
        ),
        expect: INVALID,
    },
    Row {
        name: "nesting exactly 64 deep is read",
        attack: json(
            "PUT",
            KEY,
            br#"{"permissions":["withdraw"],"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
        ),
        expect: Held,
    },
    Row {
        name: "empty body",
        attack: json("PUT", KEY, b""),
        expect: INVALID,
    },
    // --- What JSON decoding means: escapes are decoded before conditions are evaluated, and
    // `contains` on a string is a substring test.
    Row {
        name: "\\u escape inside the value",
        attack: json("PUT", KEY, br#"{"permissions":["with\u0064raw"]}"#),
        expect: Held,
    },
    Row {
        name: "\\u escape inside the key",
        attack: json("PUT", KEY, br#"{"per\u006dissions":["withdraw"]}"#),
        expect: Held,
    },
    Row {
        name: "permissions as one string",
        attack: json("PUT", KEY, br#"{"permissions":"read,withdraw"}"#),
        expect: Held,
    },
    // --- Case. Rule A's exchange reads keys and values case-sensitively, so a shouted body
    // is a different (harmless) document to it and passes; rule B's exchange ignores case,
    // so its conditions see the body folded and case twins are ambiguous.
    Row {
        name: "Permissions/WITHDRAW on a case-sensitive rule passes",
        attack: json("PUT", KEY, br#"{"Permissions":["WITHDRAW"]}"#),
        expect: passed(KEY),
    },
    Row {
        name: "Permissions/WITHDRAW on a folding rule",
        attack: json("PUT", FOLDING_KEY, br#"{"Permissions":["WITHDRAW"]}"#),
        expect: Held,
    },
    Row {
        name: "case-twin keys on a folding rule",
        attack: json(
            "PUT",
            FOLDING_KEY,
            br#"{"permissions":[],"Permissions":["withdraw"]}"#,
        ),
        expect: INVALID,
    },
    // --- Forms, where a rule lists them: the same strictness.
    Row {
        name: "form: permissions=withdraw",
        attack: typed(&[("content-type", FORM)], FORM_KEY, b"permissions=withdraw"),
        expect: Held,
    },
    Row {
        name: "form: a repeated field (HTTP parameter pollution)",
        attack: typed(
            &[("content-type", FORM)],
            FORM_KEY,
            b"permissions=read&permissions=withdraw",
        ),
        expect: Held,
    },
    Row {
        name: "form: %77 escape in the value",
        attack: typed(&[("content-type", FORM)], FORM_KEY, b"permissions=%77ithdraw"),
        expect: Held,
    },
    Row {
        name: "form: encoded brackets (PHP/Rails arrays)",
        attack: typed(
            &[("content-type", FORM)],
            FORM_KEY,
            b"permissions%5B%5D=withdraw",
        ),
        expect: INVALID,
    },
    Row {
        name: "form: raw brackets",
        attack: typed(
            &[("content-type", FORM)],
            FORM_KEY,
            b"permissions[0]=read&permissions[1]=withdraw",
        ),
        expect: INVALID,
    },
    Row {
        name: "form: malformed escape",
        attack: typed(&[("content-type", FORM)], FORM_KEY, b"permissions=%zzwithdraw"),
        expect: INVALID,
    },
    Row {
        name: "form: JSON is still read on a form rule",
        attack: json("PUT", FORM_KEY, WITHDRAW),
        expect: Held,
    },
    // --- Framing conflicts never reach a rule (request smuggling, RFC 9112 §6.3). With both
    // `Transfer-Encoding: chunked` and `Content-Length`, hyper (1.x) frames by the chunks
    // alone, deletes the `Content-Length` header and closes the connection after answering,
    // as RFC 9112 §6.3 allows; so the rule judges the chunked body, and a forward is re-framed
    // by the gate's client, never sent with the client's stale length.
    Row {
        name: "Content-Length then Transfer-Encoding: judged by the chunks",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-1\r\n\
              content-type: application/json\r\nContent-Length: 4\r\n\
              Transfer-Encoding: chunked\r\n\r\n\
              23\r\n{\"permissions\":[\"read\",\"withdraw\"]}\r\n0\r\n\r\n",
        ),
        expect: Held,
    },
    Row {
        name: "Transfer-Encoding then Content-Length: forwarded whole, not desynchronised",
        attack: Attack::RawExpecting {
            bytes: b"POST /api/v1/orders HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-0\r\n\
                     content-type: application/json\r\nTransfer-Encoding: chunked\r\n\
                     Content-Length: 4\r\n\r\n\
                     23\r\n{\"permissions\":[\"read\",\"withdraw\"]}\r\n0\r\n\r\n",
            method: "POST",
            body: WITHDRAW,
        },
        expect: Expect::Passed {
            upstream_path: "/api/v1/orders",
            // The client's stale length is gone; the whole body arrived (checked above).
            seen: &[Seen::Absent("content-length")],
        },
    },
    Row {
        name: "two different Content-Lengths",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-2\r\n\
              content-type: application/json\r\nContent-Length: 35\r\nContent-Length: 2\r\n\r\n\
              {\"permissions\":[\"read\",\"withdraw\"]}",
        ),
        expect: Rejected(400),
    },
    Row {
        name: "Content-Length: +35 (hyper CVE-2021-32715)",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-3\r\n\
              content-type: application/json\r\nContent-Length: +35\r\n\r\n\
              {\"permissions\":[\"read\",\"withdraw\"]}",
        ),
        expect: Rejected(400),
    },
    Row {
        name: "Transfer-Encoding that does not end in chunked",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-4\r\n\
              content-type: application/json\r\nTransfer-Encoding: chunked, identity\r\n\r\n\
              23\r\n{\"permissions\":[\"read\",\"withdraw\"]}\r\n0\r\n\r\n",
        ),
        expect: Rejected(400),
    },
    // Well-formed chunked framing is read like any other body.
    Row {
        name: "chunked body with a chunk extension",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\nx-user-id: bodies-raw-5\r\n\
              content-type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              10;ext=1\r\n{\"permissions\":[\r\n13\r\n\"read\",\"withdraw\"]}\r\n0\r\n\r\n",
        ),
        expect: Held,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_attacks() {
    let gate = Gate::start().await;
    run_table(&gate, "bodies", ROWS).await;
}
