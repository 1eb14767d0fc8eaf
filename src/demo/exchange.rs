//! The pretend exchange behind `stepgate demo`: a login page, an API-keys page and a small JSON
//! API for API keys, all in memory. It knows nothing about stepgate; like a real exchange it
//! issues its own session JWT and honours `Idempotency-Key`, which is all the gate relies on.
//! The browser reaches it only through the gate, so every request here has passed the gate's
//! rules first.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::clock::Clock;

/// The exchange's session cookie; the gate's `[identity]` reads the same cookie.
pub const SESSION_COOKIE: &str = "demo_session";

/// How long a demo login lasts.
const SESSION_LIFETIME: time::Duration = time::Duration::hours(12);

/// The permissions a key can have, in the order the page shows them.
pub const PERMISSIONS: [&str; 3] = ["read", "trade", "withdraw"];

/// Keeps one browser from growing the in-memory state without bound.
const MAX_KEYS_PER_USER: usize = 20;
const MAX_LABEL_CHARS: usize = 40;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Request bodies here are a few dozen bytes; nothing bigger is worth buffering.
const MAX_BODY_BYTES: usize = 16 * 1024;

const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                        frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const EXCHANGE_JS: &str = include_str!("assets/exchange.js");
const EXCHANGE_CSS: &str = include_str!("assets/exchange.css");

/// One API key as the JSON API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub label: String,
    pub permissions: Vec<String>,
}

/// The exchange's state, shared by all requests.
#[derive(Clone)]
struct Exchange {
    shared: Arc<Shared>,
}

struct Shared {
    secret: Vec<u8>,
    clock: Arc<dyn Clock>,
    // Keys and recorded replies sit behind one lock so "look up the Idempotency-Key, apply,
    // record the reply" is a single step: two concurrent retries cannot both apply.
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    keys: HashMap<String, Vec<ApiKey>>,
    /// (user, Idempotency-Key) → what was asked and what was answered.
    replies: HashMap<(String, String), Recorded>,
}

struct Recorded {
    /// Method, path and body of the first request, so a reused key with a different request
    /// is refused instead of silently answered with someone else's reply.
    fingerprint: Vec<u8>,
    reply: Reply,
}

/// A JSON answer of the API, kept as data so it can be recorded and replayed.
#[derive(Debug, Clone)]
struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn ok(status: StatusCode, body: Value) -> Self {
        Self { status, body }
    }

    fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": code, "message": message.into() }),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The demo exchange's routes. `secret` signs and verifies its session JWTs (HS256) and must
/// be the secret the gate is configured with, so both agree on who the user is.
pub fn router(secret: &str, clock: Arc<dyn Clock>) -> Router {
    let exchange = Exchange {
        shared: Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            clock,
            ledger: Mutex::new(Ledger::default()),
        }),
    };
    Router::new()
        .route("/", get(home))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/demo-assets/exchange.js", get(script))
        .route("/demo-assets/exchange.css", get(stylesheet))
        .route("/api/v1/api-keys", get(list_keys).post(create_key))
        .route("/api/v1/api-keys/{key_id}", put(update_key))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(exchange)
}

#[derive(Debug, Serialize, Deserialize)]
struct SessionClaims {
    sub: String,
    iat: i64,
    exp: i64,
}

