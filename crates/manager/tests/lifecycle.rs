//! Domains running real VMM processes (`ferro vmm` booting the built-in test guests on /dev/kvm)
//! under a real ferrod: lifecycle, console, crashes, SIGKILL of the daemon, concurrency and leaks.

use ferro_test_support::daemon::{Api, Daemon, Home, guest_toml, openapi, read_console};
use ferro_test_support::{alive, wait_for};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a console line from a running test guest may take (only a hang reaches it).
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

fn state(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}"), None, 200)
}

fn vmm_pid(d: &Daemon, name: &str) -> i64 {
    state(d, name)["pid"].as_i64().unwrap_or_else(|| panic!("{name} has no pid"))
}

#[test]
fn full_lifecycle_of_a_domain() {
    let home = Home::new("life");
    let d = Daemon::start(&home);
    let api = d.api();
    let file = home.path().join("idle1.toml");
    std::fs::write(&file, guest_toml("idle1", "idle")).unwrap();

    let t = Instant::now();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    d.ferro_ok(&["start", "idle1"]);
    eprintln!("define + start through the CLI: {:?}", t.elapsed());
    let info = state(&d, "idle1");
    assert_eq!(info["state"], "running");
    let pid = info["pid"].as_i64().unwrap();
    assert!(alive(pid));
    let v = api.expect("POST", "/v1/domains/idle1/start", None, 409);
    assert!(v["message"].as_str().unwrap().contains("already running"), "{v}");
    api.expect("DELETE", "/v1/domains/idle1", None, 409);

    let stats = api.expect("GET", "/v1/domains/idle1/stats", None, 200);
    assert_eq!(stats["vcpu_time_ns"].as_array().unwrap().len(), 1);
    assert!(stats["rss_bytes"].as_u64().unwrap() > 0);
    let cli_stats: Value = serde_json::from_str(&d.ferro_ok(&["domstats", "idle1", "--json"])).unwrap();
    openapi::validate(&serde_json::json!({"$ref": "#/components/schemas/DomainStats"}), &cli_stats, "$").unwrap();

    // The console reaches the guest, which echoes what it is sent.
    let mut con = d.console("idle1");
    read_console(&mut con, "idle: up", CONSOLE_WAIT);
    con.write_all(b"k").unwrap();
    read_console(&mut con, "echo: k", CONSOLE_WAIT);
    drop(con);

    // A paused guest does not echo until resumed.
    assert_eq!(api.expect("POST", "/v1/domains/idle1/suspend", None, 200)["state"], "paused");
    assert_eq!(d.ferro_ok(&["domstate", "idle1"]).trim(), "paused");
    let mut con = d.console("idle1");
    read_console(&mut con, "echo: k", CONSOLE_WAIT);
    con.write_all(b"p").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut early = [0u8; 4096];
    con.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let n = con.read(&mut early).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&early[..n]).contains("echo: p"), "paused guest echoed");
    assert_eq!(api.expect("POST", "/v1/domains/idle1/resume", None, 200)["state"], "running");
    read_console(&mut con, "echo: p", CONSOLE_WAIT);
    drop(con);

    // The test guest has no ACPI: the power button is ignored and the timed shutdown says so.
    let v = api.expect("POST", "/v1/domains/idle1/shutdown", Some(r#"{"timeout": 1}"#), 504);
    assert!(v["message"].as_str().unwrap().contains("ferro destroy"), "{v}");
    assert_eq!(state(&d, "idle1")["state"], "running");

    // A hard reset restarts the VMM: new process, still running.
    let after = api.expect("POST", "/v1/domains/idle1/reset", None, 200);
    assert_eq!(after["state"], "running");
    let new_pid = after["pid"].as_i64().unwrap();
    assert_ne!(new_pid, pid);
    assert!(!alive(pid));

    // `ferro top` shows it; `ferro console` (stdin not a terminal) relays input and ends when the
    // domain stops.
    let top = d.ferro_ok(&["top", "--iterations", "1"]);
    assert!(top.contains("idle1") && top.contains("running"), "{top}");
    let mut cli_console = std::process::Command::new(ferro_test_support::ferro_bin())
        .args(["console", "idle1"])
        .env("FERRO_HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cli_console.stdin.take().unwrap().write_all(b"c").unwrap();
    let mut cli_out = cli_console.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = cli_out.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(500));

    let off = api.expect("POST", "/v1/domains/idle1/destroy", None, 200);
    assert_eq!(off["state"], "shutoff");
    assert!(off["pid"].is_null());
    wait_for("the VMM to exit", Duration::from_secs(5), || !alive(new_pid));
    wait_for("`ferro console` to end", Duration::from_secs(10), || cli_console.try_wait().unwrap().is_some());
    let text = reader.join().unwrap();
    assert!(text.contains("echo: c"), "console output: {text:?}");
    assert!(home.processes().is_empty(), "processes left: {:?}", home.processes());
    api.expect("POST", "/v1/domains/idle1/destroy", None, 409);

    // A guest that powers off by itself ends up shut off, not crashed.
    api.expect("POST", "/v1/domains", Some(&guest_toml("hello1", "hello")), 201);
    api.expect("POST", "/v1/domains/hello1/start", None, 200);
    wait_for("hello to power off", Duration::from_secs(10), || state(&d, "hello1")["state"] == "shutoff");
    let events = api.expect("GET", "/v1/events", None, 200);
    let kinds: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "hello1")
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["defined", "started", "stopped"]);
    assert_eq!(d.ferro(&["undefine", "idle1"]).status.code(), Some(0));
}

