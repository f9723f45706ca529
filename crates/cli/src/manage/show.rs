//! Human output: virsh-style tables and key/value blocks.

use ferro_block::ops::utc_date as utc_time;
use super::client::Client;
use serde_json::Value;

/// Prints rows under a header, each column as wide as its widest cell.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!(" {}", text.join("   ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    println!("{}", "-".repeat(widths.iter().sum::<usize>() + 3 * widths.len()));
    for row in rows {
        line(row.clone());
    }
}

fn kv(rows: &[(&str, String)]) {
    for (k, v) in rows {
        println!("{:<16}{v}", format!("{k}:"));
    }
}

pub fn state_word(state: &Value) -> &'static str {
    match state.as_str() {
        Some("running") => "running",
        Some("paused") => "paused",
        Some("crashed") => "crashed",
        Some("shutoff") => "shut off",
        _ => "unknown",
    }
}

/// 1536 -> "1.5 KiB"
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.2} {}", UNITS[unit]) }
}

fn opt_u64(v: &Value) -> String {
    v.as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".to_string())
}

pub fn domain_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let mut state = state_word(&d["state"]).to_string();
            if d["template"] == true {
                state = "template".to_string();
            }
            if d["error"].is_string() {
                state.push_str(" (invalid definition)");
            }
            vec![
                d["name"].as_str().unwrap_or("?").to_string(),
                state,
                opt_u64(&d["vcpus"]),
                d["memory_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".into()),
                opt_u64(&d["pid"]),
                if d["autostart"] == true { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    table(&["Name", "State", "vCPUs", "Memory", "PID", "Autostart"], &rows);
}

pub fn dominfo(d: &Value) {
    let mut rows = vec![
        ("Name", d["name"].as_str().unwrap_or("?").to_string()),
        ("UUID", d["uuid"].as_str().unwrap_or("?").to_string()),
        ("State", state_word(&d["state"]).to_string()),
        ("CPU(s)", opt_u64(&d["vcpus"])),
        ("Memory", d["memory_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".into())),
        ("Autostart", if d["autostart"] == true { "enable".into() } else { "disable".into() }),
    ];
    if d["template"] == true {
        rows.push(("Template", "yes (never started; the base of linked clones)".into()));
    }
    if let Some(pid) = d["pid"].as_u64() {
        rows.push(("PID", pid.to_string()));
    }
    if let Some(ms) = d["started_ms"].as_u64() {
        let secs = crate_now_ms().saturating_sub(ms) / 1000;
        rows.push(("Uptime", format!("{}h {:02}m {:02}s", secs / 3600, secs / 60 % 60, secs % 60)));
    }
    if let Some(reason) = d["crash"]["reason"].as_str() {
        rows.push(("Crash reason", reason.to_string()));
        let status = match (d["crash"]["exit_code"].as_i64(), d["crash"]["signal"].as_i64()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown".into(),
        };
        rows.push(("Exit status", status));
    }
    if let Some(error) = d["error"].as_str() {
        rows.push(("Definition", format!("INVALID: {error}")));
    }
    rows.push(("VMM log", d["log"].as_str().unwrap_or("-").to_string()));
    kv(&rows);
}

fn crate_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// virsh nodeinfo and nodememstats in one table.
pub fn nodeinfo(n: &Value) {
    let size = |key: &str| n[key].as_u64().map(bytes).unwrap_or_else(|| "-".into());
    let huge = &n["hugepages"];
    let ksm = &n["ksm"];
    kv(&[
        ("CPUs", format!("{} ({})", opt_u64(&n["cpus"]), n["cpu_list"].as_str().unwrap_or("?"))),
        ("Memory", size("ram_bytes")),
        ("Available", size("available_bytes")),
        ("Committed", format!("{} to {} running domains", size("committed_bytes"), opt_u64(&n["running_domains"]))),
        ("Commit limit", format!("{} ({} x memory)", size("commit_limit_bytes"), n["overcommit_ratio"])),
        (
            "Huge pages",
            if huge.is_null() {
                "none (the kernel has no 2 MiB huge pages)".into()
            } else {
                format!("{} of {} 2 MiB pages free, {} reserved", opt_u64(&huge["free"]), opt_u64(&huge["total"]), opt_u64(&huge["reserved"]))
            },
        ),
        (
            "KSM",
            match ksm["running"].as_bool() {
                Some(true) => format!("running, {} pages sharing", opt_u64(&ksm["pages_sharing"])),
                Some(false) => "not running".into(),
                None => "not in this kernel".into(),
            },
        ),
        ("THP", n["thp"].as_str().unwrap_or("not in this kernel").to_string()),
    ]);
}

/// virsh vcpuinfo's layout: one block per vCPU, then the emulator's CPUs.
pub fn vcpuinfo(info: &Value) {
    for v in info["vcpus"].as_array().into_iter().flatten() {
        let secs = v["cpu_time_ns"].as_f64().map(|ns| format!("{:.3} s", ns / 1e9)).unwrap_or_else(|| "-".into());
        kv(&[
            ("VCPU", opt_u64(&v["vcpu"])),
            ("Thread", v["thread_id"].to_string()),
            ("State", v["state"].as_str().unwrap_or("?").to_string()),
            ("CPU time", secs),
            ("CPU Affinity", v["affinity"].as_str().unwrap_or("?").to_string()),
        ]);
        println!();
    }
    kv(&[("Emulator CPUs", info["emulator_affinity"].as_str().unwrap_or("?").to_string())]);
}

pub fn domstats(s: &Value) {
    let secs = |v: &Value| v.as_f64().map(|ns| format!("{:.3} s", ns / 1e9)).unwrap_or_else(|| "-".into());
    let mut rows = vec![
        ("Domain", s["name"].as_str().unwrap_or("?").to_string()),
        ("State", state_word(&s["state"]).to_string()),
        ("CPU time", secs(&s["cpu_time_ns"])),
        ("Memory", s["memory_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".into())),
        ("RSS", s["rss_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".into())),
        ("vCPU exits", opt_u64(&s["exits"])),
        (
            "KSM merged",
            match s["ksm_merging_pages"].as_u64() {
                Some(pages) => format!("{pages} pages ({})", bytes(pages * 4096)),
                None => "not reported by this kernel (/proc/PID/ksm_merging_pages needs Linux 6.1)".to_string(),
            },
        ),
    ];
    if let Some(b) = s["balloon"].as_object() {
        rows.push(("Balloon", format!("target {} MiB, actual {} MiB", opt_u64(&b["target_mib"]), opt_u64(&b["actual_mib"]))));
    }
    let vcpu_labels: Vec<String> =
        (0..s["vcpu_time_ns"].as_array().map_or(0, Vec::len)).map(|i| format!("vCPU {i} time")).collect();
    for (i, t) in s["vcpu_time_ns"].as_array().into_iter().flatten().enumerate() {
        rows.push((vcpu_labels[i].as_str(), secs(t)));
    }
    rows.extend(cgroup_rows(&s["cgroup"]));
    kv(&rows);
    for (kind, key) in [("Disk", "disks"), ("NIC", "nics")] {
        for (i, dev) in s[key].as_array().into_iter().flatten().enumerate() {
            let counters: Vec<String> = dev
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect();
            println!("{:<16}{}", format!("{kind} {i}:"), counters.join(" "));
        }
    }
}

/// The cgroup's limits and how often each held the domain back ("throttled", "refused").
fn cgroup_rows(c: &Value) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    if c.is_null() {
        rows.push(("Limits", "none (no cgroup hierarchy ferrod can use; see ferro host-check)".to_string()));
        return rows;
    }
    let cpu = &c["cpu"];
    if let Some(percent) = cpu["limit_percent"].as_u64() {
        let throttled = cpu["throttled_ns"].as_f64().unwrap_or(0.0) / 1e9;
        rows.push((
            "CPU limit",
            format!(
                "{percent}% of a host CPU; throttled in {} of {} periods ({throttled:.3} s)",
                opt_u64(&cpu["throttled_periods"]),
                opt_u64(&cpu["periods"])
            ),
        ));
    }
    let memory = &c["memory"];
    if !memory.is_null() {
        let limit = memory["limit_bytes"].as_u64().map(bytes).unwrap_or_else(|| "none".to_string());
        let usage = memory["usage_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".to_string());
        rows.push((
            "Memory limit",
            format!("{limit}; using {usage}, limit reached {} times, {} OOM kills", opt_u64(&memory["limit_hits"]), opt_u64(&memory["oom_kills"])),
        ));
    }
    let pids = &c["pids"];
    if let Some(limit) = pids["limit"].as_u64() {
        rows.push(("Task limit", format!("{limit}; {} in use, {} refused", opt_u64(&pids["current"]), opt_u64(&pids["limit_hits"]))));
    }
    for dev in c["io"].as_array().into_iter().flatten() {
        let amount = |key: &str| dev[key].as_u64().map(bytes).unwrap_or_else(|| "-".to_string());
        let mut limits = Vec::new();
        if let Some(v) = dev["read_bps_limit"].as_u64() {
            limits.push(format!("reads {}/s", bytes(v)));
        }
        if let Some(v) = dev["write_bps_limit"].as_u64() {
            limits.push(format!("writes {}/s", bytes(v)));
        }
        if let Some(v) = dev["read_iops_limit"].as_u64() {
            limits.push(format!("{v} operations/s each way"));
        }
        let limits = if limits.is_empty() { "no limit".to_string() } else { format!("limits: {}", limits.join(", ")) };
        rows.push((
            "Disk I/O",
            format!(
                "host disk {}: read {} in {} ops, wrote {} in {} ops; {limits}",
                dev["device"].as_str().unwrap_or("?"),
                amount("read_bytes"),
                opt_u64(&dev["read_ops"]),
                amount("write_bytes"),
                opt_u64(&dev["write_ops"]),
            ),
        ));
    }
    rows
}