/// Signs a session for `user`, as the exchange's login does.
pub fn issue_session(
    secret: &[u8],
    user: &str,
    now: OffsetDateTime,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = SessionClaims {
        sub: user.to_string(),
        iat: now.unix_timestamp(),
        exp: (now + SESSION_LIFETIME).unix_timestamp(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// The user a session token names, if it is ours and unexpired at `now`.
pub fn verify_session(secret: &[u8], token: &str, now: OffsetDateTime) -> Option<String> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked against the injected clock below, not the library's wall clock.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<SessionClaims>(
        token,
        &DecodingKey::from_secret(secret),
        &validation,
    )
    .ok()?;
    let claims = data.claims;
    (claims.exp > now.unix_timestamp() && valid_name(&claims.sub)).then_some(claims.sub)
}

/// Login names are short and plain so they are safe in URLs, logs and the gate's user ids.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

impl Exchange {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding the lock leaves plain data behind, still usable for a demo.
        self.shared
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> OffsetDateTime {
        self.shared.clock.now()
    }

    /// The logged-in user, from the session cookie.
    fn session_user(&self, headers: &HeaderMap) -> Option<String> {
        let now = self.now();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == SESSION_COOKIE)
            .find_map(|(_, token)| verify_session(&self.shared.secret, token, now))
    }

    /// The user's keys, seeding a new account on first sight.
    fn keys_of(&self, user: &str) -> Vec<ApiKey> {
        self.ledger()
            .keys
            .entry(user.to_string())
            .or_insert_with(seed_keys)
            .clone()
    }

    /// Runs `apply` on the user's keys at most once per Idempotency-Key: a repeated key with
    /// the same request gets the recorded reply back and changes nothing.
    fn apply_once(
        &self,
        user: &str,
        idempotency_key: Option<String>,
        fingerprint: Vec<u8>,
        apply: impl FnOnce(&mut Vec<ApiKey>) -> Reply,
    ) -> Response {
        let mut ledger = self.ledger();
        if let Some(key) = &idempotency_key {
            if let Some(recorded) = ledger.replies.get(&(user.to_string(), key.clone())) {
                if recorded.fingerprint != fingerprint {
                    return Reply::error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was already used for a different request",
                    )
                    .into_response();
                }
                let mut response = recorded.reply.clone().into_response();
                response.headers_mut().insert(
                    HeaderName::from_static("idempotent-replayed"),
                    HeaderValue::from_static("true"),
                );
                return response;
            }
        }
        let keys = ledger
            .keys
            .entry(user.to_string())
            .or_insert_with(seed_keys);
        let reply = apply(keys);
        if let Some(key) = idempotency_key {
            ledger.replies.insert(
                (user.to_string(), key),
                Recorded {
                    fingerprint,
                    reply: reply.clone(),
                },
            );
        }
        reply.into_response()
    }
}

fn new_key_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..12)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect();
    format!("key_{suffix}")
}

