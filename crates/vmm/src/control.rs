//! The per-VM control socket (docs/vmm-control.md): [`Request`]s from `ferrod` (or any client)
//! to pause, resume, press the power button, reset, quit, read stats and set the balloon, one
//! JSON line each way, typed by `ferro-vmm-api`.

use crate::exit::ExitReason;
use crate::vcpu::{self, Shared};
use crate::virtio::DeviceHandles;
use ferro_devices::acpi::AcpiPm;
use ferro_vmm_api::Request;
use ferro_vmm_api::control::{BalloonReply, Done, InfoReply, MAX_LINE, RunState, StatsReply, decode_request, encode_reply};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

    fn info(&self) -> InfoReply {
        InfoReply {
            state: if self.is_paused() { RunState::Paused } else { RunState::Running },
            pid: std::process::id(),
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            name: self.name.clone(),
        }
    }

    fn stats(&self) -> StatsReply {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        StatsReply {
            vcpu_time_ns: threads.iter().map(|t| vcpu::thread_cpu_time_ns(*t)).collect(),
            cpu_time_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            rss_bytes: rss_bytes(),
            exits: self.shared.exits.load(Ordering::Relaxed),
            disks: self.devices.disk_stats(),
            nics: self.devices.nic_stats(),
            balloon: self.devices.balloon.as_ref().map(|b| {
                // Answer with what the guest last said, and ask it for fresh numbers for next time.
                b.request_stats();
                b.stats()
            }),
        }
    }

    /// Sets the balloon's target to `mib` MiB of guest memory to take back.
    fn balloon(&self, mib: u64) -> Result<BalloonReply, String> {
        let Some(balloon) = &self.devices.balloon else {
            return Err("this VM has no balloon device (start it with --balloon size=0)".into());
        };
        let memory_mib = self.memory >> 20;
        if mib > memory_mib {
            return Err(format!("target_mib {mib} is more than the guest's {memory_mib} MiB"));
        }
        balloon.set_target_pages((mib << 8) as u32);
        Ok(BalloonReply { target_mib: mib, actual_mib: balloon.stats().actual_mib })
    }

    fn power_button(&self) -> Result<Done, String> {
        let mut pm = self.pm.lock().unwrap_or_else(|p| p.into_inner());
        pm.press_power_button().map(|()| Done {}).map_err(|e| format!("power button: {e}"))
    }

    /// Answers one request line with one reply line (docs/vmm-control.md).
    pub fn handle(&self, line: &str) -> String {
        let request = match decode_request(line) {
            Ok(r) => r,
            Err(e) => return encode_reply::<Done>(&Err(e)),
        };
        match request {
            Request::Info => encode_reply(&Ok(self.info())),
            Request::Pause => encode_reply(&self.pause().map(|()| Done {})),
            Request::Resume => {
                self.resume();
                encode_reply(&Ok(Done {}))
            }
            Request::PowerButton => encode_reply(&self.power_button()),
            Request::Reset => {
                self.shared.exit.request(ExitReason::Reset);
                encode_reply(&Ok(Done {}))
            }
            Request::Quit => {
                self.shared.exit.request(ExitReason::Quit);
                encode_reply(&Ok(Done {}))
            }
            Request::Stats => encode_reply(&Ok(self.stats())),
            Request::Balloon { target_mib } => encode_reply(&self.balloon(target_mib)),
        }
    }
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
        match reader.by_ref().take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= MAX_LINE {
            let _ = writeln!(out, "{}", encode_reply::<Done>(&Err("request line longer than 64 KiB".into())));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        if writeln!(out, "{}", c.handle(&line)).is_err() {
            return;
        }
    }
}
