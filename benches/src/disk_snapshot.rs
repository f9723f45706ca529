//! `ferro-bench disk-snapshot`: qcow2 internal snapshots on a 1 GiB image whose every cluster
//! is written, `ferro img snapshot` against `qemu-img snapshot` on copies of the same image:
//! create (every refcount of the tree goes up, flags cleared), revert after 64 MiB were
//! rewritten (the old tree's copies freed), delete (the snapshot's references dropped). Each is
//! one process run, timed from spawn to exit, so both sides pay the same open and close.

use crate::common::{Scratch, ferro_bin, median};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

fn run_ok(program: &Path, args: &[&str]) {
    let status = Command::new(program).args(args).stdout(Stdio::null()).status();
    let status = status.unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(status.success(), "{} {args:?} failed", program.display());
}

/// Seconds `program ARGS` takes.
fn timed(program: &Path, args: &[&str]) -> f64 {
    let start = Instant::now();
    run_ok(program, args);
    start.elapsed().as_secs_f64()
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let base = scratch.0.join("base.qcow2");
    let (qemu_img, qemu_io) = (Path::new("qemu-img"), Path::new("qemu-io"));
    let base_s = base.to_str().expect("utf-8");
    run_ok(qemu_img, &["create", "-q", "-f", "qcow2", base_s, "1G"]);
    run_ok(qemu_io, &["-f", "qcow2", "-c", "write -P 0x5a 0 1G", base_s]);
    let ferro = ferro_bin();
    println!("== qcow2 internal snapshots, 1 GiB image fully written (64 KiB clusters), {runs} runs, medians");
    // [tool][create, revert, delete]
    let mut samples = [[Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]];
    for _ in 0..runs {
        for (tool, (program, prefix)) in [(ferro.as_path(), &["img"][..]), (qemu_img, &[][..])].into_iter().enumerate() {
            let img = scratch.0.join("img.qcow2");
            std::fs::copy(&base, &img).expect("copy the image");
            // The copy must be on disk first, or the first sync of either tool writes all of it.
            std::fs::File::open(&img).and_then(|f| f.sync_all()).expect("sync the copy");
            let img_s = img.to_str().expect("utf-8");
            let args = |verb: &[&str]| -> Vec<String> {
                prefix.iter().chain(["snapshot"].iter()).chain(verb).chain([img_s].iter()).map(|s| s.to_string()).collect()
            };
            let t = |a: Vec<String>| timed(program, &a.iter().map(String::as_str).collect::<Vec<_>>());
            samples[tool][0].push(t(args(&["-c", "s1"])));
            run_ok(qemu_io, &["-f", "qcow2", "-c", "write -P 0xa5 256M 64M", img_s]);
            samples[tool][1].push(t(args(&["-a", "s1"])));
            samples[tool][2].push(t(args(&["-d", "s1"])));
            let check = Command::new(qemu_img).args(["check", img_s]).output().expect("qemu-img check");
            assert!(check.status.success(), "qemu-img check after the runs: {}", String::from_utf8_lossy(&check.stdout));
            std::fs::remove_file(&img).expect("remove the copy");
        }
    }
    for (i, name) in ["create", "revert (64 MiB rewritten)", "delete"].iter().enumerate() {
        let ours = median(samples[0][i].clone()) * 1e3;
        let peer = median(samples[1][i].clone()) * 1e3;
        println!("  {name:<28} ferro {ours:8.1} ms   qemu-img {peer:8.1} ms   ratio ferro/qemu-img {:.2}", ours / peer);
    }
}
