//! One-click cancel from a notification link: no login and no passkey, only the signed token
//! in the link, which can cancel that one change and nothing else until the change can no
//! longer be cancelled. Opening the link (a GET, which mail scanners prefetch) only shows the
//! change; the button on the page (a POST) cancels it.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use super::pages::{state_words, PageError};
use super::AppState;
use crate::error::GateError;
use crate::stepup::Change;

#[derive(Deserialize)]
pub struct LinkQuery {
    token: String,
}

#[derive(Template)]
#[template(path = "cancel.html")]
struct CancelPage {
    summary: String,
    state_words: &'static str,
    can_cancel: bool,
    done: bool,
    action: String,
}

fn render(change: &Change, token: &str, done: bool) -> Response {
    let page = CancelPage {
        summary: change.summary.clone(),
        state_words: state_words(change.state),
        can_cancel: change.state.is_pending(),
        done,
        action: format!("/_stepgate/cancel/{}?token={}", change.id, urlencode(token)),
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "cancel page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be shown",
            )
                .into_response()
        }
    }
}

/// Tokens are `digits.hex`; anything else is passed through escaped so the link stays intact.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'.' | b'-' | b'_' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn parse_id(raw: &str) -> Result<Uuid, PageError> {
    Uuid::parse_str(raw).map_err(|_| PageError::html(GateError::NotFound))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LinkQuery>,
) -> Result<Response, PageError> {
    let change = state
        .stepup
        .change_by_cancel_token(parse_id(&id)?, &query.token)
        .await
        .map_err(PageError::html)?;
    Ok(render(&change, &query.token, false))
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LinkQuery>,
) -> Result<Response, PageError> {
    let change = state
        .stepup
        .cancel_by_token(parse_id(&id)?, &query.token)
        .await
        .map_err(PageError::html)?;
    Ok(render(&change, &query.token, true))
}
