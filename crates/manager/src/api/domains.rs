//! `/v1/domains`: definitions, lifecycle actions, stats, the TOML definition and the console (raw
//! upgrade for the CLI, WebSocket for browsers).

use super::{ApiError, ApiResult, Svc, body_flag, check_name, enabled_flag, json, ok, only_fields, read_body, read_json};
use crate::daemon::Services;
use crate::domain::parse_size;
use crate::domains::{Domains, PinTarget};
use ferro_vmm_api::CpuList;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

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

/// GET on a domain's sub-resources: stats, interfaces, config, console.
pub(super) async fn resource(State(svc): Svc, Path((name, sub)): Path<(String, String)>, req: Request) -> ApiResult<Response> {
    check_name("domain", &name)?;
    match sub.as_str() {
        // A revert stops the domain's VMM and starts another: a request meeting it in between
        // waits for the revert (as virsh waits for a domain's job) and asks again.
        "stats" => match svc.domains.stats(&name).await {
            Ok(stats) => ok(&stats),
            Err(_) if svc.snapshots.settle(&name).await => ok(&svc.domains.stats(&name).await?),
            Err(e) => Err(e.into()),
        },
        "interfaces" => ok(&svc.domains.interfaces(&name)?),
        "config" => Ok(([(header::CONTENT_TYPE, "application/toml")], svc.domains.definition(&name)?).into_response()),
        "console" => console(&svc.domains, &name, req).await,
        "vcpuinfo" => ok(&svc.domains.vcpu_info(&name).await?),
        _ => Err(ApiError::not_found(format!("domains have no resource {sub:?}"))),
    }
}

pub(super) async fn action(State(svc): Svc, Path((name, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("domain", &name)?;
    let body = read_json(body).await?;
    if action == "export" {
        return export(&svc, &name, &body);
    }
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
        "vcpupin" | "emulatorpin" => {
            let target = if action == "vcpupin" {
                only_fields(&body, &["vcpu", "cpus", "config"])?;
                let vcpu = body["vcpu"].as_u64().and_then(|v| u8::try_from(v).ok());
                PinTarget::Vcpu(vcpu.ok_or_else(|| ApiError::invalid("vcpu: give a vCPU number (0-254)"))?)
            } else {
                only_fields(&body, &["cpus", "config"])?;
                PinTarget::Emulator
            };
            let cpus = body["cpus"].as_str().ok_or_else(|| ApiError::invalid("cpus: give a host CPU list such as \"0\" or \"2-3\""))?;
            let cpus = cpus.parse::<CpuList>().map_err(|e| ApiError::invalid(format!("cpus: {e}")))?;
            let config = body_flag(&body, "config", false)?;
            domains.pin(&name, target, cpus, config).await?
        }
        _ => return Err(ApiError::not_found(format!("domains have no action {action:?}"))),
    };
    ok(&info)
}

/// Starts exporting a shut-off domain as an OVA file or an OVF directory on ferrod's host: 202
/// with the job.
fn export(svc: &Services, name: &str, body: &Value) -> ApiResult<Response> {
    only_fields(body, &["target", "format"])?;
    let target = body.get("target").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("target: missing (an absolute path on ferrod's host)"))?;
    let format = match body.get("format") {
        None => if target.to_ascii_lowercase().ends_with(".ova") { "ova" } else { "ovf" },
        Some(Value::String(f)) => f.as_str(),
        Some(_) => return Err(ApiError::invalid("format: must be \"ova\" or \"ovf\"")),
    };
    let job = svc.ovf.export(name, std::path::Path::new(target), format)?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}

/// Starts importing an OVF package of ferrod's host as a new domain: 202 with the job.
pub(super) async fn import_ovf(State(svc): Svc, body: Body) -> ApiResult<Response> {
    let body = read_json(body).await?;
    only_fields(&body, &["source", "name", "pool", "network_map"])?;
    let text = |key: &str| match body.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(format!("{key}: must be a string"))),
    };
    let source = text("source")?.ok_or_else(|| ApiError::invalid("source: missing (an .ova or .ovf on ferrod's host)"))?;
    let mut network_map = std::collections::BTreeMap::new();
    match body.get("network_map") {
        None => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let v = v.as_str().ok_or_else(|| ApiError::invalid(format!("network_map.{k}: must be a string")))?;
                network_map.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => return Err(ApiError::invalid("network_map: must be an object of network names to taps")),
    }
    let req = crate::ovf::ImportRequest {
        source: source.into(),
        name: text("name")?,
        pool: text("pool")?.unwrap_or_else(|| "default".to_string()),
        network_map,
    };
    let job = svc.ovf.import(req)?;
    Ok(json(StatusCode::ACCEPTED, &job.info()))
}

/// Joins the caller to the VMM's serial socket, bytes both ways: as a WebSocket (`Upgrade:
/// websocket`, for browsers: binary messages out, binary or text messages in) or as a raw
/// upgraded connection (`Upgrade: ferro-console`, for the CLI).
async fn console(domains: &Domains, name: &str, req: Request) -> ApiResult<Response> {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if upgrade != "websocket" && upgrade != "ferro-console" {
        return Err(ApiError::invalid("the console needs an upgrade: Upgrade: websocket, or Upgrade: ferro-console"));
    }
    let socket = domains.serial_socket(name)?;
    let serial = crate::vmm::connect(&socket)
        .await
        .map_err(|e| crate::error::Error::vmm(format!("domain {name}: cannot connect to the serial console: {e}")))?;
    let domain = name.to_string();
    if upgrade == "websocket" {
        let (mut parts, _) = req.into_parts();
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|e| ApiError::invalid(format!("console WebSocket: {}", e.body_text())))?;
        return Ok(ws.on_upgrade(move |socket| websocket_console(socket, serial, domain)));
    }
    raw_console(req, serial, domain)
}

fn raw_console(mut req: Request, mut serial: UnixStream, domain: String) -> ApiResult<Response> {
    let on_upgrade = hyper::upgrade::on(&mut req);
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

/// Copies console output into binary messages and the browser's messages into the console until
/// either side closes.
async fn websocket_console(mut socket: WebSocket, serial: UnixStream, domain: String) {
    let (mut from_vm, mut to_vm) = serial.into_split();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        tokio::select! {
            message = socket.recv() => {
                let bytes = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Text(text))) => Bytes::copy_from_slice(text.as_str().as_bytes()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!(domain, "console WebSocket ended: {e}");
                        break;
                    }
                };
                if to_vm.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            read = from_vm.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
                Ok(n) => {
                    if socket.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
}
