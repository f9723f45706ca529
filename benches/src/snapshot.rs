//! `ferro-bench snapshot`: how long a snapshot pauses the guest, and how soon a VM restored from
//! one answers again, for `ferro vmm` and QEMU `-M microvm` running the same `counter` test
//! guest (which has written a 16 MiB pattern; the rest of RAM is untouched), at 256 MiB and 2 GiB.
//!
//! - Pause: ours is the control socket's `snapshot` request with `resume`, which writes memory
//!   while the guest runs and pauses it only for the pages dirtied meanwhile and the state; the
//!   pause is the VMM's own `pause_us`, and the whole request is timed by the client too. QEMU's
//!   savevm-style snapshot is `stop`, then `migrate` to a file (`exec:cat > FILE`, polled with
//!   `query-migrate` until completed), then `cont` over QMP, all paused. QEMU's live equivalent
//!   is `migrate` to a file while the guest runs: it stops the guest for the last pages and ends
//!   paused, so its pause is its reported `downtime` plus the time until `cont` returned.
//! - Restore: from spawning the VMM with the snapshot (`ferro vmm --restore DIR`; QEMU with
//!   `-incoming "exec:cat FILE"` and a QMP `cont` once the migration is in) until the guest
//!   answers a byte typed on its serial console ("counter: pong").

use crate::common::{QEMU_CPU, Scratch, ferro_bin, median, qemu_bin};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZES_MIB: [u64; 2] = [256, 2048];

