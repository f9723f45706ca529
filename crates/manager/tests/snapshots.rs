//! Domain snapshots under a real ferrod with real VMMs on /dev/kvm: the `counter` test guest
//! (a 16 MiB memory pattern from a seed, and a count, both printed on its console) proves that a
//! revert goes back in time and loses nothing; a tree with branches, reverts across shut off and
//! running, deleting a middle snapshot, damaged snapshot files, raw disks, undefine, and the REST
//! endpoints (every answer checked against openapi.json).

use ferro_test_support::daemon::{Daemon, Home, guest_toml, read_console};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long the guest may take to answer on its console.
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

/// Sends one command byte to the counter guest and returns what it printed up to `expect`.
fn command(con: &mut UnixStream, byte: u8, expect: &str) -> String {
    con.write_all(&[byte]).unwrap();
    read_console(con, expect, CONSOLE_WAIT)
}

/// Sends one command byte and returns the seed the guest printed in its answer `<prefix><seed>`.
fn seed_after(con: &mut UnixStream, byte: u8, prefix: &str) -> String {
    let seen = command(con, byte, prefix);
    let mut rest = seen.split(prefix).nth(1).unwrap_or_default().to_string();
    if !rest.contains(char::is_whitespace) {
        rest.push_str(&read_console(con, "\n", CONSOLE_WAIT));
    }
    rest.split_whitespace().next().unwrap_or_else(|| panic!("no seed after {prefix:?}: {seen:?}")).to_string()
}

fn snapshots(d: &Daemon, domain: &str) -> Vec<Value> {
    let out = d.ferro_ok(&["snapshot-list", domain, "--json"]);
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

fn snapshot<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no snapshot {name} in {list:?}"))
}

fn domain_state(d: &Daemon, name: &str) -> String {
    d.api().expect("GET", &format!("/v1/domains/{name}"), None, 200)["state"].as_str().unwrap().to_string()
}

