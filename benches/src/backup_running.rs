//! `ferro-bench backup-running`: backups of a running domain whose guest keeps writing its disk,
//! and what the backup costs that guest, beside QEMU's `blockdev-backup` of the same disk under
//! the same guest and `qemu-img convert -U` of our disk in the same run.
//!
//! - The disk: 1 GiB qcow2 (64 KiB clusters) holding 512 MiB of data, made with qemu-io.
//! - The guest: `virtio_bench` writing 4 KiB at random offsets in the first 64 MiB of the disk,
//!   16 requests in flight, forever, in rounds of 1024 requests (`bench.rounds=0`); it prints a
//!   line after every round. The host stamps each line as it arrives, so the guest's
//!   throughput over any stretch of time is the bytes of the rounds in it (a round cut by the
//!   stretch's ends counts in proportion), whatever the stretch's length.
//! - Ours: a domain under ferrod (1 vCPU, 64 MiB, virtio-pci disk); the full backup is
//!   `ferro backup-begin DOM --target DIR --checkpoint C`, the incremental one 2 s later
//!   `--incremental C`, each timed from the command's start to its end (the guest's pause at
//!   the point in time comes from ferrod's log). Then `qemu-img convert -U -O qcow2` of the
//!   same disk while the guest writes (what a copy without a point in time costs).
//! - QEMU: `-M q35` with the same guest file and the same disk contents on `virtio-blk-pci`;
//!   the full backup is a transaction of `block-dirty-bitmap-add` and `blockdev-backup
//!   sync=full` into a new qcow2 file, the incremental one `blockdev-backup sync=incremental`
//!   into a qcow2 overlay of the full one, each timed from creating the target file until
//!   `BLOCK_JOB_COMPLETED`.
//! - Each side's guest throughput is measured over 3 s without a backup, during each backup
//!   (and during the convert), in every run; numbers are medians over the runs.

use crate::common::{QEMU_CPU, Scratch, median, qemu_bin};
use crate::snapshot::{LineSocket, connect};
use ferro_test_support::daemon::{Daemon, Home};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DATA_MIB: u64 = 512;
const SPAN_MIB: u64 = 64;
const REQUEST: u64 = 4096;
const ROUND: u64 = 1024;
const QUIET: Duration = Duration::from_secs(3);
const DIRTY: Duration = Duration::from_secs(2);
const MIB: f64 = (1u64 << 20) as f64;

fn cmdline() -> String {
    format!("bench.op=write bench.size={REQUEST} bench.count={ROUND} bench.random=1 bench.span={} bench.rounds=0", SPAN_MIB << 20)
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 1 GiB qcow2 disk whose first 512 MiB hold data.
fn make_disk(path: &Path) {
    let p = path.to_str().expect("utf-8 path");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "1G"]);
    run_ok("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {DATA_MIB}M"), p]);
}

/// The bytes of data a qcow2 file holds itself (not its backing file's), as `qemu-img map` says.
fn own_data(path: &Path) -> u64 {
    let out = run_ok("qemu-img", &["map", "--output=json", path.to_str().expect("utf-8 path")]);
    let map: Value = serde_json::from_str(&out).expect("qemu-img map --output=json");
    map.as_array()
        .expect("a list of ranges")
        .iter()
        .filter(|r| r["data"] == true && r["depth"] == 0)
        .map(|r| r["length"].as_u64().expect("length"))
        .sum()
}

/// A backup file must pass `qemu-img check`.
fn check(path: &Path) {
    run_ok("qemu-img", &["check", "-q", path.to_str().expect("utf-8 path")]);
}

/// The guest's round lines as they arrive, on a thread of their own.
struct Meter {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    /// What else the guest printed (kept for error messages), and the errors it reported.
    other: Arc<Mutex<(String, u64)>>,
}

