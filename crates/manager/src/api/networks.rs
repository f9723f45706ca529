//! `/v1/networks`: virtual network definitions (TOML), start/destroy/autostart, the TOML
//! definition and the DHCP leases. Host work runs on blocking threads.

use super::{ApiError, ApiResult, Svc, enabled_flag, json, ok, read_body, read_json};
use crate::error::{Error, Result};
use crate::networks::Networks;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Runs a networks service call on a blocking thread (it runs netlink, nft and dnsmasq).
async fn blocking<T: Send + 'static>(networks: &Arc<Networks>, f: impl FnOnce(&Networks) -> Result<T> + Send + 'static) -> ApiResult<T> {
    let networks = networks.clone();
    let result = tokio::task::spawn_blocking(move || f(&networks)).await.map_err(|e| Error::internal(format!("network task failed: {e}")))?;
    Ok(result?)
}

fn check_name(name: &str) -> ApiResult<()> {
    ferro_net::config::validate_name(name).map_err(|e| ApiError::invalid(format!("network name: {e}")))
}

pub(super) async fn list(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.networks.list())
}

pub(super) async fn define(State(svc): Svc, body: Body) -> ApiResult<Response> {
    let bytes = read_body(body).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::invalid("definition is not UTF-8 text"))?.to_string();
    let (created, info) = blocking(&svc.networks, move |n| n.define(&text)).await?;
    Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &info))
}

pub(super) async fn get(State(svc): Svc, Path(name): Path<String>) -> ApiResult<Response> {
    check_name(&name)?;
    ok(&svc.networks.info(&name)?)
}

pub(super) async fn undefine(State(svc): Svc, Path(name): Path<String>) -> ApiResult<Response> {
    check_name(&name)?;
    blocking(&svc.networks, move |n| n.undefine(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// GET on a network's sub-resources: config, leases.
pub(super) async fn resource(State(svc): Svc, Path((name, sub)): Path<(String, String)>) -> ApiResult<Response> {
    check_name(&name)?;
    match sub.as_str() {
        "config" => Ok(([(header::CONTENT_TYPE, "application/toml")], svc.networks.definition(&name)?).into_response()),
        "leases" => ok(&svc.networks.leases(&name)?),
        _ => Err(ApiError::not_found(format!("networks have no resource {sub:?}"))),
    }
}

pub(super) async fn action(State(svc): Svc, Path((name, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name(&name)?;
    let body = read_json(body).await?;
    let info = match action.as_str() {
        "start" => blocking(&svc.networks, move |n| n.start(&name)).await?,
        "destroy" => blocking(&svc.networks, move |n| n.destroy(&name)).await?,
        "autostart" => {
            let enabled = enabled_flag(&body)?;
            blocking(&svc.networks, move |n| n.set_autostart(&name, enabled)).await?
        }
        _ => return Err(ApiError::not_found(format!("networks have no action {action:?}"))),
    };
    ok(&info)
}
