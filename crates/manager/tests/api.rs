//! ferrod's API and the `ferro` verbs against a real daemon process, for everything that does not
//! need a running VM: definitions, validation, errors, persistence across SIGKILL, pools and
//! volumes, events, metrics and many domains at once. Every response is checked against openapi.json.

use ferro_test_support::daemon::{Daemon, Home, guest_toml, openapi};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

const GOOD: &str = r#"
# a comment that dumpconfig keeps
name = "web1"
memory = "512M"
vcpus = 2
[boot]
kernel = "/nonexistent/vmlinux"
cmdline = "console=ttyS0"
[[disk]]
path = "/var/lib/disk.qcow2"
format = "qcow2"
[[nic]]
tap = "tap-web1"
"#;

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

#[test]
fn define_get_list_redefine_undefine() {
    let home = Home::new("define");
    let d = Daemon::start(&home);
    let api = d.api();
    assert_eq!(api.expect("GET", "/v1/domains", None, 200), Value::Array(vec![]));

    let created = api.expect("POST", "/v1/domains", Some(GOOD), 201);
    assert_eq!(created["name"], "web1");
    assert_eq!(created["state"], "shutoff");
    assert_eq!(created["memory_bytes"], 512u64 << 20);
    assert_eq!(created["config"]["disk"][0]["format"], "qcow2");
    let uuid = created["uuid"].as_str().unwrap().to_string();

    let redefined = api.expect("POST", "/v1/domains", Some(&GOOD.replace("vcpus = 2", "vcpus = 4")), 200);
    assert_eq!(redefined["vcpus"], 4);
    assert_eq!(redefined["uuid"], uuid.as_str(), "redefinition keeps the uuid");

    let got = api.expect("GET", "/v1/domains/web1", None, 200);
    assert_eq!(got["vcpus"], 4);
    let config = api.raw("GET", "/v1/domains/web1/config", "", None);
    assert_eq!(config.status, 200);
    let text = String::from_utf8(config.body).unwrap();
    assert!(text.contains("# a comment that dumpconfig keeps") && text.contains("vcpus = 4"), "{text}");

    let on = api.expect("POST", "/v1/domains/web1/autostart", Some(r#"{"enabled": true}"#), 200);
    assert_eq!(on["autostart"], true);
    let text = String::from_utf8(api.raw("GET", "/v1/domains/web1/config", "", None).body).unwrap();
    assert!(text.contains("autostart = true") && text.contains("# a comment"), "{text}");

    assert_eq!(api.expect("GET", "/v1/domains", None, 200).as_array().unwrap().len(), 1);
    let (status, _) = api.call("DELETE", "/v1/domains/web1", None);
    assert_eq!(status, 204);
    api.expect("GET", "/v1/domains/web1", None, 404);
    assert_eq!(api.expect("GET", "/v1/domains", None, 200), Value::Array(vec![]));
}

#[test]
fn bad_definitions_are_rejected_naming_the_key() {
    let home = Home::new("bad");
    let d = Daemon::start(&home);
    let api = d.api();
    let cases: &[(&str, &str, &str)] = &[
        ("vcpus = 2", "vcpus = 2\ncolour = \"red\"", "colour"),
        ("vcpus = 2", "vcpus = 0", "vcpus"),
        ("vcpus = 2", "vcpus = 1000", "vcpus"),
        ("vcpus = 2", "vcpus = \"two\"", "vcpus"),
        ("memory = \"512M\"", "memory = \"lots\"", "memory"),
        ("memory = \"512M\"", "memory = \"0\"", "memory"),
        ("memory = \"512M\"", "", "memory"),
        ("name = \"web1\"", "name = \"../etc\"", "name"),
        ("name = \"web1\"", "name = \"\"", "name"),
        ("format = \"qcow2\"", "format = \"vmdk\"", "disk[0].format"),
        ("format = \"qcow2\"", "format = \"qcow2\"\nsize = 3", "disk[0].size"),
        ("path = \"/var/lib/disk.qcow2\"", "path = \"disk.qcow2\"", "disk[0].path"),
        ("path = \"/var/lib/disk.qcow2\"", "pool = \"default\"", "disk[0].volume"),
        ("tap = \"tap-web1\"", "tap = \"tap/with/slash\"", "nic[0].tap"),
        ("tap = \"tap-web1\"", "tap = \"t\"\nmac = \"01:00:5e:00:00:01\"", "nic[0].mac"),
        ("kernel = \"/nonexistent/vmlinux\"", "kernel = \"relative\"", "boot.kernel"),
        ("kernel = \"/nonexistent/vmlinux\"", "", "boot"),
        ("cmdline = \"console=ttyS0\"", "cmdline = 5", "boot.cmdline"),
        ("[boot]", "[bot]", "bot"),
        ("name = \"web1\"", "name = ", ""),
    ];
    for (from, to, key) in cases {
        let text = GOOD.replace(from, to);
        let v = api.expect("POST", "/v1/domains", Some(&text), 400);
        assert_eq!(v["code"], "invalid");
        assert!(message(&v).starts_with(key), "{from} -> {to}: expected key {key:?}, got {v}");
        assert!(!message(&v).contains('\n'), "one-line message: {v}");
    }
    // Not text, not TOML, too big.
    let raw = api.raw("POST", "/v1/domains", "application/toml", Some(&[0xff, 0xfe, 0x00]));
    assert_eq!(raw.status, 400);
    api.expect("POST", "/v1/domains", Some("{\"name\": \"json\"}"), 400);
    let huge = format!("name = \"big\"\n# {}\n", "x".repeat(2 << 20));
    api.expect("POST", "/v1/domains", Some(&huge), 413);
    // Nothing was stored by any of these.
    assert_eq!(api.expect("GET", "/v1/domains", None, 200), Value::Array(vec![]));
}

#[test]
fn unknown_objects_wrong_states_and_bad_requests() {
    let home = Home::new("errors");
    let d = Daemon::start(&home);
    let api = d.api();
    for (method, path) in [
        ("GET", "/v1/domains/nope"),
        ("DELETE", "/v1/domains/nope"),
        ("POST", "/v1/domains/nope/start"),
        ("POST", "/v1/domains/nope/destroy"),
        ("GET", "/v1/domains/nope/stats"),
        ("GET", "/v1/domains/nope/config"),
        ("GET", "/v1/pools/nope"),
        ("GET", "/v1/pools/nope/volumes"),
        ("GET", "/v1/nothing-here"),
    ] {
        let v = api.expect(method, path, None, 404);
        assert_eq!(v["code"], "not_found", "{method} {path}");
    }
    api.expect("POST", "/v1/domains", Some(&guest_toml("idle1", "idle")), 201);
    api.expect("POST", "/v1/domains/idle1/fly", None, 404);
    api.expect("GET", "/v1/domains/idle1/fly", None, 404);
    for action in ["destroy", "suspend", "resume", "reset", "reboot", "shutdown"] {
        let v = api.expect("POST", &format!("/v1/domains/idle1/{action}"), None, 409);
        assert!(message(&v).contains("not running"), "{action}: {v}");
    }
    api.expect("GET", "/v1/domains/idle1/stats", None, 409);
    api.expect("GET", "/v1/domains/idle1/console", None, 400);
    api.expect("POST", "/v1/domains/idle1/shutdown", Some(r#"{"timeout": "soon"}"#), 400);
    // A true/false field given anything else is refused naming the field (null means its default).
    let v = api.expect("POST", "/v1/domains/idle1/autostart", Some(r#"{"enabled": "yes"}"#), 400);
    assert_eq!(message(&v), "enabled: must be true or false", "{v}");
    let v = api.expect("POST", "/v1/domains/idle1/emulatorpin", Some(r#"{"cpus": "0", "config": 1}"#), 400);
    assert_eq!(message(&v), "config: must be true or false", "{v}");
    api.expect("POST", "/v1/domains/idle1/start", Some("not json"), 400);
    api.expect("POST", "/v1/domains/idle1/start", Some("[1]"), 400);
    api.expect("GET", "/v1/domains/bad%20name", None, 400);
    api.expect("GET", "/v1/events?since=x", None, 400);
    let v = api.expect("PATCH", "/v1/domains", None, 405);
    assert_eq!(v["code"], "method_not_allowed");
    // A definition whose kernel file is missing is accepted, but cannot start; the message says why.
    api.expect("POST", "/v1/domains", Some(GOOD), 201);
    let v = api.expect("POST", "/v1/domains/web1/start", None, 400);
    assert!(message(&v).starts_with("disk[0]") || message(&v).starts_with("boot.kernel"), "{v}");
    assert_eq!(api.expect("GET", "/v1/domains/web1", None, 200)["state"], "shutoff");
    // Malformed HTTP must not take the daemon down.
    for garbage in ["GARBAGE\r\n\r\n", "GET / HTTP/9.9\r\n\r\n", "POST /v1/domains HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"] {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let _ = s.write_all(garbage.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    api.expect("GET", "/v1/domains/idle1", None, 200);
}

#[test]
fn definitions_survive_sigkill_and_a_corrupt_one_is_reported() {
    let home = Home::new("restart");
    let mut d = Daemon::start(&home);
    let api = d.api();
    for i in 0..3 {
        api.expect("POST", "/v1/domains", Some(&guest_toml(&format!("keep{i}"), "idle")), 201);
    }
    api.expect("POST", "/v1/domains/keep0/autostart", Some(r#"{"enabled": false}"#), 200);
    d.kill9();

    // Damage one definition behind the daemon's back.
    let db = rusqlite::Connection::open(home.path().join("ferrod.db")).unwrap();
    db.execute("UPDATE domains SET definition = 'name = \"keep1\"\nvcpus = \"many\"' WHERE name = 'keep1'", []).unwrap();
    drop(db);

    let d = Daemon::start(&home);
    let api = d.api();
    let list = api.expect("GET", "/v1/domains", None, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    let by_name = |n: &str| list.iter().find(|d| d["name"] == n).unwrap().clone();
    assert!(by_name("keep0")["error"].is_null());
    assert!(by_name("keep2")["error"].is_null());
    let broken = by_name("keep1");
    assert!(broken["error"].as_str().unwrap().contains("vcpus"), "{broken}");
    let v = api.expect("POST", "/v1/domains/keep1/start", None, 409);
    assert!(message(&v).contains("invalid stored definition"), "{v}");
    // Defining it again repairs it.
    let fixed = api.expect("POST", "/v1/domains", Some(&guest_toml("keep1", "idle")), 200);
    assert!(fixed["error"].is_null());
    let out = d.ferro(&["list", "--all"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2 + 3);
}

#[test]
fn pools_and_volumes() {
    let home = Home::new("pools");
    let d = Daemon::start(&home);
    let api = d.api();
    let target = home.path().join("images");
    let def = serde_json::json!({ "name": "default", "type": "dir", "target": target.display().to_string() }).to_string();
    let pool = api.expect("POST", "/v1/pools", Some(&def), 201);
    assert_eq!(pool["active"], false);
    api.expect("POST", "/v1/pools", Some(&def), 409);
    api.expect("POST", "/v1/pools", Some(r#"{"name": "x", "type": "lvm", "target": "/tmp/x"}"#), 400);
    api.expect("POST", "/v1/pools", Some(r#"{"name": "x", "target": "relative"}"#), 400);
    api.expect("POST", "/v1/pools", Some(r#"{"name": "x", "target": "/tmp/x", "colour": 1}"#), 400);
    let v = api.expect("POST", "/v1/pools/default/start", None, 409);
    assert!(message(&v).contains("pool-build"), "{v}");
    api.expect("GET", "/v1/pools/default/volumes", None, 409);
    api.expect("POST", "/v1/pools/default/build", None, 200);
    let pool = api.expect("POST", "/v1/pools/default/start", None, 200);
    assert_eq!(pool["active"], true);
    assert!(pool["capacity"].as_u64().unwrap() > 0);

    let vols = "/v1/pools/default/volumes";
    let raw = api.expect("POST", vols, Some(r#"{"name": "a.raw", "capacity": "16M"}"#), 201);
    assert_eq!((raw["format"].as_str(), raw["capacity"].as_u64()), (Some("raw"), Some(16 << 20)));
    let q = api.expect("POST", vols, Some(r#"{"name": "base.qcow2", "capacity": 1073741824, "format": "qcow2"}"#), 201);
    assert_eq!((q["format"].as_str(), q["capacity"].as_u64()), (Some("qcow2"), Some(1 << 30)));
    let overlay = api.expect(
        "POST",
        vols,
        Some(r#"{"name": "overlay.qcow2", "capacity": "1G", "format": "qcow2", "backing_volume": "base.qcow2"}"#),
        201,
    );
    assert!(overlay["backing"].as_str().unwrap().ends_with("base.qcow2"), "{overlay}");
    for (body, key) in [
        (r#"{"name": "a.raw", "capacity": "1M"}"#, ""),
        (r#"{"name": "b", "capacity": "1M", "format": "vdi"}"#, "format"),
        (r#"{"name": "b", "capacity": "huge"}"#, "capacity"),
        (r#"{"name": "b", "capacity": 0}"#, "capacity"),
        (r#"{"name": "../escape", "capacity": "1M"}"#, "name"),
        (r#"{"name": "b", "capacity": "1M", "backing_volume": "a.raw"}"#, "backing_volume"),
        (r#"{"name": "b", "capacity": "1M", "format": "qcow2", "backing_volume": "missing"}"#, "backing_volume"),
    ] {
        let (status, v) = api.call("POST", vols, Some(body));
        if key.is_empty() {
            assert_eq!(status, 409, "{body}: {v}");
        } else {
            assert!(status == 400 || status == 404, "{body}: {status} {v}");
            assert!(message(&v).starts_with(key), "{body}: {v}");
        }
    }
    // Interop: qemu-img reads what we made.
    if let Ok(out) = std::process::Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(target.join("overlay.qcow2")).output() {
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 1u64 << 30);
        assert!(info["backing-filename"].as_str().unwrap().ends_with("base.qcow2"));
    }
    let list = api.expect("GET", vols, None, 200);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.raw", "base.qcow2", "overlay.qcow2"]);

    let clone = api.expect("POST", "/v1/pools/default/volumes/base.qcow2/clone?wait=true", Some(r#"{"name": "copy.qcow2"}"#), 200);
    assert_eq!((clone["format"].as_str(), clone["capacity"].as_u64()), (Some("qcow2"), Some(1 << 30)));
    let grown = api.expect("POST", "/v1/pools/default/volumes/a.raw/resize", Some(r#"{"capacity": "32M"}"#), 200);
    assert_eq!(grown["capacity"], 32u64 << 20);
    api.expect("POST", "/v1/pools/default/volumes/a.raw/resize", Some(r#"{"capacity": "1M"}"#), 400);
    let grown = api.expect("POST", "/v1/pools/default/volumes/copy.qcow2/resize", Some(r#"{"capacity": "2G"}"#), 200);
    assert_eq!(grown["capacity"], 2u64 << 30);

    // Upload, download, wipe.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let up = api.raw("PUT", "/v1/pools/default/volumes/a.raw/data", "application/octet-stream", Some(&data));
    assert_eq!(up.status, 200);
    let down = api.raw("GET", "/v1/pools/default/volumes/a.raw/data", "", None);
    assert_eq!(down.status, 200);
    assert!(down.body == data, "downloaded bytes differ");
    let wiped = api.expect("POST", "/v1/pools/default/volumes/a.raw/wipe", None, 200);
    assert_eq!(wiped["capacity"], data.len());
    let down = api.raw("GET", "/v1/pools/default/volumes/a.raw/data", "", None);
    assert!(down.body.len() == data.len() && down.body.iter().all(|&b| b == 0));

    api.expect("GET", "/v1/pools/default/volumes/missing", None, 404);
    api.expect("POST", "/v1/pools/default/volumes/missing/clone", Some(r#"{"name": "x"}"#), 404);
    api.expect("POST", "/v1/pools/default/volumes/a.raw/spin", None, 404);
    assert_eq!(api.call("DELETE", "/v1/pools/default/volumes/copy.qcow2", None).0, 204);
    assert!(!target.join("copy.qcow2").exists());

    api.expect("DELETE", "/v1/pools/default", None, 409);
    api.expect("POST", "/v1/pools/default/destroy", None, 200);
    api.expect("GET", "/v1/pools/default/volumes", None, 409);
    assert_eq!(api.call("DELETE", "/v1/pools/default", None).0, 204);
    assert!(target.join("a.raw").exists(), "undefining a pool keeps its files");
}

#[test]
fn cli_verbs_without_vms() {
    let home = Home::new("cli");
    let d = Daemon::start(&home);
    let file = home.path().join("web1.toml");
    std::fs::write(&file, GOOD).unwrap();
    assert!(d.ferro_ok(&["define", file.to_str().unwrap()]).contains("Domain 'web1' defined"));
    let list: Value = serde_json::from_str(&d.ferro_ok(&["list", "--all", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "web1");
    let running: Value = serde_json::from_str(&d.ferro_ok(&["list", "--json"])).unwrap();
    assert_eq!(running, Value::Array(vec![]), "plain list shows running domains only");
    let table = d.ferro_ok(&["list", "--all"]);
    assert!(table.contains("web1") && table.contains("shut off"), "{table}");
    let info: Value = serde_json::from_str(&d.ferro_ok(&["dominfo", "web1", "--json"])).unwrap();
    openapi::validate(&serde_json::json!({"$ref": "#/components/schemas/Domain"}), &info, "$").unwrap();
    assert!(d.ferro_ok(&["dominfo", "web1"]).contains("Memory:         512.00 MiB"));
    assert_eq!(d.ferro_ok(&["domstate", "web1"]).trim(), "shut off");
    // The NIC defined without a MAC got one, written into the text as defined.
    let mac = info["config"]["nic"][0]["mac"].as_str().expect("a MAC given at define time");
    assert_eq!(d.ferro_ok(&["dumpconfig", "web1"]), GOOD.replace("[[nic]]\n", &format!("[[nic]]\nmac = \"{mac}\"\n")));
    d.ferro_ok(&["autostart", "web1"]);
    assert!(d.ferro_ok(&["dominfo", "web1"]).contains("Autostart:      enable"));
    d.ferro_ok(&["autostart", "web1", "--disable"]);

    // Failures: non-zero exit, one line naming the problem.
    for (args, needle) in [
        (vec!["start", "nope"], "\"nope\" is not defined"),
        (vec!["destroy", "web1"], "not running"),
        (vec!["dominfo", "bad/name"], "not a valid name"),
        (vec!["vol-list", "nopool"], "pool \"nopool\" is not defined"),
    ] {
        let out = d.ferro(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, GOOD.replace("vcpus = 2", "vcpus = 0")).unwrap();
    let out = d.ferro(&["define", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus: must be between 1 and 255"));

    // Pools and volumes through the CLI.
    let target = home.path().join("pool");
    d.ferro_ok(&["pool-define-as", "p", "dir", "--target", target.to_str().unwrap()]);
    d.ferro_ok(&["pool-build", "p"]);
    d.ferro_ok(&["pool-start", "p"]);
    d.ferro_ok(&["vol-create-as", "p", "disk.qcow2", "64M", "--format", "qcow2"]);
    assert!(d.ferro_ok(&["vol-list", "p"]).contains("disk.qcow2"));
    assert_eq!(d.ferro_ok(&["vol-path", "disk.qcow2", "--pool", "p"]).trim(), target.join("disk.qcow2").to_str().unwrap());
    assert!(d.ferro_ok(&["pool-list"]).contains("active"));
    let out = d.ferro(&["pool-undefine", "p"]);
    assert_eq!(out.status.code(), Some(1));

    // No daemon: a clear message.
    let out = std::process::Command::new(ferro_test_support::ferro_bin()).args(["list", "--connect", "/nonexistent/sock"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is ferrod running"));

    assert!(d.ferro_ok(&["undefine", "web1"]).contains("undefined"));
}

#[test]
fn events_are_listed_and_streamed() {
    let home = Home::new("events");
    let d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("ev1", "idle")), 201);
    let events = api.expect("GET", "/v1/events", None, 200);
    assert_eq!(events[0]["kind"], "defined");
    let last = events[0]["seq"].as_u64().unwrap();

    // Follow from now on: a define and an undefine arrive as JSON lines.
    let mut stream = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /v1/events?follow=true&since={last} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        reader.read_line(&mut head).unwrap();
    }
    assert!(head.contains("application/x-ndjson"), "{head}");
    api.expect("POST", "/v1/domains", Some(&guest_toml("ev2", "idle")), 201);
    api.call("DELETE", "/v1/domains/ev2", None);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim();
        if line.starts_with('{') {
            openapi::check("GET", "/v1/events", 200, "application/x-ndjson", line.as_bytes());
            let e: Value = serde_json::from_str(line).unwrap();
            seen.push((e["name"].as_str().unwrap().to_string(), e["kind"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(seen, [("ev2".to_string(), "defined".to_string()), ("ev2".to_string(), "undefined".to_string())]);

    let out = d.ferro_ok(&["events", "--no-follow"]);
    assert!(out.contains("domain 'ev2': undefined"), "{out}");

    let metrics = api.raw("GET", "/metrics", "", None);
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("ferro_domain_state{domain=\"ev1\",state=\"shutoff\"} 1"), "{text}");
    assert!(text.contains("# TYPE ferro_domain_cpu_seconds_total counter"));
}

#[test]
fn a_hundred_domains_defined_listed_and_removed_concurrently() {
    let home = Home::new("many");
    let d = Daemon::start(&home);
    let api = d.api();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let api = api.clone();
            std::thread::spawn(move || {
                for i in (t..100).step_by(8) {
                    api.expect("POST", "/v1/domains", Some(&guest_toml(&format!("vm{i:03}"), "idle")), 201);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let start = Instant::now();
    let list = api.expect("GET", "/v1/domains", None, 200);
    let api_list = start.elapsed();
    assert_eq!(list.as_array().unwrap().len(), 100);
    let start = Instant::now();
    let table = d.ferro_ok(&["list", "--all"]);
    let cli_list = start.elapsed();
    assert_eq!(table.lines().count(), 102);
    eprintln!("list of 100 domains: API {api_list:?}, `ferro list --all` {cli_list:?}");

    let threads: Vec<_> = (0..8)
        .map(|t| {
            let api = api.clone();
            std::thread::spawn(move || {
                for i in (t..100).step_by(8) {
                    assert_eq!(api.call("DELETE", &format!("/v1/domains/vm{i:03}"), None).0, 204);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(api.expect("GET", "/v1/domains", None, 200), Value::Array(vec![]));
}

#[test]
fn a_second_daemon_on_the_same_home_is_refused() {
    let home = Home::new("twice");
    let _d = Daemon::start(&home);
    let out = std::process::Command::new(ferro_test_support::ferrod_bin()).env("FERRO_HOME", home.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another ferrod"));
}

/// A state store written by a newer ferrod (a schema version this one does not know) is refused
/// at start with a message, and left as it was (the migration of older stores is tested in
/// src/store).
#[test]
fn a_state_store_from_a_newer_ferrod_is_refused() {
    let home = Home::new("schema");
    let mut d = Daemon::start(&home);
    d.api().expect("POST", "/v1/domains", Some(&guest_toml("kept", "idle")), 201);
    d.kill9();
    let db = rusqlite::Connection::open(home.path().join("ferrod.db")).unwrap();
    let current: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert!(current >= 2, "the store records its schema version: {current}");
    db.pragma_update(None, "user_version", current + 1).unwrap();
    drop(db);
    let out = std::process::Command::new(ferro_test_support::ferrod_bin()).env("FERRO_HOME", home.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("schema version {}, written by a newer ferrod", current + 1)), "{stderr}");
    assert!(std::os::unix::net::UnixStream::connect(home.socket()).is_err(), "no API is served from a store it cannot read");

    let db = rusqlite::Connection::open(home.path().join("ferrod.db")).unwrap();
    db.pragma_update(None, "user_version", current).unwrap();
    drop(db);
    let d = Daemon::start(&home);
    assert_eq!(d.api().expect("GET", "/v1/domains/kept", None, 200)["state"], "shutoff");
}

#[test]
fn sigterm_stops_the_daemon_even_with_an_event_stream_open() {
    let home = Home::new("sigterm");
    let mut d = Daemon::start(&home);
    let mut stream = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(stream, "GET /v1/events?follow=true HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut first).unwrap();
    // SAFETY: kill(2) on the daemon's pid; no memory is involved.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ferrod ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}: {}", d.stderr());
    assert!(!d.socket.exists(), "socket removed on a clean stop");
}

#[test]
fn with_allow_path_definitions_name_only_files_under_it_or_in_pools() {
    let home = Home::new("allow-path");
    let allowed = home.path().join("images");
    let elsewhere = home.path().join("elsewhere");
    let pool_dir = home.path().join("pool");
    for dir in [&allowed, &elsewhere] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let d = Daemon::start_args(&home, &["--allow-path", allowed.to_str().unwrap()], &[]);
    let api = d.api();
    let with_disk = |name: &str, path: &std::path::Path| format!("{}[[disk]]\npath = \"{}\"\nformat = \"raw\"\n", guest_toml(name, "idle"), path.display());
    let inside = allowed.join("ok.raw");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    api.expect("POST", "/v1/domains", Some(&with_disk("inside", &inside)), 201);

    // Outside, through `..`, through a symlink planted in the allowed directory: refused by key.
    let outside = elsewhere.join("x.raw");
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let dotdot = allowed.join("../elsewhere/x.raw");
    std::os::unix::fs::symlink(&outside, allowed.join("link.raw")).unwrap();
    for (name, path) in [("out1", outside.clone()), ("out2", dotdot), ("out3", allowed.join("link.raw"))] {
        let v = api.expect("POST", "/v1/domains", Some(&with_disk(name, &path)), 400);
        let m = message(&v);
        assert!(m.starts_with("disk[0].path: ") && m.contains("is outside the directories domains may use"), "{m}");
        assert!(m.contains(allowed.to_str().unwrap()) && m.contains("--allow-path"), "{m}");
    }
    let kernel = format!("name = \"k\"\nmemory = \"64M\"\n[boot]\nkernel = \"{}\"\n", outside.display());
    assert!(message(&api.expect("POST", "/v1/domains", Some(&kernel), 400)).starts_with("boot.kernel: "));

    // A pool's directory is allowed: its volumes, and files named by path inside it.
    d.ferro_ok(&["pool-define-as", "p", "dir", "--target", pool_dir.to_str().unwrap()]);
    d.ferro_ok(&["pool-build", "p"]);
    d.ferro_ok(&["pool-start", "p"]);
    api.expect("POST", "/v1/pools/p/volumes", Some(r#"{"name": "v.raw", "capacity": "1M"}"#), 201);
    let on_pool = format!("{}[[disk]]\npool = \"p\"\nvolume = \"v.raw\"\nformat = \"raw\"\n", guest_toml("vol", "idle"));
    api.expect("POST", "/v1/domains", Some(&on_pool), 201);
    api.expect("POST", "/v1/domains", Some(&with_disk("bypath", &pool_dir.join("v.raw"))), 201);

    // Checked again at start: a file swapped for a symlink after the definition is refused.
    std::fs::remove_file(&inside).unwrap();
    std::os::unix::fs::symlink(&outside, &inside).unwrap();
    let v = api.expect("POST", "/v1/domains/inside/start", None, 400);
    assert!(message(&v).contains(&format!("resolving to {}", outside.display())), "{v}");
    assert_eq!(api.expect("GET", "/v1/domains/inside", None, 200)["state"], "shutoff");
    d.ferro_ok(&["start", "vol"]);

    // A qcow2 in an allowed place whose header names a backing file elsewhere (an upload can
    // carry any header): refused at the start, before anything opens the backing file.
    let overlay = allowed.join("overlay.qcow2");
    ferro_test_support::run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", outside.to_str().unwrap(), "-F", "raw", overlay.to_str().unwrap()]);
    let backed = format!("{}[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n", guest_toml("backed", "idle"), overlay.display());
    api.expect("POST", "/v1/domains", Some(&backed), 201);
    let m = message(&api.expect("POST", "/v1/domains/backed/start", None, 400)).to_string();
    assert!(m.starts_with(&format!("disk[0]: {}: backing file: {}", overlay.display(), outside.display())), "{m}");
    assert!(m.contains("is outside the directories domains may use"), "{m}");

    // A symbolic link planted in a pool is no volume: not listed, not read, written or deleted.
    let victim = elsewhere.join("victim.raw");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, pool_dir.join("planted.raw")).unwrap();
    let listed = api.expect("GET", "/v1/pools/p/volumes", None, 200);
    assert!(!listed.to_string().contains("planted"), "{listed}");
    for (method, path) in [("GET", "/v1/pools/p/volumes/planted.raw"), ("DELETE", "/v1/pools/p/volumes/planted.raw")] {
        let m = message(&api.expect(method, path, None, 409)).to_string();
        assert!(m.contains("is a symbolic link; pool volumes must be files in the pool's directory"), "{method} {path}: {m}");
    }
    let m = message(&api.expect("PUT", "/v1/pools/p/volumes/planted.raw/data", Some("overwritten"), 409)).to_string();
    assert!(m.contains("is a symbolic link"), "{m}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");

    // No pool on a system directory, on or in ferrod's own state, whatever the path says.
    std::os::unix::fs::symlink("/etc", home.path().join("etc-link")).unwrap();
    let path = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    let refusals = [
        ("/".to_string(), "is the root directory".to_string()),
        ("/etc".to_string(), "is in the system directory /etc".to_string()),
        ("/usr/lib/images".to_string(), "is in the system directory /usr".to_string()),
        ("/proc/self".to_string(), "is in the system directory /proc".to_string()),
        (path(home.path().join("etc-link/x")), "(resolving to /etc/x) is in the system directory /etc".to_string()),
        (path(home.path().to_path_buf()), format!("holds ferrod's state directory {}", home.path().canonicalize().unwrap().display())),
        (path(home.path().parent().unwrap().to_path_buf()), "holds ferrod's state directory".to_string()),
        (path(home.path().join("run/x")), "is in ferrod's state directory".to_string()),
    ];
    for (target, why) in refusals {
        let body = serde_json::json!({"name": "bad", "target": target}).to_string();
        let m = message(&api.expect("POST", "/v1/pools", Some(&body), 400)).to_string();
        assert!(m.starts_with(&format!("target: {target}")) && m.contains(&why), "{target}: {m}");
    }
    d.cleanup();
}
