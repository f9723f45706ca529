//! Jobs against the real daemon: volume clone and convert run as jobs with progress, cancel and a
//! final state kept across restarts (crates/manager/src/jobs.rs). qemu-io writes the source data
//! and qemu-img checks the copies, so both tools must be installed (scripts/setup.sh does it).

use ferro_test_support::daemon::{Api, Daemon, Home};
use ferro_test_support::wait_for;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Defines, builds and starts pool `p` in `$home/images`.
fn pool(api: &Api, home: &Home) -> PathBuf {
    let target = home.path().join("images");
    let def = json!({ "name": "p", "type": "dir", "target": target.display().to_string() }).to_string();
    api.expect("POST", "/v1/pools", Some(&def), 201);
    api.expect("POST", "/v1/pools/p/build", None, 200);
    api.expect("POST", "/v1/pools/p/start", None, 200);
    target
}

/// Creates a qcow2 volume through the API and fills ranges with qemu-io: (pattern, offset, length).
fn qcow2_with_data(api: &Api, dir: &Path, name: &str, capacity: &str, writes: &[(u8, &str, &str)]) -> PathBuf {
    let body = json!({ "name": name, "capacity": capacity, "format": "qcow2" }).to_string();
    api.expect("POST", "/v1/pools/p/volumes", Some(&body), 201);
    let path = dir.join(name);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for (pattern, offset, len) in writes {
        cmd.args(["-c", &format!("write -P {pattern:#x} {offset} {len}")]);
    }
    let out = cmd.arg(&path).output().expect("qemu-io is installed (scripts/setup.sh)");
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img is installed (scripts/setup.sh)")
}

/// Polls a running job until it has copied something, and returns it then.
fn wait_progress(api: &Api, id: u64) -> Value {
    let mut job = Value::Null;
    wait_for(&format!("job {id} to make progress"), Duration::from_secs(60), || {
        job = api.expect("GET", &format!("/v1/jobs/{id}"), None, 200);
        assert_eq!(job["state"], "running", "the job ended before it could be interrupted: {job}");
        job["done_bytes"].as_u64().unwrap() > 0
    });
    job
}

/// Names of the files in a pool directory, hidden scratch files included.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

fn job_events(api: &Api, id: u64) -> Vec<String> {
    let events = api.expect("GET", "/v1/events", None, 200);
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["object"] == "job" && e["name"].as_str() == Some(id.to_string().as_str()))
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

/// A 2 GiB qcow2 volume with 1 GiB of data: long enough to copy that a test can interrupt it.
fn big_source(api: &Api, dir: &Path) -> PathBuf {
    qcow2_with_data(api, dir, "big.qcow2", "2G", &[(0x5a, "0", "1G")])
}

