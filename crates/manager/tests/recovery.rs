//! ferrod coming back after it was killed: what it finds in its state directory must be
//! consistent, and what it recorded about processes must never lead it to signal a stranger.

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::{alive, start_time, wait_for};
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

fn state(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}"), None, 200)
}

/// An unrelated process leading its own process group (so a group kill aimed at its pid would
/// take it down), killed on drop.
struct Stranger(Child);

impl Stranger {
    fn spawn() -> Stranger {
        Stranger(Command::new("sleep").arg("600").process_group(0).spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn set_runtime(home: &Home, name: &str, runtime: &Value) {
    let db = rusqlite::Connection::open(home.path().join("ferrod.db")).unwrap();
    let n = db.execute("UPDATE domains SET runtime = ?1 WHERE name = ?2", [runtime.to_string(), name.to_string()]).unwrap();
    assert_eq!(n, 1, "domain {name} is in the store");
}

/// After a crash ferrod finds pids in its records that now belong to someone else: one whose
/// start time differs (the monitor died and its pid was reused), and one whose start time matches
/// too (a reuse within the same clock tick, or a record ferrod wrote before it could see the
/// process). Neither stranger is signalled, by a restart or by a later destroy, and both domains
/// are reported as no longer running.
#[test]
fn a_recorded_pid_that_is_not_the_domains_is_never_signalled() {
    let home = Home::new("stranger");
    let mut d = Daemon::start(&home);
    let api = d.api();
    for name in ["reused", "sametick"] {
        api.expect("POST", "/v1/domains", Some(&guest_toml(name, "idle")), 201);
    }
    d.kill9();

    let mut reused = Stranger::spawn();
    let mut same_tick = Stranger::spawn();
    let record = |pid: u32, start: u64| {
        serde_json::json!({
            "state": "running", "monitor_pid": pid, "monitor_start": start, "vmm_pid": pid,
            "run_token": "f00dfeed-0000-4000-8000-000000000001", "started_ms": 1, "reboot_pending": false
        })
    };
    set_runtime(&home, "reused", &record(reused.pid(), start_time(reused.pid()) + 1));
    set_runtime(&home, "sametick", &record(same_tick.pid(), start_time(same_tick.pid())));

    let d = Daemon::start(&home);
    let api = d.api();
    std::thread::sleep(Duration::from_millis(200));
    assert!(reused.alive(), "ferrod killed a process that reused a recorded pid");
    for name in ["reused", "sametick"] {
        // A destroy must not reach the stranger either: the domain is not running.
        let v = api.expect("POST", &format!("/v1/domains/{name}/destroy"), None, 409);
        assert!(v["message"].as_str().unwrap().contains("not running"), "{v}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(same_tick.alive(), "ferrod killed a process whose pid and start time matched a record");
    for name in ["reused", "sametick"] {
        let info = state(&d, name);
        assert_eq!(info["state"], "crashed", "{info}");
        assert!(info["pid"].is_null(), "{info}");
        let reason = info["crash"]["reason"].as_str().unwrap();
        assert!(reason.contains("monitor process is gone"), "{reason}");
    }

    // The domains are intact: they start, and their own processes are the ones a destroy kills.
    api.expect("POST", "/v1/domains/reused/start", None, 200);
    let pid = state(&d, "reused")["pid"].as_i64().unwrap();
    api.expect("POST", "/v1/domains/reused/destroy", None, 200);
    wait_for("the domain's VMM to exit", Duration::from_secs(5), || !alive(pid));
    assert!(reused.alive() && same_tick.alive());
}

/// ferrod killed while it runs a VM whose monitor is then killed too: the VMM lives on without a
/// monitor, and the restarted ferrod finds it by its run token and stops it, so no VM runs
/// unsupervised on a disk nobody claims.
#[test]
fn a_vmm_left_without_its_monitor_is_found_and_stopped() {
    let home = Home::new("orphan");
    let mut d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("orphan", "idle")), 201);
    api.expect("POST", "/v1/domains/orphan/start", None, 200);
    let vmm = state(&d, "orphan")["pid"].as_i64().unwrap();
    d.kill9();
    let monitor = home.processes().into_iter().find(|&p| i64::from(p) != vmm).expect("the monitor runs");
    // SAFETY: kill(2) on the monitor this test started through ferrod; no memory is involved.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    wait_for("the monitor to die", Duration::from_secs(5), || !alive(i64::from(monitor)));
    assert!(alive(vmm), "the VMM outlives its monitor");

    let d = Daemon::start(&home);
    let info = state(&d, "orphan");
    assert_eq!(info["state"], "crashed", "{info}");
    assert!(info["crash"]["reason"].as_str().unwrap().contains("leftover process"), "{info}");
    wait_for("the orphaned VMM to be killed", Duration::from_secs(5), || !alive(vmm));
    assert!(home.processes().is_empty(), "left: {:?}", home.processes());
}