/// A new account starts with one trading key and one read-only key, neither able to withdraw:
/// the walkthrough is about what it takes to add that.
fn seed_keys() -> Vec<ApiKey> {
    vec![
        ApiKey {
            id: new_key_id(),
            label: "trading-bot".into(),
            permissions: vec!["read".into(), "trade".into()],
        },
        ApiKey {
            id: new_key_id(),
            label: "tax-export".into(),
            permissions: vec!["read".into()],
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Pages.

fn html_page(status: StatusCode, title: &str, body_attrs: &str, content: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · Demo Exchange</title>\n\
         <link rel=\"stylesheet\" href=\"/demo-assets/exchange.css\">\n\
         <script src=\"/demo-assets/exchange.js\" defer></script>\n</head>\n\
         <body{body_attrs}>\n{content}\n</body>\n</html>\n",
        title = html_escape(title),
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response()
}

const DEMO_BANNER: &str = "<p class=\"banner\">This is a pretend exchange for the stepgate demo. \
                           Nothing here is real money.</p>";

fn login_page(status: StatusCode, problem: Option<&str>) -> Response {
    let problem = problem
        .map(|text| {
            format!(
                "<p class=\"error\" role=\"alert\">{}</p>",
                html_escape(text)
            )
        })
        .unwrap_or_default();
    let content = format!(
        "{DEMO_BANNER}\n<main class=\"narrow\">\n<h1>Log in to Demo Exchange</h1>\n{problem}\n\
         <form method=\"post\" action=\"/login\" class=\"card\">\n\
         <label for=\"name\">Your name</label>\n\
         <input id=\"name\" name=\"name\" required maxlength=\"32\" pattern=\"[A-Za-z0-9_\\-]{{1,32}}\" \
         autocomplete=\"username\" autofocus>\n\
         <p class=\"hint\">Any name works (letters, digits, _ and -); there is no password. \
         Your passkeys at the gate belong to this name.</p>\n\
         <button type=\"submit\">Log in</button>\n</form>\n</main>"
    );
    html_page(status, "Log in", "", &content)
}

fn key_row(key: &ApiKey) -> String {
    let mut cells = String::new();
    for permission in PERMISSIONS {
        let checked = if key.permissions.iter().any(|p| p == permission) {
            " checked"
        } else {
            ""
        };
        // Writing into a String cannot fail.
        let _ = write!(
            cells,
            "<td class=\"perm\"><label><input type=\"checkbox\" value=\"{permission}\"{checked}> \
             {permission}</label></td>"
        );
    }
    format!(
        "<tr data-key-id=\"{id}\" data-label=\"{label}\"><td class=\"key-name\">\
         <span class=\"label\">{label}</span> <code>{id}</code></td>{cells}\
         <td class=\"actions\"><button type=\"button\" class=\"save\">Save</button></td></tr>",
        id = html_escape(&key.id),
        label = html_escape(&key.label),
    )
}

fn keys_page(user: &str, keys: &[ApiKey]) -> Response {
    let name = html_escape(user);
    let rows: String = keys.iter().map(key_row).collect();
    let content = format!(
        "{DEMO_BANNER}\n\
<header class=\"top\"><span class=\"brand\">Demo Exchange</span>\n<nav>\
<a href=\"/_stepgate/passkeys\">Your passkeys</a>\
<a href=\"/_stepgate/changes\">Pending changes</a>\
<form method=\"post\" action=\"/logout\"><button type=\"submit\" class=\"link\">Log out</button></form>\
</nav></header>\n\
<main>\n<h1>API keys</h1>\n\
<p class=\"lead\">Signed in as <strong>{name}</strong>. Taking a permission away is instant; \
giving a key the <em>withdraw</em> permission is held by stepgate until you confirm it with \
your passkey and a cooling-off period has passed.</p>\n\
<section id=\"step-up\" class=\"panel\" hidden aria-live=\"polite\">\n\
<h2>Change held for confirmation</h2>\n\
<p class=\"summary\" id=\"step-up-summary\"></p>\n\
<p>This change is held by stepgate. Confirm it with your passkey:</p>\n\
<p><a id=\"step-up-link\" class=\"button\" target=\"_blank\" rel=\"noopener\">Confirm with your passkey</a></p>\n\
<p class=\"hint\" id=\"step-up-timing\"></p>\n\
<p class=\"warning\">No support agent will ever ask you to do this. If someone is on the phone \
telling you to, hang up and cancel it under <a href=\"/_stepgate/changes\">Pending changes</a>.</p>\n\
<div class=\"row\"><button type=\"button\" id=\"step-up-finish\">Finish the change</button>\
<button type=\"button\" id=\"step-up-forget\" class=\"secondary\">Forget it</button></div>\n\
<p id=\"step-up-result\" class=\"result\" role=\"status\"></p>\n\
</section>\n\
<p id=\"status\" class=\"status\" role=\"status\" aria-live=\"polite\"></p>\n\
<table class=\"keys\">\n<thead><tr><th>Key</th><th>Read</th><th>Trade</th><th>Withdraw</th><th></th></tr></thead>\n\
<tbody id=\"key-rows\">{rows}</tbody>\n</table>\n\
<form id=\"create-key\" class=\"create card\">\n\
<label for=\"new-label\">New key label</label>\n\
<div class=\"row\"><input id=\"new-label\" name=\"label\" required maxlength=\"{MAX_LABEL_CHARS}\" \
placeholder=\"e.g. portfolio-app\"><button type=\"submit\">Create API key</button></div>\n\
</form>\n\
<section class=\"help card\">\n<h2>Try the gate</h2>\n<ol>\n\
<li>Register a passkey under <a href=\"/_stepgate/passkeys\">Your passkeys</a>.</li>\n\
<li>Tick <em>withdraw</em> on a key and press Save: stepgate holds the change.</li>\n\
<li>Confirm it on the gate's page with your passkey.</li>\n\
<li>Wait out the cooling-off (you could cancel it under <a href=\"/_stepgate/changes\">Pending changes</a>).</li>\n\
<li>Press <em>Finish the change</em>.</li>\n</ol>\n</section>\n</main>"
    );
    html_page(
        StatusCode::OK,
        "API keys",
        &format!(" data-user=\"{name}\""),
        &content,
    )
}

async fn home(State(exchange): State<Exchange>, headers: HeaderMap) -> Response {
    match exchange.session_user(&headers) {
        None => login_page(StatusCode::OK, None),
        Some(user) => {
            let keys = exchange.keys_of(&user);
            keys_page(&user, &keys)
        }
    }
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    name: String,
}

async fn login(
    State(exchange): State<Exchange>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let bad_name = || {
        login_page(
            StatusCode::BAD_REQUEST,
            Some("Please use 1 to 32 letters, digits, _ or -."),
        )
    };
    let Ok(Form(LoginForm { name })) = form else {
        return bad_name();
    };
    let name = name.trim();
    if !valid_name(name) {
        return bad_name();
    }
    let token = match issue_session(&exchange.shared.secret, name, exchange.now()) {
        Ok(token) => token,
        Err(error) => {
            tracing::error!(%error, "demo exchange: cannot sign a session");
            return login_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("Could not log you in; see the terminal running stepgate demo."),
            );
        }
    };
    // Seed now so the first page already shows the account's keys.
    exchange.keys_of(name);
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", EXCHANGE_JS)
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", EXCHANGE_CSS)
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The secret and keys change every run anyway; never let a stale script linger.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
        .into_response()
}

async fn not_found() -> Response {
    Reply::error(StatusCode::NOT_FOUND, "not_found", "no such page").into_response()
}

// ---------------------------------------------------------------------------------------------
// JSON API.

fn unauthorized() -> Response {
    Reply::error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "log in first: the demo_session cookie is missing, invalid or expired",
    )
    .into_response()
}

/// Refuses bodies that are not declared JSON: besides being honest, it keeps plain HTML forms
/// on other sites from posting here (they cannot send `application/json`).
fn require_json(headers: &HeaderMap) -> Result<(), Reply> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(Reply::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        ))
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Reply> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let bad = |why: &str| Reply::error(StatusCode::BAD_REQUEST, "invalid_idempotency_key", why);
    if values.next().is_some() {
        return Err(bad("send Idempotency-Key once"));
    }
    match first.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_CHARS => {
            Ok(Some(key.to_string()))
        }
        _ => Err(bad(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

fn fingerprint(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(method.len() + path.len() + body.len() + 2);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn bad_json(error: &serde_json::Error) -> Response {
    Reply::error(
        StatusCode::BAD_REQUEST,
        "invalid_body",
        format!("the body is not what this endpoint expects: {error}"),
    )
    .into_response()
}

async fn list_keys(State(exchange): State<Exchange>, headers: HeaderMap) -> Response {
    let Some(user) = exchange.session_user(&headers) else {
        return unauthorized();
    };
    let keys = exchange.keys_of(&user);
    Reply::ok(StatusCode::OK, json!({ "keys": keys })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    label: String,
}

async fn create_key(State(exchange): State<Exchange>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(user) = exchange.session_user(&headers) else {
        return unauthorized();
    };
    if let Err(reply) = require_json(&headers) {
        return reply.into_response();
    }
    let idempotency_key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(reply) => return reply.into_response(),
    };
    let request: CreateKey = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_json(&error),
    };
    let label = request.label.trim().to_string();
    if label.is_empty()
        || label.chars().count() > MAX_LABEL_CHARS
        || label.chars().any(char::is_control)
    {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_label",
            format!("a label is 1 to {MAX_LABEL_CHARS} characters without control characters"),
        )
        .into_response();
    }
    let fingerprint = fingerprint("POST", "/api/v1/api-keys", &body);
    exchange.apply_once(&user, idempotency_key, fingerprint, move |keys| {
        if keys.len() >= MAX_KEYS_PER_USER {
            return Reply::error(
                StatusCode::CONFLICT,
                "too_many_keys",
                format!("the demo allows {MAX_KEYS_PER_USER} keys per user"),
            );
        }
        let key = ApiKey {
            id: new_key_id(),
            label,
            permissions: vec!["read".into()],
        };
        keys.push(key.clone());
        Reply::ok(StatusCode::CREATED, json!(key))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    permissions: Vec<String>,
}

async fn update_key(
    State(exchange): State<Exchange>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(user) = exchange.session_user(&headers) else {
        return unauthorized();
    };
    if let Err(reply) = require_json(&headers) {
        return reply.into_response();
    }
    let idempotency_key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(reply) => return reply.into_response(),
    };
    let request: UpdateKey = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_json(&error),
    };
    if let Some(unknown) = request
        .permissions
        .iter()
        .find(|p| !PERMISSIONS.contains(&p.as_str()))
    {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_permission",
            format!(
                "unknown permission `{unknown}`; allowed: {}",
                PERMISSIONS.join(", ")
            ),
        )
        .into_response();
    }
    // One canonical order, duplicates dropped: the stored key reads the same however the
    // client listed its permissions.
    let permissions: Vec<String> = PERMISSIONS
        .iter()
        .filter(|p| request.permissions.iter().any(|r| r == *p))
        .map(|p| p.to_string())
        .collect();
    let fingerprint = fingerprint("PUT", &format!("/api/v1/api-keys/{key_id}"), &body);
    exchange.apply_once(&user, idempotency_key, fingerprint, move |keys| match keys
        .iter_mut()
        .find(|key| key.id == key_id)
    {
        None => Reply::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("you have no API key {key_id}"),
        ),
        Some(key) => {
            key.permissions = permissions;
            Reply::ok(StatusCode::OK, json!(key))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

    fn app() -> (Router, ManualClock) {
        let clock = ManualClock::starting_now();
        (router(SECRET, Arc::new(clock.clone())), clock)
    }

    async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body.to_vec())
    }

    async fn log_in(app: &Router, name: &str) -> String {
        let request = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("name={name}")))
            .unwrap();
        let (status, headers, _) = send(app, request).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = headers[header::SET_COOKIE].to_str().unwrap();
        cookie.split(';').next().unwrap().to_string()
    }

    fn json_request(method: &str, uri: &str, cookie: &str, body: &str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::COOKIE, cookie)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn list(app: &Router, cookie: &str) -> Vec<ApiKey> {
        let request = Request::get("/api/v1/api-keys")
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(app, request).await;
        assert_eq!(status, StatusCode::OK);
        let value: Value = serde_json::from_slice(&body).unwrap();
        serde_json::from_value(value["keys"].clone()).unwrap()
    }

    #[tokio::test]
    async fn login_sets_a_session_cookie_that_decodes_to_the_name() {
        let (app, clock) = app();
        let request = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("name=alice"))
            .unwrap();
        let (status, headers, _) = send(&app, request).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "/");
        let cookie = headers[header::SET_COOKIE].to_str().unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
        assert!(cookie.contains("Path=/"));
        let token = cookie
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("demo_session=")
            .unwrap();
        assert_eq!(
            verify_session(SECRET.as_bytes(), token, clock.now()).as_deref(),
            Some("alice")
        );
        // The standard claims the gate's JWT identity checks are there too.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        let decoded = jsonwebtoken::decode::<Value>(
            token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims["sub"], "alice");
        // Twelve hours later the session is over.
        clock.advance(std::time::Duration::from_secs(12 * 3600 + 1));
        assert_eq!(verify_session(SECRET.as_bytes(), token, clock.now()), None);
    }

    #[tokio::test]
    async fn login_refuses_names_outside_the_allowed_characters() {
        let (app, _) = app();
        for body in ["name=", "name=a%20b", "name=%3Cscript%3E", "nothing=1"] {
            let request = Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap();
            let (status, headers, _) = send(&app, request).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert!(headers.get(header::SET_COOKIE).is_none());
        }
        let long = format!("name={}", "a".repeat(33));
        let request = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(long))
            .unwrap();
        assert_eq!(send(&app, request).await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_session_signed_with_another_secret_is_not_accepted() {
        let (app, clock) = app();
        let forged =
            issue_session(b"some-other-secret-some-other-secret", "alice", clock.now()).unwrap();
        let request = Request::get("/api/v1/api-keys")
            .header(header::COOKIE, format!("demo_session={forged}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, request).await.0, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn the_api_answers_401_json_without_a_session() {
        let (app, _) = app();
        let requests = [
            Request::get("/api/v1/api-keys")
                .body(Body::empty())
                .unwrap(),
            Request::post("/api/v1/api-keys")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"label":"x"}"#))
                .unwrap(),
            Request::put("/api/v1/api-keys/key_x")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"permissions":["read"]}"#))
                .unwrap(),
        ];
        for request in requests {
            let (status, headers, body) = send(&app, request).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json"));
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["error"], "unauthorized");
        }
    }

    #[tokio::test]
    async fn a_new_user_gets_two_keys_without_withdraw() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let keys = list(&app, &cookie).await;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].label, "trading-bot");
        assert_eq!(keys[0].permissions, ["read", "trade"]);
        assert_eq!(keys[1].label, "tax-export");
        assert_eq!(keys[1].permissions, ["read"]);
        // Another user has their own keys.
        let other = log_in(&app, "carol").await;
        assert!(list(&app, &other).await.iter().all(|k| !keys.contains(k)));
    }

    #[tokio::test]
    async fn an_unknown_permission_is_refused_with_400() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let id = list(&app, &cookie).await[0].id.clone();
        let uri = format!("/api/v1/api-keys/{id}");
        let request = json_request("PUT", &uri, &cookie, r#"{"permissions":["read","admin"]}"#);
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["error"], "invalid_permission");
        for bad in [r#"{"permissions":"read"}"#, "not json", r#"{"perms":[]}"#] {
            let (status, _, _) = send(&app, json_request("PUT", &uri, &cookie, bad)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(list(&app, &cookie).await[0].permissions, ["read", "trade"]);
    }

    #[tokio::test]
    async fn put_updates_permissions_in_canonical_order() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let id = list(&app, &cookie).await[1].id.clone();
        let request = json_request(
            "PUT",
            &format!("/api/v1/api-keys/{id}"),
            &cookie,
            r#"{"permissions":["withdraw","read","withdraw"]}"#,
        );
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::OK);
        let key: ApiKey = serde_json::from_slice(&body).unwrap();
        assert_eq!(key.permissions, ["read", "withdraw"]);
        assert_eq!(
            list(&app, &cookie).await[1].permissions,
            ["read", "withdraw"]
        );

        let missing = json_request(
            "PUT",
            "/api/v1/api-keys/key_nope",
            &cookie,
            r#"{"permissions":[]}"#,
        );
        assert_eq!(send(&app, missing).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_is_applied_once() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let id = list(&app, &cookie).await[0].id.clone();
        let uri = format!("/api/v1/api-keys/{id}");
        let enable = r#"{"permissions":["read","trade","withdraw"]}"#;
        let with_key = |body: &str| {
            let mut request = json_request("PUT", &uri, &cookie, body);
            request
                .headers_mut()
                .insert("idempotency-key", HeaderValue::from_static("change-1"));
            request
        };

        let (status, _, first) = send(&app, with_key(enable)).await;
        assert_eq!(status, StatusCode::OK);
        // The user tightens the key in between...
        let tighten = json_request("PUT", &uri, &cookie, r#"{"permissions":["read"]}"#);
        assert_eq!(send(&app, tighten).await.0, StatusCode::OK);
        // ...and a retry of the first request must not loosen it again.
        let (status, headers, replayed) = send(&app, with_key(enable)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(replayed, first);
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(list(&app, &cookie).await[0].permissions, ["read"]);

        // The same key with a different request is refused, not answered with the old reply.
        let (status, _, _) = send(&app, with_key(r#"{"permissions":["trade"]}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(list(&app, &cookie).await[0].permissions, ["read"]);
    }

    #[tokio::test]
    async fn creating_a_key_with_an_idempotency_key_creates_one() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let create = || {
            let mut request = json_request(
                "POST",
                "/api/v1/api-keys",
                &cookie,
                r#"{"label":"portfolio"}"#,
            );
            request
                .headers_mut()
                .insert("idempotency-key", HeaderValue::from_static("create-1"));
            request
        };
        let (status, _, first) = send(&app, create()).await;
        assert_eq!(status, StatusCode::CREATED);
        let key: ApiKey = serde_json::from_slice(&first).unwrap();
        assert_eq!(key.label, "portfolio");
        assert_eq!(key.permissions, ["read"]);
        let (status, _, again) = send(&app, create()).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(again, first);
        assert_eq!(list(&app, &cookie).await.len(), 3);
    }

    #[tokio::test]
    async fn json_endpoints_require_a_json_content_type() {
        let (app, _) = app();
        let cookie = log_in(&app, "bob").await;
        let request = Request::post("/api/v1/api-keys")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"label":"x"}"#))
            .unwrap();
        assert_eq!(
            send(&app, request).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(list(&app, &cookie).await.len(), 2);
    }

    #[tokio::test]
    async fn pages_escape_user_text_and_load_no_inline_script() {
        let (app, _) = app();
        let request = Request::get("/").body(Body::empty()).unwrap();
        let (status, headers, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8(body).unwrap().contains("Your name"));
        assert!(headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));

        let cookie = log_in(&app, "bob").await;
        let create = json_request(
            "POST",
            "/api/v1/api-keys",
            &cookie,
            r#"{"label":"<script>alert(1)</script>"}"#,
        );
        assert_eq!(send(&app, create).await.0, StatusCode::CREATED);
        let request = Request::get("/")
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::OK);
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("/_stepgate/passkeys") && html.contains("/_stepgate/changes"));
        // Every script tag loads a file; none carries code.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/demo-assets/exchange.js\" defer></script>"));
        assert!(!html.contains("style="));

        for path in ["/demo-assets/exchange.js", "/demo-assets/exchange.css"] {
            let request = Request::get(path).body(Body::empty()).unwrap();
            assert_eq!(send(&app, request).await.0, StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn logout_clears_the_cookie() {
        let (app, _) = app();
        let request = Request::post("/logout").body(Body::empty()).unwrap();
        let (status, headers, _) = send(&app, request).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = headers[header::SET_COOKIE].to_str().unwrap();
        assert!(cookie.starts_with("demo_session=;") && cookie.contains("Max-Age=0"));
    }

    #[test]
    fn html_escape_covers_the_special_characters() {
        assert_eq!(
            html_escape(r#"<a href="x" title='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
