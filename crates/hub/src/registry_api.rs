//! A read-only subset of the Confluent Schema Registry REST API over the
//! schemas the hub loaded at start, so that producers' serializers and
//! schema tooling read subjects, versions and global ids, look a schema
//! up, and test a candidate version's compatibility against the running
//! hub.
//!
//! Schemas are files (`schemas/<subject>/vN.avsc`, reviewed like code and
//! checked by `watershed schema check`), so the registry is `READONLY`:
//! registering, deleting and changing a compatibility level or mode are
//! refused with Confluent's `42205` (operation not permitted), saying how a
//! version is added instead.
//!
//! Every request needs an account's token: `Authorization: Bearer <token>`
//! (Confluent clients: `bearer.auth.credentials.source=STATIC_TOKEN`), or
//! HTTP Basic with the account id as user and the token as password
//! (`basic.auth.credentials.source=USER_INFO`). Errors are Confluent's:
//! `{"error_code": 40401, "message": "..."}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use watershed_event::AccountId;
use watershed_schema::{SubjectEntry, Version};

use crate::metrics::RefusedLabel;
use crate::pipeline::Hub;

/// The media type of the registry's answers.
const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The registry's routes, each behind the account check.
pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(read_only))
        .route("/subjects/{subject}/versions", get(versions).post(read_only))
        .route("/subjects/{subject}/versions/{version}", get(version).delete(read_only))
        .route("/subjects/{subject}/versions/{version}/schema", get(version_schema))
        .route("/schemas/types", get(types))
        .route("/schemas/ids/{id}", get(by_id))
        .route("/schemas/ids/{id}/schema", get(by_id_schema))
        .route("/schemas/ids/{id}/subjects", get(id_subjects))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/compatibility/subjects/{subject}/versions", post(compatible_with_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(compatible_with_one))
        .route("/config", get(global_config).put(read_only))
        .route("/config/{subject}", get(subject_config).put(read_only).delete(read_only))
        .route("/mode", get(mode).put(read_only))
        .route("/mode/{subject}", get(subject_mode).put(read_only).delete(read_only))
        .route_layer(axum::middleware::from_fn_with_state(hub, authenticate))
}

/// A refusal in Confluent's form.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: u32,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn subject_not_found(subject: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = answer(self.status, &json!({ "error_code": self.code, "message": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="watershed", Basic realm="watershed""#),
            );
        }
        r
    }
}

fn answer(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, MEDIA_TYPE)], body.to_string()).into_response()
}

fn ok(body: &Value) -> Response {
    answer(StatusCode::OK, body)
}

type Answer = Result<Response, Refusal>;

/// The account whose credentials the request carries: a bearer token, or
/// HTTP Basic with the account id as user and its token as password.
fn credentials(hub: &Hub, headers: &HeaderMap) -> Result<AccountId, (&'static str, String)> {
    // One header of the Basic scheme; anything else is read (or refused)
    // as `POST /v1/events` reads its bearer token.
    let one = headers.get_all(header::AUTHORIZATION).iter().count() == 1;
    let basic = headers
        .get(header::AUTHORIZATION)
        .filter(|_| one)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once([' ', '\t']))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"));
    let (user, token) = match basic {
        Some((_, encoded)) => {
            let bad =
                || ("unauthenticated", "the Basic credentials are not base64 of user:password".to_owned());
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
            (Some(user.to_owned()), password.to_owned())
        }
        None => {
            let token = crate::http::bearer_token(headers).map_err(|why| {
                ("unauthenticated", format!("{why}, or Basic with the account id and its token"))
            })?;
            (None, token.to_owned())
        }
    };
    let Some(account) = hub.accounts.authenticate(&token) else {
        return Err(("bad_credentials", "the token is not valid for any account".into()));
    };
    match user {
        Some(u) if u != account.as_str() => {
            Err(("bad_credentials", "the Basic user is not the account the token belongs to".into()))
        }
        _ => Ok(account),
    }
}

async fn authenticate(State(hub): State<Arc<Hub>>, req: Request<Body>, next: Next) -> Response {
    hub.accounts.refresh();
    match credentials(&hub, req.headers()) {
        Ok(_) => next.run(req).await,
        Err((code, message)) => {
            hub.metrics.refused.get_or_create(&RefusedLabel { reason: code.into() }).inc();
            let peer = req.extensions().get::<crate::http::Peer>().copied();
            hub.auth_failures.note(peer, code, &message);
            Refusal::new(StatusCode::UNAUTHORIZED, 40101, message).into_response()
        }
    }
}

/// Confluent's `offset` and `limit` (`-1`: no limit) over `items`.
fn page<T>(items: Vec<T>, q: &HashMap<String, String>) -> Vec<T> {
    let offset = q.get("offset").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let limit = q.get("limit").and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    items.into_iter().skip(offset).take(limit).collect()
}

fn subject<'a>(hub: &'a Hub, name: &str) -> Result<&'a SubjectEntry, Refusal> {
    hub.registry.subject(name).ok_or_else(|| Refusal::subject_not_found(name))
}

/// A version id: a number from 1 to 2^31-1, `latest`, or `-1` (latest).
fn version_of<'a>(s: &'a SubjectEntry, id: &str) -> Result<&'a Version, Refusal> {
    if id == "latest" || id == "-1" {
        return Ok(s.latest());
    }
    let n = id.parse::<u32>().ok().filter(|n| (1..=i32::MAX as u32).contains(n)).ok_or_else(|| {
        Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{id}' is not a valid version id. Allowed values are between \
                 [1, 2^31-1] and the string \"latest\""
            ),
        )
    })?;
    s.version(n).ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, 40402, format!("Version {n} not found.")))
}

