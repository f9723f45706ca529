//! A domain's `[tuning]` through ferrod, proven by what the kernel reports: vCPU and emulator
//! pinning from the definition and live (`Cpus_allowed_list` of each VMM thread in
//! /proc/PID/task/TID/status), `vcpuinfo`, CPU lists the host lacks refused by name, `--config`
//! stored in the definition; a huge-page domain holds its pages while it runs and gives them back
//! when it stops.

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::hugepages::{self, Reservation};
use ferro_test_support::wait_for;
use serde_json::Value;
use std::time::Duration;

/// A line of /proc/TGID/task/TID/status (the process found from the thread's own status).
fn task_status(tid: i64, key: &str) -> String {
    let own = std::fs::read_to_string(format!("/proc/{tid}/status")).expect("the thread exists");
    let tgid = field(&own, "Tgid");
    field(&std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/status")).expect("task status"), key)
}

fn field(status: &str, key: &str) -> String {
    let prefix = format!("{key}:");
    let line = status.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {key} in {status}"));
    line[prefix.len()..].trim().to_owned()
}

/// Every thread of the VMM that runs vCPU thread `vcpu_tid`, as (tid, name), but the workers the
/// kernel's KVM starts in the process (`kvm-nx-lpage-recovery`), which the kernel places.
fn threads_beside(vcpu_tid: i64) -> Vec<(i64, String)> {
    let tgid = field(&std::fs::read_to_string(format!("/proc/{vcpu_tid}/status")).unwrap(), "Tgid");
    std::fs::read_dir(format!("/proc/{tgid}/task"))
        .unwrap()
        .map(|e| {
            let tid: i64 = e.unwrap().file_name().to_str().unwrap().parse().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/comm")).unwrap_or_default();
            (tid, comm.trim().to_owned())
        })
        .filter(|(_, comm)| !comm.starts_with("kvm-"))
        .collect()
}

fn vcpuinfo(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}/vcpuinfo"), None, 200)
}

