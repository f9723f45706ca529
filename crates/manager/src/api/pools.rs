//! `/v1/pools` and their volumes: definitions, actions, volume data up and down, copies as jobs.

use super::{ApiError, ApiResult, Svc, body_flag, check_name, enabled_flag, from_json, json, ok, only_fields, query_flag, read_json};
use crate::daemon::Services;
use crate::model::JobState;
use crate::pools::{CopyKind, Imported, PoolDefinition, Size, VolumeDefinition};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub(super) async fn list(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.pools.list())
}

pub(super) async fn define(State(svc): Svc, body: Body) -> ApiResult<Response> {
    let def: PoolDefinition = from_json(read_json(body).await?)?;
    Ok(json(StatusCode::CREATED, &svc.pools.define(def)?))
}

pub(super) async fn get(State(svc): Svc, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&svc.pools.get(&pool)?)
}

pub(super) async fn undefine(State(svc): Svc, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    svc.pools.undefine(&pool)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn action(State(svc): Svc, Path((pool, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let body = read_json(body).await?;
    let pools = &svc.pools;
    let info = match action.as_str() {
        "build" => pools.build(&pool)?,
        "start" => pools.start(&pool)?,
        "destroy" => pools.destroy(&pool)?,
        "refresh" => pools.refresh(&pool)?,
        "autostart" => pools.set_autostart(&pool, enabled_flag(&body)?)?,
        "import" => return import(&svc, &pool, &body).await,
        _ => return Err(ApiError::not_found(format!("pools have no action {action:?}"))),
    };
    ok(&info)
}

pub(super) async fn volumes(State(svc): Svc, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&svc.pools.volumes(&pool)?)
}

pub(super) async fn create_volume(State(svc): Svc, Path(pool): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let def: VolumeDefinition = from_json(read_json(body).await?)?;
    Ok(json(StatusCode::CREATED, &svc.pools.create_volume(&pool, def).await?))
}

pub(super) async fn volume(State(svc): Svc, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&svc.pools.volume(&pool, &vol)?)
}

pub(super) async fn delete_volume(State(svc): Svc, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    svc.pools.delete_volume(&pool, &vol)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn volume_action(
    State(svc): Svc,
    Path((pool, vol, action)): Path<(String, String, String)>,
    uri: Uri,
    body: Body,
) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let body = read_json(body).await?;
    let info = match action.as_str() {
        "clone" => return copy(&svc, &pool, &vol, CopyKind::Clone, &body, query_flag(uri.query(), "wait")?).await,
        "convert" => return copy(&svc, &pool, &vol, CopyKind::Convert, &body, query_flag(uri.query(), "wait")?).await,
        "resize" => {
            let capacity = match body.get("capacity") {
                Some(v) => serde_json::from_value::<Size>(v.clone())
                    .map_err(|_| ApiError::invalid("capacity: expected a byte count or a size like \"20G\""))?
                    .bytes("capacity")?,
                None => return Err(ApiError::invalid("capacity: missing")),
            };
            svc.pools.resize_volume(&pool, &vol, capacity).await?
        }
        "wipe" => svc.pools.wipe_volume(&pool, &vol).await?,
        _ => return Err(ApiError::not_found(format!("volumes have no action {action:?}"))),
    };
    ok(&info)
}

/// Starts a clone or convert job: 202 with the job, or with `wait` the new volume once the job
/// has completed (the job goes on if the client hangs up).
async fn copy(svc: &Services, pool: &str, vol: &str, kind: CopyKind, body: &Value, wait: bool) -> ApiResult<Response> {
    let fields: &[&str] = match kind {
        CopyKind::Clone => &["name"],
        CopyKind::Convert => &["name", "format"],
    };
    only_fields(body, fields)?;
    let target = match body.get("name") {
        Some(Value::String(n)) => n.as_str(),
        _ => return Err(ApiError::invalid("name: missing (the name of the new volume, a string)")),
    };
    let format = match body.get("format") {
        None => None,
        Some(Value::String(f)) => Some(f.as_str()),
        Some(f) => return Err(ApiError::invalid(format!("format: {f} is not raw or qcow2"))),
    };
    let job = svc.pools.copy_volume(pool, vol, kind, target, format)?;
    if !wait {
        return Ok(json(StatusCode::ACCEPTED, &job.info()));
    }
    let info = job.finished(None).await;
    match info.state {
        JobState::Completed => ok(&svc.pools.volume(pool, target)?),
        JobState::Cancelled => Err(crate::error::Error::conflict(format!("job {} was cancelled", info.id)).into()),
        _ => Err(crate::error::Error::internal(format!("job {} failed: {}", info.id, info.error.unwrap_or_default())).into()),
    }
}

/// Imports an image file of ferrod's host into a new volume: 202 with the copy job, or 201 with
/// the volume for a linked (overlay) import.
async fn import(svc: &Services, pool: &str, body: &Value) -> ApiResult<Response> {
    only_fields(body, &["source", "name", "format", "linked"])?;
    let text = |key: &str| match body.get(key) {
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        None => Ok(None),
        Some(_) => Err(ApiError::invalid(format!("{key}: must be a string"))),
    };
    let source = text("source")?.ok_or_else(|| ApiError::invalid("source: missing (an image file on ferrod's host)"))?;
    let name = text("name")?.ok_or_else(|| ApiError::invalid("name: missing (the name of the new volume)"))?;
    let format = text("format")?.unwrap_or("qcow2");
    let linked = body_flag(&body, "linked", false)?;
    match svc.pools.import_image(pool, std::path::Path::new(source), name, format, linked)? {
        Imported::Job(job) => Ok(json(StatusCode::ACCEPTED, &job.info())),
        Imported::Volume(info) => Ok(json(StatusCode::CREATED, &info)),
    }
}

/// Streams the volume's bytes (vol-download).
pub(super) async fn download(State(svc): Svc, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let path = svc.pools.volume_path(&pool, &vol, false)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| crate::error::Error::internal(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/octet-stream"), (header::CONTENT_LENGTH, &len.to_string())], Body::from_stream(stream))
        .into_response())
}

/// Replaces the volume's contents with the request body (vol-upload).
pub(super) async fn upload(State(svc): Svc, Path((pool, vol)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&svc.pools.upload_volume(&pool, &vol, body.into_data_stream()).await?)
}
