//! `GET /_stepgate/jwks.json`: the public key that verifies `Stepgate-Approval` headers, as a
//! JWKS. Public and cacheable: it holds nothing secret, and exchanges fetch it to verify.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use super::{ApiError, AppState};

pub async fn jwks(State(state): State<AppState>) -> Response {
    match state.approvals.signer().await {
        Ok(signer) => {
            let mut response = (StatusCode::OK, signer.jwks_json().to_string()).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            );
            // Short, so a key change (a new key file) reaches exchanges within minutes.
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            response
        }
        Err(error) => ApiError(error).into_response(),
    }
}
