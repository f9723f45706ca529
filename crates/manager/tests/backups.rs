//! Backups and checkpoints of a shut-off domain under a real ferrod, with qemu-img and qemu-io as
//! the peers: a full backup equals the disk, an incremental one holds exactly the clusters
//! written since its checkpoint on top of the previous backup and restores the whole disk with
//! `qemu-img convert`, checkpoints chain and merge when deleted, existing files are never
//! replaced, and a refused backup changes nothing. The REST answers are checked against
//! openapi.json.

use ferro_test_support::qemu::{identical, img as qemu_img, img_ok as qemu_img_ok, io as qemu_io};
use ferro_test_support::daemon::{Daemon, Home, guest_toml, read_console};
use serde_json::{Value, json};
use std::path::Path;

/// The bitmaps qemu-img lists: name -> flags.
fn bitmaps(image: &Path) -> Vec<(String, Vec<String>)> {
    let info: Value = serde_json::from_str(&qemu_img_ok(&["info", "--force-share", "--output=json", image.to_str().unwrap()])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
            (b["name"].as_str().unwrap().to_string(), flags)
        })
        .collect()
}

/// The ranges of the top layer of `image` that hold data or zero clusters (what the file itself
/// stores, not its backing file).
fn top_layer(image: &Path) -> Vec<(u64, u64)> {
    let map: Value = serde_json::from_str(&qemu_img_ok(&["map", "--output=json", image.to_str().unwrap()])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn backing_of(image: &Path) -> Option<String> {
    let info: Value = serde_json::from_str(&qemu_img_ok(&["info", "--output=json", image.to_str().unwrap()])).unwrap();
    info["full-backing-filename"].as_str().map(str::to_string)
}

fn ferro_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.ferro(args);
    assert!(!out.status.success(), "ferro {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn backup(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["backup-begin"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&d.ferro_ok(&all)).unwrap()
}

fn checkpoints(d: &Daemon) -> Vec<(String, Option<String>)> {
    checkpoints_of(d, "b1")
}

fn checkpoints_of(d: &Daemon, domain: &str) -> Vec<(String, Option<String>)> {
    let list: Value = serde_json::from_str(&d.ferro_ok(&["checkpoint-list", domain, "--json"])).unwrap();
    list.as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap().to_string(), c["parent"].as_str().map(str::to_string))).collect()
}

