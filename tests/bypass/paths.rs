//! Path attacks: one protected route, spelled so that the gate and the exchange might read two
//! different paths. The gate's answer to every ambiguous spelling is `400 invalid_path`, on
//! protected and unprotected routes alike (an unprotected route can be one decoding step away
//! from a protected one); harmless re-spellings are canonicalised and then matched as usual,
//! and the exchange is sent the canonical form, so it acts on exactly what was matched.
//!
//! The rows reproduce the path-confusion bypasses published against auth proxies and auth
//! frameworks. Where we cite an advisory we are confident of its id; otherwise the comment names
//! the class.

use crate::helpers::{bare, json, passed, run_table, Attack, Expect, Gate, Row, WITHDRAW};

use Expect::{Held, Refused};

const INVALID: Expect = Refused(400, "invalid_path");

pub static ROWS: &[Row] = &[
    // The control: the protected change, spelled plainly, is held.
    Row {
        name: "plain protected path",
        attack: json("PUT", "/api/v1/api-keys/k1", WITHDRAW),
        expect: Held,
    },
    // --- Encoded separators. CVE-2021-29492 (Envoy): `%2F` and `%5C` were not decoded when
    // matching routes but were decoded by the upstream, so `/admin%2Fsecret` skipped the
    // route's auth policy. Pomerium, which runs on Envoy, shipped the same fix. Also the
    // double-decoding class of Apache Shiro CVE-2020-11989 (`%25%32%66`).
    Row {
        name: "%2F between literal segments",
        attack: json("PUT", "/api/v1%2Fapi-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "%2f (lower-case hex) before the key id",
        attack: json("PUT", "/api/v1/api-keys%2fk1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "%5C (encoded backslash) as a separator",
        attack: json("PUT", "/api/v1%5Capi-keys%5ck1", WITHDRAW),
        expect: INVALID,
    },
    // NUL truncation: a C-string upstream (or a logger) stops at %00, the gate would not.
    Row {
        name: "%00 after the key id",
        attack: json("PUT", "/api/v1/api-keys/k1%00.json", WITHDRAW),
        expect: INVALID,
    },
    // Encoded slashes are refused on unprotected routes too: the exchange could decode one
    // into a protected path.
    Row {
        name: "%2F on an unprotected route",
        attack: bare("GET", "/api/v1/orders%2F1"),
        expect: INVALID,
    },
    // --- Dot segments. CVE-2019-9901 (Envoy): paths were not normalised, so
    // `/public/../admin` matched a public route while the upstream served `/admin`.
    Row {
        name: "../ back into the protected route",
        attack: json("PUT", "/api/v1/public/../api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "./ inside the protected route",
        attack: json("PUT", "/api/v1/./api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    // The encoded variants that normalisers which decode after resolving miss (the class
    // behind Envoy's `normalize_path` plus `%2e` follow-ups and countless WAF bypasses).
    Row {
        name: "%2e%2e (encoded ..)",
        attack: json("PUT", "/api/v1/public/%2e%2e/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: ".%2E (half-encoded ..)",
        attack: json("PUT", "/api/v1/public/.%2E/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "%2e (encoded .) as a whole segment",
        attack: json("PUT", "/api/v1/%2e/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "trailing /.. after the key id",
        attack: json("PUT", "/api/v1/api-keys/k1/..", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "dot segments on an unprotected route",
        attack: bare("GET", "/api/v1/orders/../account"),
        expect: INVALID,
    },
    // --- Empty segments: upstreams that merge slashes read `//` as `/`; a matcher that does
    // not, sees another path (the class Envoy's `merge_slashes` option exists for).
    Row {
        name: "// inside the protected route",
        attack: json("PUT", "/api/v1//api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "leading //",
        attack: json("PUT", "//api/v1/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "trailing //",
        attack: json("PUT", "/api/v1/api-keys/k1//", WITHDRAW),
        expect: INVALID,
    },
    // --- `;` path parameters. Apache Shiro CVE-2020-1957 (`/public/..;/admin`: Shiro saw a
    // public path, Tomcat stripped `..;` into `..` and served `/admin`), the same trick against
    // every Tomcat-fronting proxy, and `;jsessionid=` which Java servlet containers drop.
    Row {
        name: "..;/ (Tomcat traversal)",
        attack: json("PUT", "/api/v1/public/..;/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: ";jsessionid= after the key id",
        attack: json("PUT", "/api/v1/api-keys/k1;jsessionid=abc", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "; parameter on a literal segment",
        attack: json("PUT", "/api/v1/api-keys;x=1/k1", WITHDRAW),
        expect: INVALID,
    },
    // Apache Shiro CVE-2020-13933: `%3B` was decoded and then cut at `;` by one reader but not
    // the other. An upstream that decodes before stripping parameters reads
    // `/api/v1/api-keys%3Bx/k1` as the protected `/api/v1/api-keys/k1`, so an encoded `;`
    // is as ambiguous as a raw one.
    Row {
        name: "%3B (encoded ;) on a literal segment",
        attack: json("PUT", "/api/v1/api-keys%3Bx/k1", WITHDRAW),
        expect: INVALID,
    },
    // --- Backslashes: Windows servers and WHATWG URL parsers read `\` as `/` (the class of
    // the oauth2-proxy open redirect CVE-2020-4037, `/\evil.example`).
    Row {
        name: "raw backslash as a separator",
        attack: json("PUT", "/api/v1\\api-keys\\k1", WITHDRAW),
        expect: INVALID,
    },
    // --- Malformed escapes: readers disagree on whether `%zz` is an error, literal text, or
    // (IIS) `%u002f` a slash.
    Row {
        name: "%zz (not hex)",
        attack: json("PUT", "/api/v1/api-keys/k1%zz", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "%4 (truncated escape)",
        attack: json("PUT", "/api/v1/api-keys/k1%4", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "%u002f (IIS unicode escape)",
        attack: json("PUT", "/api/v1%u002fapi-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    // --- Other request-target forms. An absolute-form target (`PUT http://host/path`) is
    // routed by its own authority by some servers and by `Host` by others; the gate only judges
    // origin-form targets (the class of the Authelia nginx `auth_request` bypass
    // CVE-2021-32637, where the checked URI was not the one served).
    Row {
        name: "absolute-form target naming the gate",
        attack: json("PUT", "http://gate.test/api/v1/api-keys/k1", WITHDRAW),
        expect: INVALID,
    },
    Row {
        name: "absolute-form target naming another host",
        attack: bare("GET", "http://internal.exchange/api/v1/account"),
        expect: INVALID,
    },
    Row {
        name: "asterisk-form OPTIONS *",
        attack: bare("OPTIONS", "*"),
        expect: INVALID,
    },
    // A `#` has no meaning in a request target; a reader that cuts the "fragment" and one
    // that does not would see two paths. hyper cuts it (the `http` crate parses it as a
    // fragment and drops it), and since the gate forwards the target it rebuilt from what it
    // matched, the exchange never sees the part after `#`: normalised, not ambiguous.
    Row {
        name: "# in the target: the fragment is dropped before matching",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1#/../../account HTTP/1.1\r\nHost: gate.test\r\n\
              x-user-id: paths-raw-1\r\ncontent-type: application/json\r\n\
              content-length: 35\r\n\r\n{\"permissions\":[\"read\",\"withdraw\"]}",
        ),
        expect: Held,
    },
    Row {
        name: "# in the target: the exchange never sees what follows it",
        attack: Attack::RawExpecting {
            bytes: b"PUT /api/v1/public#/../api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\n\
                     x-user-id: paths-raw-2\r\ncontent-type: application/json\r\n\
                     content-length: 35\r\n\r\n{\"permissions\":[\"read\",\"withdraw\"]}",
            method: "PUT",
            body: WITHDRAW,
        },
        expect: passed("/api/v1/public"),
    },
    // --- Harmless re-spellings: canonicalised, matched, and forwarded canonical.
    Row {
        name: "%61 (encoded unreserved) in the protected route",
        attack: json("PUT", "/api/v1/%61pi-keys/k1", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "every letter of a literal segment encoded, lower-case hex",
        attack: json("PUT", "/%61%70%69/v1/api-keys/%6b1", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "%61 on an unprotected route is forwarded decoded",
        attack: bare("GET", "/api/v1/%61ccount"),
        expect: passed("/api/v1/account"),
    },
    Row {
        name: "reserved escapes are forwarded upper-cased",
        attack: bare("GET", "/api/v1/search/a%2ab%3d?q=%2a"),
        expect: passed("/api/v1/search/a%2Ab%3D?q=%2a"),
    },
    // Raw non-ASCII bytes next to an escape: canonicalising must not change what they say
    // (the fuzz target found that it re-encoded each byte as Latin-1, `é` → `Ã©`).
    Row {
        name: "raw UTF-8 after an escape keeps its bytes",
        attack: bare("GET", "/api/v1/%61ccount/\u{e9}"),
        expect: passed("/api/v1/account/\u{e9}"),
    },
    // Trailing slash: Spring (before 6) and many routers treat `/x/` as `/x`.
    Row {
        name: "single trailing slash",
        attack: json("PUT", "/api/v1/api-keys/k1/", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "single trailing slash on a protected GET",
        attack: bare("GET", "/api/v1/withdrawal-addresses/export/"),
        expect: Held,
    },
    // --- Case. Rule A's exchange routes case-sensitively (the default), so `/API/…` is
    // another route to it and passes untouched; rule B says its exchange ignores case, so every
    // spelling is held (the class of case-insensitive upstreams behind case-sensitive proxy
    // rules, e.g. Spring's `setCaseSensitive(false)` or IIS).
    Row {
        name: "upper-case prefix on a case-sensitive rule passes as another route",
        attack: json("PUT", "/API/v1/api-keys/k1", WITHDRAW),
        expect: passed("/API/v1/api-keys/k1"),
    },
    Row {
        name: "upper-case path on a case-insensitive rule",
        attack: json("PUT", "/API/V2/KEYS/k1", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "mixed case plus %4B on a case-insensitive rule",
        attack: json("PUT", "/api/v2/%4Beys/k1/", WITHDRAW),
        expect: Held,
    },
    // --- Spellings that only a broken reader would turn into the protected route; the gate
    // forwards them as sent and the exchange (decoding once, strict UTF-8) reads them as the
    // same unknown route. Double decoding is MS01-026 (IIS, CVE-2001-0333); overlong UTF-8
    // `%C0%AF` is the IIS unicode traversal CVE-2000-0884.
    Row {
        name: "%252F (double-encoded slash) stays one segment",
        attack: json("PUT", "/api/v1%252Fapi-keys/k1", WITHDRAW),
        expect: passed("/api/v1%252Fapi-keys/k1"),
    },
    Row {
        name: "%C0%AF (overlong UTF-8 slash) stays one segment",
        attack: json("PUT", "/api/v1/api-keys%C0%AFk1", WITHDRAW),
        expect: passed("/api/v1/api-keys%C0%AFk1"),
    },
    // --- The gate's own namespace is never forwarded, however it is spelled.
    Row {
        name: "%5F-encoded /_stepgate",
        attack: bare("GET", "/%5Fstepgate/api/changes"),
        expect: Refused(404, "not_found"),
    },
    Row {
        name: "%5f (lower-case hex) /_stepgate page",
        attack: bare("GET", "/%5fstepgate/passkeys"),
        expect: Refused(404, "not_found"),
    },
    Row {
        name: "unknown /_stepgate route",
        attack: bare("GET", "/_stepgate/internal/anything"),
        expect: Refused(404, "not_found"),
    },
    // Paths are case-sensitive (RFC 3986 §6.2.2.1), so `/_STEPGATE/…` is not the gate's
    // namespace: it is forwarded like any unknown route. Nothing leaks: the exchange has no such
    // route, and the gate's session cookie is scoped to the exact-case path `/_stepgate`.
    Row {
        name: "/_STEPGATE in upper case is another path and passes",
        attack: bare("GET", "/_STEPGATE/api/changes"),
        expect: passed("/_STEPGATE/api/changes"),
    },
    Row {
        name: "/_stepgate reached through ..",
        attack: bare("GET", "/api/../_stepgate/api/changes"),
        expect: INVALID,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_attacks() {
    let gate = Gate::start().await;
    run_table(&gate, "paths", ROWS).await;
}
