//! Watching every request from the outside: give it a request id (returned as a header and
//! passed upstream), run it inside a tracing span that carries the id so every log line of the
//! request has it, then count it in the metrics and write one access-log line.
//!
//! Handlers say what happened by leaving a marker in the response's extensions (the proxy
//! pipeline's [`Outcome`], an error's [`ErrorMarker`]); this layer reads the markers, so the
//! handlers need no metrics code of their own.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method};
use tracing::{Instrument, Span};

use super::request_id::{self, RequestId};
use super::AppState;
use crate::metrics::{Ceremony, Outcome};

/// Left in an error response's extensions by the error answers: what the error was.
#[derive(Debug, Clone, Copy)]
pub struct ErrorMarker {
    pub code: &'static str,
    /// The database failed (an outage or a query error), as opposed to the client or upstream.
    pub database: bool,
}

/// The layer on the gate's own routes (and the router's fallback), which knows the route.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_owned());
    watch(&state, route, request, |request| next.run(request)).await
}

/// Runs `serve` on `request` inside the request's id, span, metrics and access line. `route`
/// is the gate route's template, `None` for the proxy pipeline. The layer above and the
/// server's direct path to the proxy pipeline (`web::dispatch::Gate`) both come here.
pub async fn watch<F, Fut>(
    state: &AppState,
    route: Option<String>,
    mut request: Request,
    serve: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let (id, header_value) = tag_request(request.headers_mut());
    let span = request_span(&id);
    let method = request.method().clone();
    // A cheap clone (shared bytes). Only its path is logged: the query can carry tokens
    // (the cancel link's, for one).
    let uri = request.uri().clone();
    // Boxed: inline, the inner future was stored twice in this one (12.5 KB in all), and hyper
    // keeps the service future's space for the whole life of every connection, idle ones
    // included (1,000 idle keep-alive connections: 35 -> 29 MB).
    let mut response =
        request_id::scope(id, Box::pin(serve(request)).instrument(span.clone())).await;
    let took = started.elapsed();
    if let Some(value) = header_value {
        response
            .headers_mut()
            .insert(request_id::HEADER_NAME, value);
    }

    let status = response.status().as_u16();
    let error = response.extensions().get::<ErrorMarker>().copied();
    if error.is_some_and(|error| error.database) {
        state.metrics.record_database_error();
    }
    let millis = took.as_secs_f64() * 1000.0;
    match route {
        Some(route) => {
            state.metrics.record_gate_request(&route, took);
            if let Some((ceremony, step)) = ceremony_step(&route) {
                let outcome = match (error, step) {
                    (Some(error), _) => error.code,
                    (None, Step::Start) => "started",
                    (None, Step::Finish) => "success",
                };
                state.metrics.record_ceremony(ceremony, outcome);
            }
            let _entered = span.enter();
            tracing::info!(%method, path = uri.path(), status, route = %route, duration_ms = millis, "request finished");
        }
        None => {
            let outcome = pipeline_outcome(&response, error);
            finish_pipeline(
                state,
                || span,
                &method,
                uri.path(),
                status,
                outcome,
                error,
                took,
            );
        }
    }
    response
}

/// Gives a request its id: the edge's when sane, else a new one, set in the request's headers
/// for the upstream (with room made for the `X-Forwarded-*` headers the proxy adds, so the map
/// grows once). Returns the id and its header value, for the response.
pub fn tag_request(headers: &mut HeaderMap) -> (RequestId, Option<HeaderValue>) {
    let id = RequestId::from_headers(headers);
    let header_value = id.header_value();
    headers.reserve(6);
    if let Some(value) = &header_value {
        headers.insert(request_id::HEADER_NAME, value.clone());
    }
    (id, header_value)
}

/// The span every log line of a request is written in. Only the id is a span field: the
/// subscriber formats span fields when the span is made, while method and path are needed
/// only by the access line.
pub fn request_span(id: &RequestId) -> Span {
    tracing::info_span!("request", request_id = %id)
}

/// What became of a proxy-pipeline request, from its answer's markers.
pub fn pipeline_outcome(response: &Response, error: Option<ErrorMarker>) -> Outcome {
    match (response.extensions().get::<Outcome>(), error) {
        (Some(outcome), _) => *outcome,
        (None, Some(error)) if error.code.starts_with("upstream_") => Outcome::UpstreamError,
        (None, _) => Outcome::Refused,
    }
}

/// Counts a proxy-pipeline request in the metrics and writes its access line in the request's
/// span, made by `span` only when a line is written: a pass-through's line is debug (the edge
/// logs those already, and at full rate they would cost more than the forward itself).
#[allow(clippy::too_many_arguments)]
pub fn finish_pipeline(
    state: &AppState,
    span: impl FnOnce() -> Span,
    method: &Method,
    path: &str,
    status: u16,
    outcome: Outcome,
    error: Option<ErrorMarker>,
    took: Duration,
) {
    state
        .metrics
        .record_request(outcome, error.map(|error| error.code), took);
    let millis = took.as_secs_f64() * 1000.0;
    if outcome == Outcome::Passed {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let span = span();
            let _entered = span.enter();
            tracing::debug!(
                %method,
                path,
                status,
                outcome = outcome.as_str(),
                duration_ms = millis,
                "request finished"
            );
        }
    } else {
        let span = span();
        let _entered = span.enter();
        tracing::info!(
            %method,
            path,
            status,
            outcome = outcome.as_str(),
            duration_ms = millis,
            "request finished"
        );
    }
}

enum Step {
    Start,
    Finish,
}

/// The ceremony endpoints, by route template.
fn ceremony_step(route: &str) -> Option<(Ceremony, Step)> {
    Some(match route {
        "/_stepgate/api/passkeys/register/start" => (Ceremony::Registration, Step::Start),
        "/_stepgate/api/passkeys/register/finish" => (Ceremony::Registration, Step::Finish),
        "/_stepgate/api/changes/{id}/confirm/start" => (Ceremony::Confirmation, Step::Start),
        "/_stepgate/api/changes/{id}/confirm/finish" => (Ceremony::Confirmation, Step::Finish),
        _ => return None,
    })
}