/// A shut-off domain `b1` with a 64 MiB qcow2 disk holding data at 0 (4 MiB) and at 32 MiB (1 MiB).
fn setup(home: &Home, d: &Daemon) -> std::path::PathBuf {
    let disk = home.path().join("disk.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    qemu_io(&disk, "write -P 0x11 0 4M");
    qemu_io(&disk, "write -P 0x22 32M 1M");
    let toml = format!("{}[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n", guest_toml("b1", "idle"), disk.display());
    let file = home.path().join("b1.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    disk
}

#[test]
fn full_and_incremental_backups_of_a_shut_off_domain_restore_the_disk_at_each_point() {
    let home = Home::new("backup-offline");
    let d = Daemon::start(&home);
    let disk = setup(&home, &d);
    let (dir1, dir2, dir3, dir4) = (home.path().join("b/1"), home.path().join("b/2"), home.path().join("b/3"), home.path().join("b/4"));

    // Full: the whole disk, sparse, standalone; checkpoint c1 is an enabled bitmap in the disk.
    let started = backup(&d, &["b1", "--target", dir1.to_str().unwrap(), "--checkpoint", "c1"]);
    let full = dir1.join("vda.qcow2");
    assert_eq!(started, json!({ "checkpoint": "c1", "files": [full.display().to_string()] }));
    assert!(identical(&disk, &full), "the full backup reads as the disk");
    assert_eq!(backing_of(&full), None);
    assert_eq!(top_layer(&full).iter().map(|r| r.1).sum::<u64>(), 5 << 20, "only the 5 MiB of data are stored");
    assert_eq!(bitmaps(&disk), [("c1".to_string(), vec!["auto".to_string()])]);
    let copy_at_c1 = home.path().join("at-c1.qcow2");
    std::fs::copy(&disk, &copy_at_c1).unwrap();

    // Writes after c1: new data, and zeroes over old data (a backing file must not show through).
    qemu_io(&disk, "write -P 0x33 8M 64k");
    qemu_io(&disk, "write -z 0 64k");
    let out = d.ferro_ok(&["backup-begin", "b1", "--target", dir2.to_str().unwrap(), "--incremental", "c1", "--checkpoint", "c2"]);
    assert!(out.contains("Backup of b1 complete: checkpoint c2") && out.contains("vda.qcow2"), "{out}");
    let inc = dir2.join("vda.qcow2");
    assert_eq!(backing_of(&inc).as_deref(), Some(full.to_str().unwrap()), "the incremental one is backed by c1's backup");
    assert_eq!(top_layer(&inc), [(0, 64 << 10), (8 << 20, 64 << 10)], "exactly the two clusters written since c1");
    assert!(identical(&disk, &inc), "the chain reads as the disk");
    assert!(identical(&copy_at_c1, &full), "the full backup still reads as the disk at c1");
    let restored = home.path().join("restored.raw");
    qemu_img_ok(&["convert", "-O", "raw", inc.to_str().unwrap(), restored.to_str().unwrap()]);
    assert!(identical(&disk, &restored), "qemu-img convert of the newest file restores the disk");
    assert_eq!(bitmaps(&disk), [("c1".to_string(), vec![]), ("c2".to_string(), vec!["auto".to_string()])], "only the newest tracks");
    assert_eq!(checkpoints(&d), [("c1".to_string(), None), ("c2".to_string(), Some("c1".to_string()))]);

    // A file that exists is never replaced, and the refused backup leaves no checkpoint.
    let err = ferro_err(&d, &["backup-begin", "b1", "--target", dir1.to_str().unwrap()]);
    assert!(err.contains("exists") && err.contains("never replace"), "{err}");
    let err = ferro_err(&d, &["backup-begin", "b1", "--target", dir3.to_str().unwrap(), "--incremental", "nope"]);
    assert!(err.contains("incremental: domain b1 has no checkpoint \"nope\""), "{err}");
    assert_eq!(checkpoints(&d).len(), 2);
    assert!(!dir3.join("vda.qcow2").exists());

    // Since c1 again after more writes: everything written since c1 (two bitmaps merged), on c1's backup.
    qemu_io(&disk, "write -P 0x44 40M 128k");
    backup(&d, &["b1", "--target", dir3.to_str().unwrap(), "--incremental", "c1", "--checkpoint", "c3"]);
    let since_c1 = dir3.join("vda.qcow2");
    assert_eq!(top_layer(&since_c1), [(0, 64 << 10), (8 << 20, 64 << 10), (40 << 20, 128 << 10)]);
    assert!(identical(&disk, &since_c1));

    // Deleting c2 merges its bitmap into c1's: changes since c1 are still complete.
    d.ferro_ok(&["checkpoint-delete", "b1", "c2"]);
    assert_eq!(checkpoints(&d), [("c1".to_string(), None), ("c3".to_string(), Some("c1".to_string()))]);
    assert_eq!(bitmaps(&disk).iter().map(|b| b.0.as_str()).collect::<Vec<_>>(), ["c1", "c3"]);
    qemu_io(&disk, "write -P 0x55 60M 64k");
    let started = backup(&d, &["b1", "--target", dir4.to_str().unwrap(), "--incremental", "c1"]);
    let name = started["checkpoint"].as_str().unwrap();
    assert!(name.parse::<u64>().is_ok(), "a checkpoint named by the time: {name}");
    let latest = dir4.join("vda.qcow2");
    assert_eq!(top_layer(&latest), [(0, 64 << 10), (8 << 20, 64 << 10), (40 << 20, 128 << 10), (60 << 20, 64 << 10)]);
    assert!(identical(&disk, &latest));
    assert!(identical(&copy_at_c1, &full), "older backups are untouched");
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.status.success(), "the disk stays clean: {check:?}");

    // The REST view of the same, checked against openapi.json.
    let api = d.api();
    let list = api.expect("GET", "/v1/domains/b1/checkpoints", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 3);
    let c3 = api.expect("GET", "/v1/domains/b1/checkpoints/c3", None, 200);
    assert_eq!(c3["disks"], json!([{ "target": "vda", "path": disk.display().to_string(), "backup": since_c1.display().to_string() }]));
    api.expect("GET", "/v1/domains/b1/checkpoints/c2", None, 404);
    let body = json!({ "target": "relative/dir" }).to_string();
    let err = api.expect("POST", "/v1/domains/b1/backup", Some(&body), 400);
    assert!(err["message"].as_str().unwrap().starts_with("target: "), "{err}");
    api.expect("POST", "/v1/domains/b1/backup", Some(r#"{"target": "/tmp", "full": true}"#), 400);
    api.expect("DELETE", "/v1/domains/b1/checkpoints/c1", None, 204);
    assert_eq!(bitmaps(&disk).iter().map(|b| b.0.as_str()).collect::<Vec<_>>(), ["c3", name]);
    let job = d.ferro_ok(&["domjobinfo", "b1"]);
    assert!(job.contains("backup") && job.contains("completed"), "{job}");
    let dir5 = home.path().join("b/5");
    let body = json!({ "target": dir5, "incremental": "c3", "checkpoint": "c5" }).to_string();
    let started = api.expect("POST", "/v1/domains/b1/backup", Some(&body), 202);
    assert_eq!(started["files"], json!([dir5.join("vda.qcow2")]));
    let id = started["job"]["id"].as_u64().unwrap();
    let job = api.expect("GET", &format!("/v1/jobs/{id}?wait_ms=60000"), None, 200);
    assert_eq!(job["state"], "completed", "answered when the job ended: {job}");
    let err = api.expect("GET", &format!("/v1/jobs/{id}?wait_ms=60001"), None, 400);
    assert!(err["message"].as_str().unwrap().starts_with("wait_ms: "), "{err}");
    assert_eq!(top_layer(&dir5.join("vda.qcow2")), [(60 << 20, 64 << 10)], "since c3: the one cluster written after it");

    // Restores: back to c1 (the full backup), then forward to the newest chain.
    let now = home.path().join("now.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", disk.to_str().unwrap(), now.to_str().unwrap()]);
    let out = d.ferro_ok(&["backup-restore", "b1", "--from", full.to_str().unwrap()]);
    assert!(out.contains("b1/vda restored from"), "{out}");
    assert!(identical(&disk, &copy_at_c1), "the disk is back at c1");
    d.ferro_ok(&["backup-restore", "b1", "--from", dir5.join("vda.qcow2").to_str().unwrap(), "--disk", "vda"]);
    assert!(identical(&disk, &now), "the disk is back at the newest backup");
    let err = ferro_err(&d, &["backup-restore", "b1", "--from", full.to_str().unwrap(), "--disk", "vdq"]);
    assert!(err.contains("disk: domain b1 has no writable disk \"vdq\""), "{err}");
    let body = json!({ "from": full, "disk": "vda" }).to_string();
    let job = api.expect("POST", "/v1/domains/b1/restore", Some(&body), 202);
    assert_eq!(api.wait_job(job["id"].as_u64().unwrap())["state"], "completed");
    assert!(identical(&disk, &copy_at_c1));
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.status.success(), "the restored disk is clean: {check:?}");
}

#[test]
fn a_raw_disk_and_a_domain_without_disks_are_refused_by_name() {
    let home = Home::new("backup-refused");
    let d = Daemon::start(&home);
    let raw = home.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let toml = format!("{}[[disk]]\npath = \"{}\"\nformat = \"raw\"\n", guest_toml("r1", "idle"), raw.display());
    let file = home.path().join("r1.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    let target = home.path().join("out");
    let err = ferro_err(&d, &["backup-begin", "r1", "--target", target.to_str().unwrap()]);
    assert!(err.contains("disk vda") && err.contains("is raw, which cannot hold checkpoints"), "{err}");
    assert!(std::fs::read_dir(&target).map(|mut d| d.next().is_none()).unwrap_or(true), "nothing written");

    let file = home.path().join("idle.toml");
    std::fs::write(&file, guest_toml("i1", "idle")).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    d.ferro_ok(&["start", "i1"]);
    let err = ferro_err(&d, &["backup-begin", "i1", "--target", target.to_str().unwrap()]);
    assert!(err.contains("domain i1 has no writable disk to back up"), "{err}");
    let err = ferro_err(&d, &["domjobabort", "i1"]);
    assert!(err.contains("runs no job"), "{err}");
}

/// Internal snapshots qemu-img lists (names).
fn snapshots_of(image: &Path) -> Vec<String> {
    let info: Value = serde_json::from_str(&qemu_img_ok(&["info", "--force-share", "--output=json", image.to_str().unwrap()])).unwrap();
    info["snapshots"].as_array().into_iter().flatten().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

/// `qemu-img compare --force-share`: the images read the same (the guest is idle, its writes
/// flushed, so the running domain's disk holds still).
fn identical_shared(a: &Path, b: &Path) -> bool {
    let out = qemu_img(&["compare", "-U", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.code().is_some_and(|c| c <= 1), "qemu-img compare: {out:?}");
    out.status.success()
}

/// Defines (or redefines) `r1`: the `virtio` test guest writing its pattern at `sector` of the
/// qcow2 disk, then staying up.
fn define_writer(d: &Daemon, home: &Home, disk: &Path, seed: u32, sector: u64) {
    let toml = format!(
        "name = \"r1\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"virtio\"\ncmdline = \"virtio.hold=1 blk.seed={seed} blk.sector={sector}\"\n[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n",
        disk.display()
    );
    let file = home.path().join("r1.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
}

fn start_writer(d: &Daemon) {
    d.ferro_ok(&["start", "r1"]);
    let mut console = d.console("r1");
    read_console(&mut console, "virtio: all devices passed", std::time::Duration::from_secs(20));
}

#[test]
fn backups_of_a_running_domain_are_one_point_in_time_and_the_guest_runs_on() {
    let home = Home::new("backup-running");
    let d = Daemon::start(&home);
    let disk = home.path().join("disk.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    qemu_io(&disk, "write -P 0x11 0 4M");
    define_writer(&d, &home, &disk, 3, 16384);
    start_writer(&d);
    let (dir1, dir2) = (home.path().join("b/1"), home.path().join("b/2"));

    // Full, while the guest runs: its writes at 8 MiB are in, the guest runs on, no snapshot stays.
    let started = backup(&d, &["r1", "--target", dir1.to_str().unwrap(), "--checkpoint", "c1"]);
    assert_eq!(started["checkpoint"], "c1");
    let full = dir1.join("vda.qcow2");
    assert_eq!(d.api().expect("GET", "/v1/domains/r1", None, 200)["state"], "running");
    assert!(identical_shared(&disk, &full), "the full backup reads as the running domain's disk");
    let data = top_layer(&full);
    assert!(data.iter().any(|&(off, len)| off <= 8 << 20 && off + len > 8 << 20), "the guest's write at 8 MiB is in: {data:?}");
    assert!(snapshots_of(&disk).is_empty(), "the backup's temporary snapshot is gone: {:?}", snapshots_of(&disk));

    // The guest writes at 16 MiB in its next run; the bitmap tracked across the VMM's restart.
    d.ferro_ok(&["destroy", "r1"]);
    assert_eq!(bitmaps(&disk), [("c1".to_string(), vec!["auto".to_string()])], "stored when the VMM closed the disk");
    define_writer(&d, &home, &disk, 9, 32768);
    start_writer(&d);
    let out = d.ferro_ok(&["backup-begin", "r1", "--target", dir2.to_str().unwrap(), "--incremental", "c1", "--checkpoint", "c2"]);
    assert!(out.contains("checkpoint c2"), "{out}");
    let inc = dir2.join("vda.qcow2");
    assert_eq!(top_layer(&inc), [(16 << 20, 64 << 10)], "only the cluster the guest wrote since c1");
    assert!(identical_shared(&disk, &inc), "the chain reads as the running domain's disk");
    let restored = home.path().join("restored.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", inc.to_str().unwrap(), restored.to_str().unwrap()]);
    assert!(identical_shared(&disk, &restored));
    assert!(snapshots_of(&disk).is_empty(), "{:?}", snapshots_of(&disk));

    // Deleting c1 while the domain runs goes through its VMM; c2 keeps tracking.
    d.ferro_ok(&["checkpoint-delete", "r1", "c1"]);
    assert_eq!(checkpoints_of(&d, "r1"), [("c2".to_string(), None)]);
    d.ferro_ok(&["destroy", "r1"]);
    assert_eq!(bitmaps(&disk), [("c2".to_string(), vec!["auto".to_string()])]);
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.status.success(), "the disk is clean: {check:?}");
}

/// The names in a directory (none if it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// Starts a detached backup of `r1` into `dir` and returns its job id once the copy is under
/// way (some bytes copied, not all).
fn backup_under_way(d: &Daemon, dir: &Path) -> u64 {
    let started = backup(d, &["r1", "--target", dir.to_str().unwrap(), "--checkpoint", "c1", "--detach"]);
    let id = started["job"]["id"].as_u64().unwrap();
    loop {
        let job = d.api().expect("GET", &format!("/v1/jobs/{id}"), None, 200);
        assert_eq!(job["state"], "running", "the backup ended before it could be interrupted: {job}");
        let (done, total) = (job["done_bytes"].as_u64().unwrap(), job["total_bytes"].as_u64().unwrap());
        if done > 0 {
            assert!(done < total, "{job}");
            return id;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// After an interrupted backup: no checkpoint, no file, and the disk (once its domain is off)
/// clean, with neither the checkpoint's bitmap nor the backup's snapshot left in it.
fn nothing_left(d: &Daemon, disk: &Path, dir: &Path) {
    assert!(checkpoints_of(d, "r1").is_empty(), "{:?}", checkpoints_of(d, "r1"));
    assert!(names_in(dir).is_empty(), "files left: {:?}", names_in(dir));
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.status.success(), "the disk is clean: {check:?}");
    assert!(snapshots_of(disk).is_empty(), "{:?}", snapshots_of(disk));
    assert!(bitmaps(disk).iter().all(|(name, _)| name != "c1"), "{:?}", bitmaps(disk));
}

#[test]
fn a_backup_whose_vmm_or_ferrod_is_killed_mid_copy_leaves_nothing_half_made() {
    let home = Home::new("backup-killed");
    let mut d = Daemon::start(&home);
    let disk = home.path().join("disk.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "256M"]);
    qemu_io(&disk, "write -P 0x11 0 192M");
    define_writer(&d, &home, &disk, 3, 16384);
    start_writer(&d);

    // The VMM killed while ferrod copies: the backup fails and is undone in the disk's files.
    let dir = home.path().join("b/vmm");
    let id = backup_under_way(&d, &dir);
    let pid = d.api().expect("GET", "/v1/domains/r1", None, 200)["pid"].as_i64().unwrap();
    // SAFETY: kill(2) on the VMM this test's ferrod started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let job = d.api().wait_job(id);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("its VMM could not end the backup"), "{job}");
    assert_eq!(d.api().expect("GET", "/v1/domains/r1", None, 200)["state"], "crashed");
    nothing_left(&d, &disk, &dir);

    // ferrod killed while it copies (the VMM runs on): the restarted ferrod undoes the backup
    // through the VMM, and a backup runs again.
    start_writer(&d);
    let dir = home.path().join("b/ferrod");
    backup_under_way(&d, &dir);
    d.kill9();
    let d = Daemon::start(&home);
    assert_eq!(d.api().expect("GET", "/v1/domains/r1", None, 200)["state"], "running");
    assert!(checkpoints_of(&d, "r1").is_empty(), "{:?}", checkpoints_of(&d, "r1"));
    assert!(names_in(&dir).is_empty(), "files left: {:?}", names_in(&dir));
    assert!(snapshots_of(&disk).is_empty(), "the VMM deleted the backup's snapshot: {:?}", snapshots_of(&disk));
    let again = home.path().join("b/again");
    backup(&d, &["r1", "--target", again.to_str().unwrap(), "--checkpoint", "c1"]);
    assert!(identical_shared(&disk, &again.join("vda.qcow2")), "the backup after the kills reads as the disk");
    d.ferro_ok(&["destroy", "r1"]);
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.status.success(), "the disk is clean: {check:?}");
    assert!(snapshots_of(&disk).is_empty());
    assert_eq!(bitmaps(&disk), [("c1".to_string(), vec!["auto".to_string()])]);
}