/// Connects to a unix socket the child is about to create; panics if it does not within 30 s.
pub(crate) fn connect(path: &Path, child: &mut Child) -> UnixStream {
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the VMM exited with {status} before {} appeared", path.display());
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Reads the console until `what` appears; returns what it read.
pub(crate) fn wait_console(console: &mut UnixStream, what: &str) -> String {
    console.set_read_timeout(Some(Duration::from_secs(60))).expect("socket timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains(what) {
        match console.read(&mut buf) {
            Ok(0) | Err(_) => panic!("console closed or silent before {what:?}: {}", String::from_utf8_lossy(&seen)),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Types a ping on the console and waits for the guest's answer; returns what it read.
pub(crate) fn ping(console: &mut UnixStream) -> String {
    console.write_all(b"p").expect("write to the console");
    wait_console(console, "counter: pong")
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One JSON line each way on a control socket (ours or QMP).
pub(crate) struct LineSocket(pub(crate) BufReader<UnixStream>);

impl LineSocket {
    pub(crate) fn send(&mut self, v: &Value) {
        writeln!(self.0.get_mut(), "{v}").expect("write a request");
    }

    pub(crate) fn line(&mut self) -> Value {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("read a reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// QMP: the reply to the command just sent, skipping asynchronous events.
    pub(crate) fn qmp(&mut self, v: &Value) -> Value {
        self.qmp_keeping_events(v, &mut Vec::new())
    }

    /// QMP: the reply to the command just sent; the asynchronous events that came before it
    /// go to `events`.
    pub(crate) fn qmp_keeping_events(&mut self, v: &Value, events: &mut Vec<Value>) -> Value {
        self.send(v);
        loop {
            let reply = self.line();
            if reply.get("event").is_none() {
                assert!(reply.get("error").is_none(), "QMP {v}: {reply}");
                return reply;
            }
            events.push(reply);
        }
    }
}

/// What one VMM's snapshots and restores cost (medians, ms).
struct Costs {
    /// The guest paused.
    pause: f64,
    /// The whole snapshot, from request to the guest running with the files written.
    total: f64,
    /// From spawning the restoring VMM until the guest answers.
    restore: f64,
}

/// Our VMM: boots the counter guest, times `runs` snapshots and `runs` restores.
fn ferro(mib: u64, runs: usize, dir: &Path) -> Costs {
    let ferro = ferro_bin();
    let (api, serial) = (dir.join("api.sock"), dir.join("serial.sock"));
    let memory = format!("{mib}M");
    let mut vmm = Command::new(&ferro)
        .args(["vmm", "--guest", "counter", "--memory", &memory])
        .arg("--api-socket")
        .arg(&api)
        .arg("--serial-socket")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferro vmm");
    let mut console = connect(&serial, &mut vmm);
    wait_console(&mut console, "counter: up");
    let mut control = LineSocket(BufReader::new(connect(&api, &mut vmm)));
    let (mut pauses, mut totals) = (Vec::new(), Vec::new());
    let mut snapshot = PathBuf::new();
    for i in 0..runs {
        snapshot = dir.join(format!("snap{i}"));
        let start = Instant::now();
        control.send(&json!({"op": "snapshot", "dir": snapshot, "resume": true}));
        let reply = control.line();
        totals.push(ms(start.elapsed()));
        assert_eq!(reply["ok"], true, "{reply}");
        pauses.push(reply["pause_us"].as_f64().expect("pause_us") / 1e3);
        ping(&mut console);
    }
    stop(vmm);

    let mut restores = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&serial);
        let start = Instant::now();
        let mut restored = Command::new(&ferro)
            .args(["vmm", "--restore"])
            .arg(&snapshot)
            .arg("--serial-socket")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ferro vmm --restore");
        let mut console = connect(&serial, &mut restored);
        ping(&mut console);
        restores.push(ms(start.elapsed()));
        stop(restored);
    }
    for i in 0..runs {
        let _ = std::fs::remove_dir_all(dir.join(format!("snap{i}")));
    }
    Costs { pause: median(pauses), total: median(totals), restore: median(restores) }
}

pub(crate) fn qemu_command(qemu: &Path, guest: &Path, mib: u64, serial: &Path, qmp: &Path) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-M", "microvm", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", &mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-chardev")
        .arg(format!("socket,id=con,path={},server=on,wait=off", serial.display()))
        .args(["-serial", "chardev:con"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-kernel")
        .arg(guest)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

pub(crate) fn qmp_connect(path: &Path, child: &mut Child) -> LineSocket {
    let mut s = LineSocket(BufReader::new(connect(path, child)));
    s.line(); // greeting
    s.qmp(&json!({"execute": "qmp_capabilities"}));
    s
}

/// Polls `query-migrate` until the migration completed; returns its final status.
fn wait_migrated(qmp: &mut LineSocket) -> Value {
    loop {
        let status = qmp.qmp(&json!({"execute": "query-migrate"}));
        match status["return"]["status"].as_str() {
            Some("completed") => return status,
            Some("failed") | Some("cancelled") => panic!("QEMU migration to a file: {status}"),
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// QEMU, the peer: the same guest and the same measurements, through QMP and migration files:
/// the savevm-style snapshot (stopped throughout) and its restore.
fn qemu(qemu: &Path, guest: &Path, mib: u64, runs: usize, dir: &Path) -> Costs {
    let (qmp_path, serial) = (dir.join("qmp.sock"), dir.join("qemu-serial.sock"));
    let mut vm = qemu_command(qemu, guest, mib, &serial, &qmp_path).spawn().expect("spawn qemu");
    let mut console = connect(&serial, &mut vm);
    wait_console(&mut console, "counter: up");
    let mut qmp = qmp_connect(&qmp_path, &mut vm);
    let mut pauses = Vec::new();
    let file = dir.join("qemu.migration");
    for _ in 0..runs {
        let _ = std::fs::remove_file(&file);
        let start = Instant::now();
        qmp.qmp(&json!({"execute": "stop"}));
        qmp.qmp(&json!({"execute": "migrate", "arguments": {"uri": format!("exec:cat > {}", file.display())}}));
        wait_migrated(&mut qmp);
        qmp.qmp(&json!({"execute": "cont"}));
        pauses.push(ms(start.elapsed()));
        ping(&mut console);
    }
    stop(vm);

    let mut restores = Vec::new();
    for _ in 0..runs {
        for p in [&qmp_path, &serial] {
            let _ = std::fs::remove_file(p);
        }
        let start = Instant::now();
        let mut restored = qemu_command(qemu, guest, mib, &serial, &qmp_path)
            .arg("-incoming")
            .arg(format!("exec:cat {}", file.display()))
            .spawn()
            .expect("spawn qemu -incoming");
        let mut console = connect(&serial, &mut restored);
        let mut qmp = qmp_connect(&qmp_path, &mut restored);
        // The saved guest was stopped, so the incoming one stays paused until told to go on.
        loop {
            let status = qmp.qmp(&json!({"execute": "query-status"}));
            if status["return"]["status"] != "inmigrate" {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        qmp.qmp(&json!({"execute": "cont"}));
        ping(&mut console);
        restores.push(ms(start.elapsed()));
        stop(restored);
    }
    let pause = median(pauses);
    Costs { pause, total: pause, restore: median(restores) }
}

/// QEMU's live snapshot to a file: `migrate` while the guest runs; at the end QEMU stops the
/// guest for the last pages and leaves it paused until `cont`. Returns (pause, total), medians.
fn qemu_live(qemu: &Path, guest: &Path, mib: u64, runs: usize, dir: &Path) -> (f64, f64) {
    let (qmp_path, serial) = (dir.join("qmp-live.sock"), dir.join("qemu-live-serial.sock"));
    let mut vm = qemu_command(qemu, guest, mib, &serial, &qmp_path).spawn().expect("spawn qemu");
    let mut console = connect(&serial, &mut vm);
    wait_console(&mut console, "counter: up");
    let mut qmp = qmp_connect(&qmp_path, &mut vm);
    let (mut pauses, mut totals) = (Vec::new(), Vec::new());
    let file = dir.join("qemu-live.migration");
    for _ in 0..runs {
        let _ = std::fs::remove_file(&file);
        let start = Instant::now();
        qmp.qmp(&json!({"execute": "migrate", "arguments": {"uri": format!("exec:cat > {}", file.display())}}));
        let status = wait_migrated(&mut qmp);
        let seen = Instant::now();
        qmp.qmp(&json!({"execute": "cont"}));
        let downtime = status["return"]["downtime"].as_f64().expect("QEMU reports the downtime of a completed migration");
        pauses.push(downtime + ms(seen.elapsed()));
        totals.push(ms(start.elapsed()));
        ping(&mut console);
    }
    stop(vm);
    let _ = std::fs::remove_file(&file);
    (median(pauses), median(totals))
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let guest = scratch.0.join("counter.elf");
    std::fs::write(&guest, ferro_guests::get("counter").expect("built-in counter guest")).expect("write the guest");
    let peer = qemu_bin();
    println!("== snapshot pause and restore -> guest answering, counter guest (16 MiB written), {runs} runs, medians");
    for mib in SIZES_MIB {
        let ours = ferro(mib, runs, &scratch.0);
        println!(
            "  {mib:>5} MiB  ferro vmm (live)         pause {:8.2} ms   whole snapshot {:8.2} ms   restore -> answering {:8.2} ms",
            ours.pause, ours.total, ours.restore
        );
        match &peer {
            Some(qemu_path) => {
                let savevm = qemu(qemu_path, &guest, mib, runs, &scratch.0);
                let (live_pause, live_total) = qemu_live(qemu_path, &guest, mib, runs, &scratch.0);
                println!(
                    "  {mib:>5} MiB  qemu stop+migrate+cont   pause {:8.2} ms   whole snapshot {:8.2} ms   restore -> answering {:8.2} ms",
                    savevm.pause, savevm.total, savevm.restore
                );
                println!("  {mib:>5} MiB  qemu live migrate+cont   pause {live_pause:8.2} ms   whole snapshot {live_total:8.2} ms");
                println!(
                    "  {mib:>5} MiB  ratio ferro/qemu   pause {:.3} vs stop+migrate (qemu {:.1}x longer), {:.3} vs live (qemu {:.1}x longer)   restore {:.3} (qemu {:.1}x slower)",
                    ours.pause / savevm.pause,
                    savevm.pause / ours.pause,
                    ours.pause / live_pause,
                    live_pause / ours.pause,
                    ours.restore / savevm.restore,
                    savevm.restore / ours.restore
                );
            }
            None => println!("  (no QEMU peer: see scripts/qemu-peer.sh)"),
        }
    }
}
