//! `/v1/jobs`: every job the daemon remembers, whatever its kind, and cancel.

use super::{ApiError, ApiResult, Svc, ok, query_param, read_json};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use std::time::Duration;

/// Longest a `GET /v1/jobs/{id}?wait_ms=` may wait for the job to end.
const MAX_WAIT_MS: u64 = 60_000;

/// A job id from a URL; text that names no job is a 404 like an unknown id.
fn job_id(text: &str) -> ApiResult<u64> {
    text.parse().map_err(|_| ApiError::not_found(format!("job {text:?} does not exist (see `ferro job-list`)")))
}

pub(super) async fn list(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.jobs.list())
}

/// A job; with `?wait_ms=N`, once it ended or N milliseconds passed, whichever comes first (so a
/// client following a job learns of its end at once without polling fast).
pub(super) async fn get(State(svc): Svc, Path(id): Path<String>, RawQuery(query): RawQuery) -> ApiResult<Response> {
    let job = svc.jobs.get(job_id(&id)?)?;
    match query_param(query.as_deref(), "wait_ms") {
        None => ok(&job.info()),
        Some(text) => {
            let wait = text.parse::<u64>().ok().filter(|ms| *ms <= MAX_WAIT_MS);
            let wait = wait.ok_or_else(|| ApiError::invalid(format!("wait_ms: {text:?} is not 0-{MAX_WAIT_MS} milliseconds")))?;
            ok(&job.finished(Some(Duration::from_millis(wait))).await)
        }
    }
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