/// Host CPUs 0 and 1 are all this needs (the development machines have two).
#[test]
fn vcpu_and_emulator_pinning_from_the_definition_and_live() {
    let home = Home::new("pinning");
    let d = Daemon::start(&home);
    let api = d.api();
    let toml = "name = \"pin1\"\nmemory = \"64M\"\nvcpus = 2\n[boot]\nguest = \"idle\"\n[tuning]\nvcpu_pin = [\"1\", \"0\"]\nemulator_pin = \"0\"\n";
    api.expect("POST", "/v1/domains", Some(toml), 201);
    d.ferro_ok(&["start", "pin1"]);

    let info = vcpuinfo(&d, "pin1");
    let tid = |vcpu: usize| info["vcpus"][vcpu]["thread_id"].as_i64().unwrap();
    assert_eq!(info["vcpus"][0]["affinity"], "1", "{info}");
    for (vcpu, cpus) in [(0, "1"), (1, "0")] {
        assert_eq!(task_status(tid(vcpu), "Name"), format!("vcpu{vcpu}"));
        assert_eq!(task_status(tid(vcpu), "Cpus_allowed_list"), cpus, "vCPU {vcpu}");
    }
    let others: Vec<(i64, String)> = threads_beside(tid(0)).into_iter().filter(|(t, _)| *t != tid(0) && *t != tid(1)).collect();
    assert!(others.len() >= 2, "the main thread and the control socket's at least: {others:?}");
    for (t, name) in &others {
        assert_eq!(task_status(*t, "Cpus_allowed_list"), "0", "emulator thread {name} ({t})");
    }

    // Live: vCPU 0 moves to CPU 0, the emulator to CPU 1.
    assert!(d.ferro_ok(&["vcpupin", "pin1", "0", "0"]).contains("vCPU 0 pinned to CPUs 0"));
    assert_eq!(task_status(tid(0), "Cpus_allowed_list"), "0");
    d.ferro_ok(&["emulatorpin", "pin1", "1"]);
    for (t, name) in threads_beside(tid(0)).iter().filter(|(t, _)| *t != tid(0) && *t != tid(1)) {
        assert_eq!(task_status(*t, "Cpus_allowed_list"), "1", "emulator thread {name} ({t})");
    }
    let json: Value = serde_json::from_str(&d.ferro_ok(&["vcpuinfo", "pin1", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
    assert_eq!((json[0]["vcpu"].as_u64(), json[0]["affinity"].as_str(), json[0]["state"].as_str()), (Some(0), Some("0"), Some("running")));
    assert_eq!(json[1]["thread_id"].as_i64(), Some(tid(1)));
    assert!(json[1]["cpu_time_ns"].as_u64().is_some(), "{json}");
    let human = d.ferro_ok(&["vcpuinfo", "pin1"]);
    assert!(human.contains("CPU Affinity") && human.contains("Emulator CPUs"), "{human}");

    // Refused, naming what was wrong; nothing moved.
    for (args, why) in [
        (vec!["vcpupin", "pin1", "0", "7"], "this host has no CPU 7"),
        (vec!["vcpupin", "pin1", "5", "0"], "vcpu 5: domain pin1 has 2 vCPUs"),
        (vec!["emulatorpin", "pin1", "0-9"], "this host has no CPU 2-9"),
        (vec!["vcpupin", "pin1", "0", "one"], "'one' is not a CPU list"),
    ] {
        let o = d.ferro(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(task_status(tid(0), "Cpus_allowed_list"), "0");

    // --config: live and in the definition, for the next start.
    d.ferro_ok(&["vcpupin", "pin1", "1", "1", "--config"]);
    assert_eq!(task_status(tid(1), "Cpus_allowed_list"), "1");
    let stored = api.expect("GET", "/v1/domains/pin1", None, 200);
    assert_eq!(stored["config"]["tuning"]["vcpu_pin"], serde_json::json!(["1", "1"]), "{stored}");
    d.ferro_ok(&["destroy", "pin1"]);
    let v = api.expect("POST", "/v1/domains/pin1/vcpupin", Some(r#"{"vcpu": 0, "cpus": "1"}"#), 409);
    assert!(v["message"].as_str().unwrap().contains("not running"), "{v}");
    d.ferro_ok(&["emulatorpin", "pin1", "1", "--config"]);
    d.ferro_ok(&["start", "pin1"]);
    let again = vcpuinfo(&d, "pin1");
    assert_eq!((again["vcpus"][1]["affinity"].as_str(), again["emulator_affinity"].as_str()), (Some("1"), Some("1")), "{again}");
    d.ferro_ok(&["destroy", "pin1"]);

    // A definition written for a bigger host is accepted, but it cannot start here.
    let big = toml.replace("vcpu_pin = [\"1\", \"0\"]", "vcpu_pin = [\"0\", \"64\"]").replace("pin1", "pin2");
    api.expect("POST", "/v1/domains", Some(&big), 201);
    let o = d.ferro(&["start", "pin2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tuning.vcpu_pin[1]: CPU list '64': this host has no CPU 64"), "{err}");
}

#[test]
fn a_huge_page_domain_holds_its_pages_while_it_runs_and_gives_them_back() {
    let _pool = Reservation::exactly(32);
    let home = Home::new("hugepages");
    let d = Daemon::start(&home);
    let toml = "name = \"huge1\"\nmemory = \"64M\"\n[boot]\nguest = \"memory\"\ncmdline = \"hold=1\"\n[tuning]\nhugepages = true\n";
    d.api().expect("POST", "/v1/domains", Some(toml), 201);
    d.ferro_ok(&["start", "huge1"]);
    assert_eq!(hugepages::available(), 0, "the domain's 64 MiB reserved all 32 pages at start");
    // The guest writes all of its RAM: every reserved page is then in use.
    wait_for("the guest to touch all of its RAM", Duration::from_secs(30), || hugepages::read("free_hugepages") == 0);
    assert_eq!(hugepages::read("resv_hugepages"), 0);
    let stats = d.ferro_ok(&["domstats", "huge1"]);
    assert!(stats.contains("KSM merged"), "{stats}");
    d.ferro_ok(&["destroy", "huge1"]);
    wait_for("the pages to go back to the pool", Duration::from_secs(10), || hugepages::available() == 32);

    // Another domain asking for more than the pool has cannot start, and says why.
    let toml = toml.replace("huge1", "huge2").replace("64M", "128M");
    d.api().expect("POST", "/v1/domains", Some(&toml), 201);
    let o = d.ferro(&["start", "huge2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs 64 free 2 MiB huge pages (128 MiB), the host has 32 free"), "{err}");
}

/// ferrod with an overcommit ratio that leaves this host room for 200 MiB: a 64 MiB domain (with
/// its default 64 MiB VMM overhead allowance) starts, a 96 MiB one next to it is refused with the
/// numbers, and starts once the first is gone. nodeinfo shows the committed memory.
#[test]
fn nodeinfo_counts_committed_memory_and_a_start_past_the_ratio_is_refused() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total: u64 = field(&meminfo, "MemTotal").trim_end_matches(" kB").parse::<u64>().unwrap() * 1024;
    let ratio = (200u64 << 20) as f64 / total as f64;
    let home = Home::new("overcommit");
    let d = Daemon::start_args(&home, &["--overcommit-ratio", &ratio.to_string()], &[]);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("small", "idle")), 201);
    api.expect("POST", "/v1/domains", Some(&guest_toml("big", "idle").replace("64M", "96M")), 201);
    d.ferro_ok(&["start", "small"]);

    let node = api.expect("GET", "/v1/nodeinfo", None, 200);
    let committed = node["committed_bytes"].as_u64().unwrap();
    assert!(committed > 64 << 20 && committed < 128 << 20, "64 MiB of guest RAM plus the VMM's own memory: {node}");
    assert_eq!(node["running_domains"], 1);
    assert_eq!(node["ram_bytes"].as_u64(), Some(total));
    assert_eq!(node["overcommit_ratio"].as_f64(), Some(ratio));
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(node["cpu_list"].as_str(), Some(online.trim()));
    assert!(node["hugepages"]["total"].is_u64() && node["ksm"]["running"].is_boolean(), "{node}");
    let json: Value = serde_json::from_str(&d.ferro_ok(&["nodeinfo", "--json"])).unwrap();
    assert_eq!(json["ram_bytes"], node["ram_bytes"]);
    let human = d.ferro_ok(&["nodeinfo"]);
    assert!(human.contains("Committed") && human.contains("to 1 running domains"), "{human}");

    let o = d.ferro(&["start", "big"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("starting big would commit") && err.contains("MiB are committed to 1 running domains and starts under way"), "{err}");
    assert!(err.contains("big needs 96 MiB of RAM and 64 MiB of VMM overhead"), "{err}");
    assert_eq!(api.expect("GET", "/v1/domains/big", None, 200)["state"], "shutoff");

    d.ferro_ok(&["destroy", "small"]);
    d.ferro_ok(&["start", "big"]);
    d.ferro_ok(&["destroy", "big"]);

    // Two domains that fit one at a time, started at the same instant: exactly one runs.
    api.expect("POST", "/v1/domains", Some(&guest_toml("big2", "idle").replace("64M", "96M")), 201);
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(|| d.ferro(&["start", "big"]));
        let two = s.spawn(|| d.ferro(&["start", "big2"]));
        (one.join().unwrap(), two.join().unwrap())
    });
    let started: Vec<bool> = [&one, &two].iter().map(|o| o.status.success()).collect();
    assert_eq!(started.iter().filter(|s| **s).count(), 1, "{one:?}\n{two:?}");
    let refused = if started[0] { &two } else { &one };
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("MiB are committed to") && err.contains("needs 96 MiB of RAM"), "{err}");
    let states: Vec<Value> = ["big", "big2"].iter().map(|n| api.expect("GET", &format!("/v1/domains/{n}"), None, 200)["state"].clone()).collect();
    assert_eq!(states.iter().filter(|s| *s == "running").count(), 1, "{states:?}");
    d.cleanup();
}
