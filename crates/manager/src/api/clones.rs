//! `/v1/domains/{name}/clone` and `/v1/domains/{name}/template`: cloning a shut-off domain (a
//! full clone is a job, 202 with the job; a linked clone is made at once, 201 with the new
//! domain) and turning a shut-off domain into a template (200 with the domain).

use super::{ApiResult, Svc, check_name, from_json, json, ok, read_json};
use crate::clones::Cloned;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

/// Clones a domain: `{"name", "linked"?, "pool"?}`.
pub(super) async fn clone(State(svc): Svc, Path(domain): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    let req = from_json(read_json(body).await?)?;
    match svc.clones.clone_domain(&domain, req).await? {
        Cloned::Job(job) => Ok(json(StatusCode::ACCEPTED, &job.info())),
        Cloned::Domain(info) => Ok(json(StatusCode::CREATED, &info)),
    }
}

pub(super) async fn template(State(svc): Svc, Path(domain): Path<String>) -> ApiResult<Response> {
    check_name("domain", &domain)?;
    ok(&svc.domains.make_template(&domain).await?)
}
