//! The HTTP interface (axum): `POST /v1/events`, `/healthz`, `/readyz`,
//! `/metrics`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::RefusedLabel;
use crate::pipeline::{Hub, Refused};

/// The router over a running hub.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn ingest(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Body) -> Response {
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
    body: Body,
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
    // Read only once the token is good: an unauthenticated client gets its
    // 401 before the hub buffers a byte of its body.
    let limits = &hub.config.limits;
    let deadline = std::time::Duration::from_secs(limits.body_timeout_secs);
    let body = match tokio::time::timeout(deadline, read_body(headers, body, limits.max_body_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyRead::TooLarge)) => return Err(too_large(limits.max_body_bytes)),
        Ok(Err(BodyRead::Failed(e))) => {
            return Err((StatusCode::BAD_REQUEST, "bad_request", format!("cannot read the body: {e}")))
        }
        Err(_) => {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the body did not arrive within {} s (limits.body_timeout_secs)",
                    limits.body_timeout_secs
                ),
            ))
        }
    };
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

/// Why a body could not be read.
enum BodyRead {
    /// Over the limit (by its `Content-Length`, or as it arrived).
    TooLarge,
    /// The connection failed.
    Failed(axum::Error),
}

/// Read the body, refusing it as soon as its declared or received size
/// passes `limit` (the compressed body may not exceed the limit either;
/// the decompressed size is checked while decompressing).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyRead> {
    use futures::StreamExt as _;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyRead::TooLarge);
    }
    let mut stream = body.into_data_stream();
    let first = match stream.next().await {
        None => return Ok(Bytes::new()),
        Some(chunk) => chunk.map_err(BodyRead::Failed)?,
    };
    let Some(second) = stream.next().await else {
        // The usual case, one chunk: no copy.
        return if first.len() > limit { Err(BodyRead::TooLarge) } else { Ok(first) };
    };
    let mut all = bytes::BytesMut::with_capacity(declared.unwrap_or(2 * first.len()).min(limit));
    all.extend_from_slice(&first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        let chunk = chunk.map_err(BodyRead::Failed)?;
        if all.len() + chunk.len() > limit {
            return Err(BodyRead::TooLarge);
        }
        all.extend_from_slice(&chunk);
        next = stream.next().await;
    }
    Ok(all.freeze())
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
