//! The HTTP interface (axum): `POST /v1/events`, `/healthz`, `/readyz`,
//! `/metrics`, and the Schema Registry API ([`crate::registry_api`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::body::Framing;
use crate::metrics::RefusedLabel;
use crate::pipeline::{Hub, Refused};
use crate::requests::{Full, Held};

/// The router over a running hub.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::registry_api::routes(hub.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(hub)
}

/// 404 with the JSON error `not_found`, naming the endpoints there are.
async fn not_found(uri: axum::http::Uri) -> Response {
    let message = format!(
        "no endpoint {}; the endpoints are POST /v1/events, GET /healthz, GET /readyz, GET /metrics, \
         and the Schema Registry API (GET /subjects, /schemas/ids/<id>, ...)",
        uri.path()
    );
    error(StatusCode::NOT_FOUND, "not_found", &message)
}

/// 405 with the JSON error `method_not_allowed` (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let message = format!("{method} is not allowed on {}; the Allow header lists what is", uri.path());
    error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &message)
}

/// What answers while the hub starts (see
/// [`crate::serve::start_and_serve`]): `/healthz` 200 `starting`,
/// `/readyz` 503 `starting`, anything else 503 with the JSON error
/// `starting`; both 503s with `Retry-After`.
pub fn starting_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "starting" }))
        .route(
            "/readyz",
            get(|| async { retry_later((StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()) }),
        )
        .fallback(|| async {
            retry_later(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the hub is starting (replaying its write-ahead log); nothing was stored, retry",
            ))
        })
}

/// `r` with `Retry-After: 1`: nothing was stored, and a retry is safe.
fn retry_later(mut r: Response) -> Response {
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// The address of the client a request came from (a request extension set
/// for each connection), for the log of refused credentials.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Requests refused for their credentials (401), logged with the client's
/// address so that a security team sees who tries which tokens: the
/// first at once, then at most one line a second, saying how many were
/// not logged since (all are counted in `watershed_requests_refused_total`).
#[derive(Debug, Default)]
pub struct AuthFailures {
    /// When the last line was logged, and the failures since.
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl AuthFailures {
    /// Whether a failure at `now` is logged, and how many were not
    /// since the last logged one.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < AUTH_LOG_EVERY => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }

    pub(crate) fn note(&self, peer: Option<Peer>, code: &str, why: &str) {
        if let Some(not_logged) = self.admit(Instant::now()) {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.0.to_string());
            tracing::warn!(peer, code, why, not_logged, "refused a request for its credentials");
        }
    }
}

/// At most one line a second in the log of refused credentials.
const AUTH_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn ingest(
    State(hub): State<Arc<Hub>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (status, code, message) = match authenticate_and_ingest(&hub, &headers, body).await {
        Ok(resp) => return (StatusCode::OK, Json(resp)).into_response(),
        Err(e) => e,
    };
    hub.metrics.refused.get_or_create(&RefusedLabel { reason: code.into() }).inc();
    if status == StatusCode::UNAUTHORIZED {
        hub.auth_failures.note(peer.map(|p| p.0), code, &message);
    }
    let mut r = error(status, code, &message);
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        // The codings a body may have (RFC 9110, 12.5.3).
        r.headers_mut().insert(header::ACCEPT_ENCODING, header::HeaderValue::from_static("gzip, zstd"));
    }
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6750, 3: how to authenticate, and whether the token was bad.
        let challenge = if code == "bad_credentials" {
            r#"Bearer realm="watershed", error="invalid_token""#
        } else {
            r#"Bearer realm="watershed""#
        };
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(challenge));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        retry_later(r)
    } else {
        r
    }
}