pub fn pool_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p["name"].as_str().unwrap_or("?").to_string(),
                if p["active"] == true { "active".into() } else { "inactive".into() },
                if p["autostart"] == true { "yes".into() } else { "no".into() },
                p["target"].as_str().unwrap_or("?").to_string(),
            ]
        })
        .collect();
    table(&["Name", "State", "Autostart", "Target"], &rows);
}

pub fn pool_info(p: &Value) {
    let size = |v: &Value| v.as_u64().map(bytes).unwrap_or_else(|| "-".into());
    kv(&[
        ("Name", p["name"].as_str().unwrap_or("?").to_string()),
        ("UUID", p["uuid"].as_str().unwrap_or("?").to_string()),
        ("Type", p["type"].as_str().unwrap_or("?").to_string()),
        ("State", if p["active"] == true { "running".into() } else { "inactive".into() }),
        ("Autostart", if p["autostart"] == true { "yes".into() } else { "no".into() }),
        ("Target", p["target"].as_str().unwrap_or("?").to_string()),
        ("Capacity", size(&p["capacity"])),
        ("Allocation", size(&p["allocation"])),
        ("Available", size(&p["available"])),
        ("Volumes", opt_u64(&p["volumes"])),
    ]);
}

fn yes_no(v: &Value) -> String {
    if *v == true { "yes".into() } else { "no".into() }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("-").to_string()
}

