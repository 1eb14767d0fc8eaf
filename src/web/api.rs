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
use crate::stepup::service::{Registration, Removal};
use crate::stepup::Change;
use crate::store::PasskeyRecord;
use http::StatusCode;

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
        "quarantined_until": change.quarantined_until.map(rfc3339),
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
    let (ceremony_id, challenge) = state.stepup.start_registration(&user, &binding).await?;
    ceremony_answer(ceremony_id, challenge)
}

#[derive(Deserialize)]
pub struct RegisterFinish {
    ceremony_id: Uuid,
    credential: RegisterPublicKeyCredential,
    name: String,
}

/// The JSON view of a passkey.
pub fn passkey_json(passkey: &PasskeyRecord, quarantine: std::time::Duration) -> Value {
    json!({
        "id": passkey.id,
        "name": passkey.name,
        "state": passkey.state.as_str(),
        "created_at": rfc3339(passkey.created_at),
        "last_used_at": passkey.last_used_at.map(rfc3339),
        "backup_eligible": passkey.backup_eligible,
        "aaguid": passkey.aaguid,
        "quarantined_until": rfc3339(passkey.created_at + quarantine),
    })
}

/// 200 with the passkey when it is the user's first (active, quarantined); 202 with the
/// change to confirm when the user already had one.
pub async fn register_finish(
    State(state): State<AppState>,
    Caller(user): Caller,
    session: Session,
    JsonBody(request): JsonBody<RegisterFinish>,
) -> Result<Response, ApiError> {
    let binding = session_binding(&session).await?;
    let registration = state
        .stepup
        .register_passkey(
            &user,
            request.ceremony_id,
            &binding,
            &request.credential,
            &request.name,
        )
        .await?;
    let quarantine = state.config.passkeys.quarantine;
    Ok(match registration {
        Registration::Active(passkey) => {
            tracing::info!(user = %user, passkey = %passkey.id, "registered a first passkey");
            Json(passkey_json(&passkey, quarantine)).into_response()
        }
        Registration::Pending(passkey, change) => {
            tracing::info!(user = %user, passkey = %passkey.id, change = %change.id, "registered a passkey that waits for confirmation");
            let mut body = passkey_json(&passkey, quarantine);
            body["change_id"] = json!(change.id);
            body["confirm_url"] = json!(state.confirm_url(change.id));
            body["summary"] = json!(change.summary);
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
    })
}

pub async fn list_passkeys(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Response, ApiError> {
    let passkeys = state.stepup.list_passkeys(&user).await?;
    let quarantine = state.config.passkeys.quarantine;
    let passkeys: Vec<Value> = passkeys
        .iter()
        .map(|p| passkey_json(p, quarantine))
        .collect();
    Ok(Json(json!({ "passkeys": passkeys })).into_response())
}

#[derive(Deserialize)]
pub struct RenamePasskey {
    name: String,
}

pub async fn rename_passkey(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<RenamePasskey>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError(GateError::NotFound))?;
    let name = state
        .stepup
        .rename_passkey(&user, id, &request.name)
        .await?;
    Ok(Json(json!({ "id": id, "name": name })).into_response())
}

/// 202 with the change to confirm; 200 when a pending passkey was simply dropped.
pub async fn remove_passkey(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError(GateError::NotFound))?;
    Ok(
        match state.stepup.request_passkey_removal(&user, id).await? {
            Removal::NeedsConfirmation(change) => started_change(&state, &change),
            Removal::Dropped => Json(json!({ "state": "removed" })).into_response(),
        },
    )
}

pub async fn account(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Response, ApiError> {
    let frozen_at = state.stepup.frozen_at(&user).await?;
    Ok(
        Json(json!({ "frozen": frozen_at.is_some(), "frozen_at": frozen_at.map(rfc3339) }))
            .into_response(),
    )
}

/// Emergency freeze: no passkey needed, stopping must be easy.
pub async fn freeze(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Response, ApiError> {
    let cancelled = state.stepup.freeze(&user).await?;
    tracing::warn!(user = %user, cancelled = cancelled.len(), "account frozen by its user");
    Ok(Json(json!({ "frozen": true, "cancelled": cancelled })).into_response())
}

/// Starts an unfreeze: 202 with the change the user must confirm with a passkey.
pub async fn unfreeze(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Response, ApiError> {
    let change = state.stepup.request_unfreeze(&user).await?;
    Ok(started_change(&state, &change))
}

/// The 202 answer for a built-in change the user must now confirm.
pub fn started_change(state: &AppState, change: &Change) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "change_id": change.id,
            "confirm_url": state.confirm_url(change.id),
            "summary": change.summary,
            "state": change.state.as_str(),
        })),
    )
        .into_response()
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
    let mut body = json!({
        "state": change.state.as_str(),
        "release_at": change.release_at.map(rfc3339),
    });
    if let Some(until) = change.quarantined_until {
        body["quarantined_until"] = json!(rfc3339(until));
        body["message"] = json!(
            "Your passkey is new, so this change waits until the passkey is old enough (its quarantine) before it can take effect."
        );
    }
    Ok(Json(body).into_response())
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