#[test]
fn clone_and_convert_run_as_jobs_and_copy_every_byte() {
    let home = Home::new("jobs-copy");
    let d = Daemon::start(&home);
    let api = d.api();
    let dir = pool(&api, &home);
    assert_eq!(api.expect("GET", "/v1/jobs", None, 200), json!([]));
    let src = qcow2_with_data(&api, &dir, "src.qcow2", "256M", &[(0x11, "0", "4M"), (0x22, "100M", "3M"), (0x33, "250M", "1M")]);

    let job = api.expect("POST", "/v1/pools/p/volumes/src.qcow2/clone", Some(r#"{"name": "copy.qcow2"}"#), 202);
    assert_eq!((job["kind"].as_str(), job["state"].as_str()), (Some("clone"), Some("running")));
    assert_eq!((job["source"].as_str(), job["target"].as_str()), (Some("p/src.qcow2"), Some("p/copy.qcow2")));
    let id = job["id"].as_u64().unwrap();
    let job = api.wait_job(id);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["total_bytes"], 8u64 << 20, "the data qemu-io wrote, not the zero ranges: {job}");
    assert_eq!(job["done_bytes"], job["total_bytes"]);
    assert!(job["finished_ms"].as_u64().unwrap() >= job["started_ms"].as_u64().unwrap());
    assert_eq!(job["error"], Value::Null);
    let copy = dir.join("copy.qcow2");
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", src.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(cmp.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));
    assert!(qemu_img(&["check", copy.to_str().unwrap()]).status.success());
    let vol = api.expect("GET", "/v1/pools/p/volumes/copy.qcow2", None, 200);
    assert_eq!((vol["format"].as_str(), vol["capacity"].as_u64()), (Some("qcow2"), Some(256 << 20)));
    assert_eq!(job_events(&api, id), ["started", "completed"]);

    // wait=true keeps the synchronous answer for scripts: the new volume.
    let vol = api.expect(
        "POST",
        "/v1/pools/p/volumes/src.qcow2/convert?wait=true",
        Some(r#"{"name": "copy.raw", "format": "raw"}"#),
        200,
    );
    assert_eq!((vol["format"].as_str(), vol["capacity"].as_u64()), (Some("raw"), Some(256 << 20)));
    assert!(vol["allocation"].as_u64().unwrap() < 64 << 20, "zero ranges stay sparse: {vol}");
    let raw = dir.join("copy.raw");
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", src.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(cmp.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));

    // The CLI waits for its job and, off a terminal, prints only its usual line.
    let out = d.ferro(&["vol-convert", "copy.raw", "--pool", "p", "back.qcow2", "--format", "qcow2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Vol back.qcow2 converted from copy.raw to qcow2\n");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.ferro(&["vol-clone", "back.qcow2", "--pool", "p", "again.qcow2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Vol again.qcow2 cloned from back.qcow2\n");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = dir.join("again.qcow2");
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", src.to_str().unwrap(), again.to_str().unwrap()]);
    assert!(cmp.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));

    let list: Value = serde_json::from_str(&d.ferro_ok(&["job-list", "--json"])).unwrap();
    let kinds: Vec<&str> = list.as_array().unwrap().iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["clone", "convert", "convert", "clone"]);
    assert!(list.as_array().unwrap().iter().all(|j| j["state"] == "completed"), "{list}");
    let table = d.ferro_ok(&["job-list"]);
    assert!(table.contains("p/copy.raw") && table.contains("100%"), "{table}");
    let info: Value = serde_json::from_str(&d.ferro_ok(&["job-info", &id.to_string(), "--json"])).unwrap();
    assert_eq!((info["id"].as_u64(), info["state"].as_str()), (Some(id), Some("completed")));
    assert!(d.ferro_ok(&["job-info", &id.to_string()]).contains("p/copy.qcow2"));
    let out = d.ferro(&["job-cancel", &id.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already completed"), "{}", String::from_utf8_lossy(&out.stderr));

    // Bad requests name the field; no job is made for them.
    let convert = "/v1/pools/p/volumes/src.qcow2/convert";
    for (path, body, status, field) in [
        (convert, r#"{"name": "x.raw"}"#, 400, "format"),
        (convert, r#"{"name": "x.raw", "format": "vdi"}"#, 400, "format"),
        (convert, r#"{"name": "x.raw", "format": 7}"#, 400, "format"),
        (convert, r#"{"format": "raw"}"#, 400, "name"),
        (convert, r#"{"name": "../x", "format": "raw"}"#, 400, "name"),
        (convert, r#"{"name": "copy.raw", "format": "raw"}"#, 409, "name"),
        ("/v1/pools/p/volumes/src.qcow2/clone", r#"{"name": "y", "format": "raw"}"#, 400, "format"),
        ("/v1/pools/p/volumes/src.qcow2/clone", r#"{"name": "y", "colour": 1}"#, 400, "colour"),
        ("/v1/pools/p/volumes/src.qcow2/clone?wait=maybe", r#"{"name": "y"}"#, 400, "wait"),
        ("/v1/pools/p/volumes/missing/clone", r#"{"name": "y"}"#, 404, ""),
        ("/v1/pools/nopool/volumes/src.qcow2/clone", r#"{"name": "y"}"#, 404, ""),
    ] {
        let v = api.expect("POST", path, Some(body), status);
        assert!(message(&v).starts_with(field), "{path} {body}: {v}");
    }
    assert_eq!(api.expect("GET", "/v1/jobs", None, 200).as_array().unwrap().len(), 4);
}

#[test]
fn a_cancelled_job_stops_and_leaves_no_volume() {
    let home = Home::new("jobs-cancel");
    let d = Daemon::start(&home);
    let api = d.api();
    let dir = pool(&api, &home);
    big_source(&api, &dir);

    let job = api.expect("POST", "/v1/pools/p/volumes/big.qcow2/clone", Some(r#"{"name": "big-copy.qcow2"}"#), 202);
    let id = job["id"].as_u64().unwrap();
    wait_progress(&api, id);
    // While the job reads the source, nothing may change or delete it, nor take the target's name.
    let v = api.expect("DELETE", "/v1/pools/p/volumes/big.qcow2", None, 409);
    assert!(message(&v).contains(&format!("job {id}")), "{v}");
    api.expect("POST", "/v1/pools/p/volumes", Some(r#"{"name": "big-copy.qcow2", "capacity": "1M"}"#), 409);
    api.expect("POST", "/v1/pools/p/volumes/big.qcow2/clone", Some(r#"{"name": "big-copy.qcow2"}"#), 409);

    let job = api.expect("POST", &format!("/v1/jobs/{id}/cancel"), None, 200);
    assert_eq!(job["state"], "cancelled", "{job}");
    let (done, total) = (job["done_bytes"].as_u64().unwrap(), job["total_bytes"].as_u64().unwrap());
    assert!(done > 0 && done < total && total == 1 << 30, "stopped part way: {job}");
    assert!(job["finished_ms"].is_u64());
    assert_eq!(files(&dir), ["big.qcow2"], "no copy and no scratch file is left");
    api.expect("GET", "/v1/pools/p/volumes/big-copy.qcow2", None, 404);
    let v = api.expect("POST", &format!("/v1/jobs/{id}/cancel"), None, 409);
    assert!(message(&v).contains("already cancelled"), "{v}");
    assert_eq!(job_events(&api, id), ["started", "cancelled"]);
    assert_eq!(api.expect("GET", &format!("/v1/jobs/{id}"), None, 200)["state"], "cancelled");

    // The source is free again and the name can be used; the CLI cancels too.
    let job = api.expect("POST", "/v1/pools/p/volumes/big.qcow2/clone", Some(r#"{"name": "big-copy.qcow2"}"#), 202);
    let second = job["id"].as_u64().unwrap();
    assert_eq!(second, id + 1);
    wait_progress(&api, second);
    assert_eq!(d.ferro_ok(&["job-cancel", &second.to_string()]), format!("Job {second} cancelled\n"));
    assert_eq!(files(&dir), ["big.qcow2"]);
    api.expect("DELETE", "/v1/pools/p/volumes/big.qcow2", None, 204);
}

#[test]
fn unknown_job_ids_are_not_found() {
    let home = Home::new("jobs-404");
    let d = Daemon::start(&home);
    let api = d.api();
    for path in ["/v1/jobs/1", "/v1/jobs/abc", "/v1/jobs/-1", "/v1/jobs/18446744073709551616", "/v1/jobs/1%2F2"] {
        let v = api.expect("GET", path, None, 404);
        assert!(message(&v).contains("does not exist"), "{path}: {v}");
        api.expect("POST", &format!("{path}/cancel"), None, 404);
    }
    api.expect("POST", "/v1/jobs/1/pause", None, 404);
    api.expect("DELETE", "/v1/jobs/1", None, 405);
    let out = d.ferro(&["job-info", "42"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "error: job \"42\" does not exist (see `ferro job-list`)\n");
    assert!(!d.ferro(&["job-cancel", "42"]).status.success());
    assert!(d.ferro_ok(&["job-list"]).starts_with(" Id "));
}

#[test]
fn finished_jobs_survive_a_daemon_restart() {
    let home = Home::new("jobs-restart");
    let mut d = Daemon::start(&home);
    let api = d.api();
    let dir = pool(&api, &home);
    qcow2_with_data(&api, &dir, "src.qcow2", "64M", &[(0x42, "1M", "2M")]);
    api.expect("POST", "/v1/pools/p/volumes/src.qcow2/clone?wait=true", Some(r#"{"name": "a.qcow2"}"#), 200);
    let job = api.expect("POST", "/v1/pools/p/volumes/src.qcow2/convert", Some(r#"{"name": "b.raw", "format": "raw"}"#), 202);
    api.wait_job(job["id"].as_u64().unwrap());
    let before = api.expect("GET", "/v1/jobs", None, 200);
    assert_eq!(before.as_array().unwrap().len(), 2);

    d.kill9();
    let d = Daemon::start(&home);
    let api = d.api();
    assert_eq!(api.expect("GET", "/v1/jobs", None, 200), before);
    // Ids keep counting after the restart.
    let job = api.expect("POST", "/v1/pools/p/volumes/a.qcow2/clone", Some(r#"{"name": "c.qcow2"}"#), 202);
    assert_eq!(job["id"], 3);
    assert_eq!(api.wait_job(3)["state"], "completed");
}

#[test]
fn a_job_running_when_the_daemon_is_killed_is_failed_after_restart() {
    let home = Home::new("jobs-kill");
    let mut d = Daemon::start(&home);
    let api = d.api();
    let dir = pool(&api, &home);
    big_source(&api, &dir);
    let job = api.expect("POST", "/v1/pools/p/volumes/big.qcow2/convert", Some(r#"{"name": "big.raw", "format": "raw"}"#), 202);
    let id = job["id"].as_u64().unwrap();
    wait_progress(&api, id);
    assert!(files(&dir).contains(&".big.raw.part".to_string()), "the copy goes to a hidden scratch file: {:?}", files(&dir));

    d.kill9();
    let d = Daemon::start(&home);
    let api = d.api();
    let job = api.expect("GET", &format!("/v1/jobs/{id}"), None, 200);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("ferrod stopped while the job was running"), "{job}");
    assert!(job["finished_ms"].is_u64());
    assert_eq!(files(&dir), ["big.qcow2"], "the unfinished copy is removed on restart");
    assert_eq!(job_events(&api, id), ["failed"]);
    api.expect("POST", &format!("/v1/jobs/{id}/cancel"), None, 409);

    // SIGTERM stops a running job at its next chunk and records why, without waiting for it.
    let job = api.expect("POST", "/v1/pools/p/volumes/big.qcow2/clone", Some(r#"{"name": "big2.qcow2"}"#), 202);
    let id = job["id"].as_u64().unwrap();
    wait_progress(&api, id);
    let mut d = d;
    // SAFETY: kill(2) on the daemon's pid; no memory is involved.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    assert_eq!(files(&dir), ["big.qcow2"]);
    let d = Daemon::start(&home);
    let api = d.api();
    let job = api.expect("GET", &format!("/v1/jobs/{id}"), None, 200);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("ferrod was stopped"), "{job}");
    // The source is not held by the dead jobs.
    api.expect("DELETE", "/v1/pools/p/volumes/big.qcow2", None, 204);
}
