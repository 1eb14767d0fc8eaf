//! The gate's pages: the passkeys page, the list of changes and the confirm page. Everything a
//! user is asked to confirm is rendered from the stored request, never from client text.
//! Errors are shown as a sentence on a page, never as raw JSON.

use askama::Template;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::{Html, IntoResponse, Response};
use http::{header, HeaderMap, StatusCode};
use uuid::Uuid;

use super::{ApiError, AppState, Caller};
use crate::clock::rfc3339;
use crate::error::GateError;
use crate::identity::UserId;
use crate::stepup::{Change, State as ChangeState};
use crate::store::PasskeyState;

/// An error on a page route. Browsers (which ask for `text/html`) get a page with a sentence;
/// API clients and tests get the same JSON as the API, with the same status code.
pub struct PageError {
    error: GateError,
    html: bool,
}

/// The identified viewer of a page, and whether their client wants HTML answers.
pub struct Viewer {
    pub user: UserId,
    html: bool,
}

impl PageError {
    /// An error always shown as a page (for routes only browsers visit).
    pub fn html(error: GateError) -> Self {
        PageError { error, html: true }
    }
}

/// A state in words for people.
pub fn state_words(state: ChangeState) -> &'static str {
    match state {
        ChangeState::Held => "waiting for your confirmation",
        ChangeState::CoolingOff => "confirmed and cooling off",
        ChangeState::Applying => "being applied now",
        ChangeState::Applied => "applied",
        ChangeState::Cancelled => "cancelled",
        ChangeState::Expired => "expired",
    }
}

impl Viewer {
    pub fn error(&self, error: impl Into<GateError>) -> PageError {
        PageError {
            error: error.into(),
            html: self.html,
        }
    }
}

fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, PageError> {
        let html = accepts_html(&parts.headers);
        match Caller::from_request_parts(parts, state).await {
            Ok(Caller(user)) => Ok(Viewer { user, html }),
            Err(ApiError(error)) => Err(PageError { error, html }),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: &'static str,
    message: String,
    /// Shown so a user can quote it to the exchange's support, who can find the logs by it.
    request_id: Option<String>,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if !self.html {
            return ApiError(self.error).into_response();
        }
        let (status, _) = self.error.status_and_code();
        let title = match status {
            StatusCode::UNAUTHORIZED => "Please sign in to the exchange first",
            StatusCode::NOT_FOUND => "Not found",
            s if s.is_server_error() => "Something went wrong on our side",
            _ => "This cannot be done",
        };
        let page = ErrorPage {
            title,
            message: self.error.public_message(),
            request_id: super::request_id::current().map(|id| id.to_string()),
        };
        let mut response = (status, render(&page)).into_response();
        response
            .extensions_mut()
            .insert(super::error_marker(&self.error));
        response
    }
}

fn render<T: Template>(page: &T) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be shown",
            )
                .into_response()
        }
    }
}

/// A change as the pages show it.
pub struct ChangeView {
    pub id: String,
    pub summary: String,
    pub state: &'static str,
    pub state_words: &'static str,
    pub method: String,
    pub target: String,
    pub body: String,
    pub created_at: String,
    pub confirm_before: String,
    pub release_at: Option<String>,
    pub quarantined_until: Option<String>,
    pub can_confirm: bool,
    pub can_cancel: bool,
    pub cooling_off_words: String,
    /// What the held request asks for, at the places the rule looks: ("permissions",
    /// "read, trade, withdraw").
    pub requested: Vec<(String, String)>,
}

impl ChangeView {
    fn from_change(change: &Change) -> Self {
        let target = match &change.query {
            Some(q) => format!("{}?{}", change.path, q),
            None => change.path.clone(),
        };
        Self {
            id: change.id.to_string(),
            summary: change.summary.clone(),
            state: change.state.as_str(),
            state_words: match change.state {
                ChangeState::Held => "Waiting for your confirmation",
                ChangeState::CoolingOff => "Confirmed, cooling off",
                ChangeState::Applying => "Being applied now",
                ChangeState::Applied => "Applied",
                ChangeState::Cancelled => "Cancelled",
                ChangeState::Expired => "Expired",
            },
            method: change.method.clone(),
            target,
            body: pretty_body(&change.body),
            created_at: rfc3339(change.created_at),
            confirm_before: rfc3339(change.confirm_before),
            release_at: change.release_at.map(rfc3339),
            quarantined_until: change.quarantined_until.map(rfc3339),
            can_confirm: change.state == ChangeState::Held,
            can_cancel: change.state.is_pending(),
            cooling_off_words: duration_words(change.cooling_off),
            requested: Vec::new(),
        }
    }
}

