//! `/v1/jobs`: every job the daemon remembers, whatever its kind, and cancel.

use super::{ApiError, ApiResult, Svc, ok, read_json};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;

/// A job id from a URL; text that names no job is a 404 like an unknown id.
fn job_id(text: &str) -> ApiResult<u64> {
    text.parse().map_err(|_| ApiError::not_found(format!("job {text:?} does not exist (see `ferro job-list`)")))
}

pub(super) async fn list(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.jobs.list())
}

pub(super) async fn get(State(svc): Svc, Path(id): Path<String>) -> ApiResult<Response> {
    ok(&svc.jobs.get(job_id(&id)?)?.info())
}

pub(super) async fn action(State(svc): Svc, Path((id, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    read_json(body).await?;
    let id = job_id(&id)?;
    match action.as_str() {
        "cancel" => ok(&svc.jobs.cancel(id).await?),
        _ => {
            svc.jobs.get(id)?;
            Err(ApiError::not_found(format!("jobs have no action {action:?}")))
        }
    }
}
