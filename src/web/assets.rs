//! The gate's static assets, compiled into the binary so pages need no CDN and no files on disk.

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{header, StatusCode};

const SCRIPT: &str = include_str!("../../static/stepgate.js");
const STYLE: &str = include_str!("../../static/stepgate.css");

pub async fn asset(Path(name): Path<String>) -> Response {
    let (content_type, body) = match name.as_str() {
        "stepgate.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "stepgate.css" => ("text/css; charset=utf-8", STYLE),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
