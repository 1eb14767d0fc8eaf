//! The admin API, on its own listener (`admin_listen`) and behind a bearer token: what the
//! exchange's support and security staff may do. They can look (a user's changes and
//! passkeys, the audit log, dead-lettered webhooks), stop (freeze), retry deliveries, and
//! start an unfreeze that only the user can confirm. There is deliberately no route that
//! approves a change, confirms it, or shortens a cooling-off on a user's behalf: a phone
//! fraudster who talks their way past support must still face the user's own passkey and
//! the wait.

use axum::extract::{Path, Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http::header;
use serde_json::{json, Value};

use super::api::{change_json, passkey_json, started_change};
use super::routes::{Listener, RegisteredRoute, Routes};
use super::{ApiError, AppState};
use crate::error::GateError;
use crate::identity::UserId;

/// The admin API's routes before layers and state, and the list of what they are. A new
/// route is one line here plus its entry in `web::openapi`, or the OpenAPI test fails.
pub fn admin_routes() -> (Router<AppState>, Vec<RegisteredRoute>) {
    Routes::new(Listener::Admin)
        .get("/admin/users/{user}/changes", user_changes)
        .get("/admin/users/{user}/passkeys", user_passkeys)
        .post("/admin/users/{user}/freeze", freeze)
        .post("/admin/users/{user}/unfreeze", unfreeze)
        .get("/admin/audit", audit)
        .get("/admin/webhooks/dead", dead_letters)
        .post("/admin/webhooks/{id}/retry", retry)
        .finish()
}

/// The admin router; every route requires the bearer token.
pub fn router(state: AppState) -> Router {
    admin_routes()
        .0
        .layer(from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let expected = state
        .config
        .admin
        .as_ref()
        .map(|admin| admin.token.as_bytes());
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    let allowed = match (expected, presented) {
        // Constant-time comparison: the token is a secret.
        (Some(expected), Some(presented)) => {
            expected.len() == presented.len()
                && expected
                    .iter()
                    .zip(presented)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
        _ => false,
    };
    if !allowed {
        return ApiError(GateError::Unauthenticated(
            crate::identity::IdentityError::Invalid(
                "the admin API needs Authorization: Bearer <admin token>",
            ),
        ))
        .into_response();
    }
    next.run(request).await
}

fn user(raw: &str) -> Result<UserId, ApiError> {
    UserId::parse(raw).map_err(|_| ApiError(GateError::NotFound))
}

async fn user_changes(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let changes = state.stepup.list(&user(&raw)?).await?;
    let changes: Vec<Value> = changes.iter().map(change_json).collect();
    Ok(Json(json!({ "changes": changes })).into_response())
}

async fn user_passkeys(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let passkeys = state.stepup.list_passkeys(&user(&raw)?).await?;
    let quarantine = state.config.passkeys.quarantine;
    let passkeys: Vec<Value> = passkeys
        .iter()
        .map(|p| passkey_json(p, quarantine))
        .collect();
    Ok(Json(json!({ "passkeys": passkeys })).into_response())
}

async fn freeze(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let user = user(&raw)?;
    let cancelled = state.stepup.freeze(&user).await?;
    tracing::warn!(user = %user, cancelled = cancelled.len(), "account frozen by the exchange");
    Ok(Json(json!({ "frozen": true, "cancelled": cancelled })).into_response())
}

/// Starts the user's own unfreeze: it still needs their passkey and its cooling-off.
async fn unfreeze(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let change = state.stepup.request_unfreeze(&user(&raw)?).await?;
    Ok(started_change(&state, &change))
}

async fn audit(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (rows, (head_seq, head_hash)) = state
        .stepup
        .store()
        .audit_log()
        .await
        .map_err(GateError::from)?;
    Ok(
        Json(json!({ "rows": rows, "head": { "seq": head_seq, "hash": head_hash } }))
            .into_response(),
    )
}

async fn dead_letters(State(state): State<AppState>) -> Result<Response, ApiError> {
    let rows = state
        .stepup
        .store()
        .outbox_in_state("dead")
        .await
        .map_err(GateError::from)?;
    let deliveries: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.id,
                "event": row.event,
                "webhook_url": row.webhook_url,
                "attempts": row.attempts,
                "last_error": row.last_error,
            })
        })
        .collect();
    Ok(Json(json!({ "deliveries": deliveries })).into_response())
}

async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let requeued = state
        .stepup
        .store()
        .outbox_requeue(&id, state.clock.now())
        .await
        .map_err(GateError::from)?;
    if !requeued {
        return Err(ApiError(GateError::NotFound));
    }
    Ok(Json(json!({ "state": "pending" })).into_response())
}