pub fn interface_table(list: &[Value]) {
    let rows: Vec<Vec<String>> =
        list.iter().map(|i| vec![text(&i["tap"]), text(&i["type"]), text(&i["source"]), "virtio".into(), text(&i["mac"])]).collect();
    table(&["Interface", "Type", "Source", "Model", "MAC"], &rows);
}

pub fn address_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let protocol = if i["address"].is_string() { "ipv4" } else { "-" };
            vec![text(&i["tap"]), text(&i["mac"]), protocol.into(), text(&i["address"])]
        })
        .collect();
    table(&["Name", "MAC address", "Protocol", "Address"], &rows);
}

/// A domain's disks as `[{"target": "vda", "source": ...}]`: targets in definition order, the
/// source a path or `pool/volume`.
pub fn disk_list(disks: &Value) -> Value {
    let list: Vec<Value> = disks
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, d)| {
            let source = match d["path"].as_str() {
                Some(path) => path.to_string(),
                None => format!("{}/{}", text(&d["pool"]), text(&d["volume"])),
            };
            serde_json::json!({ "target": disk_target(i), "source": source })
        })
        .collect();
    Value::Array(list)
}

/// vda, vdb, ..., vdz, vdaa, ... as Linux names virtio disks.
fn disk_target(index: usize) -> String {
    let mut name = String::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        name.insert(0, char::from(b'a' + (n % 26) as u8));
        n /= 26;
    }
    format!("vd{name}")
}

