//! Header attacks: a client sending headers that only the gate (or the exchange's edge) may
//! set, or using `Connection` to make a proxy delete the headers it adds. The gate removes
//! client copies of its own namespace (`Stepgate-*`) and of the verified-user header before
//! anything else, removes hop-by-hop headers and every header `Connection` names, and only then
//! sets its own (`Host`, `X-Forwarded-*`, the verified user, `Idempotency-Key` on a release),
//! so a client can neither forge nor remove them.
//!
//! The published classes: CVE-2023-27487 (Envoy: a client could send
//! `x-envoy-original-path`, an internal header the upstream trusted); the hop-by-hop deletion
//! trick (Nathan Davison, "Abusing HTTP hop-by-hop request headers", 2019: `Connection:
//! X-Forwarded-For` made proxies strip the header that carried the client's identity); h2c
//! upgrade smuggling through proxies that forward `Upgrade` (Bishop Fox, 2020); `Host` and
//! `X-Forwarded-Host` poisoning; CVE-2019-9900 (Envoy: NUL bytes in header values); and
//! identity-header spoofing with an underscore twin (`X_Verified_User`), which CGI, WSGI and
//! Rack all map to the same `HTTP_X_VERIFIED_USER` as the dashed name.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

use crate::helpers::{
    build_attack, exchange, json as json_attack, run_table, Attack, Expect, Gate, Row, Seen, OMIT,
    READ_ONLY, VERIFIED_USER, WITHDRAW,
};

use Expect::{Held, Passed, Refused, Rejected};

const ACCOUNT: &str = "/api/v1/account";
const KEY: &str = "/api/v1/api-keys/k1";

const fn get(headers: &'static [(&'static str, &'static str)]) -> Attack {
    Attack::Http {
        method: "GET",
        target: ACCOUNT,
        headers,
        body: b"",
    }
}

/// A protected route's request that the rules let through (it only tightens).
const fn tighten(headers: &'static [(&'static str, &'static str)]) -> Attack {
    Attack::Http {
        method: "PUT",
        target: KEY,
        headers,
        body: READ_ONLY,
    }
}

/// A protected change the rules hold.
const fn loosen(headers: &'static [(&'static str, &'static str)]) -> Attack {
    Attack::Http {
        method: "PUT",
        target: KEY,
        headers,
        body: WITHDRAW,
    }
}