impl Meter {
    fn spawn(console: impl Read + Send + 'static) -> Meter {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let other = Arc::new(Mutex::new((String::new(), 0)));
        let (a, o) = (arrivals.clone(), other.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(console).split(b'\n') {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let line = String::from_utf8_lossy(&line).into_owned();
                if let Some(rest) = line.split("bench: round ").nth(1) {
                    let errors = rest.split(" errors ").nth(1).and_then(|e| e.trim().parse::<u64>().ok());
                    let mut o = o.lock().expect("meter lock");
                    match errors {
                        Some(e) => o.1 += e,
                        None => o.0.push_str(&format!("{line}\n")),
                    }
                    a.lock().expect("meter lock").push(now);
                } else {
                    let mut o = o.lock().expect("meter lock");
                    if o.0.len() < 4096 {
                        o.0.push_str(&format!("{line}\n"));
                    }
                }
            }
        });
        Meter { arrivals, other }
    }

    fn seen(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("meter lock").clone()
    }

    /// Waits until a round line arrived after `t` (60 s at most).
    fn wait_past(&self, t: Instant) {
        let start = Instant::now();
        while self.seen().last().is_none_or(|&last| last <= t) {
            let other = self.other.lock().expect("meter lock").0.clone();
            assert!(start.elapsed() < Duration::from_secs(60), "the guest stopped reporting rounds; it printed:\n{other}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The guest's write throughput between `a` and `b`, MiB/s: each round is spread evenly
    /// over the time between its line and the one before.
    fn rate(&self, a: Instant, b: Instant) -> f64 {
        self.wait_past(b);
        let errors = self.other.lock().expect("meter lock").1;
        assert_eq!(errors, 0, "the guest's writes failed");
        let seen = self.seen();
        let round = (ROUND * REQUEST) as f64;
        let bytes: f64 = seen
            .windows(2)
            .map(|w| {
                let (s, e) = (w[0].max(a), w[1].min(b));
                if e > s { round * (e - s).as_secs_f64() / (w[1] - w[0]).as_secs_f64() } else { 0.0 }
            })
            .sum();
        bytes / (b - a).as_secs_f64() / MIB
    }

    /// The median time between round lines, ms (the meter's resolution).
    fn round_ms(&self) -> f64 {
        median(self.seen().windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect())
    }
}

/// One side's samples, one per run.
#[derive(Default)]
struct Side {
    /// The guest's MiB/s without a backup.
    quiet: Vec<f64>,
    /// Full backup: seconds, bytes of data, the guest's MiB/s meanwhile.
    full: Vec<(f64, u64, f64)>,
    incremental: Vec<(f64, u64, f64)>,
    /// The guest's pause at the backups' point in time, ms (ours only).
    pauses: Vec<f64>,
    /// qemu-img convert -U of the disk: seconds, the guest's MiB/s meanwhile (ours only).
    convert: Vec<(f64, f64)>,
    round_ms: f64,
}

fn med(v: &[(f64, u64, f64)], f: impl Fn(&(f64, u64, f64)) -> f64) -> f64 {
    median(v.iter().map(f).collect())
}

/// Waits until `n` rounds were seen (the guest is up and writing).
fn warm_up(meter: &Meter, n: usize) {
    let start = Instant::now();
    while meter.seen().len() < n {
        let other = meter.other.lock().expect("meter lock").0.clone();
        assert!(start.elapsed() < Duration::from_secs(60), "the guest did not start writing; it printed:\n{other}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Times `f` and measures the guest meanwhile; returns (seconds, start, end).
fn timed(f: impl FnOnce()) -> (f64, Instant, Instant) {
    let a = Instant::now();
    f();
    let b = Instant::now();
    ((b - a).as_secs_f64(), a, b)
}

/// The pauses ferrod logged for backups (`pause_us=N`), in order, ms.
fn logged_pauses(d: &Daemon) -> Vec<f64> {
    d.stderr()
        .lines()
        .filter(|l| l.contains("backup point in time taken"))
        .filter_map(|l| l.split("pause_us=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect()
}

fn ferro(runs: usize, dir: &Path) -> Side {
    let home = Home::new("bench-backup-running");
    let d = Daemon::start_with(&home, &[("RUST_LOG", "info")]);
    let disk = home.path().join("disk.qcow2");
    make_disk(&disk);
    let toml = format!(
        "name = \"bw\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"virtio_bench\"\ncmdline = \"{}\"\n[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n",
        cmdline(),
        disk.display()
    );
    let def = home.path().join("bw.toml");
    std::fs::write(&def, toml).expect("write the definition");
    d.ferro_ok(&["define", def.to_str().expect("utf-8 path")]);
    d.ferro_ok(&["start", "bw"]);
    let meter = Meter::spawn(d.console("bw"));
    warm_up(&meter, 5);
    let mut side = Side::default();
    for i in 0..runs {
        side.quiet.push(quiet_rate(&meter));

        let (full_dir, inc_dir) = (dir.join(format!("full-{i}")), dir.join(format!("inc-{i}")));
        let (secs, a, b) = timed(|| {
            d.ferro_ok(&["backup-begin", "bw", "--target", full_dir.to_str().expect("utf-8"), "--checkpoint", &format!("f{i}")]);
        });
        let full = full_dir.join("vda.qcow2");
        side.full.push((secs, own_data(&full), meter.rate(a, b)));
        std::thread::sleep(DIRTY);
        let (secs, a, b) = timed(|| {
            let args = ["backup-begin", "bw", "--target", inc_dir.to_str().expect("utf-8"), "--incremental", &format!("f{i}"), "--checkpoint", &format!("i{i}")];
            d.ferro_ok(&args);
        });
        let inc = inc_dir.join("vda.qcow2");
        side.incremental.push((secs, own_data(&inc), meter.rate(a, b)));
        check(&full);
        check(&inc);

        let copy = dir.join("convert.qcow2");
        let (secs, a, b) = timed(|| {
            run_ok("qemu-img", &["convert", "-U", "-O", "qcow2", disk.to_str().expect("utf-8"), copy.to_str().expect("utf-8")]);
        });
        side.convert.push((secs, meter.rate(a, b)));
        let _ = std::fs::remove_file(&copy);
        for done in [full_dir, inc_dir] {
            let _ = std::fs::remove_dir_all(done);
        }
        d.ferro_ok(&["checkpoint-delete", "bw", &format!("f{i}")]);
        d.ferro_ok(&["checkpoint-delete", "bw", &format!("i{i}")]);
    }
    side.pauses = logged_pauses(&d);
    side.round_ms = meter.round_ms();
    d.ferro_ok(&["destroy", "bw"]);
    side
}

/// Sends a QMP command that starts block job `job`; returns once the job completed (without
/// an error) and the command's reply was read, whichever came first.
fn qmp_job(qmp: &mut LineSocket, cmd: &Value, job: &str) {
    qmp.send(cmd);
    let (mut replied, mut done) = (false, false);
    while !(replied && done) {
        let v = qmp.line();
        if v.get("return").is_some() {
            replied = true;
        } else if let Some(e) = v.get("error") {
            panic!("QMP {cmd}: {e}");
        } else if v["event"] == "BLOCK_JOB_COMPLETED" && v["data"]["device"] == job {
            assert!(v["data"].get("error").is_none(), "QEMU's backup job {job} failed: {v}");
            assert_eq!(v["data"]["offset"], v["data"]["len"], "QEMU's backup job {job} ended short: {v}");
            done = true;
        }
    }
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(qemu: &Path, runs: usize, dir: &Path) -> Side {
    let guest = dir.join("virtio_bench.elf");
    std::fs::write(&guest, ferro_guests::get("virtio_bench").expect("the virtio_bench guest")).expect("write the guest");
    let disk = dir.join("qemu-disk.qcow2");
    make_disk(&disk);
    let qmp_path = dir.join("qmp.sock");
    let mut child = Command::new(qemu)
        .args(["-accel", "kvm", "-M", "q35", "-cpu", QEMU_CPU, "-m", "64", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-blockdev")
        .arg(format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={}", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=disk0,disable-legacy=on"])
        .args(["-append", &cmdline(), "-kernel"])
        .arg(&guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    let stdout = child.stdout.take().expect("qemu's stdout");
    let mut vm = Qemu(child);
    let meter = Meter::spawn(stdout);
    let mut qmp = LineSocket(BufReader::new(connect(&qmp_path, &mut vm.0)));
    qmp.line(); // greeting
    qmp.qmp(&json!({"execute": "qmp_capabilities"}));
    warm_up(&meter, 5);
    let mut side = Side::default();
    for i in 0..runs {
        side.quiet.push(quiet_rate(&meter));

        let (full, inc) = (dir.join(format!("qemu-full-{i}.qcow2")), dir.join(format!("qemu-inc-{i}.qcow2")));
        let (secs, a, b) = timed(|| {
            run_ok("qemu-img", &["create", "-q", "-f", "qcow2", full.to_str().expect("utf-8"), "1G"]);
            let node = format!("t{i}");
            qmp.qmp(&json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": full}}}));
            let actions = json!([
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": format!("b{i}")}},
                {"type": "blockdev-backup", "data": {"device": "disk0", "target": node, "sync": "full", "job-id": format!("full{i}")}},
            ]);
            qmp_job(&mut qmp, &json!({"execute": "transaction", "arguments": {"actions": actions}}), &format!("full{i}"));
        });
        qmp.qmp(&json!({"execute": "blockdev-del", "arguments": {"node-name": format!("t{i}")}}));
        side.full.push((secs, own_data(&full), meter.rate(a, b)));
        std::thread::sleep(DIRTY);
        let (secs, a, b) = timed(|| {
            let backing = full.to_str().expect("utf-8");
            run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", inc.to_str().expect("utf-8"), "1G"]);
            let node = format!("u{i}");
            qmp.qmp(&json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": inc}}}));
            let backup = json!({"device": "disk0", "target": node, "sync": "incremental", "bitmap": format!("b{i}"), "job-id": format!("inc{i}")});
            qmp_job(&mut qmp, &json!({"execute": "blockdev-backup", "arguments": backup}), &format!("inc{i}"));
        });
        qmp.qmp(&json!({"execute": "blockdev-del", "arguments": {"node-name": format!("u{i}")}}));
        qmp.qmp(&json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": format!("b{i}")}}));
        side.incremental.push((secs, own_data(&inc), meter.rate(a, b)));
        check(&full);
        check(&inc);
        for f in [full, inc] {
            let _ = std::fs::remove_file(f);
        }
    }
    side.round_ms = meter.round_ms();
    drop(vm);
    side
}

/// The guest's write rate over a quiet spell (no backup running), the 100 % its rate during a
/// backup is measured against.
fn quiet_rate(meter: &Meter) -> f64 {
    let start = Instant::now();
    std::thread::sleep(QUIET);
    meter.rate(start, Instant::now())
}

fn print_backup(label: &str, who: &str, v: &[(f64, u64, f64)], quiet: f64) {
    let (secs, data, guest) = (med(v, |s| s.0), med(v, |s| s.1 as f64), med(v, |s| s.2));
    println!(
        "  {label:<12} {who:<24} {:8.1} ms  {:6.1} MiB of data  {:6.0} MiB/s   guest {:6.1} MiB/s ({:3.0}% of its rate without a backup)",
        secs * 1e3,
        data / MIB,
        data / MIB / secs,
        guest,
        guest / quiet * 100.0
    );
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    println!(
        "== backups of a running domain: 1 GiB qcow2 disk holding {DATA_MIB} MiB; the guest (virtio_bench, 1 vCPU) writes 4 KiB at random in the first {SPAN_MIB} MiB, 16 in flight; {runs} runs, medians"
    );
    let ours = ferro(runs, &scratch.0);
    let peer = qemu_bin().map(|q| qemu(&q, runs, &scratch.0));
    let quiet = median(ours.quiet.clone());
    println!("  guest writes without a backup: ferrod domain {quiet:6.1} MiB/s (one line per {:.0} ms)", ours.round_ms);
    if let Some(p) = &peer {
        println!("                                 qemu q35       {:6.1} MiB/s (one line per {:.0} ms)", median(p.quiet.clone()), p.round_ms);
    }
    print_backup("full", "ferro backup-begin", &ours.full, quiet);
    if let Some(p) = &peer {
        print_backup("full", "qemu blockdev-backup", &p.full, median(p.quiet.clone()));
    }
    let (convert, convert_guest) = (median(ours.convert.iter().map(|c| c.0).collect()), median(ours.convert.iter().map(|c| c.1).collect()));
    let data = DATA_MIB as f64;
    println!(
        "  {:<12} {:<24} {:8.1} ms  {data:6.1} MiB of data  {:6.0} MiB/s   guest {convert_guest:6.1} MiB/s ({:3.0}% of its rate without a backup)",
        "copy",
        "qemu-img convert -U",
        convert * 1e3,
        data / convert,
        convert_guest / quiet * 100.0
    );
    print_backup("incremental", "ferro backup-begin", &ours.incremental, quiet);
    if let Some(p) = &peer {
        print_backup("incremental", "qemu blockdev-backup", &p.incremental, median(p.quiet.clone()));
    }
    if !ours.pauses.is_empty() {
        println!(
            "  the guest's pause at each backup's point in time (ferrod's log): median {:.3} ms, longest {:.3} ms over {} backups",
            median(ours.pauses.clone()),
            ours.pauses.iter().copied().fold(0.0, f64::max),
            ours.pauses.len()
        );
    }
    let full = med(&ours.full, |s| s.0);
    println!("  ratio full backup / qemu-img convert -U: {:.2}", full / convert);
    match &peer {
        Some(p) => {
            let (pf, pi) = (med(&p.full, |s| s.0), med(&p.incremental, |s| s.0));
            println!(
                "  ratio ferro / qemu blockdev-backup: full {:.2}, incremental {:.2}; the guest keeps {:.0}% of its write rate during ours, {:.0}% during qemu's full backup",
                full / pf,
                med(&ours.incremental, |s| s.0) / pi,
                med(&ours.full, |s| s.2) / quiet * 100.0,
                med(&p.full, |s| s.2) / median(p.quiet.clone()) * 100.0
            );
        }
        None => println!("  (no QEMU peer: see scripts/qemu-peer.sh)"),
    }
}
