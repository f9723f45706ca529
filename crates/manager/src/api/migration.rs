//! Live migration between ferrods: on the source, `POST /v1/domains/{name}/migrate` (202 with the
//! job; cancelled as any job) and `GET /v1/domains/{name}/migration`; on the
//! destination, `POST /v1/migrations/incoming`, which another ferrod calls with
//! `Upgrade: ferro-migration` and whose connection then carries the migration stream.

use super::{ApiError, ApiResult, Svc, body_flag, check_name, from_json, json, ok, only_fields, read_json};
use crate::migration::{DiskClaim, MigrateRequest};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use ferro_vmm_api::control::DEFAULT_MAX_DOWNTIME_MS;
use serde_json::Value;

/// The upgrade that turns an incoming-migration request into the migration stream.
const UPGRADE: &str = "ferro-migration";
/// The longest downtime budget a request may set (10 minutes).
const MAX_DOWNTIME_MS: u64 = 600_000;

/// Starts migrating the domain: `{"destination": "tls://HOST:PORT", "dest_token", "dest_ca"?,
/// "live"?, "offline"?, "max_downtime_ms"?, "bandwidth_mib"?, "auto_converge"?, "copy_storage_all"?,
/// "undefine_source"?}`.
pub(super) async fn migrate(State(svc): Svc, Path(name): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("domain", &name)?;
    let body = read_json(body).await?;
    only_fields(
        &body,
        &[
            "destination",
            "dest_ca",
            "dest_token",
            "live",
            "offline",
            "max_downtime_ms",
            "bandwidth_mib",
            "auto_converge",
            "copy_storage_all",
            "undefine_source",
        ],
    )?;
    let text = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(format!("{key}: must be a string"))),
    };
    let flag = |key: &str| body_flag(&body, key, false);
    let number = |key: &str, range: std::ops::RangeInclusive<u64>| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid(format!("{key}: must be a whole number from {} to {}", range.start(), range.end()))),
        },
    };
    let req = MigrateRequest {
        destination: text("destination")?.ok_or_else(|| ApiError::invalid("destination: missing (tls://HOST:PORT of the destination ferrod)"))?,
        dest_ca: text("dest_ca")?,
        dest_token: text("dest_token")?.ok_or_else(|| ApiError::invalid("dest_token: missing (an admin token of the destination ferrod)"))?,
        live: flag("live")?,
        offline: flag("offline")?,
        max_downtime_ms: number("max_downtime_ms", 1..=MAX_DOWNTIME_MS)?.unwrap_or(DEFAULT_MAX_DOWNTIME_MS),
        bandwidth_mib: number("bandwidth_mib", 1..=1 << 20)?,
        auto_converge: flag("auto_converge")?,
        copy_storage: flag("copy_storage_all")?,
        undefine_source: flag("undefine_source")?,
    };
    if req.copy_storage && req.offline {
        return Err(ApiError::invalid("copy_storage_all: moves a running domain's disks; offline already copies the disks the destination lacks"));
    }
    let job = svc.migrations.migrate(&name, req).await?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}

/// The domain's last outgoing migration: its job, the VMM's progress and, once completed, the
/// numbers.
pub(super) async fn last(State(svc): Svc, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("domain", &name)?;
    ok(&svc.migrations.last(&name)?)
}

/// The destination's side: `{"definition": TOML, "disks": [{"size", "marker", "nonce", "format"?,
/// "virtual_size"?}], "offline"?, "copy_storage"?}` with `Upgrade: ferro-migration`. Answers 101 once the domain's VMM waits for the
/// VM, and relays the connection to it from then on; offline, the connection then carries the
/// disks missing here.
pub(super) async fn incoming(State(svc): Svc, mut req: Request) -> ApiResult<Response> {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !upgrade.eq_ignore_ascii_case(UPGRADE) {
        return Err(ApiError::invalid(format!("an incoming migration needs the header Upgrade: {UPGRADE}")));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let body = read_json(req.into_body()).await?;
    only_fields(&body, &["definition", "disks", "offline", "copy_storage"])?;
    let definition = body.get("definition").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("definition: missing (the domain's TOML)"))?;
    let disks: Vec<DiskClaim> = from_json(body.get("disks").cloned().unwrap_or(Value::Array(Vec::new())))?;
    let flag = |key: &str| body_flag(&body, key, false);
    let (offline, copy_storage) = (flag("offline")?, flag("copy_storage")?);
    if offline && copy_storage {
        return Err(ApiError::invalid("copy_storage: a live migration's; offline copies the disks missing here anyway"));
    }
    let (name, arrival) = svc.migrations.incoming(definition, &disks, offline, copy_storage).await?;
    let migrations = svc.migrations.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => migrations.arrive(&name, hyper_util::rt::TokioIo::new(upgraded), arrival).await,
            Err(e) => {
                tracing::warn!(domain = name, "incoming migration: the upgrade failed: {e}");
                drop(arrival);
                migrations.abandon_incoming(&name, &[]).await;
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE)
        .body(Body::empty())
        .unwrap_or_default())
}
