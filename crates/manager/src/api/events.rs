//! `/v1/events` (the lifecycle event log, listed or followed) and `/metrics` (Prometheus text).

use super::{ApiError, ApiResult, Svc, ok, query_flag, query_param};
use crate::model::{DomainInfo, DomainState, DomainStats};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

/// Past events as a JSON array, or with `follow=true` a never-ending stream of JSON lines.
pub(super) async fn events(State(svc): Svc, req: Request) -> ApiResult<Response> {
    let query = req.uri().query();
    let since = match query_param(query, "since") {
        None => 0,
        Some(s) => s.parse().map_err(|_| ApiError::invalid(format!("since: {s:?} is not an event number")))?,
    };
    let follow = query_flag(query, "follow")?;
    if !follow {
        return ok(&svc.events.since(since));
    }
    let (past, receiver) = svc.events.follow(since);
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
pub(super) async fn metrics(State(svc): Svc) -> ApiResult<Response> {
    use std::fmt::Write;
    let all = svc.domains.all_stats().await;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let label = |domain: &str| format!("domain=\"{domain}\"");
    let states = [DomainState::Shutoff, DomainState::Running, DomainState::Paused, DomainState::Crashed];
    family(
        "ferro_domain_state",
        "gauge",
        "1 for the domain's current state",
        all.iter()
            .flat_map(|(info, _)| {
                states.iter().map(move |&s| {
                    let value = if info.state == s { 1.0 } else { 0.0 };
                    (format!("{},state=\"{}\"", label(&info.name), s.name()), value)
                })
            })
            .collect(),
    );
    let per_domain = |f: &dyn Fn(&DomainInfo, Option<&DomainStats>) -> Option<f64>| -> Vec<(String, f64)> {
        all.iter().filter_map(|(info, stats)| f(info, stats.as_ref()).map(|v| (label(&info.name), v))).collect()
    };
    family("ferro_domain_vcpus", "gauge", "configured vCPUs", per_domain(&|i, _| i.vcpus.map(f64::from)));
    family("ferro_domain_memory_bytes", "gauge", "configured guest memory", per_domain(&|i, _| i.memory_bytes.map(|m| m as f64)));
    family(
        "ferro_domain_cpu_seconds_total",
        "counter",
        "CPU time of the VMM process",
        per_domain(&|_, s| s.map(|s| s.vmm.cpu_time_ns as f64 * 1e-9)),
    );
    family("ferro_domain_rss_bytes", "gauge", "resident memory of the VMM process", per_domain(&|_, s| s.map(|s| s.vmm.rss_bytes as f64)));
    family("ferro_domain_exits_total", "counter", "vCPU exits to the VMM", per_domain(&|_, s| s.map(|s| s.vmm.exits as f64)));
    let vcpu_samples = all
        .iter()
        .filter_map(|(info, stats)| Some((info, stats.as_ref()?)))
        .flat_map(|(info, stats)| {
            stats.vmm.vcpu_time_ns.iter().enumerate().map(|(i, t)| (format!("{},vcpu=\"{i}\"", label(&info.name)), *t as f64 * 1e-9))
        })
        .collect();
    family("ferro_domain_vcpu_seconds_total", "counter", "time spent running each vCPU", vcpu_samples);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
