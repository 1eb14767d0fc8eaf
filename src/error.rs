//! The gate's error type and who is to blame for each error: the client (4xx), the upstream
//! (502/504), the database (503, failing closed) or ourselves (500). The web layer turns an
//! error into a JSON answer or a page with the same code and sentence.

use http::StatusCode;
use time::OffsetDateTime;

use crate::identity::IdentityError;
use crate::policy::PathError;
use crate::proxy::ProxyError;
use crate::stepup::Refusal;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{0}")]
    Unauthenticated(IdentityError),
    #[error("there is no such change or passkey for you")]
    NotFound,
    #[error("{0}")]
    InvalidPath(PathError),
    #[error("the request body cannot be read strictly: {0}")]
    InvalidBody(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("this request came from another site")]
    CrossOrigin,
    #[error("the change was refused")]
    Refused(Refusal),
    #[error("this request differs from the one that was held and confirmed")]
    ChangeMismatch,
    #[error("register a passkey before confirming changes")]
    NoPasskey,
    #[error("this ceremony is unknown, already used, expired, or was started in another session")]
    CeremonyInvalid,
    #[error("the passkey's answer was not accepted: {0}")]
    AssertionInvalid(String),
    #[error(
        "the passkey did not verify the user (PIN or biometric); try again and complete the check"
    )]
    UserNotVerified,
    #[error("the passkey could not be registered: {0}")]
    RegistrationFailed(String),
    #[error("this passkey is already registered")]
    DuplicateCredential,
    #[error("{0}")]
    PasskeyNotAllowed(String),
    #[error("this passkey was disabled because it may have been copied; use another passkey and contact the exchange")]
    PasskeyDisabled,
    #[error(transparent)]
    Upstream(#[from] ProxyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("you have {limit} changes waiting already; confirm, cancel or let them expire first")]
    TooManyPendingChanges { limit: u32 },
    #[error(
        "too many passkey prompts were started in the last minute; wait a minute and try again"
    )]
    TooManyCeremonies,
    #[error("this account is frozen: sensitive changes are refused until it is unfrozen")]
    AccountFrozen,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("internal error: {0}")]
    Internal(String),
}

impl GateError {
    /// The status code and stable machine-readable code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use GateError::*;
        match self {
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            CrossOrigin => (StatusCode::FORBIDDEN, "cross_origin"),
            TooManyPendingChanges { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_pending_changes")
            }
            TooManyCeremonies => (StatusCode::TOO_MANY_REQUESTS, "too_many_ceremonies"),
            BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            AccountFrozen => (StatusCode::FORBIDDEN, "account_frozen"),
            Refused(refusal) => refusal_status(*refusal),
            ChangeMismatch => (StatusCode::FORBIDDEN, "change_mismatch"),
            NoPasskey => (StatusCode::CONFLICT, "no_passkey"),
            CeremonyInvalid => (StatusCode::BAD_REQUEST, "ceremony_invalid"),
            AssertionInvalid(_) => (StatusCode::FORBIDDEN, "assertion_invalid"),
            UserNotVerified => (StatusCode::FORBIDDEN, "user_not_verified"),
            RegistrationFailed(_) => (StatusCode::BAD_REQUEST, "registration_failed"),
            DuplicateCredential => (StatusCode::CONFLICT, "duplicate_credential"),
            PasskeyNotAllowed(_) => (StatusCode::FORBIDDEN, "passkey_not_allowed"),
            PasskeyDisabled => (StatusCode::FORBIDDEN, "passkey_disabled"),
            Upstream(ProxyError::Unreachable(_)) => {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable")
            }
            Upstream(ProxyError::Failed(_)) => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            Upstream(ProxyError::Timeout) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Store(_) | Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    /// A sentence a person can read. Internal details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            GateError::Refused(refusal) => refusal_message(*refusal),
            GateError::Store(StoreError::Unavailable(_)) => {
                "the gate's database is unavailable; protected changes are refused until it is back"
                    .into()
            }
            GateError::Store(_) | GateError::Internal(_) => {
                "the gate failed on its side; nothing was changed".into()
            }
            other => other.to_string(),
        }
    }

    /// Facts a client can act on, added to the JSON answer next to `error` and `message`.
    pub fn details(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            GateError::Refused(Refusal::CoolingOff { release_at }) => {
                vec![("release_at", crate::clock::rfc3339(*release_at).into())]
            }
            GateError::Refused(Refusal::AlreadyApplied { outcome_status }) => vec![
                ("state", "applied".into()),
                ("upstream_status", (*outcome_status).into()),
            ],
            GateError::Refused(Refusal::Applying) => vec![("state", "applying".into())],
            _ => Vec::new(),
        }
    }

    /// For `cooling_off`: when the release becomes possible.
    pub fn release_at(&self) -> Option<OffsetDateTime> {
        match self {
            GateError::Refused(Refusal::CoolingOff { release_at }) => Some(*release_at),
            _ => None,
        }
    }
}

fn refusal_status(refusal: Refusal) -> (StatusCode, &'static str) {
    match refusal {
        Refusal::CoolingOff { .. } => (StatusCode::FORBIDDEN, "cooling_off"),
        Refusal::NotConfirmed => (StatusCode::FORBIDDEN, "not_confirmed"),
        Refusal::Cancelled => (StatusCode::FORBIDDEN, "change_cancelled"),
        Refusal::Expired | Refusal::Lapsed => (StatusCode::FORBIDDEN, "change_expired"),
        // A release that is being forwarded right now is, to the client, already taken.
        Refusal::AlreadyApplied { .. } | Refusal::Applying => {
            (StatusCode::CONFLICT, "change_already_applied")
        }
        Refusal::NotHeld => (StatusCode::CONFLICT, "change_not_held"),
        Refusal::NotDue => (StatusCode::CONFLICT, "change_not_due"),
        Refusal::NotApplying => (StatusCode::CONFLICT, "change_not_applying"),
    }
}

fn refusal_message(refusal: Refusal) -> String {
    match refusal {
        Refusal::CoolingOff { release_at } => format!(
            "this change is cooling off and can be released from {}",
            crate::clock::rfc3339(release_at)
        ),
        Refusal::NotConfirmed => "this change has not been confirmed with a passkey yet".into(),
        Refusal::Cancelled => "this change was cancelled".into(),
        Refusal::Expired | Refusal::Lapsed => {
            "this change expired: it was not confirmed or released in time".into()
        }
        Refusal::AlreadyApplied {
            outcome_status: Some(status),
        } => {
            format!("this change was already applied (the exchange answered {status})")
        }
        Refusal::AlreadyApplied {
            outcome_status: None,
        } => "this change was already applied".into(),
        Refusal::Applying => "this change is being applied right now".into(),
        Refusal::NotApplying => "this change is not being applied".into(),
        Refusal::NotHeld => "this change is no longer waiting for a confirmation".into(),
        Refusal::NotDue => "this change has no deadline that has passed".into(),
    }
}
