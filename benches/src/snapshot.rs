//! `ferro-bench snapshot`: how long a snapshot pauses the guest, and how soon a VM restored from
//! one answers again, for `ferro vmm` and QEMU `-M microvm` running the same `counter` test
//! guest (which has written a 16 MiB pattern; the rest of RAM is untouched), at 256 MiB and 2 GiB.
//!
//! - Pause: ours is the control socket's `snapshot` request with `resume` (memory file and state
//!   written while paused), timed by the client from request to reply. QEMU's is `stop`, then
//!   `migrate` to a file (`exec:cat > FILE`, polled with `query-migrate` until completed), then
//!   `cont` over QMP, timed the same way. Both write the whole RAM while the guest is stopped.
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
        self.send(v);
        loop {
            let reply = self.line();
            if reply.get("event").is_none() {
                assert!(reply.get("error").is_none(), "QMP {v}: {reply}");
                return reply;
            }
        }
    }
}

/// Our VMM: boots the counter guest, times `runs` snapshots and `runs` restores.
fn ferro(mib: u64, runs: usize, dir: &Path) -> (f64, f64) {
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
    let mut pauses = Vec::new();
    let mut snapshot = PathBuf::new();
    for i in 0..runs {
        snapshot = dir.join(format!("snap{i}"));
        let start = Instant::now();
        control.send(&json!({"op": "snapshot", "dir": snapshot, "resume": true}));
        let reply = control.line();
        pauses.push(ms(start.elapsed()));
        assert_eq!(reply["ok"], true, "{reply}");
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
    (median(pauses), median(restores))
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

/// QEMU, the peer: the same guest and the same measurements, through QMP and migration files.
fn qemu(qemu: &Path, guest: &Path, mib: u64, runs: usize, dir: &Path) -> (f64, f64) {
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
        loop {
            let status = qmp.qmp(&json!({"execute": "query-migrate"}));
            match status["return"]["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => panic!("QEMU migration to a file: {status}"),
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
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
    (median(pauses), median(restores))
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let guest = scratch.0.join("counter.elf");
    std::fs::write(&guest, ferro_guests::get("counter").expect("built-in counter guest")).expect("write the guest");
    let peer = qemu_bin();
    println!("== snapshot pause and restore -> guest answering, counter guest (16 MiB written), {runs} runs, medians");
    for mib in SIZES_MIB {
        let (pause, restore) = ferro(mib, runs, &scratch.0);
        println!("  {mib:>5} MiB  ferro vmm          pause {pause:8.2} ms   restore -> answering {restore:8.2} ms");
        match &peer {
            Some(qemu_path) => {
                let (q_pause, q_restore) = qemu(qemu_path, &guest, mib, runs, &scratch.0);
                println!("  {mib:>5} MiB  qemu -M microvm    pause {q_pause:8.2} ms   restore -> answering {q_restore:8.2} ms");
                println!(
                    "  {mib:>5} MiB  ratio ferro/qemu   pause {:.3} (qemu {:.1}x longer)   restore {:.3} (qemu {:.1}x slower)",
                    pause / q_pause,
                    q_pause / pause,
                    restore / q_restore,
                    q_restore / restore
                );
            }
            None => println!("  (no QEMU peer: see scripts/qemu-peer.sh)"),
        }
    }
}