/// A guest that honours the ACPI power button (the idle guest with `powerbutton=1`) shuts down
/// cleanly on `ferro shutdown`, and `ferro reboot` brings it back with a new VMM.
#[test]
fn shutdown_and_reboot_through_the_acpi_power_button() {
    let home = Home::new("powerbutton");
    let d = Daemon::start(&home);
    let api = d.api();
    let toml = format!("{}cmdline = \"powerbutton=1\"\n", guest_toml("acpi1", "idle"));
    api.expect("POST", "/v1/domains", Some(&toml), 201);
    api.expect("POST", "/v1/domains/acpi1/start", None, 200);
    let mut con = d.console("acpi1");
    read_console(&mut con, "idle: up", CONSOLE_WAIT);
    let pid = vmm_pid(&d, "acpi1");

    d.ferro_ok(&["reboot", "acpi1"]);
    wait_for("the reboot", Duration::from_secs(20), || {
        let s = state(&d, "acpi1");
        s["state"] == "running" && s["pid"].as_i64().is_some_and(|p| p != pid)
    });
    assert!(!alive(pid), "the old VMM must be gone after a reboot");
    let pid = vmm_pid(&d, "acpi1");

    let out = d.ferro_ok(&["shutdown", "acpi1", "--timeout", "20"]);
    eprintln!("{out}");
    let s = state(&d, "acpi1");
    assert_eq!(s["state"], "shutoff", "{s}");
    assert!(s["crash"].is_null(), "a clean shutdown is not a crash: {s}");
    wait_for("the VMM to exit", Duration::from_secs(5), || !alive(pid));
    assert!(home.processes().is_empty(), "left: {:?}", home.processes());
}

#[test]
fn a_vmm_killed_behind_the_daemons_back_is_crashed() {
    let home = Home::new("crash");
    let d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("victim", "idle")), 201);
    api.expect("POST", "/v1/domains/victim/start", None, 200);
    let pid = vmm_pid(&d, "victim");
    // SAFETY: kill(2) on the VMM's pid; no memory is involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("the crash to be noticed", Duration::from_secs(10), || state(&d, "victim")["state"] == "crashed");
    let info = state(&d, "victim");
    assert_eq!(info["crash"]["signal"], 9, "{info}");
    assert!(info["crash"]["reason"].as_str().unwrap().contains("SIGKILL"), "{info}");
    assert!(d.ferro_ok(&["domstate", "victim", "--reason"]).contains("crashed (VMM killed by signal 9"));
    let out = d.ferro_ok(&["dominfo", "victim"]);
    assert!(out.contains("Exit status:    killed by signal 9"), "{out}");
    let metrics = String::from_utf8(api.raw("GET", "/metrics", "", None).body).unwrap();
    assert!(metrics.contains("ferro_domain_state{domain=\"victim\",state=\"crashed\"} 1"));
    // A crashed domain starts again.
    assert_eq!(api.expect("POST", "/v1/domains/victim/start", None, 200)["state"], "running");
    assert!(api.expect("GET", "/v1/domains/victim", None, 200)["crash"].is_null());
}