/// Fails with the CLI's one-line error.
fn ferro_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.ferro(args);
    assert!(!out.status.success(), "ferro {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_revert_goes_back_in_time_and_snapshots_form_a_tree() {
    let home = Home::new("snap-tree");
    let d = Daemon::start(&home);
    let file = home.path().join("c1.toml");
    std::fs::write(&file, guest_toml("c1", "counter")).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    d.ferro_ok(&["start", "c1"]);
    let mut con = d.console("c1");
    read_console(&mut con, "counter: up seed=", CONSOLE_WAIT);
    let seed1 = seed_after(&mut con, b'c', "counter: 1 seed=");
    for n in 2..=3 {
        command(&mut con, b'c', &format!("counter: {n} seed={seed1} errors=0"));
    }

    // s1 while running: the memory pattern of seed1 and the count 3.
    let out = d.ferro_ok(&["snapshot-create-as", "c1", "s1", "--description", "three counted"]);
    assert!(out.contains("Domain snapshot s1 created (guest paused ") && out.contains(" ms)"), "{out}");
    assert_eq!(domain_state(&d, "c1"), "running", "the guest runs again after the snapshot");
    let info: Value = serde_json::from_str(&d.ferro_ok(&["snapshot-info", "c1", "s1", "--json"])).unwrap();
    let pause_us = info["pause_us"].as_u64().expect("a running snapshot reports its pause");
    eprintln!("snapshot-create s1 of a 64 MiB counter guest: guest paused {pause_us} us, {} bytes of memory written", info["memory_bytes"]);
    assert!(info["memory_bytes"].as_u64().unwrap() >= 16 << 20, "the 16 MiB pattern is in the memory file: {info}");
    assert_eq!((info["parent"].clone(), info["state"].as_str(), info["current"].as_bool()), (Value::Null, Some("running"), Some(true)));
    assert_eq!(info["description"], "three counted");
    assert!(info["created"].as_str().unwrap().ends_with('Z') && info["created"].as_str().unwrap().contains('T'), "{info}");

    // The guest goes on: two more counts, a new pattern, one count under it; then s2 (child of s1).
    command(&mut con, b'c', &format!("counter: 4 seed={seed1} errors=0"));
    command(&mut con, b'c', &format!("counter: 5 seed={seed1} errors=0"));
    let seed2 = seed_after(&mut con, b'r', "counter: reseeded seed=");
    assert_ne!(seed1, seed2);
    command(&mut con, b'c', &format!("counter: 6 seed={seed2} errors=0"));
    d.ferro_ok(&["snapshot-create-as", "c1", "s2"]);
    drop(con);

    // Back to s1: the count of 3 and seed1's pattern, every byte of it (errors=0).
    let out = d.ferro_ok(&["snapshot-revert", "c1", "s1"]);
    assert!(out.contains("reverted to snapshot s1 (running)"), "{out}");
    let mut con = d.console("c1");
    command(&mut con, b'c', &format!("counter: 4 seed={seed1} errors=0"));
    assert_eq!(d.ferro_ok(&["snapshot-current", "c1"]).trim(), "s1");

    // Taken after the revert: a sibling of s2, and s4 below it (three levels: s1 > s3 > s4).
    d.ferro_ok(&["snapshot-create-as", "c1", "s3"]);
    command(&mut con, b'c', &format!("counter: 5 seed={seed1} errors=0"));
    d.ferro_ok(&["snapshot-create-as", "c1", "s4"]);
    drop(con);
    let list = snapshots(&d, "c1");
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2", "s3", "s4"]);
    assert_eq!(snapshot(&list, "s1")["children"], serde_json::json!(["s2", "s3"]));
    assert_eq!((snapshot(&list, "s2")["parent"].as_str(), snapshot(&list, "s3")["parent"].as_str()), (Some("s1"), Some("s1")));
    assert_eq!(snapshot(&list, "s4")["parent"], "s3");
    let current: Vec<&str> = list.iter().filter(|s| s["current"] == true).map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(current, ["s4"]);
    for s in &list {
        for key in ["name", "parent", "state", "created", "current", "description"] {
            assert!(s.get(key).is_some(), "{key} missing in {s}");
        }
    }
    let tree = d.ferro_ok(&["snapshot-list", "c1", "--tree"]);
    let s2_at = tree.find("+- s2").unwrap_or_else(|| panic!("{tree}"));
    let s4_at = tree.find("+- s4").unwrap_or_else(|| panic!("{tree}"));
    assert!(tree.starts_with("s1\n") && s2_at < tree.find("+- s3").unwrap() && tree.find("+- s3").unwrap() < s4_at, "{tree}");
    let table = d.ferro_ok(&["snapshot-list", "c1"]);
    assert!(table.contains("s4") && table.contains("running"), "{table}");

    // To s2, paused: nothing runs until resumed, then the count of 6 under seed2 goes on.
    d.ferro_ok(&["snapshot-revert", "c1", "s2", "--paused"]);
    assert_eq!(domain_state(&d, "c1"), "paused");
    d.ferro_ok(&["resume", "c1"]);
    let mut con = d.console("c1");
    command(&mut con, b'c', &format!("counter: 7 seed={seed2} errors=0"));
    drop(con);

    // Deleting the middle of s1 > s3 > s4: s4 moves up to s1, s3's files go.
    let uuid = d.api().expect("GET", "/v1/domains/c1", None, 200)["uuid"].as_str().unwrap().to_string();
    let s3_dir = home.path().join("snapshots").join(&uuid).join("s3");
    assert!(s3_dir.join("state").is_file() && s3_dir.join("memory").is_file());
    assert_eq!(d.ferro_ok(&["snapshot-delete", "c1", "s3"]).trim(), "Domain snapshot s3 deleted");
    assert!(!s3_dir.exists());
    let list = snapshots(&d, "c1");
    assert_eq!(snapshot(&list, "s4")["parent"], "s1");
    assert_eq!(snapshot(&list, "s1")["children"], serde_json::json!(["s2", "s4"]));
    assert!(ferro_err(&d, &["snapshot-info", "c1", "s3"]).contains("no snapshot \"s3\""));

    // Shut off: a snapshot of the disks only (the counter has none), child of the current s2.
    d.ferro_ok(&["destroy", "c1"]);
    let out = d.ferro_ok(&["snapshot-create-as", "c1", "off1"]);
    assert_eq!(out.trim(), "Domain snapshot off1 created");
    let off1: Value = serde_json::from_str(&d.ferro_ok(&["snapshot-info", "c1", "off1", "--json"])).unwrap();
    assert_eq!((off1["state"].as_str(), off1["parent"].as_str(), off1["pause_us"].clone()), (Some("shutoff"), Some("s2"), Value::Null));

    // Across shut off and running: from off to s4 (running, count 5 under seed1), to off1 (off).
    d.ferro_ok(&["snapshot-revert", "c1", "s4"]);
    assert_eq!(domain_state(&d, "c1"), "running");
    let mut con = d.console("c1");
    command(&mut con, b'c', &format!("counter: 6 seed={seed1} errors=0"));
    drop(con);
    let out = d.ferro_ok(&["snapshot-revert", "c1", "off1"]);
    assert!(out.contains("(shut off)"), "{out}");
    assert_eq!(domain_state(&d, "c1"), "shutoff");
    assert_eq!(d.ferro_ok(&["snapshot-current", "c1"]).trim(), "off1");
    // --running on a shut-off snapshot boots the domain afresh.
    d.ferro_ok(&["snapshot-revert", "c1", "off1", "--running"]);
    let mut con = d.console("c1");
    read_console(&mut con, "counter: up seed=", CONSOLE_WAIT);
    drop(con);
    d.ferro_ok(&["destroy", "c1"]);

    // A domain with snapshots is only undefined when told what to do with them.
    let err = ferro_err(&d, &["undefine", "c1"]);
    assert!(err.contains("has 4 snapshot(s)") && err.contains("--snapshots-metadata"), "{err}");
    d.ferro_ok(&["undefine", "c1", "--snapshots-metadata"]);
    assert!(!home.path().join("snapshots").join(&uuid).exists(), "the snapshot files go with the metadata");
    // Defined again under the same name, it starts with no snapshots.
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    assert!(snapshots(&d, "c1").is_empty());
    assert!(ferro_err(&d, &["snapshot-current", "c1"]).contains("no current snapshot"));
}

