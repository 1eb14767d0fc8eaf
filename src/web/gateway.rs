//! The proxy pipeline for every request that is not a gate page, in named steps: canonicalise
//! the target → classify by method and path → (unprotected) stream through untouched, or
//! (protected) identify the caller, read the body within the limit, then hold, release or
//! pass through. Protected routes fail closed: any error answers, nothing is forwarded.

use std::borrow::Cow;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, AppState};
use crate::clock::rfc3339;
use crate::error::GateError;
use crate::metrics::Outcome;
use crate::policy::{
    canonical_path, decide, may_override_method, methods_to_match, BodyError, BodyView, Decision,
    PathError, RouteMatch,
};
use crate::proxy::{strip_underscore_twins, Outgoing, ProxyError, STEPGATE_CHANGE};
use crate::stepup::{Change, Event, HeldRequest};

/// The router's fallback: a path in the gate's namespace that is none of its routes.
pub async fn gateway(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    answer(&state, peer, request).await
}

/// Everything outside the gate's own routes (`web::dispatch` sends it here directly).
pub async fn answer(state: &AppState, peer: SocketAddr, request: Request) -> Response {
    match handle(state, peer, request).await {
        Ok((outcome, mut response)) => {
            // For the metrics and the access log (see `web::observe`).
            response.extensions_mut().insert(outcome);
            response
        }
        Err(error) => {
            // The rest of a refused body is never read, so the connection cannot carry
            // another request: say so, or a client may reuse it and see it reset.
            let body_left_unread = matches!(
                error,
                GateError::BodyTooLarge { .. } | GateError::BodyTimeout
            );
            let mut response = ApiError(error).into_response_at(state.clock.now());
            if body_left_unread {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

async fn handle(
    state: &AppState,
    peer: SocketAddr,
    request: Request,
) -> Result<(Outcome, Response), GateError> {
    let (mut parts, body) = request.into_parts();
    match classify(state, &mut parts)? {
        // The hot path: nothing protected here, stream both ways, no database.
        Route::PassThrough(path_and_query) => {
            passed(forward(state, parts, path_and_query, body, peer, None).await)
        }
        // The rest has its own (boxed) future: its state is large, and inline it would be part
        // of every pass-through request's future too, and moved along with it.
        Route::Protected(matched) => Box::pin(protected(state, peer, parts, body, matched)).await,
    }
}

/// Where the proxy pipeline sends a request.
pub enum Route<'a> {
    /// Nothing protects it: forward it to this target (the canonical path and the raw query),
    /// streaming, without identifying anyone or reading the body.
    PassThrough(PathAndQuery),
    /// A protected route, a release, or a form that may name another method: the careful path.
    Protected(Matched<'a>),
}

/// Classifies a request by its head alone, after removing what a client may never send (the
/// identity header the gate gives the upstream, and its underscore twins). An error is the
/// answer (a path that cannot be canonicalised, the gate's namespace in disguise). Pure apart
/// from those removals: the express lane (`crate::express`) asks it too and hands anything
/// but a pass-through to this pipeline, which then asks again.
pub fn classify<'a>(
    state: &'a AppState,
    parts: &mut http::request::Parts,
) -> Result<Route<'a>, GateError> {
    // Before anything else: a client may not send the header the gate uses to tell the
    // upstream who was verified.
    if let Some(header) = &state.config.upstream_identity_header {
        parts.headers.remove(header);
    }
    // Underscore spellings of the identity headers could be read as them upstream. Header
    // names with `_` are rare, so the common request skips this entirely.
    if parts.headers.keys().any(|name| name.as_str().contains('_')) {
        let mut identity_names: Vec<&header::HeaderName> = Vec::with_capacity(2);
        if let Some(header) = &state.config.upstream_identity_header {
            identity_names.push(header);
        }
        if let crate::identity::IdentitySettings::Header { header, .. } = &state.config.identity {
            identity_names.push(header);
        }
        strip_underscore_twins(&mut parts.headers, &identity_names);
    }

    // Only origin-form targets: an absolute-form target could name a host other than ours.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        return Err(GateError::InvalidPath(PathError::NotOriginForm));
    }
    let path = canonical_path(parts.uri.path()).map_err(GateError::InvalidPath)?;
    // The gate's namespace is never forwarded, however it was spelled.
    if path == "/_stepgate" || path.starts_with("/_stepgate/") {
        return Err(GateError::NotFound);
    }
    let query = parts.uri.query();
    let path_and_query = match (&path, parts.uri.path_and_query()) {
        // Canonicalisation changed nothing: forward the request's own target (shared bytes).
        (Cow::Borrowed(_), Some(original)) => original.clone(),
        _ => {
            let rebuilt = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            PathAndQuery::try_from(rebuilt).map_err(|_| {
                GateError::BadRequest("the request target cannot be forwarded".into())
            })?
        }
    };
    let release_of = parts.headers.get(STEPGATE_CHANGE).cloned();
    let rules = &state.config.rules;
    // Almost every request has one method to match; only overrides and HEAD/OPTIONS allocate.
    let candidates = if may_override_method(&parts.method, &parts.headers, query) {
        let methods = methods_to_match(&parts.method, &parts.headers, query);
        let methods: Vec<&Method> = methods.iter().collect();
        rules.candidates(&methods, &path)
    } else {
        rules.candidates(&[&parts.method], &path)
    };
    // A POST form can name another method in a `_method` field of its body (Rails, Laravel):
    // on a path some rule names, such a form is read (bounded) before deciding.
    let form_method_override = candidates.is_empty()
        && parts.method == Method::POST
        && is_form(&parts.headers)
        && rules.names_path(&path);

    if candidates.is_empty() && release_of.is_none() && !form_method_override {
        return Ok(Route::PassThrough(path_and_query));
    }
    Ok(Route::Protected(Matched {
        path: path.into_owned(),
        path_and_query,
        release_of,
        candidates,
        form_method_override,
    }))
}

/// What the classification found for a request that is not simply passed through.
pub struct Matched<'a> {
    path: String,
    path_and_query: PathAndQuery,
    release_of: Option<HeaderValue>,
    candidates: Vec<RouteMatch<'a>>,
    form_method_override: bool,
}

