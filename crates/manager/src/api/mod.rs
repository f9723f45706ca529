//! The REST API on ferrod's unix socket and TCP listeners (documented in `openapi.json` next to
//! this crate): maps HTTP requests to service calls, and owns every HTTP status code. One file per
//! resource family (`domains`, `snapshots` of domains, `backups` with checkpoints of domains, `clones` and templates of domains, `migration` of domains between ferrods, `pools` with volumes, `networks`, `jobs`,
//! `events` with metrics, `host`); `auth` checks every request first and serves `/v1/session`; `ui` serves the embedded
//! web UI at `/`.
//!
//! Every failure is JSON `{"code","message"}`; request bodies are read here with explicit limits so
//! that no input can produce a non-JSON error or take the daemon down.

pub mod auth;
mod backups;
mod clones;
mod domains;
mod events;
mod host;
mod jobs;
mod migration;
mod networks;
mod pools;
mod snapshots;
pub mod ui;

use crate::access::Access;
use crate::daemon::Services;
use crate::domain::validate_name;
use crate::error::{Error, ErrorKind};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

type Svc = State<Arc<Services>>;

/// Largest JSON or TOML request body.
const BODY_LIMIT: usize = 1 << 20;

pub fn router(services: Arc<Services>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/", get(ui::file))
        .route("/assets/{file}", get(ui::file))
        .route("/v1/version", get(version))
        .route("/v1/host", get(host::host))
        .route("/v1/nodeinfo", get(host::nodeinfo))
        .route("/v1/domains", get(domains::list).post(domains::define))
        .route("/v1/domains/{name}", get(domains::get).delete(snapshots::undefine))
        .route("/v1/domains/{name}/{sub}", get(domains::resource).post(domains::action))
        .route("/v1/domains/{name}/snapshots", get(snapshots::list).post(snapshots::create))
        .route("/v1/domains/{name}/snapshots/{snapshot}", get(snapshots::get).delete(snapshots::delete))
        .route("/v1/domains/{name}/snapshots/{snapshot}/{action}", post(snapshots::action))
        .route("/v1/domains/{name}/backup", post(backups::begin))
        .route("/v1/domains/{name}/restore", post(backups::restore))
        .route("/v1/domains/{name}/clone", post(clones::clone))
        .route("/v1/domains/{name}/template", post(clones::template))
        .route("/v1/domains/{name}/migrate", post(migration::migrate))
        .route("/v1/domains/{name}/migration", get(migration::last))
        .route("/v1/migrations/incoming", post(migration::incoming))
        .route("/v1/domains/{name}/checkpoints", get(backups::list))
        .route("/v1/domains/{name}/checkpoints/{checkpoint}", get(backups::get).delete(backups::delete))
        .route("/v1/ovf/import", post(domains::import_ovf))
        .route("/v1/pools", get(pools::list).post(pools::define))
        .route("/v1/pools/{pool}", get(pools::get).delete(pools::undefine))
        .route("/v1/pools/{pool}/{action}", post(pools::action))
        .route("/v1/pools/{pool}/volumes", get(pools::volumes).post(pools::create_volume))
        .route("/v1/pools/{pool}/volumes/{vol}", get(pools::volume).delete(pools::delete_volume))
        .route("/v1/pools/{pool}/volumes/{vol}/data", get(pools::download).put(pools::upload))
        .route("/v1/pools/{pool}/volumes/{vol}/{action}", post(pools::volume_action))
        .route("/v1/networks", get(networks::list).post(networks::define))
        .route("/v1/networks/{name}", get(networks::get).delete(networks::undefine))
        .route("/v1/networks/{name}/{sub}", get(networks::resource).post(networks::action))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/{action}", post(jobs::action))
        .route("/v1/events", get(events::events))
        .route("/metrics", get(events::metrics))
        .route("/v1/session", get(auth::whoami).post(auth::sign_in).delete(auth::sign_out))
        .fallback(|| async { ApiError::not_found("no such endpoint (see openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        })
        .with_state(services)
        .layer(axum::middleware::from_fn(auth::check))
        .layer(axum::Extension(access))
}

/// An HTTP error answer: status, a stable code and one line of message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    fn invalid(message: impl Into<String>) -> ApiError {
        Error::invalid(message).into()
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        Error::not_found(message).into()
    }
}

/// The status and code of each kind of service error.
impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let (status, code) = match e.kind {
            ErrorKind::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorKind::Vmm => (StatusCode::BAD_GATEWAY, "vmm_error"),
            ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

fn ok<T: Serialize>(value: &T) -> ApiResult<Response> {
    Ok(json(StatusCode::OK, value))
}

async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body larger than {BODY_LIMIT} bytes or unreadable"))
    })
}

/// A JSON object body; an empty body is an empty object.
async fn read_json(body: Body) -> ApiResult<Value> {
    let bytes = read_body(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body must be a JSON object"));
    }
    Ok(value)
}

/// Deserializes a JSON body into a definition struct, naming the field on errors.
fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> ApiResult<T> {
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

/// Refuses keys of a JSON object body other than `fields`, naming the first unknown one.
fn only_fields(body: &Value, fields: &[&str]) -> ApiResult<()> {
    match body.as_object().and_then(|o| o.keys().find(|k| !fields.contains(&k.as_str()))) {
        Some(key) => Err(ApiError::invalid(format!("{key}: unknown field (expected {})", fields.join(", ")))),
        None => Ok(()),
    }
}

/// An optional true/false field of a request body: missing or null gives `default`, anything
/// but a boolean is refused naming the field.
fn body_flag(body: &Value, key: &str, default: bool) -> ApiResult<bool> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(format!("{key}: must be true or false"))),
    }
}

/// Reads `{"enabled": bool}` (missing means true).
fn enabled_flag(body: &Value) -> ApiResult<bool> {
    body_flag(body, "enabled", true)
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A true/false query parameter (`?key` alone means true, absent means false).
fn query_flag(query: Option<&str>, key: &str) -> ApiResult<bool> {
    match query_param(query, key) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!("{key}: {other:?} is not true or false"))),
    }
}

/// Validates a domain or pool name taken from a URL.
fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|e| ApiError::invalid(format!("{kind} name: {e}")))
}

async fn version(State(svc): Svc) -> ApiResult<Response> {
    ok(&serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "home": svc.paths.home.display().to_string(),
        "ferro_bin": svc.paths.ferro_bin.display().to_string(),
    }))
}