/// Authenticate and ingest; a request refused as a whole gets its status,
/// error code and message.
async fn authenticate_and_ingest(
    hub: &Hub,
    headers: &HeaderMap,
    body: Body,
) -> Result<crate::ingest::IngestResponse, (StatusCode, &'static str, String)> {
    hub.accounts.refresh();
    let token =
        bearer_token(headers).map_err(|why| (StatusCode::UNAUTHORIZED, "unauthenticated", why.into()))?;
    let Some(account) = hub.accounts.authenticate(token) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "the token is not valid for any account".into(),
        ));
    };
    let framing = media(headers)
        .map_err(|message| (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message))?;
    let encoding = match content_encoding(headers) {
        Ok(e) => e,
        Err(message) => return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)),
    };
    let collector = collector(headers).map_err(|m| (StatusCode::BAD_REQUEST, "bad_request", m))?;
    let too_large = |n: usize| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body exceeds {n} bytes; send smaller batches"),
        )
    };
    let no_room = |full: Full| {
        let message = match full {
            Full::All => format!(
                "request bodies in flight hold memory.requests_bytes ({} bytes); retry after the delay",
                hub.requests.limit()
            ),
            Full::Account => format!(
                "this account's request bodies in flight hold memory.requests_bytes_per_account ({} \
                 bytes); retry after the delay",
                hub.requests.per_account()
            ),
        };
        (StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    };
    // Read only once the token is good: an unauthenticated client gets its
    // 401 before the hub buffers a byte of its body. A declared length is
    // held (or refused) before any of it is read.
    let limits = &hub.config.limits;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(too_large(limits.max_body_bytes));
    }
    let mut held = hub.requests.hold(&account, declared.unwrap_or(0)).map_err(no_room)?;
    let deadline = std::time::Duration::from_secs(limits.body_timeout_secs);
    let read = read_body(body, declared, limits.max_body_bytes, &mut held);
    let body = match tokio::time::timeout(deadline, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyRead::TooLarge)) => return Err(too_large(limits.max_body_bytes)),
        Ok(Err(BodyRead::NoRoom(full))) => return Err(no_room(full)),
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
    hub.ingest(&account, collector, encoding, framing, body, held).await.map_err(|e| match e {
        Refused::TooLarge(n) => too_large(n),
        Refused::TooManyEvents(n) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body holds more than {n} events (limits.max_batch_events); send smaller batches"),
        ),
        Refused::RequestsFull(full) => no_room(full),
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

/// Media types of an events body besides `application/json` and any
/// `application/*+json` (CloudEvents' `application/cloudevents+json` and
/// `application/cloudevents-batch+json` among them): newline-delimited
/// JSON under its common names.
const NDJSON_TYPES: [&str; 4] =
    ["application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"];

/// The bearer token of the request's one `Authorization` header, or why
/// there is none. The scheme is matched in any case (RFC 9110, 11.1);
/// several `Authorization` headers are refused rather than one chosen.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key(header::AUTHORIZATION) {
            "send one Authorization header, not several"
        } else {
            "send Authorization: Bearer <token>"
        });
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII; send Authorization: Bearer <token>")?;
    let (scheme, token) = value.trim().split_once([' ', '\t']).unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("send Authorization: Bearer <token> (another scheme was sent)");
    }
    match token.trim() {
        "" => Err("send Authorization: Bearer <token> (the token is missing)"),
        t if t.contains([' ', '\t']) => Err("send Authorization: Bearer <token> (one token, without spaces)"),
        t => Ok(t),
    }
}

/// The longest collector name, in bytes.
const MAX_COLLECTOR: usize = 256;

/// The `X-Watershed-Collector` header: the forwarding collector's name,
/// stored with every row of the request. One header of printable ASCII,
/// at most [`MAX_COLLECTOR`] bytes; anything else is refused rather than
/// dropped or stored as sent.
fn collector(headers: &HeaderMap) -> Result<Option<&str>, String> {
    let mut values = headers.get_all("x-watershed-collector").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err("send one X-Watershed-Collector header, not several".into());
    }
    let name = value.to_str().ok().map(str::trim).filter(|n| n.bytes().all(|b| (0x20..0x7f).contains(&b)));
    match name {
        Some("") => Err("X-Watershed-Collector is empty; name the collector or leave the header out".into()),
        Some(n) if n.len() <= MAX_COLLECTOR => Ok(Some(n)),
        Some(n) => Err(format!("X-Watershed-Collector is {} bytes; at most {MAX_COLLECTOR}", n.len())),
        None => Err("X-Watershed-Collector must be printable ASCII".into()),
    }
}

