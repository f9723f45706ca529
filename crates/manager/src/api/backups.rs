//! `/v1/domains/{name}/backup` and `/v1/domains/{name}/checkpoints`: starting a backup (a job,
//! 202 with the job, the checkpoint it makes and the files it writes), listing, showing and
//! deleting checkpoints.

use super::{ApiResult, Svc, check_name, from_json, json, ok, read_json};
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