/// A request on a protected route, or a release: identify the caller, read the body within
/// the limit, then hold, release or pass through.
async fn protected(
    state: &AppState,
    peer: SocketAddr,
    mut parts: http::request::Parts,
    body: Body,
    matched: Matched<'_>,
) -> Result<(Outcome, Response), GateError> {
    let Matched {
        path,
        path_and_query,
        release_of,
        mut candidates,
        form_method_override,
    } = matched;
    let rules = &state.config.rules;
    let query = parts.uri.query();
    refuse_connection_tricks(&parts.headers)?;
    let user = state
        .config
        .identity
        .identify(&parts.headers, state.clock.now())
        .map_err(GateError::Unauthenticated)?;
    if let Some(header) = &state.config.upstream_identity_header {
        if let Ok(value) = HeaderValue::from_str(user.as_str()) {
            parts.headers.insert(header.clone(), value);
        }
    }
    let limits = &state.config.limits;
    // A protected body is buffered, so a client dribbling it in must not hold a slot forever.
    let body = tokio::time::timeout(
        limits.body_timeout,
        read_limited(&parts.headers, body, limits.max_body_bytes),
    )
    .await
    .map_err(|_| GateError::BodyTimeout)??;
    if form_method_override {
        let named = form_methods(&body)?;
        let mut methods = vec![parts.method.clone()];
        methods.extend(named);
        let methods: Vec<&Method> = methods.iter().collect();
        candidates = rules.candidates(&methods, &path);
    }
    let held = HeldRequest {
        method: parts.method.to_string(),
        path: path.to_string(),
        query: query.map(str::to_string),
        content_type: single_header(&parts.headers, header::CONTENT_TYPE)?,
        reading_headers: crate::stepup::digest::reading_headers(&parts.headers),
        headers: kept_headers(&parts.headers, state),
        body: body.clone(),
    };

    if let Some(change_id) = release_of {
        // A release: the identical request, with the change's id.
        let change_id = change_id
            .to_str()
            .ok()
            .and_then(|text| Uuid::parse_str(text.trim()).ok())
            .ok_or(GateError::NotFound)?;
        let change = state
            .stepup
            .release(&user, change_id, &held.digest())
            .await?;
        tracing::info!(change = %change.id, user = %user, rule = %change.rule, attempt = change.release_attempts, "releasing a confirmed change");
        let approval = match state.approvals.sign(&change).await {
            Ok(approval) => approval,
            Err(error) => {
                // Nothing was sent: give the lease back so a retry can go at once.
                record_release_outcome(state, change, Some(Event::Undelivered)).await;
                return Err(error);
            }
        };
        let release = Release {
            idempotency_key: change.id.to_string(),
            approval,
        };
        let forwarded = forward(
            state,
            parts,
            path_and_query,
            Body::from(body),
            peer,
            Some(release),
        )
        .await;
        let outcome = release_outcome(&forwarded);
        record_release_outcome(state, change, outcome).await;
        return forwarded.map(|response| (Outcome::Released, response));
    }

    let content_encoding = single_header(&parts.headers, header::CONTENT_ENCODING)?;
    // The exchange may pass the user's anti-phishing code for the gate to put in messages.
    let notifications = &state.config.notifications;
    let from_header = notifications
        .anti_phishing_header
        .as_ref()
        .and_then(|name| parts.headers.get(name))
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let from_claim = || {
        let claim = notifications.anti_phishing_claim.as_deref()?;
        state
            .config
            .identity
            .claim(&parts.headers, state.clock.now(), claim)
    };
    let anti_phishing_code = from_header
        .or_else(from_claim)
        .map(|code| crate::policy::sanitize_for_display(code.trim()))
        .filter(|code| !code.is_empty() && code.chars().count() <= 64);
    let view = BodyView {
        content_type: held.content_type.as_deref(),
        content_encoding: content_encoding.as_deref(),
        bytes: &body,
    };
    let decision = decide(candidates, &view).map_err(|error| match error {
        BodyError::Invalid(why) => GateError::InvalidBody(why),
        BodyError::Unsupported(why) => GateError::UnsupportedMediaType(why),
    })?;
    match decision {
        Decision::Hold(matched) => {
            let change = state
                .stepup
                .hold(
                    &user,
                    matched.rule,
                    &matched.params,
                    held,
                    anti_phishing_code.as_deref(),
                )
                .await?;
            tracing::info!(change = %change.id, user = %user, rule = %change.rule, "held a protected change");
            Ok((Outcome::Held, step_up_required(state, &change)))
        }
        // A protected route whose body the rules do not protect (for example removing a
        // permission): forward the bytes we read, unchanged.
        Decision::PassThrough => {
            passed(forward(state, parts, path_and_query, Body::from(body), peer, None).await)
        }
    }
}