/// How the request's `Content-Type` says its body's events are laid out,
/// or why its headers say the body is not events this endpoint reads.
/// No (or an empty) `Content-Type` is fine: the body's shape decides (an
/// array, one object, or NDJSON), as it does for the JSON types; an
/// NDJSON type makes every line one event. A CloudEvents binary-mode
/// request (`ce-specversion` set, the body only the event's data) is
/// refused by name rather than read as an event.
fn media(headers: &HeaderMap) -> Result<Framing, String> {
    let declared = headers.get(header::CONTENT_TYPE).filter(|v| !v.as_bytes().trim_ascii().is_empty());
    let (essence, params) = match declared.map(|v| v.to_str()) {
        None => (String::new(), ""),
        Some(Err(_)) => return Err("Content-Type is not readable text; ".to_owned() + ACCEPTED),
        Some(Ok(text)) => {
            let (essence, params) = text.split_once(';').unwrap_or((text, ""));
            let essence = essence.trim().to_ascii_lowercase();
            let json = essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
                || NDJSON_TYPES.contains(&essence.as_str());
            if !json {
                return Err(format!("Content-Type {essence:?} is not supported; {ACCEPTED}"));
            }
            (essence, params)
        }
    };
    if headers.contains_key("ce-specversion") && !essence.starts_with("application/cloudevents") {
        return Err(
            "CloudEvents binary content mode (ce-* headers) is not supported; send events in structured \
             mode, Content-Type: application/cloudevents+json"
                .to_owned(),
        );
    }
    for param in params.split(';') {
        let Some((name, value)) = param.split_once('=') else { continue };
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim().trim_matches('"');
            if !value.eq_ignore_ascii_case("utf-8") && !value.eq_ignore_ascii_case("utf8") {
                return Err(format!("charset {value:?} is not supported; events are UTF-8 JSON"));
            }
        }
    }
    Ok(if NDJSON_TYPES.contains(&essence.as_str()) { Framing::Lines } else { Framing::Shape })
}

/// The body's content coding, as [`crate::body::decode`] names it
/// (`None`: unencoded), or why it is refused: one coding of `gzip`
/// (`x-gzip`), `zstd` or `identity`, in any case (RFC 9110), and nothing
/// else. Checked before the body is read.
fn content_encoding(headers: &HeaderMap) -> Result<Option<&'static str>, String> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(None) };
    let refuse = |what: &str| format!("Content-Encoding {what} is not supported; send gzip, zstd or none");
    let Ok(text) = value.to_str() else { return Err(refuse("(not readable text)")) };
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(None),
        "gzip" | "x-gzip" => Ok(Some("gzip")),
        "zstd" => Ok(Some("zstd")),
        other => Err(refuse(&format!("{other:?}"))),
    }
}

/// What a refused `Content-Type` is told to send instead.
const ACCEPTED: &str = "send application/json or application/x-ndjson (also application/cloudevents+json \
                        or application/cloudevents-batch+json)";

/// Why a body could not be read.
enum BodyRead {
    /// Over the limit (as it arrived).
    TooLarge,
    /// More arrived than the request memory has room for.
    NoRoom(Full),
    /// The connection failed.
    Failed(axum::Error),
}

/// Read the body, refusing it as soon as its received size passes
/// `limit` (the compressed body may not exceed the limit either; the
/// decompressed size is checked while decompressing), and holding in
/// `held` what arrives beyond what it holds already (the `declared`
/// length, held before the first byte).
async fn read_body(
    body: Body,
    declared: Option<usize>,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, BodyRead> {
    use futures::StreamExt as _;
    let mut stream = body.into_data_stream();
    let first = match stream.next().await {
        None => return Ok(Bytes::new()),
        Some(chunk) => chunk.map_err(BodyRead::Failed)?,
    };
    let room = |held: &mut Held, n: usize| {
        if n > limit {
            Err(BodyRead::TooLarge)
        } else {
            held.grow_to(n).map_err(BodyRead::NoRoom)
        }
    };
    room(held, first.len())?;
    let Some(second) = stream.next().await else {
        // The usual case, one chunk: no copy.
        return Ok(first);
    };
    let mut all = bytes::BytesMut::with_capacity(declared.unwrap_or(2 * first.len()).min(limit));
    all.extend_from_slice(&first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        let chunk = chunk.map_err(BodyRead::Failed)?;
        room(held, all.len() + chunk.len())?;
        all.extend_from_slice(&chunk);
        next = stream.next().await;
    }
    Ok(all.freeze())
}

/// 200 `ok`, or 503 with why the hub needs a restart (an orchestrator's
/// liveness probe restarts it; the restart recovers from disk).
async fn health(State(hub): State<Arc<Hub>>) -> Response {
    match hub.health() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}")).into_response(),
    }
}