/// The values of the held body at the pointers the change's rule checks, in plain text. The
/// gate cannot know the state before the change; it shows what the request asks for.
fn requested_values(state: &AppState, change: &Change) -> Vec<(String, String)> {
    let Some(rule) = state.config.rules.by_name(&change.rule) else {
        return Vec::new();
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&change.body) else {
        return Vec::new();
    };
    let mut shown = Vec::new();
    for condition in rule.conditions() {
        let pointer = condition.pointer();
        if shown
            .iter()
            .any(|(label, _): &(String, String)| label == pointer.trim_start_matches('/'))
        {
            continue;
        }
        let Some(value) = body.pointer(pointer) else {
            continue;
        };
        let text = match value {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| item.to_string())
                })
                .collect::<Vec<_>>()
                .join(", "),
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let label = pointer.trim_start_matches('/').replace('/', " › ");
        shown.push((label, crate::policy::sanitize_for_display(&text)));
    }
    shown
}

/// A duration as people say it: "24 hours", "2 minutes", "1 day and 6 hours".
pub fn duration_words(duration: std::time::Duration) -> String {
    let total = duration.as_secs();
    let units = [
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    let mut parts = Vec::new();
    let mut rest = total;
    for (size, name) in units {
        let n = rest / size;
        if n > 0 && parts.len() < 2 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
        rest %= size;
    }
    match parts.len() {
        0 => "no time".into(),
        1 => parts.remove(0),
        _ => parts.join(" and "),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_words() {
        use std::time::Duration;
        assert_eq!(super::duration_words(Duration::from_secs(86_400)), "1 day");
        assert_eq!(super::duration_words(Duration::from_secs(120)), "2 minutes");
        assert_eq!(
            super::duration_words(Duration::from_secs(93_600)),
            "1 day and 2 hours"
        );
        assert_eq!(super::duration_words(Duration::ZERO), "no time");
    }
}

/// The stored body, pretty-printed when it is JSON; shown escaped by the template.
fn pretty_body(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

#[derive(Template)]
#[template(path = "change.html")]
struct ChangePage {
    user: String,
    change: ChangeView,
}

pub async fn change_page(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = Uuid::parse_str(&id).map_err(|_| viewer.error(GateError::NotFound))?;
    let change = state
        .stepup
        .get(&viewer.user, id)
        .await
        .map_err(|e| viewer.error(e))?;
    let mut view = ChangeView::from_change(&change);
    view.requested = requested_values(&state, &change);
    Ok(render(&ChangePage {
        user: viewer.user.to_string(),
        change: view,
    }))
}

#[derive(Template)]
#[template(path = "changes.html")]
struct ChangesPage {
    user: String,
    changes: Vec<ChangeView>,
}

pub async fn changes_page(
    State(state): State<AppState>,
    viewer: Viewer,
) -> Result<Response, PageError> {
    let changes = state
        .stepup
        .list(&viewer.user)
        .await
        .map_err(|e| viewer.error(e))?;
    Ok(render(&ChangesPage {
        user: viewer.user.to_string(),
        changes: changes.iter().map(ChangeView::from_change).collect(),
    }))
}

pub struct PasskeyView {
    pub id: String,
    pub state: &'static str,
    pub name: String,
    pub created_at: String,
    pub last_used_at: String,
    pub kind: &'static str,
}

#[derive(Template)]
#[template(path = "passkeys.html")]
struct PasskeysPage {
    user: String,
    passkeys: Vec<PasskeyView>,
}

pub async fn passkeys_page(
    State(state): State<AppState>,
    viewer: Viewer,
) -> Result<Response, PageError> {
    let passkeys = state
        .stepup
        .list_passkeys(&viewer.user)
        .await
        .map_err(|e| viewer.error(e))?;
    Ok(render(&PasskeysPage {
        user: viewer.user.to_string(),
        passkeys: passkeys
            .iter()
            .map(|p| PasskeyView {
                id: p.id.to_string(),
                state: match p.state {
                    PasskeyState::Active => "active",
                    PasskeyState::Pending => "waiting for your confirmation and cooling-off",
                    PasskeyState::Disabled => "disabled (it may have been copied)",
                },
                name: p.name.clone(),
                created_at: rfc3339(p.created_at),
                last_used_at: p
                    .last_used_at
                    .map(rfc3339)
                    .unwrap_or_else(|| "never".into()),
                kind: if p.backup_eligible {
                    "synced (can be copied to your other devices)"
                } else {
                    "bound to one device"
                },
            })
            .collect(),
    }))
}