pub static ROWS: &[Row] = &[
    // --- The gate's namespace (CVE-2023-27487 class): never forwarded, whatever the case.
    Row {
        name: "Stepgate-* headers on an unprotected route",
        attack: get(&[
            ("Stepgate-Verified", "yes"),
            ("STEPGATE-USER", "admin"),
            ("stepgate-internal", "1"),
        ]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Absent("stepgate-verified"),
                Seen::Absent("stepgate-user"),
                Seen::Absent("stepgate-internal"),
            ],
        },
    },
    Row {
        name: "Stepgate-* headers on a protected pass-through",
        attack: tighten(&[
            ("content-type", "application/json"),
            ("Stepgate-Verified", "yes"),
        ]),
        expect: Passed {
            upstream_path: KEY,
            seen: &[Seen::Absent("stepgate-verified")],
        },
    },
    // `Stepgate-Change` turns a request into a release attempt; it never reaches the
    // exchange, and naming no change of the caller's is a 404.
    Row {
        name: "Stepgate-Change naming no change, unprotected route",
        attack: get(&[("Stepgate-Change", "00000000-0000-4000-8000-000000000000")]),
        expect: Refused(404, "not_found"),
    },
    Row {
        name: "Stepgate-Change that is not an id, protected change",
        attack: loosen(&[
            ("content-type", "application/json"),
            ("stepgate-change", "please"),
        ]),
        expect: Refused(404, "not_found"),
    },
    // --- The verified-user header: only the gate sets it.
    Row {
        name: "client x-verified-user on an unprotected route",
        attack: get(&[(VERIFIED_USER, "admin")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent(VERIFIED_USER)],
        },
    },
    Row {
        name: "two client x-verified-user copies",
        attack: get(&[(VERIFIED_USER, "admin"), ("X-Verified-User", "root")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent(VERIFIED_USER)],
        },
    },
    Row {
        name: "client x-verified-user on a protected pass-through is replaced",
        attack: tighten(&[
            ("content-type", "application/json"),
            (VERIFIED_USER, "admin"),
        ]),
        expect: Passed {
            upstream_path: KEY,
            seen: &[Seen::Is(VERIFIED_USER, "{user}")],
        },
    },
    // The underscore twin: to a CGI/WSGI/Rack exchange `X_Verified_User` *is*
    // `X-Verified-User` (both become HTTP_X_VERIFIED_USER); nginx drops such headers by default
    // (`underscores_in_headers off`) for this reason.
    Row {
        name: "underscore twin x_verified_user",
        attack: get(&[("x_verified_user", "admin")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent("x_verified_user")],
        },
    },
    // --- The identity the gate decides on: exactly one copy.
    Row {
        name: "identity header sent twice on a protected change",
        attack: loosen(&[
            ("content-type", "application/json"),
            ("x-user-id", "victim"),
            ("x-user-id", "attacker"),
        ]),
        expect: Refused(401, "unauthenticated"),
    },
    Row {
        name: "no identity on a protected change",
        attack: loosen(&[("content-type", "application/json"), ("x-user-id", OMIT)]),
        expect: Refused(401, "unauthenticated"),
    },
    // --- Host and X-Forwarded-*: the client's are not used.
    Row {
        name: "client Host is replaced by the exchange's authority",
        attack: get(&[("Host", "evil.example")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Is("host", "{upstream}"),
                Seen::Is("x-forwarded-host", "{public}"),
            ],
        },
    },
    Row {
        name: "two Host headers",
        attack: get(&[("Host", "gate.test"), ("Host", "evil.example")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Is("host", "{upstream}")],
        },
    },
    Row {
        name: "client X-Forwarded-Host and -Proto are overwritten",
        attack: get(&[
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
        ]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Is("x-forwarded-host", "{public}"),
                Seen::Is("x-forwarded-proto", "http"),
            ],
        },
    },
    Row {
        name: "client X-Forwarded-For gets the peer appended",
        attack: get(&[("X-Forwarded-For", "203.0.113.9")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Is("x-forwarded-for", "203.0.113.9, 127.0.0.1")],
        },
    },
    // `Forwarded` (RFC 7239) is the standard spelling of the X-Forwarded-* trio; Spring's
    // ForwardedHeaderFilter reads it, so a client copy could contradict the X-Forwarded-Host
    // and -Proto the gate sets. The gate removes it.
    Row {
        name: "client Forwarded header",
        attack: get(&[("Forwarded", "for=10.0.0.1;host=admin.exchange;proto=https")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent("forwarded")],
        },
    },
    // --- Path-override headers. CVE-2018-14773 (Symfony): `X-Original-URL` and
    // `X-Rewrite-URL` replaced the request path for routing (IIS URL Rewrite sets them), so a
    // proxy rule on the real path was bypassed by a harmless path plus the header. The gate
    // matches on the request line only, so these must not reach the exchange.
    Row {
        name: "X-Original-URL naming the protected route",
        attack: Attack::Http {
            method: "PUT",
            target: ACCOUNT,
            headers: &[
                ("content-type", "application/json"),
                ("X-Original-URL", "/api/v1/api-keys/k1"),
            ],
            body: WITHDRAW,
        },
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent("x-original-url")],
        },
    },
    Row {
        name: "X-Rewrite-URL naming the protected route",
        attack: Attack::Http {
            method: "PUT",
            target: ACCOUNT,
            headers: &[
                ("content-type", "application/json"),
                ("X-Rewrite-URL", "/api/v1/api-keys/k1"),
            ],
            body: WITHDRAW,
        },
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent("x-rewrite-url")],
        },
    },
    // --- Connection-named deletion (Davison 2019): the gate's own headers survive.
    Row {
        name: "Connection: X-Forwarded-For, X-Forwarded-Host, Host",
        attack: get(&[
            ("X-Forwarded-For", "203.0.113.9"),
            ("Connection", "X-Forwarded-For, X-Forwarded-Host, Host"),
        ]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Is("x-forwarded-for", "127.0.0.1"),
                Seen::Is("x-forwarded-host", "{public}"),
                Seen::Is("x-forwarded-proto", "http"),
                Seen::Is("host", "{upstream}"),
                Seen::Absent("connection"),
            ],
        },
    },
    Row {
        name: "Connection naming a custom header removes it",
        attack: get(&[("Connection", "close, x-secret"), ("x-secret", "1")]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[Seen::Absent("x-secret"), Seen::Absent("connection")],
        },
    },
    // On a protected route a Connection list naming headers is refused outright: the gate
    // would otherwise drop, say, the Content-Type it decided on.
    Row {
        name: "Connection: x-verified-user on a protected pass-through",
        attack: tighten(&[
            ("content-type", "application/json"),
            ("Connection", "x-verified-user"),
        ]),
        expect: Refused(400, "bad_request"),
    },
    Row {
        name: "Connection: Content-Type on a protected change",
        attack: loosen(&[
            ("content-type", "application/json"),
            ("Connection", "Content-Type"),
        ]),
        expect: Refused(400, "bad_request"),
    },
    Row {
        name: "Connection: keep-alive on a protected change is fine",
        attack: loosen(&[
            ("content-type", "application/json"),
            ("Connection", "keep-alive"),
        ]),
        expect: Held,
    },
    // --- Hop-by-hop headers stay on the client's connection.
    Row {
        name: "h2c upgrade smuggling",
        attack: get(&[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Absent("upgrade"),
                Seen::Absent("http2-settings"),
                Seen::Absent("connection"),
            ],
        },
    },
    Row {
        name: "proxy and connection-scoped headers",
        attack: get(&[
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic YTpi"),
            ("TE", "trailers"),
            ("Trailer", "x-late"),
        ]),
        expect: Passed {
            upstream_path: ACCOUNT,
            seen: &[
                Seen::Absent("keep-alive"),
                Seen::Absent("proxy-connection"),
                Seen::Absent("proxy-authorization"),
                Seen::Absent("te"),
                Seen::Absent("trailer"),
            ],
        },
    },
    // --- Malformed header lines are refused by hyper before the gate reads them: an obs-fold
    // continuation (RFC 9112 §5.2), whitespace before the colon (RFC 9112 §5.1, a classic
    // smuggling vector) and NUL in a value (CVE-2019-9900).
    Row {
        name: "obs-fold continuation of the identity header",
        attack: Attack::Raw(
            b"PUT /api/v1/api-keys/k1 HTTP/1.1\r\nHost: gate.test\r\n\
              x-user-id: headers-raw-1\r\n attacker\r\ncontent-type: application/json\r\n\
              content-length: 35\r\n\r\n{\"permissions\":[\"read\",\"withdraw\"]}",
        ),
        expect: Rejected(400),
    },
    Row {
        name: "whitespace before the colon",
        attack: Attack::Raw(
            b"GET /api/v1/account HTTP/1.1\r\nHost: gate.test\r\nX-Verified-User : admin\r\n\r\n",
        ),
        expect: Rejected(400),
    },
    Row {
        name: "NUL in a header value",
        attack: Attack::Raw(
            b"GET /api/v1/account HTTP/1.1\r\nHost: gate.test\r\nX-Note: a\x00b\r\n\r\n",
        ),
        expect: Rejected(400),
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_attacks() {
    let gate = Gate::start().await;
    run_table(&gate, "headers", ROWS).await;
}

// ---------------------------------------------------------------------------------------------
// A release: the one request the gate forwards with headers of its own choosing.

/// A reqwest client with a cookie jar, for the gate's own API (one gate session).
fn session_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build a reqwest client")
}

