//! The REST API on ferrod's unix socket (documented in `openapi.json` next to this crate).
//!
//! Every failure is JSON `{"code","message"}`; request bodies are read here with explicit limits so
//! that no input can produce a non-JSON error or take the daemon down.

use crate::error::{ApiError, ApiResult};
use crate::jobs::JobState;
use crate::manager::{Manager, check_name};
use crate::pools::{PoolDefinition, VolumeDefinition, enabled_flag};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

type Mgr = State<Arc<Manager>>;

/// Largest JSON or TOML request body.
const BODY_LIMIT: usize = 1 << 20;
/// Longest a `shutdown` request may wait for the guest.
const MAX_SHUTDOWN_WAIT: u64 = 3600;

pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/domains", get(domains_list).post(domain_define))
        .route("/v1/domains/{name}", get(domain_get).delete(domain_undefine))
        .route("/v1/domains/{name}/{sub}", get(domain_sub).post(domain_action))
        .route("/v1/pools", get(pools_list).post(pool_define))
        .route("/v1/pools/{pool}", get(pool_get).delete(pool_undefine))
        .route("/v1/pools/{pool}/{action}", axum::routing::post(pool_action))
        .route("/v1/pools/{pool}/volumes", get(volumes_list).post(volume_create))
        .route("/v1/pools/{pool}/volumes/{vol}", get(volume_get).delete(volume_delete))
        .route("/v1/pools/{pool}/volumes/{vol}/data", get(volume_download).put(volume_upload))
        .route("/v1/pools/{pool}/volumes/{vol}/{action}", axum::routing::post(volume_action))
        .route("/v1/jobs", get(jobs_list))
        .route("/v1/jobs/{id}", get(job_get))
        .route("/v1/jobs/{id}/{action}", axum::routing::post(job_action))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint (see openapi.json)") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed("method not allowed on this endpoint") })
        .with_state(manager)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

fn ok<T: Serialize>(value: &T) -> ApiResult<Response> {
    Ok(json(StatusCode::OK, value))
}

async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| ApiError::too_large(format!("request body larger than {BODY_LIMIT} bytes or unreadable")))
}

/// A JSON object body; an empty body is an empty object.
async fn read_json(body: Body) -> ApiResult<Value> {
    let bytes = read_body(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body must be a JSON object"));
    }
    Ok(value)
}

/// Deserializes a JSON body into a definition struct, naming the field on errors.
fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> ApiResult<T> {
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A true/false query parameter (`?key` alone means true, absent means false).
fn query_flag(query: Option<&str>, key: &str) -> ApiResult<bool> {
    match query_param(query, key) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!("{key}: {other:?} is not true or false"))),
    }
}

async fn version(State(mgr): Mgr) -> ApiResult<Response> {
    ok(&serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "home": mgr.paths.home.display().to_string(),
        "ferro_bin": mgr.paths.ferro_bin.display().to_string(),
    }))
}

async fn domains_list(State(mgr): Mgr) -> ApiResult<Response> {
    ok(&mgr.list())
}

async fn domain_define(State(mgr): Mgr, body: Body) -> ApiResult<Response> {
    let bytes = read_body(body).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::invalid("definition is not UTF-8 text"))?;
    let (created, info) = mgr.define(text).await?;
    Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &info))
}

async fn domain_get(State(mgr): Mgr, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("domain", &name)?;
    ok(&mgr.info(&name)?)
}

async fn domain_undefine(State(mgr): Mgr, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("domain", &name)?;
    mgr.undefine(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn domain_sub(State(mgr): Mgr, Path((name, sub)): Path<(String, String)>, req: Request) -> ApiResult<Response> {
    check_name("domain", &name)?;
    match sub.as_str() {
        "stats" => ok(&mgr.stats(&name).await?),
        "config" => Ok(([(header::CONTENT_TYPE, "application/toml")], mgr.definition(&name)?).into_response()),
        "console" => console(mgr, &name, req).await,
        _ => Err(ApiError::not_found(format!("domains have no resource {sub:?}"))),
    }
}

async fn domain_action(State(mgr): Mgr, Path((name, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("domain", &name)?;
    let body = read_json(body).await?;
    let info = match action.as_str() {
        "start" => mgr.start(&name).await?,
        "shutdown" => {
            let wait = match body.get("timeout") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(secs) if secs <= MAX_SHUTDOWN_WAIT => Some(Duration::from_secs(secs)),
                    _ => return Err(ApiError::invalid(format!("timeout: must be 0-{MAX_SHUTDOWN_WAIT} seconds"))),
                },
            };
            mgr.shutdown(&name, wait).await?
        }
        "destroy" => mgr.destroy(&name).await?,
        "reboot" => mgr.reboot(&name).await?,
        "reset" => mgr.reset(&name).await?,
        "suspend" => mgr.suspend(&name).await?,
        "resume" => mgr.resume(&name).await?,
        "autostart" => mgr.set_autostart(&name, enabled_flag(&body)?).await?,
        "setmem" => {
            let memory = if let Some(text) = body["memory"].as_str() {
                crate::domain::parse_size(text).map_err(|e| ApiError::invalid(format!("memory: {e}")))?
            } else if let Some(bytes) = body["memory"].as_u64() {
                bytes
            } else {
                return Err(ApiError::invalid("memory: give a size such as \"256M\" or a byte count"));
            };
            mgr.setmem(&name, memory).await?
        }
        _ => return Err(ApiError::not_found(format!("domains have no action {action:?}"))),
    };
    ok(&info)
}

/// Upgrades the connection to a raw byte stream joined to the VMM's serial socket.
async fn console(mgr: Arc<Manager>, name: &str, mut req: Request) -> ApiResult<Response> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("ferro-console"));
    if !wants_upgrade {
        return Err(ApiError::invalid("the console needs an HTTP upgrade (Upgrade: ferro-console)"));
    }
    let socket = mgr.serial_socket(name)?;
    let mut serial = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| ApiError::vmm(format!("domain {name}: cannot connect to the serial console: {e}")))?;
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

