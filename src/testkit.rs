//! A test kit for exchanges that put stepgate in front of their API: a [`VirtualUser`] who
//! registers a passkey and confirms held changes through the gate's JSON API with a software
//! authenticator, so an exchange's own integration tests can drive the whole step-up without a
//! browser or hardware. Enabled by the cargo feature `testkit` (a dev-dependency feature):
//!
//! ```toml
//! [dev-dependencies]
//! stepgate = { version = "…", features = ["testkit"] }
//! ```
//!
//! The story a test tells with it: the user sends the exchange request through the gate
//! ([`VirtualUser::send`]); the gate answers [`Sent::StepUpRequired`]; the user confirms that
//! change with their passkey ([`VirtualUser::confirm`]); after the cooling-off the identical
//! request goes again with `Stepgate-Change` ([`VirtualUser::release`]) and reaches the
//! exchange once. `docs/testkit.md` has a complete example test.
//!
//! The authenticator is `webauthn-authenticator-rs`'s `SoftPasskey`: it claims user
//! verification, signs for the gate's `public_url`, and keeps its keys in memory. It proves the
//! integration, not the security of an authenticator.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest::cookie::Jar;
use serde_json::{json, Value};
use url::Url;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse};

/// The header a release carries: the id of the confirmed change.
pub const CHANGE_HEADER: &str = "stepgate-change";

/// What can go wrong while driving the gate.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("invalid setup: {0}")]
    Setup(String),
    #[error("cannot reach the gate: {0}")]
    Http(#[from] reqwest::Error),
    /// The gate answered something other than what the step expects.
    #[error("{step}: the gate answered {status}: {body}")]
    Unexpected {
        step: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("the software authenticator refused: {0}")]
    Authenticator(String),
}

/// One request to the exchange's API, kept so that it can be sent again byte for byte: a
/// release must repeat exactly what was held (method, path and query, `Content-Type`, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: Method,
    /// The path and query, as sent: `/api/v1/api-keys/k1`.
    pub path_and_query: String,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl ApiRequest {
    /// A JSON request; the body is serialised once, here, so a release sends the same bytes.
    pub fn json(method: Method, path_and_query: &str, body: &Value) -> Self {
        Self {
            method,
            path_and_query: path_and_query.to_string(),
            content_type: Some("application/json".into()),
            body: Bytes::from(body.to_string()),
        }
    }

    /// A request without a body.
    pub fn empty(method: Method, path_and_query: &str) -> Self {
        Self {
            method,
            path_and_query: path_and_query.to_string(),
            content_type: None,
            body: Bytes::new(),
        }
    }
}

/// An answer read to the end: status, headers and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Result<Answer, TestkitError> {
        Ok(Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await?,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// `{"error": code, "message": …}`: the `error` code of a JSON error answer. Gate refusals
    /// have this shape (`cooling_off`, `change_mismatch`, …); so may the exchange's own.
    pub fn error_code(&self) -> Option<String> {
        self.json()["error"].as_str().map(str::to_string)
    }

    /// The `Retry-After` seconds of a `cooling_off` refusal.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn unexpected(&self, step: &'static str) -> TestkitError {
        TestkitError::Unexpected {
            step,
            status: self.status,
            body: self.text(),
        }
    }
}

/// The gate's answer to a protected request it holds: `403` with
/// `WWW-Authenticate: StepUp … error="step_up_required"` and a JSON body saying where and
/// until when to confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUpRequired {
    pub change_id: String,
    /// The gate's page where a person would confirm it.
    pub confirm_url: String,
    /// The plain words the confirm page shows.
    pub summary: String,
    pub cooling_off_seconds: u64,
    /// RFC 3339: the confirmation must come before this.
    pub confirm_before: String,
}

impl StepUpRequired {
    /// Recognises a hold: `Some` exactly when the answer is the gate's `step_up_required`.
    pub fn from_answer(answer: &Answer) -> Option<StepUpRequired> {
        Self::from_parts(answer.status, &answer.headers, &answer.body)
    }

