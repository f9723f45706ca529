//! `ferro-bench backup`: `ferro backup-begin` of a shut-off domain's 1 GiB qcow2 disk holding
//! 512 MiB of data, full and then incremental after 64 MiB were rewritten, against `qemu-img
//! convert -O qcow2` of the same disk in the same run (what a backup without checkpoints
//! costs). Each is timed from the command's start to its end, so ferrod's job, the bitmap switch
//! and the file naming count. A running guest's backup reads the same way, from a snapshot
//! (`backup-running` times one, and what it costs the guest).

use crate::common::{Scratch, ferro_bin, median};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run_ok(program: &Path, args: &[&str], env: &[(&str, &Path)]) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(status.success(), "{} {args:?} failed", program.display());
}

/// ferrod on its own home, until dropped.
struct Ferrod(Child);

impl Drop for Ferrod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let home = scratch.0.join("home");
    std::fs::create_dir_all(&home).expect("ferrod home");
    let disk = scratch.0.join("disk.qcow2");
    let (qemu_img, qemu_io, ferro) = (Path::new("qemu-img"), Path::new("qemu-io"), ferro_bin());
    let disk_s = disk.to_str().expect("utf-8");
    run_ok(qemu_img, &["create", "-q", "-f", "qcow2", disk_s, "1G"], &[]);
    run_ok(qemu_io, &["-f", "qcow2", "-c", "write -P 0x5a 0 512M", disk_s], &[]);
    let ferrod = ferro_test_support::ferrod_bin();
    // No default network: it would make a bridge, NAT rules and forwarding on this host.
    let child = Command::new(&ferrod)
        .arg("--no-default-network")
        .env("FERRO_HOME", &home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferrod");
    let _ferrod = Ferrod(child);
    let socket = home.join("ferrod.sock");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "ferrod did not make {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    let toml = format!("name = \"b1\"\nmemory = \"64M\"\n[boot]\nguest = \"idle\"\n[[disk]]\npath = \"{disk_s}\"\nformat = \"qcow2\"\n");
    let def = scratch.0.join("b1.toml");
    std::fs::write(&def, toml).expect("write the definition");
    let env = [("FERRO_HOME", home.as_path())];
    run_ok(&ferro, &["define", def.to_str().expect("utf-8")], &env);
    println!("== backups of a 1 GiB qcow2 disk with 512 MiB of data (shut off), {runs} runs, medians");
    let (mut full, mut incremental, mut convert) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let target = scratch.0.join(format!("full-{i}"));
        let t = Instant::now();
        run_ok(&ferro, &["backup-begin", "b1", "--target", target.to_str().expect("utf-8"), "--checkpoint", &format!("f{i}")], &env);
        full.push(t.elapsed().as_secs_f64());
        let copy = scratch.0.join("convert.qcow2");
        let t = Instant::now();
        run_ok(qemu_img, &["convert", "-O", "qcow2", disk_s, copy.to_str().expect("utf-8")], &[]);
        convert.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&copy).expect("remove the copy");
        run_ok(qemu_io, &["-f", "qcow2", "-c", &format!("write -P {} 256M 64M", 0x10 + i), disk_s], &[]);
        let target = scratch.0.join(format!("inc-{i}"));
        let t = Instant::now();
        let args = ["backup-begin", "b1", "--target", target.to_str().expect("utf-8"), "--incremental", &format!("f{i}"), "--checkpoint", &format!("i{i}")];
        run_ok(&ferro, &args, &env);
        incremental.push(t.elapsed().as_secs_f64());
        let check = Command::new(qemu_img).args(["compare", disk_s, target.join("vda.qcow2").to_str().expect("utf-8")]).output().expect("qemu-img compare");
        assert!(check.status.success(), "the incremental chain differs from the disk");
        for dir in [scratch.0.join(format!("full-{i}")), target] {
            let _ = std::fs::remove_dir_all(dir);
        }
        run_ok(&ferro, &["checkpoint-delete", "b1", &format!("f{i}")], &env);
        run_ok(&ferro, &["checkpoint-delete", "b1", &format!("i{i}")], &env);
    }
    let (full, incremental, convert) = (median(full), median(incremental), median(convert));
    let mib = |secs: f64, bytes: f64| bytes / secs / f64::from(1 << 20);
    println!("  full backup        ferro {:8.1} ms ({:6.0} MiB/s of data)", full * 1e3, mib(full, 512.0 * f64::from(1 << 20)));
    println!("  qemu-img convert   peer  {:8.1} ms ({:6.0} MiB/s of data)", convert * 1e3, mib(convert, 512.0 * f64::from(1 << 20)));
    println!("  ratio full / qemu-img convert: {:.2}", full / convert);
    println!("  incremental (64 MiB changed) ferro {:8.1} ms; ratio incremental / qemu-img convert of the disk: {:.3}", incremental * 1e3, incremental / convert);
}