fn passed(forwarded: Result<Response, GateError>) -> Result<(Outcome, Response), GateError> {
    forwarded.map(|response| (Outcome::Passed, response))
}

/// What a release adds to the forwarded request; nothing else carries these.
pub struct Release {
    pub idempotency_key: String,
    pub approval: String,
}

async fn forward(
    state: &AppState,
    parts: http::request::Parts,
    path_and_query: PathAndQuery,
    body: Body,
    peer: SocketAddr,
    release: Option<Release>,
) -> Result<Response, GateError> {
    let (idempotency_key, approval) = match release {
        Some(release) => (Some(release.idempotency_key), Some(release.approval)),
        None => (None, None),
    };
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        body,
        client_ip: Some(peer.ip()),
        idempotency_key,
        approval,
    };
    Ok(state.upstream.forward(outgoing).await?)
}

/// What the upstream made of a release, as far as the gate can tell. `None` when the outcome
/// is unknown (timeout, broken answer): the change then stays `applying` until its lease runs
/// out, and a later release forwards it again with the same `Idempotency-Key`, which the
/// upstream's de-duplication makes safe.
pub fn release_outcome(forwarded: &Result<Response, GateError>) -> Option<Event> {
    match forwarded {
        Ok(response) => Some(Event::Delivered {
            status: response.status().as_u16(),
        }),
        // Nothing reached the upstream: give the lease back so the client can retry now.
        Err(GateError::Upstream(ProxyError::Unreachable(_))) => Some(Event::Undelivered),
        Err(_) => None,
    }
}

async fn record_release_outcome(state: &AppState, change: Change, outcome: Option<Event>) {
    let Some(outcome) = outcome else { return };
    let id = change.id;
    if let Err(error) = state.stepup.record_outcome(change, outcome).await {
        // The forward happened; only the bookkeeping failed. The lease will expire and a
        // retry reuses the same Idempotency-Key, so the upstream still applies it once.
        tracing::error!(change = %id, %error, "could not record a release's outcome");
    }
}

