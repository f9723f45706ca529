//! `/v1/domains/{name}/snapshots`: a domain's snapshot tree; taking and reverting run as jobs
//! (202 with the job), listing, showing and deleting answer at once.

use super::{ApiError, ApiResult, Svc, check_name, json, ok, only_fields, query_param, read_json};
use crate::snapshots::{RevertTo, SnapshotsOnUndefine};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub(super) async fn list(State(svc): Svc, Path(domain): Path<String>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    ok(&svc.snapshots.list(&domain)?)
}

/// Starts taking a snapshot: `{"name", "description"?}`.
pub(super) async fn create(State(svc): Svc, Path(domain): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    let body = read_json(body).await?;
    only_fields(&body, &["name", "description"])?;
    let name = body.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("name: missing (the snapshot's name)"))?;
    let description = match body.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err(ApiError::invalid("description: must be a string")),
    };
    let job = svc.snapshots.create(&domain, name, description)?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}

pub(super) async fn get(State(svc): Svc, Path((domain, name)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    check_name("snapshot", &name)?;
    ok(&svc.snapshots.info(&domain, &name)?)
}

pub(super) async fn delete(State(svc): Svc, Path((domain, name)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    check_name("snapshot", &name)?;
    svc.snapshots.delete(&domain, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Starts a revert: `{"state"?: "running" | "paused"}` (default: as the snapshot was taken).
pub(super) async fn action(State(svc): Svc, Path((domain, name, action)): Path<(String, String, String)>, body: Body) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    check_name("snapshot", &name)?;
    if action != "revert" {
        return Err(ApiError::not_found(format!("snapshots have no action {action:?}")));
    }
    let body = read_json(body).await?;
    only_fields(&body, &["state"])?;
    let to = match body.get("state") {
        None | Some(Value::Null) => RevertTo::AsTaken,
        Some(Value::String(s)) if s == "running" => RevertTo::Running,
        Some(Value::String(s)) if s == "paused" => RevertTo::Paused,
        Some(_) => return Err(ApiError::invalid("state: must be \"running\" or \"paused\" (omit it to revert as the snapshot was taken)")),
    };
    let job = svc.snapshots.revert(&domain, &name, to)?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}

/// `DELETE /v1/domains/{name}[?snapshots=metadata|all]`: a domain with snapshots is only
/// undefined when the caller says what becomes of them.
pub(super) async fn undefine(State(svc): Svc, Path(domain): Path<String>, RawQuery(query): RawQuery) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    let policy = match query_param(query.as_deref(), "snapshots") {
        None => SnapshotsOnUndefine::Refuse,
        Some("metadata") => SnapshotsOnUndefine::Metadata,
        Some("all") => SnapshotsOnUndefine::RemoveAll,
        Some(other) => return Err(ApiError::invalid(format!("snapshots: {other:?} is not \"metadata\" or \"all\""))),
    };
    svc.snapshots.undefine_domain(&domain, policy).await?;
    svc.backups.forget_domain(&domain)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
