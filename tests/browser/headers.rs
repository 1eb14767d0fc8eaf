//! The page-security rules the browser relies on, checked on the wire (these need no
//! browser and always run): every gate page and API answer carries the CSP (no inline script
//! or style, `frame-ancestors 'none'`), `X-Frame-Options: DENY`, `Cache-Control: no-store` and
//! `Referrer-Policy: no-referrer`; the session cookie is `SameSite=Strict` and `HttpOnly`, and
//! `Secure` exactly when `public_url` is https; every state-changing gate call is refused with
//! `403 cross_origin` when its `Origin` or `Sec-Fetch-Site` says another site sent it.

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use stepgate::clock::ManualClock;
use stepgate::config::Config;
use stepgate::server::Server;
use tokio::net::TcpListener;

/// A gate that takes the user from an `x-user-id` header (as behind an exchange's edge).
struct HeaderGate {
    /// Where the test connects.
    base: String,
    /// `public_url` as an origin.
    origin: String,
    client: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl HeaderGate {
    async fn start(scheme: &str) -> HeaderGate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let origin = format!("{scheme}://localhost:{}", addr.port());
        let text = format!(
            r#"listen = "{addr}"
public_url = "{origin}"
upstream = "http://127.0.0.1:9"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Header test"

[identity]
mode = "header"
header = "x-user-id"

[notifications]
signing_secret = "headers-test-signing-secret-0123456789abcdef"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#
        );
        let config = Config::from_toml_str(&text, "headers test config", &[])
            .unwrap_or_else(|e| panic!("invalid test config: {e}\n{text}"));
        let server = Server::bind(config, Arc::new(ManualClock::starting_now()), listener)
            .await
            .expect("the gate starts");
        let task = tokio::spawn(async move {
            let _ = server.run().await;
        });
        HeaderGate {
            base: format!("http://{addr}"),
            origin,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("build a client"),
            _task: task,
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .header("x-user-id", "alice")
    }

    /// Holds a change for alice; returns its id.
    async fn hold(&self) -> String {
        let answer = self
            .request(Method::PUT, "/api/v1/api-keys/k1")
            .header("content-type", "application/json")
            .body(r#"{"permissions":["read","withdraw"]}"#)
            .send()
            .await
            .expect("send the held request");
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
        let body: Value = answer.json().await.expect("JSON");
        body["change_id"].as_str().expect("a change id").to_string()
    }

    async fn change_state(&self, id: &str) -> String {
        let change: Value = self
            .request(Method::GET, &format!("/_stepgate/api/changes/{id}"))
            .send()
            .await
            .expect("get the change")
            .json()
            .await
            .expect("JSON");
        change["state"].as_str().expect("a state").to_string()
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The page-security headers on one answer.
fn assert_page_security_headers(response: &reqwest::Response, what: &str) {
    let csp = header(response, "content-security-policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    for required in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ] {
        assert!(
            directives.contains(&required),
            "{what}: the CSP lacks `{required}`: {csp:?}"
        );
    }
    for forbidden in [
        "unsafe-inline",
        "unsafe-eval",
        "unsafe-hashes",
        "*",
        "data:",
        "http:",
    ] {
        assert!(
            !csp.contains(forbidden),
            "{what}: the CSP allows `{forbidden}`: {csp:?}"
        );
    }
    assert_eq!(header(response, "x-frame-options"), "DENY", "{what}");
    assert_eq!(header(response, "cache-control"), "no-store", "{what}");
    assert_eq!(header(response, "referrer-policy"), "no-referrer", "{what}");
    assert_eq!(
        header(response, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
}

#[tokio::test]
async fn every_gate_page_and_api_answer_carries_the_page_security_headers() {
    let gate = HeaderGate::start("http").await;
    let change_id = gate.hold().await;
    let unknown = "00000000-0000-4000-8000-000000000000";

    let mut checked = Vec::new();
    for path in [
        "/_stepgate/passkeys".to_string(),
        "/_stepgate/changes".to_string(),
        format!("/_stepgate/changes/{change_id}"),
        format!("/_stepgate/changes/{unknown}"),
        "/_stepgate/static/stepgate.js".to_string(),
        "/_stepgate/static/stepgate.css".to_string(),
        "/_stepgate/api/changes".to_string(),
        format!("/_stepgate/api/changes/{change_id}"),
        "/_stepgate/api/passkeys".to_string(),
        "/_stepgate/api/account".to_string(),
        format!("/_stepgate/cancel/{change_id}?token=1.forged"),
    ] {
        let response = gate
            .request(Method::GET, &path)
            .header("accept", "text/html")
            .send()
            .await
            .expect("GET a gate route");
        assert_page_security_headers(&response, &format!("GET {path} ({})", response.status()));
        checked.push(response.status());
    }
    // Refusals and errors carry them too: no identity, a cross-site call, a bad ceremony.
    let anonymous = gate
        .client
        .get(format!("{}/_stepgate/changes", gate.base))
        .header("accept", "text/html")
        .send()
        .await
        .expect("GET without identity");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_page_security_headers(&anonymous, "the signed-out page");
    for (path, origin) in [
        (
            format!("/_stepgate/api/changes/{change_id}/cancel"),
            "http://evil.example",
        ),
        (
            "/_stepgate/api/passkeys/register/finish".to_string(),
            gate.origin.as_str(),
        ),
        (
            "/_stepgate/api/passkeys/register/start".to_string(),
            gate.origin.as_str(),
        ),
    ] {
        let response = gate
            .request(Method::POST, &path)
            .header("origin", origin)
            .json(&json!({"ceremony_id": "nope", "credential": {}, "name": "x"}))
            .send()
            .await
            .expect("POST a gate route");
        assert_page_security_headers(&response, &format!("POST {path} ({})", response.status()));
    }
    assert!(
        checked.contains(&StatusCode::OK) && checked.contains(&StatusCode::NOT_FOUND),
        "both pages and errors were checked: {checked:?}"
    );
}

#[tokio::test]
async fn the_session_cookie_is_strict_and_http_only_and_secure_only_behind_https() {
    for (scheme, secure) in [("http", false), ("https", true)] {
        let gate = HeaderGate::start(scheme).await;
        let response = gate
            .request(Method::POST, "/_stepgate/api/passkeys/register/start")
            .header("origin", &gate.origin)
            .send()
            .await
            .expect("start a registration");
        assert_eq!(response.status(), StatusCode::OK);
        let cookie = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("stepgate_session="))
            .unwrap_or_else(|| panic!("{scheme}: a ceremony starts a gate session"))
            .to_string();
        let attributes: Vec<String> = cookie
            .split(';')
            .skip(1)
            .map(|a| a.trim().to_ascii_lowercase())
            .collect();
        for required in ["samesite=strict", "httponly", "path=/_stepgate"] {
            assert!(
                attributes.iter().any(|a| a == required),
                "{scheme}: the session cookie lacks {required}: {cookie}"
            );
        }
        assert_eq!(
            attributes.iter().any(|a| a == "secure"),
            secure,
            "{scheme}: Secure exactly when public_url is https: {cookie}"
        );
    }
}

#[tokio::test]
async fn state_changing_calls_from_another_site_are_refused() {
    let gate = HeaderGate::start("http").await;
    let change_id = gate.hold().await;
    let some_id = "00000000-0000-4000-8000-000000000000";
    let calls = [
        format!("/_stepgate/api/changes/{change_id}/confirm/start"),
        format!("/_stepgate/api/changes/{change_id}/confirm/finish"),
        format!("/_stepgate/api/changes/{change_id}/cancel"),
        "/_stepgate/api/passkeys/register/start".to_string(),
        "/_stepgate/api/passkeys/register/finish".to_string(),
        format!("/_stepgate/api/passkeys/{some_id}/rename"),
        format!("/_stepgate/api/passkeys/{some_id}/remove"),
        "/_stepgate/api/account/freeze".to_string(),
        "/_stepgate/api/account/unfreeze".to_string(),
        format!("/_stepgate/cancel/{change_id}?token=1.forged"),
    ];
    // Each way a browser says "another site sent this".
    let cross_site: [&[(&str, &str)]; 7] = [
        &[("origin", "http://evil.example")],
        &[("origin", "http://127.0.0.1:1")],
        &[("origin", "null")],
        // A sandboxed frame on another site, or a sibling site, posting with an opaque origin.
        &[("origin", "null"), ("sec-fetch-site", "cross-site")],
        &[("origin", "null"), ("sec-fetch-site", "same-site")],
        // Same host, other port: another origin.
        &[("origin", "http://localhost:1")],
        // No Origin at all, but the browser's fetch metadata.
        &[("sec-fetch-site", "cross-site")],
    ];
    for path in &calls {
        for headers in cross_site {
            let mut request = gate
                .request(Method::POST, path)
                .json(&json!({"ceremony_id": "x", "credential": {}, "name": "x"}));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.expect("send a cross-site POST");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(
                status == StatusCode::FORBIDDEN && body["error"] == "cross_origin",
                "POST {path} with {headers:?}: expected 403 cross_origin, got {status} {body}"
            );
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "words come with the refusal: {body}"
            );
        }
    }
    assert_eq!(
        gate.change_state(&change_id).await,
        "held",
        "nothing was cancelled"
    );
    let account: Value = gate
        .request(Method::GET, "/_stepgate/api/account")
        .send()
        .await
        .expect("get the account")
        .json()
        .await
        .expect("JSON");
    assert_eq!(account["frozen"], false, "nothing was frozen: {account}");

    // The same calls from the gate's own pages are not refused as cross-site.
    for (path, site) in [
        (
            format!("/_stepgate/api/changes/{change_id}/confirm/start"),
            "same-origin",
        ),
        (
            "/_stepgate/api/passkeys/register/start".to_string(),
            "same-origin",
        ),
        // A call without Origin and fetch metadata (an API client, not a browser) is allowed.
        ("/_stepgate/api/passkeys/register/start".to_string(), ""),
    ] {
        let mut request = gate.request(Method::POST, &path);
        if !site.is_empty() {
            request = request
                .header("origin", &gate.origin)
                .header("sec-fetch-site", site);
        }
        let response = request.send().await.expect("send a same-origin POST");
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_ne!(
            body["error"], "cross_origin",
            "POST {path} ({site}): {status} {body}"
        );
    }
    let response = gate
        .request(
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/cancel"),
        )
        .header("origin", &gate.origin)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("cancel from the gate's own page");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gate.change_state(&change_id).await, "cancelled");
}
