//! ferrod killed at every durable step of an operation (crashpoint: `FERRO_CRASH_AT=N` SIGKILLs
//! ferrod before its N-th state store commit, durable file write or rename, volume delete or VMM
//! monitor spawn after it became ready). For N = 1, 2, ... until the operation completes: a fresh home is set
//! up, ferrod restarted with the crash point, the operation sent, and after the kill a restarted
//! ferrod must show the state from before the operation or after it (never a mix, never an
//! orphaned VMM, a leaked disk claim or a half-written volume) and must let the user finish the
//! operation by running it again.

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::{alive, run_ok, wait_for};
use serde_json::Value;
use std::time::Duration;

/// Runs `op` with ferrod killed at its first, second, ... step until an attempt lets ferrod live;
/// after every kill `check` sees a restarted ferrod. Returns how many steps the operation has.
fn at_every_step(tag: &str, setup: impl Fn(&Daemon, &Home), op: impl Fn(&Daemon), check: impl Fn(&Daemon, &Home)) -> u64 {
    for n in 1..50u64 {
        let home = Home::new(tag);
        let mut d = Daemon::start(&home);
        setup(&d, &home);
        d.kill9();
        d = Daemon::start_with(&home, &[("FERRO_CRASH_AT", &n.to_string())]);
        op(&d);
        // The reply may come before a later step kills ferrod: give it a moment to reach it.
        std::thread::sleep(Duration::from_millis(300));
        let crashed = d.child.try_wait().expect("ferrod's status").is_some();
        let log = d.stderr();
        if crashed {
            assert!(log.contains(&format!("crash point {n}: killed before")), "ferrod died without reaching crash point {n}: {log}");
        }
        d.kill9();
        let d = Daemon::start(&home);
        check(&d, &home);
        d.cleanup();
        if !crashed {
            assert!(n > 1, "{tag}: the operation took no durable step at all");
            return n - 1;
        }
    }
    panic!("{tag}: still crashing after 49 steps");
}

fn domain(d: &Daemon, name: &str) -> Option<Value> {
    let (status, body) = d.api().call("GET", &format!("/v1/domains/{name}"), None);
    match status {
        200 => Some(body),
        404 => None,
        other => panic!("GET {name}: {other} {body}"),
    }
}


/// A domain is running with its VMM alive, or shut off with no VMM left behind.
fn running_or_cleanly_off(d: &Daemon, home: &Home, name: &str) -> bool {
    let info = domain(d, name).unwrap_or_else(|| panic!("{name} vanished"));
    match info["state"].as_str() {
        Some("running") => {
            let pid = info["pid"].as_i64().expect("a running domain has a pid");
            assert!(alive(pid), "{name} is running by its record but its VMM {pid} is gone");
            true
        }
        Some("shutoff") => {
            wait_for("no VMM of a shut-off domain", Duration::from_secs(10), || home.processes().is_empty());
            false
        }
        other => panic!("{name} is {other:?} after a restart: {info}"),
    }
}

/// `ferro define` of an idle test guest, its file in the daemon's home; the outcome is the caller's
/// to check (ferrod may be killed during it).
fn define(d: &Daemon, name: &str) -> String {
    let text = guest_toml(name, "idle");
    let file = d.home.join(format!("{name}.toml"));
    std::fs::write(&file, &text).unwrap();
    let _ = d.ferro(&["define", file.to_str().unwrap()]);
    text
}

#[test]
fn define_and_undefine_survive_a_kill_at_every_step() {
    let steps = at_every_step(
        "crash-define",
        |_, _| {},
        |d| {
            define(d, "vm1");
        },
        |d, _| {
            let text = guest_toml("vm1", "idle");
            if domain(d, "vm1").is_some() {
                assert_eq!(d.ferro_ok(&["dumpconfig", "vm1"]), text, "a half-stored definition");
            }
            define(d, "vm1");
            assert_eq!(d.ferro_ok(&["dumpconfig", "vm1"]), text);
        },
    );
    eprintln!("define: {steps} steps");
    let steps = at_every_step(
        "crash-undefine",
        |d, _| {
            define(d, "vm1");
        },
        |d| {
            let _ = d.ferro(&["undefine", "vm1"]);
        },
        |d, _| {
            if domain(d, "vm1").is_some() {
                assert_eq!(d.ferro_ok(&["dumpconfig", "vm1"]), guest_toml("vm1", "idle"), "a half-removed definition");
                d.ferro_ok(&["undefine", "vm1"]);
            }
            assert!(domain(d, "vm1").is_none());
        },
    );
    eprintln!("undefine: {steps} steps");
}

