//! `/v1/domains/{name}/backup` and `/v1/domains/{name}/checkpoints`: starting a backup (a job,
//! 202 with the job, the checkpoint it makes and the files it writes), listing, showing and
//! deleting checkpoints, and restoring a backup into a disk (a job).

use super::{ApiError, ApiResult, Svc, check_name, from_json, json, ok, only_fields, read_json};
use serde_json::Value;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Starts a backup: `{"target", "incremental"?, "checkpoint"?}`.
pub(super) async fn begin(State(svc): Svc, Path(domain): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    let req = from_json(read_json(body).await?)?;
    let started = svc.backups.begin(&domain, req).await?;
    Ok(json(StatusCode::ACCEPTED, &started))
}

pub(super) async fn list(State(svc): Svc, Path(domain): Path<String>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    ok(&svc.backups.list(&domain)?)
}

pub(super) async fn get(State(svc): Svc, Path((domain, name)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    check_name("checkpoint", &name)?;
    ok(&svc.backups.info(&domain, &name)?)
}

pub(super) async fn delete(State(svc): Svc, Path((domain, name)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    check_name("checkpoint", &name)?;
    svc.backups.delete(&domain, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Starts restoring a backup into a shut-off domain's disk: `{"from", "disk"?}`.
pub(super) async fn restore(State(svc): Svc, Path(domain): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    let body = read_json(body).await?;
    only_fields(&body, &["from", "disk"])?;
    let from = body.get("from").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("from: missing (the newest file of a backup chain)"))?;
    let disk = match body.get("disk") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.as_str()),
        Some(_) => return Err(ApiError::invalid("disk: must be a string (vda, vdb, ...)")),
    };
    let job = svc.backups.restore(&domain, std::path::Path::new(from), disk)?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}
