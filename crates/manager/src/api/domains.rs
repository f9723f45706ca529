//! `/v1/domains`: definitions, lifecycle actions, stats, the TOML definition and the console.

use super::{ApiError, ApiResult, Svc, check_name, enabled_flag, json, ok, read_body, read_json};
use crate::domain::parse_size;
use crate::domains::Domains;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::time::Duration;

/// Longest a `shutdown` request may wait for the guest.
const MAX_SHUTDOWN_WAIT: u64 = 3600;

pub(super) async fn list(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.domains.list())
}

pub(super) async fn define(State(svc): Svc, body: Body) -> ApiResult<Response> {
    let bytes = read_body(body).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::invalid("definition is not UTF-8 text"))?;
    let (created, info) = svc.domains.define(text).await?;
    Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &info))
}

pub(super) async fn get(State(svc): Svc, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("domain", &name)?;
    ok(&svc.domains.info(&name)?)
}

pub(super) async fn undefine(State(svc): Svc, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("domain", &name)?;
    svc.domains.undefine(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// GET on a domain's sub-resources: stats, config, console.
pub(super) async fn resource(State(svc): Svc, Path((name, sub)): Path<(String, String)>, req: Request) -> ApiResult<Response> {
    check_name("domain", &name)?;
    match sub.as_str() {
        "stats" => ok(&svc.domains.stats(&name).await?),
        "config" => Ok(([(header::CONTENT_TYPE, "application/toml")], svc.domains.definition(&name)?).into_response()),
        "console" => console(&svc.domains, &name, req).await,
        _ => Err(ApiError::not_found(format!("domains have no resource {sub:?}"))),
    }
}

pub(super) async fn action(State(svc): Svc, Path((name, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("domain", &name)?;
    let body = read_json(body).await?;
    let domains = &svc.domains;
    let info = match action.as_str() {
        "start" => domains.start(&name).await?,
        "shutdown" => {
            let wait = match body.get("timeout") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(secs) if secs <= MAX_SHUTDOWN_WAIT => Some(Duration::from_secs(secs)),
                    _ => return Err(ApiError::invalid(format!("timeout: must be 0-{MAX_SHUTDOWN_WAIT} seconds"))),
                },
            };
            domains.shutdown(&name, wait).await?
        }
        "destroy" => domains.destroy(&name).await?,
        "reboot" => domains.reboot(&name).await?,
        "reset" => domains.reset(&name).await?,
        "suspend" => domains.suspend(&name).await?,
        "resume" => domains.resume(&name).await?,
        "autostart" => domains.set_autostart(&name, enabled_flag(&body)?).await?,
        "setmem" => {
            let memory = if let Some(text) = body["memory"].as_str() {
                parse_size(text).map_err(|e| ApiError::invalid(format!("memory: {e}")))?
            } else if let Some(bytes) = body["memory"].as_u64() {
                bytes
            } else {
                return Err(ApiError::invalid("memory: give a size such as \"256M\" or a byte count"));
            };
            domains.setmem(&name, memory).await?
        }
        _ => return Err(ApiError::not_found(format!("domains have no action {action:?}"))),
    };
    ok(&info)
}

/// Upgrades the connection to a raw byte stream joined to the VMM's serial socket.
async fn console(domains: &Domains, name: &str, mut req: Request) -> ApiResult<Response> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("ferro-console"));
    if !wants_upgrade {
        return Err(ApiError::invalid("the console needs an HTTP upgrade (Upgrade: ferro-console)"));
    }
    let socket = domains.serial_socket(name)?;
    let mut serial = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| crate::error::Error::vmm(format!("domain {name}: cannot connect to the serial console: {e}")))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let domain = name.to_string();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut serial).await;
            }
            Err(e) => tracing::warn!(domain, "console upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "ferro-console")
        .body(Body::empty())
        .unwrap_or_default())
}
