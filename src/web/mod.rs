//! The HTTP edge of the gate: shared state, the caller extractor, error answers (JSON for the
//! API and the proxy, HTML for pages), the security headers of gate pages and the cross-site
//! check on state-changing calls. Handlers in the submodules stay thin: HTTP in, one domain
//! call, HTTP out.

pub mod admin;
pub mod api;
pub mod assets;
pub mod cancel_link;
pub mod dispatch;
pub mod gateway;
pub mod jwks;
pub mod observe;
pub mod openapi;
pub mod ops;
pub mod pages;
pub mod request_id;
pub mod routes;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue, Method, StatusCode};
use serde_json::json;
use tower_sessions::Session;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::GateError;
use crate::identity::UserId;
use crate::proxy::Upstream;
use crate::stepup::StepUp;

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

pub struct AppInner {
    pub config: Config,
    pub stepup: StepUp,
    pub upstream: Upstream,
    /// Signs the `Stepgate-Approval` of every release and publishes its JWKS.
    pub approvals: crate::approval::Approvals,
    pub clock: Arc<dyn Clock>,
    /// `public_url` as an origin string (`http://localhost:8080`), for Origin checks.
    pub public_origin: String,
    pub metrics: crate::metrics::Metrics,
    /// Set when shutdown begins, so `/readyz` tells the load balancer to stop sending.
    pub draining: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn confirm_url(&self, id: uuid::Uuid) -> String {
        format!("{}/_stepgate/changes/{id}", self.public_origin)
    }
}

/// A gate error answered as JSON: `{"error": code, "message": sentence}`.
pub struct ApiError(pub GateError);

impl From<GateError> for ApiError {
    fn from(error: GateError) -> Self {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.0;
        let (status, code) = error.status_and_code();
        log_error(&error, status);
        let mut body = json!({ "error": code, "message": error.public_message() });
        for (key, value) in error.details() {
            body[key] = value;
        }
        if let Some(id) = request_id::current() {
            body["request_id"] = id.as_str().into();
        }
        let mut response = (status, Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response.extensions_mut().insert(error_marker(&error));
        response
    }
}

impl ApiError {
    /// The JSON answer, plus `Retry-After` (whole seconds, rounded up, so a client that waits
    /// exactly that long is not early) when the error says when to come back.
    pub fn into_response_at(self, now: time::OffsetDateTime) -> Response {
        let release_at = self.0.release_at();
        let mut response = self.into_response();
        if let Some(release_at) = release_at {
            let wait = (release_at - now).as_seconds_f64().ceil().max(0.0) as u64;
            if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// What the metrics layer needs to know about an error answer.
pub fn error_marker(error: &GateError) -> observe::ErrorMarker {
    observe::ErrorMarker {
        code: error.status_and_code().1,
        database: matches!(error, GateError::Store(_)),
    }
}

fn log_error(error: &GateError, status: StatusCode) {
    if status.is_server_error() {
        tracing::error!(%status, error = %error, "request failed on the gate's or upstream's side");
    } else {
        tracing::debug!(%status, error = %error, "request refused");
    }
}

/// The identified caller of a gate route. Missing or invalid identity: 401 JSON.
pub struct Caller(pub UserId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state
            .config
            .identity
            .identify(&parts.headers, state.clock.now())
        {
            Ok(user) => Ok(Caller(user)),
            Err(error) => {
                // Identity failures on gate routes are security-relevant: audited with why.
                state
                    .stepup
                    .audit_identity_failure(&error.to_string())
                    .await;
                Err(ApiError(GateError::Unauthenticated(error)))
            }
        }
    }
}

/// A JSON request body whose rejection is a gate error (400 JSON), not axum's plain text.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError(GateError::BadRequest(rejection.body_text()))),
        }
    }
}

const SESSION_BINDING_KEY: &str = "ceremony_binding";

/// The random value that ties ceremonies to this browser session: a ceremony can only be
/// finished by the session that started it.
pub async fn session_binding(session: &Session) -> Result<String, GateError> {
    let existing: Option<String> = session
        .get(SESSION_BINDING_KEY)
        .await
        .map_err(|e| GateError::Internal(format!("session: {e}")))?;
    if let Some(binding) = existing {
        return Ok(binding);
    }
    let binding = random_token();
    session
        .insert(SESSION_BINDING_KEY, &binding)
        .await
        .map_err(|e| GateError::Internal(format!("session: {e}")))?;
    Ok(binding)
}

pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    crate::identity::base64url(&bytes)
}

/// Gate pages and API answers: never cached, never framed, no inline script or style.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Refuses a state-changing call that a browser says came from another site.
pub async fn same_origin_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !safe {
        let headers = request.headers();
        let fetch_site = headers.get("sec-fetch-site").map(|site| site.as_bytes());
        // Under `Referrer-Policy: no-referrer` a browser sends `Origin: null` on a page's own
        // form posts (the one-click cancel page). `Sec-Fetch-Site` is set by the browser
        // alone (pages cannot forge it), so `same-origin` there vouches for such a post.
        let vouched_null = fetch_site == Some(b"same-origin".as_slice());
        let foreign_origin = headers.get(header::ORIGIN).is_some_and(|origin| {
            origin.as_bytes() != state.public_origin.as_bytes()
                && !(origin.as_bytes() == b"null" && vouched_null)
        });
        let cross_site = fetch_site == Some(b"cross-site".as_slice());
        if foreign_origin || cross_site {
            return ApiError(GateError::CrossOrigin).into_response();
        }
    }
    next.run(request).await
}
