//! The operator endpoints on the admin listener: `/healthz` (the process answers), `/readyz`
//! (database reachable, migrations applied, upstream reachable, not shutting down) and
//! `/metrics` (Prometheus). They need no token — load balancers and Prometheus scrapers probe
//! them — and reveal no user data, which is why they live only on the admin listener, which
//! must stay off the public network.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::routes::{Listener, RegisteredRoute, Routes};
use super::AppState;
use crate::proxy::ProxyError;

/// The operator routes, before state, and the list of them (see `web::routes`).
pub fn ops_routes() -> (Router<AppState>, Vec<RegisteredRoute>) {
    Routes::new(Listener::Admin)
        .get("/healthz", healthz)
        .get("/readyz", readyz)
        .get("/metrics", metrics)
        .finish()
}

pub fn router(state: AppState) -> Router {
    ops_routes().0.with_state(state)
}

async fn healthz() -> Response {
    no_store((StatusCode::OK, Json(json!({ "status": "ok" }))).into_response())
}

/// 200 when every check passes, else 503; the body names each check and what is wrong.
async fn readyz(State(state): State<AppState>) -> Response {
    let store = state.stepup.store();
    let (database, upstream) = tokio::join!(store.ping(), state.upstream.probe());
    let database_ok = database.is_ok();
    let database = check(database.map_err(|error| error.to_string()));
    let migrations = if database_ok {
        match store.migration_status().await {
            Ok(status) if status.missing.is_empty() => check(Ok(())),
            Ok(status) => check(Err(format!(
                "migrations not applied: {:?} (run `stepgate migrate`)",
                status.missing
            ))),
            Err(error) => check(Err(error.to_string())),
        }
    } else {
        check(Err("cannot be checked: the database is unreachable".into()))
    };
    if !database_ok {
        state.metrics.record_database_error();
    }
    let upstream = check(upstream.map_err(|error| match error {
        ProxyError::Unreachable(why) => format!("cannot connect to the upstream: {why}"),
        other => other.to_string(),
    }));
    let draining = state.draining.load(Ordering::Relaxed);
    let shutdown = if draining {
        check(Err("the gate is shutting down".into()))
    } else {
        check(Ok(()))
    };
    let ready = [&database, &migrations, &upstream, &shutdown]
        .iter()
        .all(|c| c["ok"] == true);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": {
            "database": database,
            "migrations": migrations,
            "upstream": upstream,
            "shutdown": shutdown,
        },
    });
    no_store((status, Json(body)).into_response())
}

fn check(result: Result<(), String>) -> Value {
    match result {
        Ok(()) => json!({ "ok": true }),
        Err(error) => json!({ "ok": false, "error": error }),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let stored = match state.stepup.store().stored_figures().await {
        Ok(figures) => Some(figures),
        Err(error) => {
            tracing::warn!(%error, "metrics: the database could not be read");
            state.metrics.record_database_error();
            None
        }
    };
    let mut response = state.metrics.render(stored.as_ref()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    no_store(response)
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
