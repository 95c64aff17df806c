//! The HTTP interface (axum): `POST /v1/events`, `/healthz`, `/readyz`,
//! `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::pipeline::{Hub, Refused};

/// The router over a running hub.
pub fn router(hub: Arc<Hub>) -> Router {
    // The compressed body may not exceed the limit either; the decompressed
    // size is checked while decompressing.
    let limit = hub.config.limits.max_body_bytes;
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(hub)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn ingest(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    let _ = hub.accounts.reload();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return error(StatusCode::UNAUTHORIZED, "unauthenticated", "send Authorization: Bearer <token>");
    };
    let Some(account) = hub.accounts.authenticate(token) else {
        return error(StatusCode::UNAUTHORIZED, "bad_credentials", "the token is not valid for any account");
    };
    let collector = headers.get("x-watershed-collector").and_then(|v| v.to_str().ok());
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    match hub.ingest(&account, collector, encoding, body).await {
        Ok(resp) => (StatusCode::OK, Json(resp)).into_response(),
        Err(Refused::TooLarge(n)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("the body exceeds {n} bytes; send smaller batches"),
        ),
        Err(Refused::BadRequest(m)) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        Err(Refused::Busy) => retry_later("busy", "the hub is at its memory budget; retry after the delay"),
        Err(Refused::Unavailable(m)) => retry_later("unavailable", &m),
        Err(Refused::Failed(m)) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &m),
    }
}

/// 503 with `Retry-After: 1`: nothing was stored, and a retry is safe.
fn retry_later(code: &str, message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

async fn ready(State(hub): State<Arc<Hub>>) -> Response {
    if hub.ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        hub.render_metrics(),
    )
        .into_response()
}