#[test]
fn start_and_destroy_survive_a_kill_at_every_step() {
    let steps = at_every_step(
        "crash-start",
        |d, _| {
            define(d, "vm1");
        },
        |d| {
            let _ = d.ferro(&["start", "vm1"]);
        },
        |d, home| {
            if !running_or_cleanly_off(d, home, "vm1") {
                d.ferro_ok(&["start", "vm1"]);
            }
            d.ferro_ok(&["destroy", "vm1"]);
            assert!(!running_or_cleanly_off(d, home, "vm1"));
            // No claim or tap was left behind by the killed start: the domain starts again.
            d.ferro_ok(&["start", "vm1"]);
            d.ferro_ok(&["destroy", "vm1"]);
        },
    );
    eprintln!("start: {steps} steps");
    let steps = at_every_step(
        "crash-destroy",
        |d, _| {
            define(d, "vm1");
            d.ferro_ok(&["start", "vm1"]);
        },
        |d| {
            let _ = d.ferro(&["destroy", "vm1"]);
        },
        |d, home| {
            if running_or_cleanly_off(d, home, "vm1") {
                d.ferro_ok(&["destroy", "vm1"]);
            }
            assert!(!running_or_cleanly_off(d, home, "vm1"));
            d.ferro_ok(&["start", "vm1"]);
            d.ferro_ok(&["destroy", "vm1"]);
        },
    );
    eprintln!("destroy: {steps} steps");
}

fn pool(d: &Daemon, home: &Home) {
    let def = serde_json::json!({ "name": "p", "type": "dir", "target": home.path().join("images").display().to_string() }).to_string();
    let api = d.api();
    api.expect("POST", "/v1/pools", Some(&def), 201);
    api.expect("POST", "/v1/pools/p/build", None, 200);
    api.expect("POST", "/v1/pools/p/start", None, 200);
}