    /// As [`StepUpRequired::from_answer`], for a status, headers and body read elsewhere.
    /// The `WWW-Authenticate` challenge must agree with the body, so an upstream answer that
    /// happens to say `step_up_required` is not mistaken for the gate's.
    pub fn from_parts(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Self> {
        if status != StatusCode::FORBIDDEN {
            return None;
        }
        let body: Value = serde_json::from_slice(body).ok()?;
        if body["error"] != "step_up_required" {
            return None;
        }
        let change_id = body["change_id"].as_str()?.to_string();
        let challenge_names_it = headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| {
                value.starts_with("StepUp ")
                    && value.contains("error=\"step_up_required\"")
                    && value.contains(&format!("change_id=\"{change_id}\""))
            });
        if !challenge_names_it {
            return None;
        }
        Some(StepUpRequired {
            change_id,
            confirm_url: body["confirm_url"].as_str()?.to_string(),
            summary: body["summary"].as_str().unwrap_or_default().to_string(),
            cooling_off_seconds: body["cooling_off_seconds"].as_u64().unwrap_or_default(),
            confirm_before: body["confirm_before"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// What became of a request sent through the gate.
#[derive(Debug, Clone)]
pub enum Sent {
    /// The gate held it: confirm the change, wait, then [`VirtualUser::release`] it.
    StepUpRequired(StepUpRequired),
    /// Anything else: the exchange's answer (or a gate refusal that is not a hold).
    Answered(Answer),
}

/// A registered passkey, as `register/finish` reports it.
#[derive(Debug, Clone)]
pub struct RegisteredPasskey {
    pub id: String,
    pub name: String,
    /// `Some` when the user already had a passkey: adding one is itself a held change, to be
    /// confirmed with an existing passkey ([`VirtualUser::confirm`]) before it works.
    pub pending_change: Option<String>,
    /// The whole answer, for anything else a test wants to check.
    pub answer: Value,
}

/// A confirmation, as `confirm/finish` reports it.
#[derive(Debug, Clone)]
pub struct Confirmed {
    /// `cooling_off`.
    pub state: String,
    /// RFC 3339: from then on the release goes through.
    pub release_at: String,
    /// Set when a new passkey's quarantine, not the cooling-off, decides `release_at`.
    pub quarantined_until: Option<String>,
}

/// One user of the gate: an identity the exchange's edge would vouch for, a cookie jar (one
/// gate session, as one browser has), and a software passkey.
pub struct VirtualUser {
    /// Where the test reaches the gate.
    gate_url: Url,
    /// The gate's `public_url`: the WebAuthn origin the passkey signs for.
    origin: Url,
    identity: HeaderMap,
    jar: Arc<Jar>,
    client: reqwest::Client,
    passkey: Mutex<SoftPasskey>,
}

impl std::fmt::Debug for VirtualUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity headers may be bearer tokens: never print them.
        f.debug_struct("VirtualUser")
            .field("gate_url", &self.gate_url.as_str())
            .field("origin", &self.origin.as_str())
            .finish_non_exhaustive()
    }
}

impl VirtualUser {
    /// A user who talks to the gate at `gate_url` (for example `http://127.0.0.1:PORT`) and
    /// presents `identity_headers` on every request, as the exchange's edge would set them:
    /// `[("x-user-id", "alice")]` in header mode, `[("authorization", "Bearer …")]` in JWT
    /// mode. For a session cookie use [`VirtualUser::add_cookie`] instead: a `Cookie` header
    /// here would hide the gate's own session cookie.
    ///
    /// The passkey signs for `gate_url`'s origin; when the gate's `public_url` is another
    /// address (`http://localhost:PORT` while the test connects to `127.0.0.1`), say so with
    /// [`VirtualUser::with_public_url`].
    pub fn new<I, K, V>(gate_url: &str, identity_headers: I) -> Result<Self, TestkitError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let gate_url = Url::parse(gate_url)
            .map_err(|e| TestkitError::Setup(format!("gate URL {gate_url:?}: {e}")))?;
        let mut identity = HeaderMap::new();
        for (name, value) in identity_headers {
            let (name, value) = (name.as_ref(), value.as_ref());
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| TestkitError::Setup(format!("header name {name:?}: {e}")))?;
            if header == http::header::COOKIE {
                return Err(TestkitError::Setup(
                    "pass cookies with VirtualUser::add_cookie, not as an identity header".into(),
                ));
            }
            let mut value = HeaderValue::from_str(value)
                .map_err(|e| TestkitError::Setup(format!("header {name}: {e}")))?;
            value.set_sensitive(true);
            identity.append(header, value);
        }
        let jar = Arc::new(Jar::default());
        let client = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            // A redirect would hide what the gate answered.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            origin: gate_url.clone(),
            gate_url,
            identity,
            jar,
            client,
            passkey: Mutex::new(SoftPasskey::new(true)),
        })
    }

    /// The gate's `public_url`, when it differs from the address the test connects to.
    pub fn with_public_url(mut self, public_url: &str) -> Result<Self, TestkitError> {
        self.origin = Url::parse(public_url)
            .map_err(|e| TestkitError::Setup(format!("public URL {public_url:?}: {e}")))?;
        Ok(self)
    }

    /// Adds a cookie (`"session=eyJ…"`) for the gate's host, for identity modes that read the
    /// exchange's session cookie. The gate's own session cookie lives in the same jar.
    pub fn add_cookie(&self, cookie: &str) {
        self.jar.add_cookie_str(cookie, &self.gate_url);
    }

    /// A request to the gate at `path_and_query`, with this user's identity and session.
    pub fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let url = format!(
            "{}{}",
            self.gate_url.as_str().trim_end_matches('/'),
            path_and_query
        );
        self.client
            .request(method, url)
            .headers(self.identity.clone())
    }

    /// Sends an exchange request through the gate; tells a hold from any other answer.
    pub async fn send(&self, request: &ApiRequest) -> Result<Sent, TestkitError> {
        let answer = Answer::read(self.api_request(request).send().await?).await?;
        Ok(match StepUpRequired::from_answer(&answer) {
            Some(hold) => Sent::StepUpRequired(hold),
            None => Sent::Answered(answer),
        })
    }

    /// Sends `request`, which the gate must hold.
    pub async fn hold(&self, request: &ApiRequest) -> Result<StepUpRequired, TestkitError> {
        match self.send(request).await? {
            Sent::StepUpRequired(hold) => Ok(hold),
            Sent::Answered(answer) => Err(answer.unexpected("a request the gate should hold")),
        }
    }

    /// Sends `request` again, byte for byte, with `Stepgate-Change: change_id`. From the
    /// change's `release_at` on, the gate forwards it once and this is the exchange's answer;
    /// before then it is the gate's `403 cooling_off` (see [`Answer::retry_after`]).
    pub async fn release(
        &self,
        request: &ApiRequest,
        change_id: &str,
    ) -> Result<Answer, TestkitError> {
        let response = self
            .api_request(request)
            .header(CHANGE_HEADER, change_id)
            .send()
            .await?;
        Answer::read(response).await
    }

    /// Registers this user's passkey under `name`.
    pub async fn register_passkey(&self, name: &str) -> Result<RegisteredPasskey, TestkitError> {
        let options = self
            .gate_call(
                "register/start",
                "/_stepgate/api/passkeys/register/start",
                json!({}),
                &[StatusCode::OK],
            )
            .await?;
        let challenge: CreationChallengeResponse = serde_json::from_value(options.clone())
            .map_err(|e| TestkitError::Authenticator(format!("creation options: {e}")))?;
        let credential = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_registration(self.origin.clone(), challenge)
            .map_err(|e| self.authenticator_error(e))?;
        let answer = self
            .gate_call(
                "register/finish",
                "/_stepgate/api/passkeys/register/finish",
                json!({
                    "ceremony_id": options["ceremony_id"],
                    "credential": credential,
                    "name": name,
                }),
                &[StatusCode::OK, StatusCode::ACCEPTED],
            )
            .await?;
        Ok(RegisteredPasskey {
            id: answer["id"].as_str().unwrap_or_default().to_string(),
            name: answer["name"].as_str().unwrap_or(name).to_string(),
            pending_change: answer["change_id"].as_str().map(str::to_string),
            answer,
        })
    }

    /// Confirms a held change with this user's passkey (a fresh, user-verified assertion bound
    /// to the change); the change then cools off.
    pub async fn confirm(&self, change_id: &str) -> Result<Confirmed, TestkitError> {
        let options = self
            .gate_call(
                "confirm/start",
                &format!("/_stepgate/api/changes/{change_id}/confirm/start"),
                json!({}),
                &[StatusCode::OK],
            )
            .await?;
        let challenge: RequestChallengeResponse = serde_json::from_value(options.clone())
            .map_err(|e| TestkitError::Authenticator(format!("request options: {e}")))?;
        let assertion = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_authentication(self.origin.clone(), challenge)
            .map_err(|e| self.authenticator_error(e))?;
        let answer = self
            .gate_call(
                "confirm/finish",
                &format!("/_stepgate/api/changes/{change_id}/confirm/finish"),
                json!({"ceremony_id": options["ceremony_id"], "credential": assertion}),
                &[StatusCode::OK],
            )
            .await?;
        Ok(Confirmed {
            state: answer["state"].as_str().unwrap_or_default().to_string(),
            release_at: answer["release_at"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            quarantined_until: answer["quarantined_until"].as_str().map(str::to_string),
        })
    }

    /// Cancels a held or cooling-off change (no passkey needed: stopping must be easy).
    pub async fn cancel(&self, change_id: &str) -> Result<(), TestkitError> {
        self.gate_call(
            "cancel",
            &format!("/_stepgate/api/changes/{change_id}/cancel"),
            json!({}),
            &[StatusCode::OK],
        )
        .await
        .map(drop)
    }

    /// The change as the gate reports it: `{"id","state","summary","release_at",…}`.
    pub async fn change(&self, change_id: &str) -> Result<Value, TestkitError> {
        let response = self
            .request(Method::GET, &format!("/_stepgate/api/changes/{change_id}"))
            .send()
            .await?;
        let answer = Answer::read(response).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.unexpected("GET change"));
        }
        Ok(answer.json())
    }

    /// The usual cause of a refusal is an origin that is not under the gate's `rp_id`: say so.
    fn authenticator_error(&self, error: impl std::fmt::Debug) -> TestkitError {
        TestkitError::Authenticator(format!(
            "{error:?} (the passkey signs for the origin {}; if that is not the gate's \
             public_url, use VirtualUser::with_public_url)",
            self.origin.as_str().trim_end_matches('/')
        ))
    }

    fn api_request(&self, request: &ApiRequest) -> reqwest::RequestBuilder {
        let mut builder = self.request(request.method.clone(), &request.path_and_query);
        if let Some(content_type) = &request.content_type {
            builder = builder.header(http::header::CONTENT_TYPE, content_type);
        }
        builder.body(request.body.clone())
    }

    /// A POST to a gate API that must answer with one of `expected`; returns its JSON.
    async fn gate_call(
        &self,
        step: &'static str,
        path: &str,
        body: Value,
        expected: &[StatusCode],
    ) -> Result<Value, TestkitError> {
        let response = self.request(Method::POST, path).json(&body).send().await?;
        let answer = Answer::read(response).await?;
        if !expected.contains(&answer.status) {
            return Err(answer.unexpected(step));
        }
        Ok(answer.json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold_answer(change_id: &str, challenge: Option<&str>) -> Answer {
        let mut headers = HeaderMap::new();
        if let Some(challenge) = challenge {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_str(challenge).unwrap(),
            );
        }
        Answer {
            status: StatusCode::FORBIDDEN,
            headers,
            body: Bytes::from(
                json!({
                    "error": "step_up_required",
                    "change_id": change_id,
                    "confirm_url": "http://localhost:1/_stepgate/changes/c1",
                    "summary": "Enable withdrawals on API key k1",
                    "cooling_off_seconds": 86400,
                    "confirm_before": "2026-01-01T00:10:00Z",
                })
                .to_string(),
            ),
        }
    }

    #[test]
    fn a_hold_is_recognised_by_its_status_body_and_challenge() {
        let answer = hold_answer(
            "c1",
            Some(r#"StepUp realm="stepgate", error="step_up_required", change_id="c1""#),
        );
        let hold = StepUpRequired::from_answer(&answer).expect("a hold");
        assert_eq!(hold.change_id, "c1");
        assert_eq!(hold.summary, "Enable withdrawals on API key k1");
        assert_eq!(hold.cooling_off_seconds, 86400);
    }

    #[test]
    fn an_answer_without_the_matching_challenge_is_not_a_hold() {
        // The exchange itself could answer with such a body; only the gate adds the challenge.
        assert!(StepUpRequired::from_answer(&hold_answer("c1", None)).is_none());
        let other = hold_answer(
            "c1",
            Some(r#"StepUp realm="stepgate", error="step_up_required", change_id="c2""#),
        );
        assert!(StepUpRequired::from_answer(&other).is_none());
        let mut not_forbidden = hold_answer(
            "c1",
            Some(r#"StepUp realm="stepgate", error="step_up_required", change_id="c1""#),
        );
        not_forbidden.status = StatusCode::OK;
        assert!(StepUpRequired::from_answer(&not_forbidden).is_none());
    }

    #[test]
    fn a_cookie_is_refused_as_an_identity_header() {
        let error = VirtualUser::new("http://127.0.0.1:1", [("cookie", "session=x")]).unwrap_err();
        assert!(error.to_string().contains("add_cookie"), "{error}");
    }

    #[test]
    fn the_debug_output_never_shows_the_identity() {
        let user = VirtualUser::new(
            "http://127.0.0.1:1",
            [("authorization", "Bearer secret-token")],
        )
        .unwrap();
        assert!(!format!("{user:?}").contains("secret-token"));
    }

    #[test]
    fn a_json_request_keeps_the_bytes_it_will_send_again() {
        let request = ApiRequest::json(
            Method::PUT,
            "/api/v1/api-keys/k1",
            &json!({"permissions": ["read", "withdraw"]}),
        );
        assert_eq!(
            request.body,
            Bytes::from_static(br#"{"permissions":["read","withdraw"]}"#)
        );
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
    }
}
