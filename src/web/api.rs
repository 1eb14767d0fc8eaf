//! The gate's JSON API under `/_stepgate/api`: passkey registration, confirming, cancelling
//! and listing changes. Each handler: identify the caller, one domain call, shape the answer.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_sessions::Session;
use uuid::Uuid;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::{session_binding, ApiError, AppState, Caller, JsonBody};
use crate::clock::rfc3339;
use crate::error::GateError;
use crate::stepup::Change;

/// The JSON view of a change.
pub fn change_json(change: &Change) -> Value {
    json!({
        "id": change.id,
        "state": change.state.as_str(),
        "summary": change.summary,
        "rule": change.rule,
        "method": change.method,
        "path": change.path,
        "created_at": rfc3339(change.created_at),
        "confirm_before": rfc3339(change.confirm_before),
        "confirmed_at": change.confirmed_at.map(rfc3339),
        "release_at": change.release_at.map(rfc3339),
        "release_before": change.release_before.map(rfc3339),
    })
}

/// Path ids that are not UUIDs name nothing: 404, like an unknown id.
fn change_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError(GateError::NotFound))
}

fn ceremony_answer(
    ceremony_id: Uuid,
    challenge: impl serde::Serialize,
) -> Result<Response, ApiError> {
    let mut body = serde_json::to_value(challenge)
        .map_err(|e| ApiError(GateError::Internal(format!("challenge: {e}"))))?;
    body["ceremony_id"] = json!(ceremony_id);
    Ok(Json(body).into_response())
}

pub async fn register_start(
    State(state): State<AppState>,
    Caller(user): Caller,
    session: Session,
) -> Result<Response, ApiError> {
    let binding = session_binding(&session).await?;
    let (ceremony_id, challenge) = state
        .stepup
        .passkeys()
        .start_registration(&user, &binding, state.clock.now())
        .await?;
    ceremony_answer(ceremony_id, challenge)
}

#[derive(Deserialize)]
pub struct RegisterFinish {
    ceremony_id: Uuid,
    credential: RegisterPublicKeyCredential,
    name: String,
}

pub async fn register_finish(
    State(state): State<AppState>,
    Caller(user): Caller,
    session: Session,
    JsonBody(request): JsonBody<RegisterFinish>,
) -> Result<Response, ApiError> {
    let binding = session_binding(&session).await?;
    let passkey = state
        .stepup
        .passkeys()
        .finish_registration(
            &user,
            request.ceremony_id,
            &binding,
            &request.credential,
            &request.name,
            state.clock.now(),
        )
        .await?;
    tracing::info!(user = %user, passkey = %passkey.id, "registered a passkey");
    Ok(Json(json!({
        "id": passkey.id,
        "name": passkey.name,
        "created_at": rfc3339(passkey.created_at),
        "backup_eligible": passkey.backup_eligible,
    }))
    .into_response())
}

pub async fn list_changes(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Response, ApiError> {
    let changes = state.stepup.list(&user).await?;
    let changes: Vec<Value> = changes.iter().map(change_json).collect();
    Ok(Json(json!({ "changes": changes })).into_response())
}

pub async fn get_change(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let change = state.stepup.get(&user, change_id(&id)?).await?;
    Ok(Json(change_json(&change)).into_response())
}

pub async fn confirm_start(
    State(state): State<AppState>,
    Caller(user): Caller,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let binding = session_binding(&session).await?;
    let (ceremony_id, challenge) = state
        .stepup
        .start_confirm(&user, change_id(&id)?, &binding)
        .await?;
    ceremony_answer(ceremony_id, challenge)
}

#[derive(Deserialize)]
pub struct ConfirmFinish {
    ceremony_id: Uuid,
    credential: PublicKeyCredential,
}

pub async fn confirm_finish(
    State(state): State<AppState>,
    Caller(user): Caller,
    session: Session,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ConfirmFinish>,
) -> Result<Response, ApiError> {
    let binding = session_binding(&session).await?;
    let change = state
        .stepup
        .finish_confirm(
            &user,
            change_id(&id)?,
            request.ceremony_id,
            &binding,
            &request.credential,
        )
        .await?;
    tracing::info!(change = %change.id, user = %user, "confirmed a change with a passkey");
    Ok(Json(json!({
        "state": change.state.as_str(),
        "release_at": change.release_at.map(rfc3339),
    }))
    .into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let change = state.stepup.cancel(&user, change_id(&id)?).await?;
    tracing::info!(change = %change.id, user = %user, "cancelled a change");
    Ok(Json(json!({ "state": change.state.as_str() })).into_response())
}