pub fn disk_table(disks: &Value) {
    let rows: Vec<Vec<String>> = disks.as_array().into_iter().flatten().map(|d| vec![text(&d["target"]), text(&d["source"])]).collect();
    table(&["Target", "Source"], &rows);
}

pub fn network_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            let state = if n["active"] == true { "active" } else { "inactive" };
            vec![text(&n["name"]), state.into(), yes_no(&n["autostart"]), text(&n["mode"]), text(&n["bridge"])]
        })
        .collect();
    table(&["Name", "State", "Autostart", "Mode", "Bridge"], &rows);
}

pub fn network_info(n: &Value) {
    let config = &n["config"];
    let mut rows = vec![
        ("Name", text(&n["name"])),
        ("UUID", text(&n["uuid"])),
        ("Active", yes_no(&n["active"])),
        ("Autostart", yes_no(&n["autostart"])),
        ("Mode", text(&n["mode"])),
        ("Bridge", text(&n["bridge"])),
        ("Address", text(&config["ip"])),
    ];
    if config["dhcp"].is_object() {
        rows.push(("DHCP range", format!("{} - {}", text(&config["dhcp"]["start"]), text(&config["dhcp"]["end"]))));
    }
    if let Some(pid) = n["dnsmasq_pid"].as_u64() {
        rows.push(("dnsmasq pid", pid.to_string()));
    }
    if let Some(error) = n["error"].as_str() {
        rows.push(("Error", error.to_string()));
    }
    kv(&rows);
}

pub fn lease_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|l| {
            let expiry = l["expiry"].as_u64().map(utc_time).unwrap_or_else(|| "never".into());
            vec![expiry, text(&l["mac"]), text(&l["ip"]), text(&l["hostname"])]
        })
        .collect();
    table(&["Expiry Time (UTC)", "MAC address", "IP address", "Hostname"], &rows);
}

pub fn volume_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                v["name"].as_str().unwrap_or("?").to_string(),
                v["format"].as_str().unwrap_or("?").to_string(),
                v["capacity"].as_u64().map(bytes).unwrap_or_default(),
                v["path"].as_str().unwrap_or("?").to_string(),
            ]
        })
        .collect();
    table(&["Name", "Format", "Capacity", "Path"], &rows);
}

pub fn volume_info(v: &Value) {
    let mut rows = vec![
        ("Name", v["name"].as_str().unwrap_or("?").to_string()),
        ("Pool", v["pool"].as_str().unwrap_or("?").to_string()),
        ("Path", v["path"].as_str().unwrap_or("?").to_string()),
        ("Format", v["format"].as_str().unwrap_or("?").to_string()),
        ("Capacity", v["capacity"].as_u64().map(bytes).unwrap_or_default()),
        ("Allocation", v["allocation"].as_u64().map(bytes).unwrap_or_default()),
    ];
    if let Some(b) = v["backing"].as_str() {
        rows.push(("Backing", b.to_string()));
    }
    kv(&rows);
}