async fn gate_api(
    client: &reqwest::Client,
    gate: &Gate,
    user: &str,
    path: &str,
    body: Value,
) -> Value {
    let response = client
        .post(gate.url(path))
        .header("x-user-id", user)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status();
    let text = response.text().await.expect("read the gate's answer");
    assert!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"))
}

/// A client that sends its own `Idempotency-Key` and `Stepgate-*` headers on a release gets
/// neither through: the exchange sees the change id as the key (so its de-duplication keys on
/// what the gate approved, not on what the client chose) and none of the gate's namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_carries_the_gates_idempotency_key_not_the_clients() {
    let gate = Gate::start().await;
    let user = "headers-release";
    let origin = Url::parse(&gate.origin).expect("the public origin is a URL");
    let passkey = Arc::new(Mutex::new(SoftPasskey::new(true)));
    let client = session_client();

    // Register the user's (first) passkey.
    let start = gate_api(
        &client,
        &gate,
        user,
        "/_stepgate/api/passkeys/register/start",
        json!({}),
    )
    .await;
    let options: CreationChallengeResponse =
        serde_json::from_value(start.clone()).expect("creation options");
    let credential = passkey
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .do_registration(origin.clone(), options)
        .expect("the soft passkey registers");
    gate_api(
        &client,
        &gate,
        user,
        "/_stepgate/api/passkeys/register/finish",
        json!({"ceremony_id": start["ceremony_id"], "credential": credential, "name": "key"}),
    )
    .await;

    // Hold the change.
    let change = json_attack("PUT", KEY, WITHDRAW);
    let (bytes, _) = build_attack(&change, user);
    let held = exchange(gate.addr, &bytes, false)
        .await
        .expect("send the change");
    held.expect_error(403, "step_up_required")
        .expect("the change is held");
    let change_id = held.json().expect("JSON")["change_id"]
        .as_str()
        .expect("a change id")
        .to_string();

    // Confirm it with the passkey.
    let confirm = format!("/_stepgate/api/changes/{change_id}/confirm");
    let start = gate_api(&client, &gate, user, &format!("{confirm}/start"), json!({})).await;
    let options: RequestChallengeResponse =
        serde_json::from_value(start.clone()).expect("request options");
    let assertion = passkey
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .do_authentication(origin, options)
        .expect("the soft passkey signs");
    let confirmed = gate_api(
        &client,
        &gate,
        user,
        &format!("{confirm}/finish"),
        json!({"ceremony_id": start["ceremony_id"], "credential": assertion}),
    )
    .await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    // Past the cooling-off (and the first passkey's quarantine), release it with headers of
    // the client's choosing.
    gate.clock.advance(Duration::from_secs(48 * 3600));
    gate.clear();
    static RELEASE_HEADERS: [(&str, &str); 4] = [
        ("content-type", "application/json"),
        ("Idempotency-Key", "chosen-by-the-client"),
        ("Stepgate-Debug", "1"),
        (VERIFIED_USER, "admin"),
    ];
    let release = Attack::Http {
        method: "PUT",
        target: KEY,
        headers: &RELEASE_HEADERS,
        body: WITHDRAW,
    };
    let (mut bytes, _) = build_attack(&release, user);
    // The release names the change; insert the header right after the request line.
    let at = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a request line")
        + 2;
    let header = format!("Stepgate-Change: {change_id}\r\n");
    bytes.splice(at..at, header.into_bytes());
    let released = exchange(gate.addr, &bytes, false)
        .await
        .expect("send the release");
    assert_eq!(released.status, 200, "the release is forwarded: {released}");

    let received = gate.received();
    let [forwarded] = received.as_slice() else {
        panic!(
            "the exchange must see the release once, saw {}",
            received.len()
        );
    };
    assert_eq!(forwarded.values("idempotency-key"), [change_id]);
    assert_eq!(forwarded.values(VERIFIED_USER), [user.to_string()]);
    for name in ["stepgate-change", "stepgate-debug"] {
        assert!(
            forwarded.values(name).is_empty(),
            "`{name}` must not reach the exchange"
        );
    }
    assert_eq!(forwarded.body.as_ref(), WITHDRAW);
}