#[test]
fn snapshots_over_rest_with_damaged_files_raw_disks_and_bad_input() {
    let home = Home::new("snap-rest");
    let d = Daemon::start(&home);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("c2", "counter")), 201);
    api.expect("POST", "/v1/domains/c2/start", None, 200);
    let mut con = d.console("c2");
    read_console(&mut con, "counter: up seed=", CONSOLE_WAIT);
    command(&mut con, b'c', "counter: 1 seed=");
    drop(con);

    // Create as a job with steps of progress; the snapshot is listed and shown.
    let job = api.expect("POST", "/v1/domains/c2/snapshots", Some(r#"{"name":"a","description":"first"}"#), 202);
    assert_eq!((job["kind"].as_str(), job["target"].as_str()), (Some("snapshot-create"), Some("c2/a")));
    let done = api.wait_job(job["id"].as_u64().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!((done["done_steps"].as_u64(), done["total_steps"].as_u64()), (Some(2), Some(2)), "{done}");
    let list = api.expect("GET", "/v1/domains/c2/snapshots", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let a = api.expect("GET", "/v1/domains/c2/snapshots/a", None, 200);
    assert_eq!((a["name"].as_str(), a["domain"].as_str(), a["state"].as_str()), (Some("a"), Some("c2"), Some("running")));

    // Bad input: the message names what is wrong.
    for (body, status, words) in [
        (r#"{"name":"a"}"#, 409, "already has a snapshot"),
        (r#"{"name":"no/slash"}"#, 400, "snapshot name"),
        (r#"{}"#, 400, "name: missing"),
        (r#"{"name":"b","color":"red"}"#, 400, "color: unknown field"),
        (r#"{"name":"b","description":7}"#, 400, "description: must be a string"),
    ] {
        let v = api.expect("POST", "/v1/domains/c2/snapshots", Some(body), status);
        assert!(v["message"].as_str().unwrap().contains(words), "{body}: {v}");
    }
    api.expect("GET", "/v1/domains/c2/snapshots/nope", None, 404);
    api.expect("GET", "/v1/domains/nodom/snapshots", None, 404);
    let v = api.expect("POST", "/v1/domains/c2/snapshots/a/revert", Some(r#"{"state":"sideways"}"#), 400);
    assert!(v["message"].as_str().unwrap().starts_with("state:"), "{v}");
    api.expect("POST", "/v1/domains/c2/snapshots/nope/revert", None, 404);

    // Revert as a job: the guest is back at count 1. Its stats, asked all along while the revert
    // stops one VMM and starts the next, are always answered (a request meeting the gap waits
    // for the revert).
    let job = api.expect("POST", "/v1/domains/c2/snapshots/a/revert", Some("{}"), 202);
    assert_eq!(job["kind"], "snapshot-revert");
    let mut asked = 0;
    while api.expect("GET", &format!("/v1/jobs/{}", job["id"]), None, 200)["state"] == "running" {
        assert_eq!(api.expect("GET", "/v1/domains/c2/stats", None, 200)["name"], "c2");
        asked += 1;
    }
    assert!(asked > 0, "the revert ended before stats were asked");
    let done = api.wait_job(job["id"].as_u64().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    let mut con = d.console("c2");
    command(&mut con, b'c', "counter: 2 seed=");
    drop(con);

    // The VMM writes its snapshots' directory: a link it put in a snapshot's place (here to the
    // real snapshot, moved aside) is refused before the running guest is touched.
    let uuid = api.expect("GET", "/v1/domains/c2", None, 200)["uuid"].as_str().unwrap().to_string();
    let dir = home.path().join("snapshots").join(&uuid).join("a");
    let aside = dir.with_file_name("a.aside");
    std::fs::rename(&dir, &aside).unwrap();
    std::os::unix::fs::symlink(&aside, &dir).unwrap();
    let job = api.expect("POST", "/v1/domains/c2/snapshots/a/revert", None, 202);
    let done = api.wait_job(job["id"].as_u64().unwrap());
    assert_eq!(done["state"], "failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("is not a directory (a symbolic link?); refusing to restore from it"), "{done}");
    assert_eq!(domain_state(&d, "c2"), "running");
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();

    // A damaged state file is refused by name; a missing one too.
    let mut state = std::fs::read(dir.join("state")).unwrap();
    let last = state.len() - 2;
    state[last] ^= 0x20;
    std::fs::write(dir.join("state"), &state).unwrap();
    let job = api.expect("POST", "/v1/domains/c2/snapshots/a/revert", None, 202);
    let done = api.wait_job(job["id"].as_u64().unwrap());
    assert_eq!(done["state"], "failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("checksum mismatch"), "{done}");
    std::fs::remove_file(dir.join("state")).unwrap();
    let job = api.expect("POST", "/v1/domains/c2/snapshots/a/revert", None, 202);
    let done = api.wait_job(job["id"].as_u64().unwrap());
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("/state: No such file"), "{done}");
    // Refused before the running guest was touched: it counts on from 2.
    assert_eq!(domain_state(&d, "c2"), "running");
    let mut con = d.console("c2");
    command(&mut con, b'c', "counter: 3 seed=");
    drop(con);

    // Deleting it frees the name.
    api.expect("DELETE", "/v1/domains/c2/snapshots/a", None, 204);
    api.expect("DELETE", "/v1/domains/c2/snapshots/a", None, 404);
    assert_eq!(api.expect("GET", "/v1/domains/c2/snapshots", None, 200), serde_json::json!([]));

    // A writable raw disk cannot hold snapshots: refused by name, with the way out.
    let raw = home.path().join("data.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let text = format!("{}[[disk]]\npath = \"{}\"\nformat = \"raw\"\n", guest_toml("r1", "idle"), raw.display());
    api.expect("POST", "/v1/domains", Some(&text), 201);
    let v = api.expect("POST", "/v1/domains/r1/snapshots", Some(r#"{"name":"x"}"#), 409);
    let message = v["message"].as_str().unwrap();
    assert!(message.contains(&raw.display().to_string()) && message.contains("qcow2"), "{v}");

    // Undefine over REST: refused with snapshots, then removing them all.
    api.expect("POST", "/v1/domains/c2/destroy", None, 200);
    let job = api.expect("POST", "/v1/domains/c2/snapshots", Some(r#"{"name":"off"}"#), 202);
    assert_eq!(api.wait_job(job["id"].as_u64().unwrap())["state"], "completed");
    let v = api.expect("DELETE", "/v1/domains/c2", None, 409);
    assert!(v["message"].as_str().unwrap().contains("1 snapshot(s) (off)"), "{v}");
    api.expect("DELETE", "/v1/domains/c2?snapshots=everything", None, 400);
    api.expect("DELETE", "/v1/domains/c2?snapshots=all", None, 204);
    api.expect("GET", "/v1/domains/c2/snapshots", None, 404);
}

/// Runs qemu-io's `cmd` on a qcow2 image and returns its output.
fn qemu_io(image: &std::path::Path, cmd: &str) -> String {
    let out = std::process::Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(image).output().expect("qemu-io (apt install qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("failed"), "qemu-io {cmd}: {text}");
    text
}

/// The internal snapshots qemu-img lists in an image (-U: the image may be open in a VMM).
fn qemu_snapshots(image: &std::path::Path) -> String {
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-U", "-l"]).arg(image).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img snapshot -l: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_domains_qcow2_disk_is_snapshotted_reverted_and_freed_with_it() {
    let home = Home::new("snap-disk");
    let d = Daemon::start(&home);
    let api = d.api();
    let image = home.path().join("q1.qcow2");
    let made = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M").status().expect("qemu-img");
    assert!(made.success());
    qemu_io(&image, "write -P 0xaa 0 64k");
    let text = format!("{}[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n", guest_toml("q1", "counter"), image.display());
    api.expect("POST", "/v1/domains", Some(&text), 201);
    let path = image.display().to_string();

    // Running: the VMM takes the disk's internal snapshot while the guest is paused for its state.
    d.ferro_ok(&["start", "q1"]);
    let mut con = d.console("q1");
    read_console(&mut con, "counter: up seed=", CONSOLE_WAIT);
    command(&mut con, b'c', "counter: 1 seed=");
    drop(con);
    d.ferro_ok(&["snapshot-create-as", "q1", "run1"]);
    let run1 = api.expect("GET", "/v1/domains/q1/snapshots/run1", None, 200);
    assert_eq!(run1["disks"], serde_json::json!([path]));
    assert!(qemu_snapshots(&image).contains("run1"), "{}", qemu_snapshots(&image));
    d.ferro_ok(&["destroy", "q1"]);

    // Shut off: ferrod takes it; then the disk changes, and a revert brings the bytes back.
    qemu_io(&image, "write -P 0xbb 0 64k");
    assert_eq!(d.ferro_ok(&["snapshot-create-as", "q1", "off1"]).trim(), "Domain snapshot off1 created");
    assert_eq!(api.expect("GET", "/v1/domains/q1/snapshots/off1", None, 200)["disks"], serde_json::json!([path]));
    qemu_io(&image, "write -P 0xcc 0 64k");
    d.ferro_ok(&["snapshot-revert", "q1", "off1"]);
    assert_eq!(domain_state(&d, "q1"), "shutoff");
    qemu_io(&image, "read -P 0xbb 0 64k");
    // To run1: the disk as it was then, and the guest counting on from 1.
    d.ferro_ok(&["snapshot-revert", "q1", "run1"]);
    let mut con = d.console("q1");
    command(&mut con, b'c', "counter: 2 seed=");
    drop(con);
    // Deleting while the guest runs: its VMM, which holds the disk, deletes the disk snapshot.
    d.ferro_ok(&["snapshot-create-as", "q1", "run2"]);
    assert!(qemu_snapshots(&image).contains("run2"));
    d.ferro_ok(&["snapshot-delete", "q1", "run2"]);
    assert!(!qemu_snapshots(&image).contains("run2"), "{}", qemu_snapshots(&image));
    let mut con = d.console("q1");
    command(&mut con, b'c', "counter: 3 seed=");
    drop(con);
    d.ferro_ok(&["destroy", "q1"]);
    qemu_io(&image, "read -P 0xaa 0 64k");

    // Deleting frees the disk snapshot; qemu-img finds the image clean.
    d.ferro_ok(&["snapshot-delete", "q1", "run1"]);
    let listed = qemu_snapshots(&image);
    assert!(!listed.contains("run1") && listed.contains("off1"), "{listed}");
    let check = std::process::Command::new("qemu-img").args(["check", "-q"]).arg(&image).status().expect("qemu-img check");
    assert!(check.success(), "qemu-img check found errors");
    // Undefine with every snapshot removed takes off1 out of the disk too.
    d.ferro_ok(&["undefine", "q1", "--remove-all-snapshots"]);
    assert!(!qemu_snapshots(&image).contains("off1"));
}