/// "45% (450.00 MiB of 1.00 GiB)" for a job counting bytes, "50% (step 2 of 4)" for one counting
/// steps.
fn job_progress(job: &Value) -> String {
    let steps = job.get("done_steps").is_some();
    let (done, total) = if steps {
        (job["done_steps"].as_u64().unwrap_or(0), job["total_steps"].as_u64().unwrap_or(0))
    } else {
        (job["done_bytes"].as_u64().unwrap_or(0), job["total_bytes"].as_u64().unwrap_or(0))
    };
    let percent = match (total, job["state"].as_str()) {
        (0, Some("completed")) => 100,
        (0, _) => 0,
        _ => done.saturating_mul(100) / total,
    };
    if steps { format!("{percent}% (step {done} of {total})") } else { format!("{percent}% ({} of {})", bytes(done), bytes(total)) }
}

/// Seconds a job has run (until now, or until it ended).
fn job_elapsed(job: &Value) -> String {
    let start = job["started_ms"].as_u64().unwrap_or(0);
    let end = job["finished_ms"].as_u64().unwrap_or_else(crate_now_ms);
    format!("{:.1} s", end.saturating_sub(start) as f64 / 1000.0)
}

/// The one-line progress shown on a terminal while a verb waits for its job.
pub fn job_line(job: &Value) -> String {
    format!(
        "job {}: {} {} -> {}: {}",
        job["id"],
        job["kind"].as_str().unwrap_or("?"),
        job["source"].as_str().unwrap_or("?"),
        job["target"].as_str().unwrap_or("?"),
        job_progress(job)
    )
}

pub fn job_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|j| {
            vec![
                j["id"].to_string(),
                j["kind"].as_str().unwrap_or("?").to_string(),
                j["source"].as_str().unwrap_or("?").to_string(),
                j["target"].as_str().unwrap_or("?").to_string(),
                j["state"].as_str().unwrap_or("?").to_string(),
                job_progress(j),
                job_elapsed(j),
            ]
        })
        .collect();
    table(&["Id", "Kind", "Source", "Target", "State", "Progress", "Time"], &rows);
}

pub fn job_info(j: &Value) {
    let mut rows = vec![
        ("Id", j["id"].to_string()),
        ("Kind", j["kind"].as_str().unwrap_or("?").to_string()),
        ("Source", j["source"].as_str().unwrap_or("?").to_string()),
        ("Target", j["target"].as_str().unwrap_or("?").to_string()),
        ("State", j["state"].as_str().unwrap_or("?").to_string()),
        ("Progress", job_progress(j)),
        ("Time", job_elapsed(j)),
    ];
    if let Some(error) = j["error"].as_str() {
        rows.push(("Error", error.to_string()));
    }
    kv(&rows);
}

pub fn event_line(e: &Value) {
    let detail = e["detail"].as_str().unwrap_or_default();
    let secs = e["time_ms"].as_u64().unwrap_or(0) / 1000;
    println!(
        "#{} [{:02}:{:02}:{:02} UTC] {} '{}': {}{}{}",
        e["seq"],
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        e["object"].as_str().unwrap_or("?"),
        e["name"].as_str().unwrap_or("?"),
        e["kind"].as_str().unwrap_or("?"),
        if detail.is_empty() { "" } else { ": " },
        detail
    );
}

/// Refreshes a table of running domains with CPU use between two samples.
pub fn top(c: &Client, delay: u64, iterations: Option<u64>) -> Result<(), String> {
    let mut previous: std::collections::HashMap<String, (f64, std::time::Instant)> = Default::default();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut n = 0;
    loop {
        let list = c.get("/v1/domains")?;
        let mut rows = Vec::new();
        for d in list.as_array().into_iter().flatten() {
            let name = d["name"].as_str().unwrap_or("?").to_string();
            if !matches!(d["state"].as_str(), Some("running" | "paused")) {
                continue;
            }
            let Ok(s) = c.get(&format!("/v1/domains/{name}/stats")) else { continue };
            let cpu_ns = s["cpu_time_ns"].as_f64().unwrap_or(0.0);
            let now = std::time::Instant::now();
            let pct = previous
                .get(&name)
                .map(|(ns, at)| (cpu_ns - ns) / now.duration_since(*at).as_nanos().max(1) as f64 * 100.0)
                .map(|p| format!("{p:.1}"))
                .unwrap_or_else(|| "-".into());
            previous.insert(name.clone(), (cpu_ns, now));
            rows.push(vec![
                name,
                state_word(&d["state"]).to_string(),
                pct,
                opt_u64(&d["vcpus"]),
                s["rss_bytes"].as_u64().map(bytes).unwrap_or_else(|| "-".into()),
                opt_u64(&s["exits"]),
            ]);
        }
        if interactive {
            print!("\x1b[H\x1b[2J");
        }
        println!("ferro top - {} running domain(s), every {delay} s", rows.len());
        table(&["Name", "State", "%CPU", "vCPUs", "RSS", "Exits"], &rows);
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(delay.max(1)));
    }
}