/// On a protected route, a `Connection` header naming other headers would make the gate drop
/// them before forwarding (they are hop-by-hop by declaration) — including `Content-Type`,
/// which the decision was made on. Only the connection options themselves are accepted.
fn refuse_connection_tricks(headers: &HeaderMap) -> Result<(), GateError> {
    let names_a_header = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .any(|token| {
            !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
        });
    if names_a_header {
        return Err(GateError::BadRequest(
            "a Connection header naming other headers is not accepted on protected routes".into(),
        ));
    }
    Ok(())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The methods a form body names in `_method` fields. A form that cannot be read strictly on a
/// protected path is refused: the upstream might read a method from it that the gate cannot.
fn form_methods(body: &[u8]) -> Result<Vec<Method>, GateError> {
    let form = crate::policy::form::parse_form_strict(body).map_err(GateError::InvalidBody)?;
    let values = match form.get("_method") {
        None => Vec::new(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        Some(serde_json::Value::Array(many)) => many
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(_) => Vec::new(),
    };
    Ok(values
        .iter()
        .filter_map(|name| Method::from_bytes(name.trim().to_ascii_uppercase().as_bytes()).ok())
        .collect())
}

/// Reads a protected route's body, refusing (413) beyond `limit` without reading further.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GateError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(GateError::BodyTooLarge { limit });
    }
    let mut body = body;
    let mut collected = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            GateError::BadRequest(format!("the request body could not be read: {error}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if collected.len() + data.len() > limit {
            drain_briefly(body).await;
            return Err(GateError::BodyTooLarge { limit });
        }
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}

/// Reads and discards a little more of a refused body before the 413 goes out. The connection
/// is closed after the answer (the body was not read to its end), and closing a socket with
/// unread data makes the kernel reset it, which can destroy the 413 before the client reads
/// it. A client streaming a slightly oversized body then sees the answer (nginx's lingering
/// close does the same); one streaming without end is cut off after 1 MiB or 1 s.
async fn drain_briefly(mut body: Body) {
    const DRAIN_BYTES: usize = 1 << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut drained = 0;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, |data| data.len());
            if drained > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Two copies of a header that decides how the body is read could be read differently by us
/// and the upstream: refused.
fn single_header(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<Vec<u8>>, GateError> {
    let mut values = headers.get_all(&name).iter();
    let first = values.next().map(|v| v.as_bytes().to_vec());
    if values.next().is_some() {
        return Err(GateError::BadRequest(format!(
            "the request has more than one {name} header"
        )));
    }
    Ok(first)
}

/// The held request's headers worth keeping: end-to-end, meaningful to the upstream, and
/// never credentials (cookies, tokens, the identity header) — the database should not become
/// a store of session secrets.
fn kept_headers(headers: &HeaderMap, state: &AppState) -> Vec<(String, String)> {
    const NEVER_KEPT: [&str; 8] = [
        "authorization",
        "cookie",
        "proxy-authorization",
        "host",
        "content-length",
        "connection",
        "transfer-encoding",
        "stepgate-change",
    ];
    let identity_header = match &state.config.identity {
        crate::identity::IdentitySettings::Header { header, .. } => Some(header.as_str()),
        crate::identity::IdentitySettings::Jwt(_) => None,
    };
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !NEVER_KEPT.contains(&name)
                && Some(name) != identity_header
                && !name.starts_with("x-forwarded-")
                && !name.starts_with("stepgate-")
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// The hold answer: 403 with a `StepUp` challenge and where to confirm.
fn step_up_required(state: &AppState, change: &Change) -> Response {
    let confirm_url = state.confirm_url(change.id);
    let body = json!({
        "error": "step_up_required",
        "message": "This change must be confirmed with your passkey and then waits out a cooling-off period.",
        "change_id": change.id,
        "confirm_url": confirm_url,
        "summary": change.summary,
        "cooling_off_seconds": change.cooling_off.as_secs(),
        "confirm_before": rfc3339(change.confirm_before),
    });
    let mut response = (StatusCode::FORBIDDEN, Json(body)).into_response();
    let challenge = format!(
        "StepUp realm=\"stepgate\", error=\"step_up_required\", change_id=\"{}\"",
        change.id
    );
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        headers.insert(header::WWW_AUTHENTICATE, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