/// The pool's volumes as ferrod lists them; each listed one passes `qemu-img check`.
fn checked_volumes(d: &Daemon) -> Vec<String> {
    let list: Value = serde_json::from_str(&d.ferro_ok(&["vol-list", "p", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let path = v["path"].as_str().expect("a volume has a path");
            run_ok("qemu-img", &["check", "-q", path]);
            v["name"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn volume_create_and_delete_survive_a_kill_at_every_step() {
    let steps = at_every_step(
        "crash-volcreate",
        pool,
        |d| {
            let _ = d.ferro(&["vol-create-as", "p", "v1.qcow2", "16M", "--format", "qcow2"]);
        },
        |d, home| {
            if !checked_volumes(d).contains(&"v1.qcow2".to_string()) {
                d.ferro_ok(&["vol-create-as", "p", "v1.qcow2", "16M", "--format", "qcow2"]);
            }
            assert_eq!(checked_volumes(d), ["v1.qcow2"]);
            let files: Vec<_> = std::fs::read_dir(home.path().join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
            assert_eq!(files, ["v1.qcow2"], "files beside the volume (a half-made one left behind?)");
        },
    );
    eprintln!("vol-create: {steps} steps");
    let steps = at_every_step(
        "crash-voldelete",
        |d, home| {
            pool(d, home);
            d.ferro_ok(&["vol-create-as", "p", "v1.qcow2", "16M", "--format", "qcow2"]);
        },
        |d| {
            let _ = d.ferro(&["vol-delete", "--pool", "p", "v1.qcow2"]);
        },
        |d, home| {
            if checked_volumes(d).contains(&"v1.qcow2".to_string()) {
                d.ferro_ok(&["vol-delete", "--pool", "p", "v1.qcow2"]);
            }
            assert!(checked_volumes(d).is_empty());
            let left: Vec<_> = std::fs::read_dir(home.path().join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "files left in the pool after the delete: {left:?}");
        },
    );
    eprintln!("vol-delete: {steps} steps");
}

/// A shut-off domain `b1` on a 16 MiB qcow2 disk holding 2 MiB of data (for backups).
fn backup_domain(d: &Daemon, home: &Home) {
    let disk = home.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 1M 2M", disk.to_str().unwrap()]);
    let toml = format!("{}[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n", guest_toml("b1", "idle"), disk.display());
    d.api().expect("POST", "/v1/domains", Some(&toml), 201);
}

/// ferrod's home, as it reports it.
fn home_of(d: &Daemon) -> std::path::PathBuf {
    d.api().expect("GET", "/v1/version", None, 200)["home"].as_str().unwrap().into()
}

/// The names in a directory (none if it does not exist).
fn names_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn a_backup_killed_at_every_step_leaves_a_clean_disk_and_no_partial_file_or_checkpoint() {
    let backup = |d: &Daemon| {
        let out = home_of(d).join("out");
        d.ferro(&["backup-begin", "b1", "--target", out.to_str().unwrap(), "--checkpoint", "c1"])
    };
    let steps = at_every_step(
        "crash-backup",
        backup_domain,
        |d| drop(backup(d)),
        |d, home| {
            let (disk, out) = (home.path().join("disk.qcow2"), home.path().join("out"));
            let disk_arg = disk.to_str().unwrap();
            run_ok("qemu-img", &["check", "-q", disk_arg]);
            let listed: Value = serde_json::from_str(&d.ferro_ok(&["checkpoint-list", "b1", "--json"])).unwrap();
            let info: Value = serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", disk_arg])).unwrap();
            let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().map(Vec::len).unwrap_or(0);
            if listed.as_array().unwrap().is_empty() {
                assert_eq!(bitmaps, 0, "no checkpoint listed, yet the disk has a bitmap: {info}");
                assert!(names_in(&out).is_empty(), "no checkpoint listed, yet files were left: {:?}", names_in(&out));
                let again = backup(d);
                assert!(again.status.success(), "the backup runs again: {}", String::from_utf8_lossy(&again.stderr));
            } else {
                assert_eq!(bitmaps, 1, "{info}");
            }
            assert_eq!(names_in(&out), ["vda.qcow2"], "one whole backup file, nothing half made");
            run_ok("qemu-img", &["compare", disk_arg, out.join("vda.qcow2").to_str().unwrap()]);
        },
    );
    eprintln!("backup-begin: {steps} steps");
}

#[test]
fn a_running_domains_backup_killed_at_every_step_is_undone_through_its_vmm() {
    let backup = |d: &Daemon| {
        let out = home_of(d).join("out");
        d.ferro(&["backup-begin", "b1", "--target", out.to_str().unwrap(), "--checkpoint", "c1"])
    };
    let steps = at_every_step(
        "crash-backup-running",
        |d, home| {
            backup_domain(d, home);
            d.ferro_ok(&["start", "b1"]);
        },
        |d| drop(backup(d)),
        |d, home| {
            let (disk, out) = (home.path().join("disk.qcow2"), home.path().join("out"));
            let disk_arg = disk.to_str().unwrap();
            assert!(running_or_cleanly_off(d, home, "b1"), "the VMM runs on through ferrod's kill");
            let listed: Value = serde_json::from_str(&d.ferro_ok(&["checkpoint-list", "b1", "--json"])).unwrap();
            if listed.as_array().unwrap().is_empty() {
                assert!(names_in(&out).is_empty(), "no checkpoint listed, yet files were left: {:?}", names_in(&out));
                let again = backup(d);
                assert!(again.status.success(), "the backup runs again: {}", String::from_utf8_lossy(&again.stderr));
            }
            assert_eq!(names_in(&out), ["vda.qcow2"], "one whole backup file, nothing half made");
            run_ok("qemu-img", &["compare", "-U", disk_arg, out.join("vda.qcow2").to_str().unwrap()]);
            d.ferro_ok(&["destroy", "b1"]);
            run_ok("qemu-img", &["check", "-q", disk_arg]);
            let info: Value = serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", disk_arg])).unwrap();
            assert_eq!(info["snapshots"], Value::Null, "the backup's snapshot is gone: {info}");
            let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().map(Vec::len).unwrap_or(0);
            assert_eq!(bitmaps, 1, "{info}");
        },
    );
    eprintln!("backup-begin of a running domain: {steps} steps");
}