fn registered(s: &SubjectEntry, v: &Version) -> Value {
    json!({ "subject": s.name, "version": v.version, "id": v.id, "schema": v.text })
}

fn by_id_of<'a>(hub: &'a Hub, id: &str) -> Result<(&'a SubjectEntry, &'a Version), Refusal> {
    id.parse::<u32>()
        .ok()
        .and_then(|n| hub.registry.by_id(n))
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")))
}

async fn subjects(State(hub): State<Arc<Hub>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let prefix = q.get("subjectPrefix").map_or("", String::as_str);
    let names: Vec<&str> =
        hub.registry.subjects().iter().map(|s| s.name.as_str()).filter(|n| n.starts_with(prefix)).collect();
    ok(&json!(page(names, &q)))
}

async fn versions(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let s = subject(&hub, &name)?;
    Ok(ok(&json!(page(s.versions.iter().map(|v| v.version).collect(), &q))))
}

async fn version(State(hub): State<Arc<Hub>>, Path((name, id)): Path<(String, String)>) -> Answer {
    let s = subject(&hub, &name)?;
    Ok(ok(&registered(s, version_of(s, &id)?)))
}

async fn version_schema(State(hub): State<Arc<Hub>>, Path((name, id)): Path<(String, String)>) -> Answer {
    let s = subject(&hub, &name)?;
    let v = version_of(s, &id)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, MEDIA_TYPE)], v.text.clone()).into_response())
}

async fn types() -> Response {
    ok(&json!(["AVRO"]))
}

async fn by_id(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Answer {
    let (_, v) = by_id_of(&hub, &id)?;
    Ok(ok(&json!({ "schema": v.text })))
}

async fn by_id_schema(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Answer {
    let (_, v) = by_id_of(&hub, &id)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, MEDIA_TYPE)], v.text.clone()).into_response())
}

async fn id_subjects(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Answer {
    let (s, _) = by_id_of(&hub, &id)?;
    Ok(ok(&json!([s.name])))
}

async fn id_versions(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Answer {
    let (s, v) = by_id_of(&hub, &id)?;
    Ok(ok(&json!([{ "subject": s.name, "version": v.version }])))
}

/// The schema text of a request body (`{"schema": "...", "schemaType":
/// "AVRO"}`), refused unless it is an Avro schema without references.
fn candidate(body: &[u8]) -> Result<String, Refusal> {
    let invalid = |m: &str| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, 42201, m);
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        invalid(&format!("the body is not JSON ({e}); send {{\"schema\": \"<Avro schema JSON>\"}}"))
    })?;
    if let Some(t) = v.get("schemaType").filter(|t| !t.is_null()) {
        if t != "AVRO" {
            return Err(invalid(&format!(
                "schemaType {t} is not supported: the registry holds AVRO schemas"
            )));
        }
    }
    if v.get("references").and_then(Value::as_array).is_some_and(|r| !r.is_empty()) {
        return Err(invalid("schema references are not supported: send the schema whole"));
    }
    v.get("schema").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
        invalid("the body has no \"schema\" string; send {\"schema\": \"<Avro schema JSON>\"}")
    })
}

async fn lookup(State(hub): State<Arc<Hub>>, Path(name): Path<String>, body: Bytes) -> Answer {
    let s = subject(&hub, &name)?;
    let text = candidate(&body)?;
    let v = s.find(&text).ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
    Ok(ok(&registered(s, v)))
}

fn compatibility(
    s: &SubjectEntry,
    against: Option<&Version>,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    let text = candidate(body)?;
    let problems = s.check_candidate(&text, against).map_err(|invalid| {
        Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {}", invalid.join("; ")),
        )
    })?;
    let mut out = json!({ "is_compatible": problems.is_empty() });
    if q.get("verbose").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        out["messages"] = json!(problems);
    }
    Ok(ok(&out))
}

async fn compatible_with_one(
    State(hub): State<Arc<Hub>>,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Answer {
    let s = subject(&hub, &name)?;
    let v = version_of(s, &id)?;
    compatibility(s, Some(v), &q, &body)
}

async fn compatible_with_all(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Answer {
    let s = subject(&hub, &name)?;
    compatibility(s, None, &q, &body)
}

async fn global_config() -> Response {
    ok(&json!({ "compatibilityLevel": watershed_schema::Compatibility::default().as_str() }))
}

async fn subject_config(State(hub): State<Arc<Hub>>, Path(name): Path<String>) -> Answer {
    let s = subject(&hub, &name)?;
    Ok(ok(&json!({ "compatibilityLevel": s.config.compatibility.as_str() })))
}

async fn mode() -> Response {
    ok(&json!({ "mode": "READONLY" }))
}

async fn subject_mode(State(hub): State<Arc<Hub>>, Path(name): Path<String>) -> Answer {
    subject(&hub, &name)?;
    Ok(ok(&json!({ "mode": "READONLY" })))
}

async fn read_only(State(hub): State<Arc<Hub>>) -> Refusal {
    Refusal::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        42205,
        format!(
            "the schema registry is read-only: a version is added as a file, {}/<subject>/vN.avsc, checked \
             with `watershed schema check`, and takes effect when the hub restarts",
            hub.config.schemas.display()
        ),
    )
}
