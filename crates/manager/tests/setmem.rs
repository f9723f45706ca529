//! `ferro setmem` on a real domain: the built-in `virtio` test guest with a `[balloon]` touches
//! 48 MiB, then follows the balloon targets ferrod sends through the VMM's control socket; the
//! VMM's RSS drops when the guest inflates, and the guest finds the pages it takes back zeroed
//! (it exits with a failure otherwise, which would leave the domain crashed).

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::wait_for;
use serde_json::Value;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn stats(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}/stats"), None, 200)
}

#[test]
fn setmem_moves_the_balloon_and_the_host_gets_the_memory_back() {
    let home = Home::new("setmem");
    let d = Daemon::start(&home);
    let api = d.api();
    let toml = "name = \"bal1\"\nmemory = \"128M\"\n[boot]\nguest = \"virtio\"\n\
                cmdline = \"balloon_touch_mib=48 balloon_wait_s=30\"\n[balloon]\n";
    api.expect("POST", "/v1/domains", Some(toml), 201);
    let v = api.expect("POST", "/v1/domains/bal1/setmem", Some(r#"{"memory": "64M"}"#), 409);
    assert!(v["message"].as_str().unwrap().contains("not running"), "{v}");
    d.ferro_ok(&["start", "bal1"]);

    // The guest has touched its 48 MiB when the VMM's RSS shows them and stops growing.
    let mut rss_touched = 0;
    wait_for("the guest to touch 48 MiB", Duration::from_secs(10), || {
        let last = std::mem::replace(&mut rss_touched, stats(&d, "bal1")["rss_bytes"].as_u64().unwrap());
        rss_touched > 50 * MIB && rss_touched == last
    });
    for (body, why) in [
        (r#"{"memory": "129M"}"#, "between 1M and the defined 128M"),
        (r#"{"memory": "lots"}"#, "not a size"),
        (r#"{}"#, "memory"),
    ] {
        let v = api.expect("POST", "/v1/domains/bal1/setmem", Some(body), 400);
        assert!(v["message"].as_str().unwrap().contains(why), "{body}: {v}");
    }

    let out = d.ferro_ok(&["setmem", "bal1", "80M"]);
    assert!(out.contains("memory set to 80M"), "{out}");
    let mut s = Value::Null;
    wait_for("the guest to inflate 48 MiB", Duration::from_secs(10), || {
        s = stats(&d, "bal1");
        s["balloon"]["actual_mib"] == 48
    });
    let rss_inflated = s["rss_bytes"].as_u64().unwrap();
    eprintln!("VMM RSS through ferrod: {} MiB touched, {} MiB after setmem 80M", rss_touched / MIB, rss_inflated / MIB);
    assert!(rss_touched >= rss_inflated + 40 * MIB, "RSS {rss_touched} -> {rss_inflated}");
    assert_eq!(s["balloon"]["target_mib"], 48, "{s}");
    let human = d.ferro_ok(&["domstats", "bal1"]);
    assert!(human.contains("target 48 MiB, actual 48 MiB"), "{human}");

    // Giving 32 MiB back: the guest deflates, checks the pages read as zeros, and powers off
    // cleanly (a failed check would crash the domain).
    api.expect("POST", "/v1/domains/bal1/setmem", Some(&format!(r#"{{"memory": {}}}"#, 112 * MIB)), 200);
    wait_for("the guest to finish", Duration::from_secs(10), || {
        api.expect("GET", "/v1/domains/bal1", None, 200)["state"] != "running"
    });
    let info = api.expect("GET", "/v1/domains/bal1", None, 200);
    assert_eq!(info["state"], "shutoff", "{info}");
    let events = api.expect("GET", "/v1/events", None, 200);
    let set: Vec<&str> =
        events.as_array().unwrap().iter().filter(|e| e["kind"] == "memory_set").filter_map(|e| e["detail"].as_str()).collect();
    assert_eq!(set, ["80M for the guest, balloon target 48M", "112M for the guest, balloon target 16M"]);
}

#[test]
fn setmem_needs_a_balloon() {
    let home = Home::new("setmem-none");
    let d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("idle1", "idle")), 201);
    d.ferro_ok(&["start", "idle1"]);
    let v = api.expect("POST", "/v1/domains/idle1/setmem", Some(r#"{"memory": "32M"}"#), 409);
    assert!(v["message"].as_str().unwrap().contains("add a [balloon] table"), "{v}");
    let out = d.ferro(&["setmem", "idle1", "32M"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no balloon"));
    assert_eq!(stats(&d, "idle1")["balloon"], Value::Null);
}
