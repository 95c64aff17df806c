//! The HTTP interface (axum): `POST /v1/events`, `/healthz`, `/readyz`,
//! `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::RefusedLabel;
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

async fn ingest(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (status, code, message) = match authenticate_and_ingest(&hub, &headers, body).await {
        Ok(resp) => return (StatusCode::OK, Json(resp)).into_response(),
        Err(e) => e,
    };
    hub.metrics.refused.get_or_create(&RefusedLabel { reason: code.into() }).inc();
    let mut r = error(status, code, &message);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Nothing was stored, and a retry is safe.
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// Authenticate and ingest; a request refused as a whole gets its status,
/// error code and message.
async fn authenticate_and_ingest(
    hub: &Hub,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<crate::ingest::IngestResponse, (StatusCode, &'static str, String)> {
    let _ = hub.accounts.reload();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send Authorization: Bearer <token>".into(),
        ));
    };
    let Some(account) = hub.accounts.authenticate(token) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "the token is not valid for any account".into(),
        ));
    };
    let too_large = |n: usize| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body exceeds {n} bytes; send smaller batches"),
        )
    };
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(hub.config.limits.max_body_bytes),
        status => (status, "bad_request", e.body_text()),
    })?;
    let collector = headers.get("x-watershed-collector").and_then(|v| v.to_str().ok());
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    hub.ingest(&account, collector, encoding, body).await.map_err(|e| match e {
        Refused::TooLarge(n) => too_large(n),
        Refused::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
        Refused::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the hub is at its memory budget; retry after the delay".into(),
        ),
        Refused::WalFull => (
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the write-ahead log holds wal.max_raw_bytes of events not yet committed to the lake; \
             retry after the delay"
                .into(),
        ),
        Refused::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        Refused::Failed(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
    })
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