#[test]
fn ferrod_killed_and_restarted_reattaches_to_running_vms() {
    let home = Home::new("reattach");
    let mut d = Daemon::start(&home);
    let api = d.api();
    for name in ["r1", "r2", "r3"] {
        api.expect("POST", "/v1/domains", Some(&guest_toml(name, "idle")), 201);
        api.expect("POST", &format!("/v1/domains/{name}/start"), None, 200);
    }
    api.expect("POST", "/v1/domains/r2/suspend", None, 200);
    let pids: Vec<i64> = ["r1", "r2", "r3"].iter().map(|n| vmm_pid(&d, n)).collect();

    d.kill9();
    assert!(pids.iter().all(|&p| alive(p)), "VMs must survive the daemon");
    // While the daemon is gone, r3's VMM dies.
    // SAFETY: kill(2) on the VMM's pid; no memory is involved.
    unsafe { libc::kill(pids[2] as i32, libc::SIGKILL) };
    wait_for("r3 to die", Duration::from_secs(5), || !alive(pids[2]));

    let d = Daemon::start(&home);
    let api = d.api();
    let r1 = state(&d, "r1");
    assert_eq!((r1["state"].as_str(), r1["pid"].as_i64()), (Some("running"), Some(pids[0])));
    let r2 = state(&d, "r2");
    assert_eq!((r2["state"].as_str(), r2["pid"].as_i64()), (Some("paused"), Some(pids[1])));
    // r3's monitor may still be writing its exit report when the daemon comes back (the test
    // waited for the VMM, not for the monitor); the daemon learns of it through the pidfd.
    wait_for("r3 to be reported crashed", Duration::from_secs(10), || state(&d, "r3")["state"] == "crashed");
    let r3 = state(&d, "r3");
    assert_eq!(r3["crash"]["signal"], 9, "exit status known across the restart: {r3}");

    // The re-attached VMs are fully controllable.
    let mut con = d.console("r1");
    con.write_all(b"z").unwrap();
    read_console(&mut con, "echo: z", CONSOLE_WAIT);
    api.expect("POST", "/v1/domains/r2/resume", None, 200);
    api.expect("GET", "/v1/domains/r2/stats", None, 200);
    // A re-attached VMM that crashes is noticed too (through its pidfd, not as our child).
    // SAFETY: kill(2) on the VMM's pid; no memory is involved.
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    wait_for("r2's crash", Duration::from_secs(10), || state(&d, "r2")["state"] == "crashed");
    api.expect("POST", "/v1/domains/r1/destroy", None, 200);
    wait_for("r1 to exit", Duration::from_secs(5), || !alive(pids[0]));
    assert!(home.processes().is_empty(), "left: {:?}", home.processes());
}

