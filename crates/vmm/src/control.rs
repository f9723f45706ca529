//! The per-VM control socket (docs/vmm-control.md): newline-delimited JSON requests from
//! `ferrod` (or any client) to pause, resume, press the power button, quit, and read stats.

use crate::exit::ExitReason;
use crate::vcpu::{self, Shared};
use crate::virtio::DeviceHandles;
use ferro_devices::acpi::AcpiPm;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest request line accepted; longer lines are refused and the connection closed.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the control socket can do to a running VM.
pub struct Controller {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pm: Arc<Mutex<AcpiPm>>,
    /// vCPU threads while they are alive; emptied (under the lock) before they are joined.
    pub(crate) vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    pub(crate) name: String,
    pub(crate) vcpus: u8,
    pub(crate) memory: u64,
    pub(crate) devices: DeviceHandles,
}

impl Controller {
    fn kick_all(&self) {
        for t in self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            // SAFETY: the list only holds threads that have not been joined yet (the run loop
            // clears it under this lock before joining).
            unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
        }
    }

    fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are parked (or after 5 s).
    pub fn pause(&self) -> Result<(), String> {
        self.shared.set_paused(true);
        let n = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner()).len();
        let start = Instant::now();
        while self.shared.parked.load(Ordering::Acquire) < n {
            if start.elapsed() > Duration::from_secs(5) {
                return Err("vCPUs did not stop within 5 s".into());
            }
            self.kick_all();
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.shared.set_paused(false);
    }

    fn stats(&self) -> Value {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        let vcpu_time: Vec<u64> = threads.iter().map(|t| vcpu::thread_cpu_time_ns(*t)).collect();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        json!({
            "ok": true,
            "vcpu_time_ns": vcpu_time,
            "cpu_time_ns": ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            "rss_bytes": rss_bytes(),
            "exits": self.shared.exits.load(Ordering::Relaxed),
            "disks": [],
            "nics": [],
            "balloon": self.devices.balloon.as_ref().map(|b| {
                // Answer with what the guest last said, and ask it for fresh numbers for next time.
                b.request_stats();
                serde_json::to_value(b.info()).unwrap_or(Value::Null)
            }),
        })
    }

    /// `{"op":"balloon","target_mib":N}`: N MiB of guest memory to take back.
    fn balloon(&self, req: &Value) -> Value {
        let Some(balloon) = &self.devices.balloon else {
            return err("this VM has no balloon device (start it with --balloon size=0)");
        };
        let memory_mib = self.memory >> 20;
        match req.get("target_mib").and_then(Value::as_u64) {
            Some(mib) if mib <= memory_mib => {
                balloon.set_target_pages((mib << 8) as u32);
                json!({"ok": true, "target_mib": mib, "actual_mib": balloon.info().actual_mib})
            }
            Some(mib) => err(&format!("target_mib {mib} is more than the guest's {memory_mib} MiB")),
            None => err("balloon needs \"target_mib\": a number of MiB to take from the guest"),
        }
    }

    /// Answers one request object.
    pub fn handle(&self, req: &Value) -> Value {
        let Some(op) = req.get("op").and_then(Value::as_str) else {
            return err("request needs a string field \"op\"");
        };
        match op {
            "info" => json!({
                "ok": true,
                "state": if self.is_paused() { "paused" } else { "running" },
                "pid": std::process::id(),
                "vcpus": self.vcpus,
                "memory_bytes": self.memory,
                "name": self.name,
            }),
            "pause" => match self.pause() {
                Ok(()) => json!({"ok": true}),
                Err(e) => err(&e),
            },
            "resume" => {
                self.resume();
                json!({"ok": true})
            }
            "power_button" => match self.pm.lock().unwrap_or_else(|p| p.into_inner()).press_power_button() {
                Ok(()) => json!({"ok": true}),
                Err(e) => err(&format!("power button: {e}")),
            },
            "reset" => {
                self.shared.exit.request(ExitReason::Reset);
                json!({"ok": true})
            }
            "quit" => {
                self.shared.exit.request(ExitReason::Quit);
                json!({"ok": true})
            }
            "stats" => self.stats(),
            "balloon" => self.balloon(req),
            other => err(&format!("unknown op {other:?}; known: info, pause, resume, power_button, reset, quit, stats, balloon")),
        }
    }
}

fn err(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Binds `path` (replacing a stale socket file) and serves requests on background threads.
pub fn serve(path: &Path, controller: Arc<Controller>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let c = controller.clone();
            let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve_connection(stream, &c));
        }
    })?;
    Ok(())
}

fn serve_connection(stream: UnixStream, c: &Controller) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST {
            let _ = writeln!(out, "{}", err("request line longer than 64 KiB"));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => c.handle(&req),
            Err(e) => err(&format!("malformed JSON: {e}")),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}