/// A snapshot's pause time as ferrod reports it (microseconds) in milliseconds.
pub fn pause_ms(s: &Value) -> Option<String> {
    s["pause_us"].as_u64().map(|us| format!("{:.3} ms", us as f64 / 1000.0))
}

pub fn snapshot_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| vec![text(&s["name"]), text(&s["created"]), text(&s["state"]), if s["current"] == true { "*".into() } else { String::new() }])
        .collect();
    table(&["Name", "Creation Time", "State", "Current"], &rows);
}

/// The snapshots as a tree, like `virsh snapshot-list --tree`: each child under its parent.
pub fn snapshot_tree(list: &[Value]) {
    fn branch(list: &[Value], name: &str, prefix: &str, out: &mut Vec<String>) {
        let children: Vec<&str> = list.iter().filter(|s| s["parent"].as_str() == Some(name)).filter_map(|s| s["name"].as_str()).collect();
        for (i, child) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            out.push(format!("{prefix}|"));
            out.push(format!("{prefix}+- {child}"));
            branch(list, child, &format!("{prefix}{}", if last { "    " } else { "|   " }), out);
        }
    }
    let mut out = Vec::new();
    for root in list.iter().filter(|s| s["parent"].is_null()).filter_map(|s| s["name"].as_str()) {
        out.push(root.to_string());
        branch(list, root, "  ", &mut out);
        out.push(String::new());
    }
    for line in out {
        println!("{line}");
    }
}

pub fn snapshot_info(s: &Value) {
    let children = s["children"].as_array().map(|c| c.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    let disks = s["disks"].as_array().map(|d| d.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    let mut rows = vec![
        ("Name", text(&s["name"])),
        ("Domain", text(&s["domain"])),
        ("Current", yes_no(&s["current"])),
        ("State", text(&s["state"])),
        ("Created", text(&s["created"])),
        ("Parent", s["parent"].as_str().unwrap_or("-").to_string()),
        ("Children", if children.is_empty() { "-".to_string() } else { children }),
        ("Description", s["description"].as_str().unwrap_or("-").to_string()),
        ("Disks", if disks.is_empty() { "-".to_string() } else { disks }),
    ];
    if let Some(pause) = pause_ms(s) {
        rows.push(("Guest paused", pause));
    }
    if let Some(memory) = s["memory_bytes"].as_u64() {
        rows.push(("Memory saved", bytes(memory)));
    }
    kv(&rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_targets_count_like_linux() {
        assert_eq!([0, 1, 25, 26, 27, 701, 702].map(disk_target), ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]);
    }

    #[test]
    fn lease_expiry_is_a_utc_date() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_796_062_852), "2026-11-30 18:20:52");
    }

    #[test]
    fn job_progress_follows_the_jobs_unit() {
        let copy = serde_json::json!({"state": "running", "done_bytes": 1u64 << 29, "total_bytes": 1u64 << 30});
        assert_eq!(job_progress(&copy), format!("50% ({} of {})", bytes(1 << 29), bytes(1 << 30)));
        let steps = serde_json::json!({"state": "running", "done_steps": 1, "total_steps": 4});
        assert_eq!(job_progress(&steps), "25% (step 1 of 4)");
        let done = serde_json::json!({"state": "completed", "done_steps": 0, "total_steps": 0});
        assert_eq!(job_progress(&done), "100% (step 0 of 0)");
    }
}