async fn pools_list(State(mgr): Mgr) -> ApiResult<Response> {
    ok(&mgr.pools_list())
}

async fn pool_define(State(mgr): Mgr, body: Body) -> ApiResult<Response> {
    let def: PoolDefinition = from_json(read_json(body).await?)?;
    Ok(json(StatusCode::CREATED, &mgr.pool_define(def)?))
}

async fn pool_get(State(mgr): Mgr, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&mgr.pool_get(&pool)?)
}

async fn pool_undefine(State(mgr): Mgr, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    mgr.pool_undefine(&pool)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pool_action(State(mgr): Mgr, Path((pool, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let body = read_json(body).await?;
    ok(&mgr.pool_action(&pool, &action, &body)?)
}

async fn volumes_list(State(mgr): Mgr, Path(pool): Path<String>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&mgr.volumes_list(&pool)?)
}

async fn volume_create(State(mgr): Mgr, Path(pool): Path<String>, body: Body) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let def: VolumeDefinition = from_json(read_json(body).await?)?;
    Ok(json(StatusCode::CREATED, &mgr.volume_create(&pool, def).await?))
}

async fn volume_get(State(mgr): Mgr, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    ok(&mgr.volume_get(&pool, &vol)?)
}

async fn volume_delete(State(mgr): Mgr, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    mgr.volume_delete(&pool, &vol)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn volume_action(
    State(mgr): Mgr,
    Path((pool, vol, action)): Path<(String, String, String)>,
    uri: Uri,
    body: Body,
) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let body = read_json(body).await?;
    if action == "clone" || action == "convert" {
        return volume_copy(mgr, &pool, &vol, &action, &body, query_flag(uri.query(), "wait")?).await;
    }
    ok(&mgr.volume_action(&pool, &vol, &action, &body).await?)
}

/// Starts a clone or convert job: 202 with the job, or with `wait` the new volume once the job
/// has completed (the job goes on if the client hangs up).
async fn volume_copy(mgr: Arc<Manager>, pool: &str, vol: &str, action: &str, body: &Value, wait: bool) -> ApiResult<Response> {
    let job = mgr.volume_copy(pool, vol, action, body)?;
    if !wait {
        return Ok(json(StatusCode::ACCEPTED, &job.info()));
    }
    let info = job.finished(None).await;
    match info.state {
        JobState::Completed => {
            let name = info.target.rsplit('/').next().unwrap_or_default();
            ok(&mgr.volume_get(pool, name)?)
        }
        JobState::Cancelled => Err(ApiError::conflict(format!("job {} was cancelled", info.id))),
        _ => Err(ApiError::internal(format!("job {} failed: {}", info.id, info.error.unwrap_or_default()))),
    }
}

async fn jobs_list(State(mgr): Mgr) -> ApiResult<Response> {
    ok(&mgr.jobs_list())
}

async fn job_get(State(mgr): Mgr, Path(id): Path<String>) -> ApiResult<Response> {
    ok(&mgr.job(&id)?.info())
}

async fn job_action(State(mgr): Mgr, Path((id, action)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    read_json(body).await?;
    match action.as_str() {
        "cancel" => ok(&mgr.job_cancel(&id).await?),
        _ => {
            mgr.job(&id)?;
            Err(ApiError::not_found(format!("jobs have no action {action:?}")))
        }
    }
}

/// Streams the volume's bytes (vol-download).
async fn volume_download(State(mgr): Mgr, Path((pool, vol)): Path<(String, String)>) -> ApiResult<Response> {
    check_name("pool", &pool)?;
    let path = mgr.volume_path(&pool, &vol, false)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", path.display())))?;
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

/// Replaces the volume's contents with the request body (vol-upload); written to a temporary file
/// first so a broken upload leaves the old volume intact.
async fn volume_upload(State(mgr): Mgr, Path((pool, vol)): Path<(String, String)>, body: Body) -> ApiResult<Response> {
    use tokio::io::AsyncWriteExt;
    check_name("pool", &pool)?;
    let path = mgr.volume_path(&pool, &vol, true)?;
    let tmp = path.with_file_name(format!(".{vol}.upload"));
    let io = |e: std::io::Error| ApiError::internal(format!("upload to {}: {e}", path.display()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut result = Ok(());
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if let Err(e) = file.write_all(&bytes).await {
                    result = Err(io(e));
                    break;
                }
            }
            Err(e) => {
                result = Err(ApiError::invalid(format!("upload interrupted: {e}")));
                break;
            }
        }
    }
    if result.is_ok() {
        result = file.sync_all().await.map_err(io);
    }
    if result.is_ok() {
        result = tokio::fs::rename(&tmp, &path).await.map_err(io);
    }
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    mgr.events.emit("volume", &format!("{pool}/{vol}"), "uploaded", "");
    ok(&mgr.volume_get(&pool, &vol)?)
}

/// Past events as a JSON array, or with `follow=true` a never-ending stream of JSON lines.
async fn events(State(mgr): Mgr, req: Request) -> ApiResult<Response> {
    let query = req.uri().query();
    let since = match query_param(query, "since") {
        None => 0,
        Some(s) => s.parse().map_err(|_| ApiError::invalid(format!("since: {s:?} is not an event number")))?,
    };
    let follow = query_flag(query, "follow")?;
    if !follow {
        return ok(&mgr.events.since(since));
    }
    let (past, receiver) = mgr.events.follow(since);
    let past = futures_util::stream::iter(past);
    let live = futures_util::stream::unfold(receiver, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) => return Some((event, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let lines = past.chain(live).map(|event| {
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
    Ok((headers, Body::from_stream(lines)).into_response())
}

/// Prometheus text exposition of per-domain counters.
async fn metrics(State(mgr): Mgr) -> ApiResult<Response> {
    use std::fmt::Write;
    let all = mgr.all_stats().await;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let label = |domain: &str| format!("domain=\"{domain}\"");
    let states = ["shutoff", "running", "paused", "crashed"];
    family(
        "ferro_domain_state",
        "gauge",
        "1 for the domain's current state",
        all.iter()
            .flat_map(|(info, _)| {
                let current = serde_json::to_value(info.state).ok();
                states.iter().map(move |s| {
                    let value = if current.as_ref().and_then(Value::as_str) == Some(s) { 1.0 } else { 0.0 };
                    (format!("{},state=\"{s}\"", label(&info.name)), value)
                })
            })
            .collect(),
    );
    let per_domain = |f: &dyn Fn(&crate::manager::DomainInfo, Option<&Value>) -> Option<f64>| -> Vec<(String, f64)> {
        all.iter().filter_map(|(info, stats)| f(info, stats.as_ref()).map(|v| (label(&info.name), v))).collect()
    };
    let stat = |key: &'static str, scale: f64| {
        move |_: &crate::manager::DomainInfo, s: Option<&Value>| s?.get(key)?.as_f64().map(|v| v * scale)
    };
    family("ferro_domain_vcpus", "gauge", "configured vCPUs", per_domain(&|i, _| i.vcpus.map(f64::from)));
    family(
        "ferro_domain_memory_bytes",
        "gauge",
        "configured guest memory",
        per_domain(&|i, _| i.memory_bytes.map(|m| m as f64)),
    );
    family("ferro_domain_cpu_seconds_total", "counter", "CPU time of the VMM process", per_domain(&stat("cpu_time_ns", 1e-9)));
    family("ferro_domain_rss_bytes", "gauge", "resident memory of the VMM process", per_domain(&stat("rss_bytes", 1.0)));
    family("ferro_domain_exits_total", "counter", "vCPU exits to the VMM", per_domain(&stat("exits", 1.0)));
    let vcpu_samples = all
        .iter()
        .flat_map(|(info, stats)| {
            let times = stats.as_ref().and_then(|s| s.get("vcpu_time_ns")).and_then(Value::as_array).cloned().unwrap_or_default();
            times
                .into_iter()
                .enumerate()
                .filter_map(|(i, t)| t.as_f64().map(|t| (format!("{},vcpu=\"{i}\"", label(&info.name)), t * 1e-9)))
                .collect::<Vec<_>>()
        })
        .collect();
    family("ferro_domain_vcpu_seconds_total", "counter", "time spent running each vCPU", vcpu_samples);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
