//! `/v1/host`: the host at a glance for the UI's overview: CPUs, load, memory, domain counts and
//! ferrod's version. `/v1/nodeinfo`: the host as `ferro nodeinfo` shows it (memory committed to
//! domains, huge pages, KSM).

use super::{ApiResult, Svc, ok};
use crate::model::DomainState;
use axum::extract::State;
use axum::response::Response;

pub(super) async fn nodeinfo(State(svc): Svc) -> ApiResult<Response> {
    ok(&svc.domains.nodeinfo().await?)
}

pub(super) async fn host(State(svc): Svc) -> ApiResult<Response> {
    let domains = svc.domains.list();
    let count = |state: DomainState| domains.iter().filter(|d| d.state == state).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<f64> = load.split_whitespace().take(3).map(|v| v.parse().unwrap_or(0.0)).collect();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    ok(&serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "hostname": hostname.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load": [load.first().copied().unwrap_or(0.0), load.get(1).copied().unwrap_or(0.0), load.get(2).copied().unwrap_or(0.0)],
        "memory_total_bytes": meminfo_bytes(&meminfo, "MemTotal"),
        "memory_available_bytes": meminfo_bytes(&meminfo, "MemAvailable"),
        "domains": {
            "total": domains.len(),
            "running": count(DomainState::Running),
            "paused": count(DomainState::Paused),
            "shutoff": count(DomainState::Shutoff),
            "crashed": count(DomainState::Crashed),
        },
    }))
}

/// A `/proc/meminfo` field (`MemTotal:  16314960 kB`) in bytes; 0 when absent.
fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_fields_in_bytes() {
        let text = "MemTotal:       16314960 kB\nMemFree:  100 kB\nMemAvailable:    8000 kB\n";
        assert_eq!(super::meminfo_bytes(text, "MemTotal"), 16314960 * 1024);
        assert_eq!(super::meminfo_bytes(text, "MemAvailable"), 8000 * 1024);
        assert_eq!(super::meminfo_bytes(text, "SwapTotal"), 0);
    }
}