/// 200 `ready`; 503 `busy` with `Retry-After` under backpressure, or
/// `unhealthy: <why>` when the hub needs a restart.
async fn ready(State(hub): State<Arc<Hub>>) -> Response {
    if let Err(why) = hub.health() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}")).into_response();
    }
    if let Some(why) = hub.wal_failing().await {
        let message = format!(
            "unavailable: the write-ahead log's last write failed ({why}); ready again once a write succeeds"
        );
        return retry_later((StatusCode::SERVICE_UNAVAILABLE, message).into_response());
    }
    if hub.busy() {
        retry_later((StatusCode::SERVICE_UNAVAILABLE, "busy").into_response())
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        hub.render_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    async fn call(hub: &Arc<Hub>, req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, String) {
        let r = router(hub.clone()).oneshot(req).await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn get(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path).body(Body::empty()).unwrap()
    }

    /// A write-ahead log that needs a restart (its fsync failed: what
    /// reached the disk is unknown) turns `/healthz` and `/readyz` to 503
    /// with the reason and `watershed_healthy` to 0, so an orchestrator
    /// restarts the hub; ingest answers 503 with `Retry-After` (nothing
    /// was stored, a retry is safe) rather than 500.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_that_needs_a_restart_fails_health_and_ingest_answers_503() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::testing::config(dir.path());
        let token = crate::testing::token(dir.path());
        let hub = Arc::new(Hub::start(config).await.unwrap());
        let post = |id: &str| {
            let event = crate::testing::login(id);
            axum::http::Request::post("/v1/events")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from(event))
                .unwrap()
        };
        let (status, _, body) = call(&hub, post("e-1")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""accepted":1"#), "{body}");
        assert_eq!(call(&hub, get("/healthz")).await.2, "ok");
        assert_eq!(call(&hub, get("/readyz")).await.2, "ready");
        assert!(call(&hub, get("/metrics")).await.2.contains("watershed_healthy 1"));

        crate::wal::tests::fail_next_sync(&dir.path().join("wal"));
        let (status, headers, body) = call(&hub, post("e-2")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(headers.contains_key(header::RETRY_AFTER));
        assert!(body.contains("nothing was stored") && body.contains("input/output error"), "{body}");
        for path in ["/healthz", "/readyz"] {
            let (status, _, body) = call(&hub, get(path)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert!(body.starts_with("unhealthy: the write-ahead log needs a restart"), "{path}: {body}");
        }
        assert!(call(&hub, get("/metrics")).await.2.contains("watershed_healthy 0"));
        let (status, _, body) = call(&hub, post("e-3")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("restart the hub"), "{body}");
    }

    /// A write that fails and is cut back (a full disk) answers its
    /// request 503 and makes `/readyz` 503 `unavailable` while a probe's
    /// write fails too; once one succeeds the hub is ready and takes the
    /// retry. `/healthz` stays 200: no restart is needed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_follows_a_full_disk_and_comes_back_with_space() {
        let dir = tempfile::tempdir().unwrap();
        let token = crate::testing::token(dir.path());
        let hub = Arc::new(Hub::start(crate::testing::config(dir.path())).await.unwrap());
        let get = |path: &str| axum::http::Request::get(path).body(Body::empty()).unwrap();
        let post = || {
            axum::http::Request::post("/v1/events")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from(crate::testing::login("f-1")))
                .unwrap()
        };
        let wal = dir.path().join("wal");
        crate::wal::tests::fail_next_write(&wal);
        let (status, _, body) = call(&hub, post()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        crate::wal::tests::fail_next_probe(&wal);
        let (status, headers, body) = call(&hub, get("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.starts_with("unavailable: the write-ahead log's last write failed"), "{body}");
        assert!(headers.contains_key(header::RETRY_AFTER));
        assert_eq!(call(&hub, get("/healthz")).await.2, "ok");
        // Space is back: the next probe passes, and the retry is stored.
        assert_eq!(call(&hub, get("/readyz")).await.2, "ready");
        let (status, _, body) = call(&hub, post()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""accepted":1"#), "{body}");
    }

    /// Content codings are matched in any case, `x-gzip` is gzip, and any
    /// other (or several, or an unreadable value) is refused with 415 and
    /// `Accept-Encoding` before the body is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_codings_are_checked_before_the_body_is_read() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let token = crate::testing::token(dir.path());
        let hub = Arc::new(Hub::start(crate::testing::config(dir.path())).await.unwrap());
        let post = |encoding: &[u8], body: Body| {
            axum::http::Request::post("/v1/events")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .header(header::CONTENT_ENCODING, header::HeaderValue::from_bytes(encoding).unwrap())
                .body(body)
                .unwrap()
        };
        for (i, coding) in ["GZIP", " x-gzip ", "Identity"].into_iter().enumerate() {
            let event = crate::testing::login(&format!("c-{i}"));
            let body = if coding.to_ascii_lowercase().contains("gzip") {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(event.as_bytes()).unwrap();
                gz.finish().unwrap()
            } else {
                event.into_bytes()
            };
            let (status, _, text) = call(&hub, post(coding.as_bytes(), Body::from(body))).await;
            assert_eq!(status, StatusCode::OK, "{coding}: {text}");
            assert!(text.contains(r#""accepted":1"#), "{coding}: {text}");
        }
        for coding in [&b"br"[..], b"gzip, zstd", b"\xff"] {
            // A body that fails if it is read at all.
            let unread = Body::from_stream(futures::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("the body was read"))
            }));
            let (status, headers, text) = call(&hub, post(coding, unread)).await;
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{coding:?}: {text}");
            assert_eq!(headers[header::ACCEPT_ENCODING], "gzip, zstd");
            assert!(text.contains("Content-Encoding") && text.contains("send gzip, zstd or none"), "{text}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_one_token_is_required() {
        let auth = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AUTHORIZATION, header::HeaderValue::from_bytes(v.as_bytes()).unwrap());
            }
            bearer_token(&h).map(str::to_owned)
        };
        for ok in ["Bearer wsh_a", "bearer wsh_a", "BEARER  wsh_a ", "Bearer\twsh_a"] {
            assert_eq!(auth(&[ok]).as_deref(), Ok("wsh_a"), "{ok:?}");
        }
        for (bad, says) in [
            (&[][..], "send Authorization: Bearer <token>"),
            (&["Basic d2F0ZXI6c2hlZA=="], "another scheme"),
            (&["Bearer"], "the token is missing"),
            (&["Bearer "], "the token is missing"),
            (&["Bearerwsh_a"], "another scheme"),
            (&["Bearer wsh_a wsh_b"], "without spaces"),
            (&["Bearer é"], "not ASCII"),
            (&["Bearer wsh_a", "Bearer wsh_b"], "not several"),
        ] {
            let e = auth(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_collector_name_is_one_printable_ascii_header() {
        let named = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-watershed-collector", header::HeaderValue::from_bytes(v).unwrap());
            }
            collector(&h).map(|c| c.map(str::to_owned))
        };
        assert_eq!(named(&[]), Ok(None));
        assert_eq!(named(&[b"eventbridge-eu-west-1"]), Ok(Some("eventbridge-eu-west-1".into())));
        assert_eq!(named(&[b" kafka/orders @ 10.0.0.1 "]), Ok(Some("kafka/orders @ 10.0.0.1".into())));
        assert_eq!(named(&[&[b'a'; 256]]).map(|c| c.map(|n| n.len())), Ok(Some(256)));
        for (bad, says) in [
            (&[&b""[..]][..], "is empty"),
            (&[&b"  "[..]], "is empty"),
            (&[&[b'a'; 257][..]], "257 bytes; at most 256"),
            (&["caf\u{e9}".as_bytes()], "printable ASCII"),
            (&[&b"a\tb"[..]], "printable ASCII"),
            (&[&b"a"[..], &b"b"[..]], "not several"),
        ] {
            let e = named(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// 401s say how to authenticate (`WWW-Authenticate`), and whether the
    /// token was refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unauthorized_answers_carry_a_bearer_challenge() {
        let dir = tempfile::tempdir().unwrap();
        let token = crate::testing::token(dir.path());
        let hub = Arc::new(Hub::start(crate::testing::config(dir.path())).await.unwrap());
        let post = |auth: Option<String>| {
            let mut r =
                axum::http::Request::post("/v1/events").header(header::CONTENT_TYPE, "application/x-ndjson");
            if let Some(a) = auth {
                r = r.header(header::AUTHORIZATION, a);
            }
            r.body(Body::from(crate::testing::login("u-1"))).unwrap()
        };
        let (status, headers, body) = call(&hub, post(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], r#"Bearer realm="watershed""#);
        let (status, headers, body) = call(&hub, post(Some(format!("Bearer {token}x")))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("bad_credentials"), "{body}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], r#"Bearer realm="watershed", error="invalid_token""#);
        let (status, _, body) = call(&hub, post(Some(format!("bearer {token}")))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""accepted":1"#), "{body}");
    }

    /// Refused credentials are logged at once, then at most once a
    /// second, each line saying how many were not logged before it.
    #[test]
    fn refused_credentials_are_logged_at_most_once_a_second() {
        let log = AuthFailures::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        assert_eq!(log.admit(at(0)), Some(0), "the first is logged");
        assert_eq!(log.admit(at(10)), None);
        assert_eq!(log.admit(at(999)), None);
        assert_eq!(log.admit(at(1000)), Some(2), "a second later, with the two not logged");
        assert_eq!(log.admit(at(1500)), None);
        assert_eq!(log.admit(at(5000)), Some(1));
        assert_eq!(log.admit(at(7000)), Some(0));
    }

    /// An unknown path or a wrong method gets a JSON error like every
    /// other refusal; a 405 keeps its `Allow` header.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_paths_and_methods_get_json_errors() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(Hub::start(crate::testing::config(dir.path())).await.unwrap());
        let req = |method: &str, path: &str| {
            axum::http::Request::builder().method(method).uri(path).body(Body::empty()).unwrap()
        };
        let (status, headers, body) = call(&hub, req("POST", "/v1/event")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "not_found", "{body}");
        assert!(v["message"].as_str().unwrap().contains("/v1/event;"), "{body}");
        let (status, headers, body) = call(&hub, req("GET", "/v1/events")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        assert_eq!(headers[header::ALLOW], "POST");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "method_not_allowed", "{body}");
        assert!(v["message"].as_str().unwrap().starts_with("GET is not allowed on /v1/events"), "{body}");
        let (status, headers, _) = call(&hub, req("POST", "/metrics")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET,HEAD");
        let (status, _, body) = call(&hub, req("GET", "/healthz")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    /// Every acknowledged request is timed, including one with nothing
    /// new to store (duplicates only, or no events).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_request_is_timed() {
        let dir = tempfile::tempdir().unwrap();
        let token = crate::testing::token(dir.path());
        let hub = Arc::new(Hub::start(crate::testing::config(dir.path())).await.unwrap());
        let post = |body: String| {
            axum::http::Request::post("/v1/events")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from(body))
                .unwrap()
        };
        for (body, says) in [
            (crate::testing::login("t-1"), r#""accepted":1"#),
            (crate::testing::login("t-1"), r#""duplicates":1"#),
            (String::new(), r#""accepted":0"#),
        ] {
            let (status, _, text) = call(&hub, post(body)).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            assert!(text.contains(says), "{text}");
        }
        let metrics = call(&hub, get("/metrics")).await.2;
        assert!(metrics.lines().any(|l| l == "watershed_ack_latency_seconds_count 3"), "{metrics}");
    }

    fn check(pairs: &[(&str, &str)]) -> Result<Framing, String> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        media(&h)
    }

    #[test]
    fn json_types_and_no_type_are_read_and_others_refused_by_name() {
        for (ok, framing) in [
            (vec![], Framing::Shape),
            (vec![("content-type", "")], Framing::Shape),
            (vec![("content-type", "application/json")], Framing::Shape),
            (vec![("content-type", "Application/JSON; charset=UTF-8")], Framing::Shape),
            (vec![("content-type", "application/x-ndjson")], Framing::Lines),
            (vec![("content-type", "Application/NDJSON")], Framing::Lines),
            (vec![("content-type", "application/jsonl; charset=\"utf8\"")], Framing::Lines),
            (vec![("content-type", "application/cloudevents-batch+json")], Framing::Shape),
            (
                vec![("content-type", "application/cloudevents+json"), ("ce-specversion", "1.0")],
                Framing::Shape,
            ),
        ] {
            assert_eq!(check(&ok), Ok(framing), "{ok:?}");
        }
        for (bad, says) in [
            (
                vec![("content-type", "application/x-www-form-urlencoded")],
                "\"application/x-www-form-urlencoded\"",
            ),
            (vec![("content-type", "text/csv")], "application/x-ndjson"),
            (vec![("content-type", "application/json; charset=latin1")], "charset \"latin1\""),
            (vec![("ce-specversion", "1.0")], "binary content mode"),
            (vec![("content-type", "application/json"), ("ce-specversion", "1.0")], "binary content mode"),
        ] {
            let m = check(&bad).expect_err("refused");
            assert!(m.contains(says), "{bad:?}: {m}");
        }
    }
}