#[test]
fn autostart_runs_on_the_first_daemon_start_after_boot() {
    let home = Home::new("autostart");
    let mut d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("auto", "idle").replace("vcpus = 1", "vcpus = 1\nautostart = true")), 201);
    api.expect("POST", "/v1/domains", Some(&guest_toml("manual", "idle")), 201);
    d.kill9();
    // Same boot: a restart does not autostart.
    let mut d = Daemon::start(&home);
    assert_eq!(state(&d, "auto")["state"], "shutoff");
    d.kill9();
    // Pretend the host rebooted since the daemon last ran.
    let db = rusqlite::Connection::open(home.path().join("ferrod.db")).unwrap();
    db.execute("UPDATE meta SET value = 'an-earlier-boot' WHERE key = 'boot_id'", []).unwrap();
    drop(db);
    let d = Daemon::start(&home);
    assert_eq!(state(&d, "auto")["state"], "running");
    assert_eq!(state(&d, "manual")["state"], "shutoff");
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn fifty_domains_start_and_stop_concurrently_without_leaks() {
    const N: usize = 50;
    let home = Home::new("fifty");
    let d = Daemon::start(&home);
    let api = d.api();
    for i in 0..N {
        api.expect("POST", "/v1/domains", Some(&guest_toml(&format!("c{i:02}"), "idle")), 201);
    }
    // Warm up (one start/stop) so lazily created runtime resources are counted in the baseline.
    api.expect("POST", "/v1/domains/c00/start", None, 200);
    api.expect("POST", "/v1/domains/c00/destroy", None, 200);
    let fds_before = fd_count(d.child.id());

    let run_all = |action: &'static str, expect: &'static str| {
        let threads: Vec<_> = (0..10)
            .map(|t| {
                let api = api.clone();
                std::thread::spawn(move || {
                    for i in (t..N).step_by(10) {
                        let v = api.expect("POST", &format!("/v1/domains/c{i:02}/{action}"), None, 200);
                        assert_eq!(v["state"], expect);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    let t = Instant::now();
    run_all("start", "running");
    eprintln!("{N} concurrent starts: {:?}", t.elapsed());
    let list = api.expect("GET", "/v1/domains", None, 200);
    let pids: Vec<i64> = list.as_array().unwrap().iter().map(|d| d["pid"].as_i64().unwrap()).collect();
    assert_eq!(pids.len(), N);
    assert!(pids.iter().all(|&p| alive(p)));
    let metrics = String::from_utf8(api.raw("GET", "/metrics", "", None).body).unwrap();
    assert_eq!(metrics.matches("ferro_domain_rss_bytes{").count(), N);

    let t = Instant::now();
    run_all("destroy", "shutoff");
    eprintln!("{N} concurrent destroys: {:?}", t.elapsed());
    wait_for("every VMM to exit", Duration::from_secs(10), || pids.iter().all(|&p| !alive(p)));
    assert!(home.processes().is_empty(), "left: {:?}", home.processes());
    wait_for("ferrod's descriptors to settle", Duration::from_secs(5), || fd_count(d.child.id()) <= fds_before);
    let sockets: Vec<_> = walk(&home.path().join("run")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "sock")).collect();
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Defines, builds and starts the pool "default" in `$home/images`, and returns that directory.
fn default_pool(api: &Api, home: &Home) -> std::path::PathBuf {
    let target = home.path().join("images");
    let def = serde_json::json!({ "name": "default", "type": "dir", "target": target.display().to_string() }).to_string();
    api.expect("POST", "/v1/pools", Some(&def), 201);
    api.expect("POST", "/v1/pools/default/build", None, 200);
    api.expect("POST", "/v1/pools/default/start", None, 200);
    target
}

/// A domain whose disk is a pool volume: the guest (the virtio test guest, which writes a
/// pattern to its disk) really uses it through ferrod's VMM, the volume cannot be deleted while
/// the domain runs, and it can once the domain is off.
#[test]
fn a_running_domains_volume_is_used_and_cannot_be_deleted() {
    let home = Home::new("voluse");
    let d = Daemon::start(&home);
    let api = d.api();
    let target = default_pool(&api, &home);
    api.expect("POST", "/v1/pools/default/volumes", Some(r#"{"name": "d1.qcow2", "capacity": "16M", "format": "qcow2"}"#), 201);
    // The idle guest keeps running; the disk is attached but the guest leaves it alone.
    let toml = format!(
        "{}[[disk]]\npool = \"default\"\nvolume = \"d1.qcow2\"\nformat = \"qcow2\"\n",
        guest_toml("disk1", "idle")
    );
    api.expect("POST", "/v1/domains", Some(&toml), 201);
    api.expect("POST", "/v1/domains/disk1/start", None, 200);
    let v = api.expect("DELETE", "/v1/pools/default/volumes/d1.qcow2", None, 409);
    assert!(v["message"].as_str().unwrap().contains("in use by running domain disk1"), "{v}");
    api.expect("POST", "/v1/domains/disk1/destroy", None, 200);
    assert_eq!(api.call("DELETE", "/v1/pools/default/volumes/d1.qcow2", None).0, 204);

    // The virtio guest writes its pattern to the volume through ferrod's VMM and powers off.
    api.expect("POST", "/v1/pools/default/volumes", Some(r#"{"name": "d2.raw", "capacity": "16M"}"#), 201);
    let toml = "name = \"disk2\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"virtio\"\ncmdline = \"blk.seed=7\"\n[[disk]]\npool = \"default\"\nvolume = \"d2.raw\"\n";
    api.expect("POST", "/v1/domains", Some(toml), 201);
    api.expect("POST", "/v1/domains/disk2/start", None, 200);
    wait_for("the virtio guest to finish", Duration::from_secs(20), || state(&d, "disk2")["state"] != "running");
    let s = state(&d, "disk2");
    assert_eq!(s["state"], "shutoff", "the guest's disk test must pass (a failure exits non-zero): {s}");
    // The guest writes sector 1 onwards with byte(p) = seed + 7p + 13(p >> 9) (guests/kit/virtio_blk.c).
    let written = std::fs::read(target.join("d2.raw")).unwrap();
    for (p, byte) in written.iter().enumerate().take(1024).skip(512) {
        let want = (7u64 + 7 * p as u64 + 13 * (p as u64 >> 9)) as u8;
        assert_eq!(*byte, want, "byte {p} of the volume is not what the guest wrote");
    }
}

/// A volume is held while anything reads or replaces it: the base volume a running domain reads
/// through its overlay cannot be wiped, resized or overwritten; two uploads to one volume never
/// interleave; and no domain starts on a volume while an upload is replacing it.
#[test]
fn backing_volumes_and_uploads_are_held() {
    let home = Home::new("volhold");
    let d = Daemon::start(&home);
    let api = d.api();
    let target = default_pool(&api, &home);
    api.expect("POST", "/v1/pools/default/volumes", Some(r#"{"name": "base.qcow2", "capacity": "16M", "format": "qcow2"}"#), 201);
    let overlay = r#"{"name": "top.qcow2", "capacity": "16M", "format": "qcow2", "backing_volume": "base.qcow2", "backing_format": "qcow2"}"#;
    api.expect("POST", "/v1/pools/default/volumes", Some(overlay), 201);
    let toml = format!("{}[[disk]]\npool = \"default\"\nvolume = \"top.qcow2\"\nformat = \"qcow2\"\n", guest_toml("over", "idle"));
    api.expect("POST", "/v1/domains", Some(&toml), 201);
    api.expect("POST", "/v1/domains/over/start", None, 200);
    let base_bytes = std::fs::read(target.join("base.qcow2")).unwrap();
    for (method, path, body) in [
        ("POST", "/v1/pools/default/volumes/base.qcow2/wipe", None),
        ("POST", "/v1/pools/default/volumes/base.qcow2/resize", Some(r#"{"capacity": "32M"}"#)),
    ] {
        let v = api.expect(method, path, body, 409);
        assert!(v["message"].as_str().unwrap().contains("in use by running domain over"), "{path}: {v}");
    }
    let refused = api.raw("PUT", "/v1/pools/default/volumes/base.qcow2/data", "application/octet-stream", Some(b"junk"));
    assert_eq!(refused.status, 409, "an upload over the base of a running overlay");
    assert_eq!(std::fs::read(target.join("base.qcow2")).unwrap(), base_bytes, "the base volume is untouched");
    api.expect("POST", "/v1/domains/over/destroy", None, 200);
    api.expect("POST", "/v1/pools/default/volumes/base.qcow2/wipe", None, 200);

    // An upload in progress: its body is half sent and the connection left open.
    api.expect("POST", "/v1/pools/default/volumes", Some(r#"{"name": "free.raw", "capacity": "1M"}"#), 201);
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    let mut slow = UnixStream::connect(home.socket()).unwrap();
    let head = format!(
        "PUT /v1/pools/default/volumes/free.raw/data HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&data[..4096]).unwrap();
    // Its scratch file appears once it holds the volume (probing with another change could take
    // the volume first and make the upload the one refused).
    wait_for("the first upload to start", Duration::from_secs(20), || target.join(".free.raw.upload").exists());
    let v = api.expect("POST", "/v1/pools/default/volumes/free.raw/wipe", None, 409);
    assert!(v["message"].as_str().unwrap().contains("upload in progress"), "{v}");
    let second = api.raw("PUT", "/v1/pools/default/volumes/free.raw/data", "application/octet-stream", Some(&[0xee; 4096]));
    assert_eq!(second.status, 409, "a second upload to the same volume: {}", String::from_utf8_lossy(&second.body));
    assert!(String::from_utf8_lossy(&second.body).contains("upload in progress"));
    let toml = format!("{}[[disk]]\npool = \"default\"\nvolume = \"free.raw\"\n", guest_toml("during", "idle"));
    api.expect("POST", "/v1/domains", Some(&toml), 201);
    let v = api.expect("POST", "/v1/domains/during/start", None, 409);
    assert!(v["message"].as_str().unwrap().contains("upload in progress"), "{v}");

    slow.write_all(&data[4096..]).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "the first upload completes: {answer}");
    assert_eq!(std::fs::read(target.join("free.raw")).unwrap(), data, "the volume holds the first upload, whole");
    // Released when it ended: the domain starts now.
    api.expect("POST", "/v1/domains/during/start", None, 200);
    api.expect("POST", "/v1/domains/during/destroy", None, 200);
}
