//! vCPU threads: one per vCPU, each a small state machine (paused, running, exited) driven by
//! [`VcpuEvent`]s and answering each with a [`VcpuResponse`]. A vCPU starts paused; `Resume`
//! runs it (KVM_RUN, exits dispatched to the buses), `Pause` parks it outside KVM_RUN, and while
//! paused its full KVM state can be read (`SaveState`) or written (`RestoreState`) on its own
//! thread, which KVM requires. A guest exit that ends the VM (power off, reset, a fatal error)
//! asks the main thread to stop and leaves the vCPU exited until `Exit` ends the thread.
//!
//! Getting a running vCPU's attention: the event is queued, then [`kick_signal`] is sent to its
//! thread; the handler sets `immediate_exit` in that thread's `kvm_run`, so KVM_RUN returns at
//! once even if the signal arrived just before it was entered, and the thread reads its events
//! on that return. The exit path itself never looks at the events: no cost per exit.
//!
//! kvm-pvm: an application processor blocked in KVM_RUN is not woken by the guest's SIPI
//! (docs/kvm-pvm.md). Until each AP runs, the main loop kicks it at growing intervals
//! ([`Vcpus::kick_unstarted`]); after the kick KVM_RUN is entered again and KVM delivers the
//! pending INIT/SIPI.

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use ferro_devices::BusAction;
use ferro_jail::affinity;
use ferro_jail::seccomp::{self, ThreadKind};
use ferro_hypervisor::VcpuState;
use kvm_bindings::{KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use ferro_vmm_api::CpuList;
use ferro_vmm_api::control::VcpuInfo;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a vCPU may take to answer an event.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this thread to its own kvm_run mapping, which lives as
        // long as the thread's VcpuFd; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What every vCPU thread shares: the buses its exits go to and the VM's exit signal.
pub struct Shared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: ExitSignal,
    /// Total exits to userspace, all vCPUs.
    pub exits: AtomicU64,
}

/// What a vCPU is asked to do.
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Read the vCPU's KVM state (paused only).
    SaveState,
    /// Write it (paused only).
    RestoreState(Box<VcpuState>),
    /// End the thread.
    Exit,
}

/// A vCPU's answer to one event.
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<VcpuState>),
    Restored,
    /// The vCPU has stopped for good (the VM is ending); it does nothing more.
    Exited,
    Error(String),
}

/// Where a vCPU thread is; kept in an atomic the VMM reads for `vcpu_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum RunState {
    Paused,
    Running,
    Exited,
}

impl RunState {
    fn name(code: u8) -> &'static str {
        match code {
            c if c == RunState::Paused as u8 => "paused",
            c if c == RunState::Running as u8 => "running",
            _ => "exited",
        }
    }
}

/// The thread's side of one vCPU.
struct VcpuThread {
    index: u8,
    fd: VcpuFd,
    shared: Arc<Shared>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    started: Arc<AtomicBool>,
    /// The MSRs `SaveState` reads (KVM_GET_MSR_INDEX_LIST).
    msrs: Arc<Vec<u32>>,
    /// This thread's [`RunState`], for the VMM to read.
    state: Arc<AtomicU8>,
}

impl VcpuThread {
    fn run(mut self) {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        let mut state = RunState::Paused;
        loop {
            let next = match state {
                RunState::Running => self.run_once(),
                RunState::Paused | RunState::Exited => match self.events.recv() {
                    Ok(event) => self.handle(event, state),
                    Err(_) => None,
                },
            };
            match next {
                Some(s) => {
                    state = s;
                    self.state.store(s as u8, Ordering::Relaxed);
                }
                None => break,
            }
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and what follows it; None when the thread must end.
    fn run_once(&mut self) -> Option<RunState> {
        let outcome = match self.fd.run() {
            Ok(exit) => {
                self.shared.exits.fetch_add(1, Ordering::Relaxed);
                let failed = matches!(exit, VcpuExit::InternalError | VcpuExit::FailEntry(..) | VcpuExit::Shutdown);
                let reason = handle_exit(self.index, exit, &self.shared);
                if failed {
                    describe_failure(self.index, &mut self.fd);
                }
                reason
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                self.note_started();
                let mut state = RunState::Running;
                loop {
                    match self.events.try_recv() {
                        Ok(event) => state = self.handle(event, state)?,
                        Err(TryRecvError::Empty) => return Some(state),
                        Err(TryRecvError::Disconnected) => return None,
                    }
                }
            }
            Err(e) => Some(ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
        };
        match outcome {
            // Every reason ends the VM: stop this vCPU now rather than re-entering the guest.
            Some(reason) => {
                self.shared.exit.request(reason);
                Some(RunState::Exited)
            }
            None => Some(RunState::Running),
        }
    }

    /// Marks an application processor started once the guest has sent it its SIPI.
    fn note_started(&self) {
        if !self.started.load(Ordering::Relaxed) {
            if let Ok(mp) = self.fd.get_mp_state() {
                let waiting = mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED;
                self.started.store(!waiting, Ordering::Relaxed);
            }
        }
    }

    /// Answers one event; returns the state to go on in, None to end the thread.
    fn handle(&mut self, event: VcpuEvent, state: RunState) -> Option<RunState> {
        let (next, response) = match (event, state) {
            (VcpuEvent::Exit, _) => {
                let _ = self.responses.send(VcpuResponse::Exited);
                return None;
            }
            (_, RunState::Exited) => (RunState::Exited, VcpuResponse::Exited),
            (VcpuEvent::Pause, _) => (RunState::Paused, VcpuResponse::Paused),
            (VcpuEvent::Resume, _) => (RunState::Running, VcpuResponse::Resumed),
            (VcpuEvent::SaveState, RunState::Paused) => {
                let response = match VcpuState::save(&self.fd, &self.msrs) {
                    Ok(s) => VcpuResponse::State(Box::new(s)),
                    Err(e) => VcpuResponse::Error(format!("vCPU {}: {e}", self.index)),
                };
                (RunState::Paused, response)
            }
            (VcpuEvent::RestoreState(s), RunState::Paused) => {
                let response = match s.restore(&self.fd) {
                    Ok(()) => {
                        let waiting = s.mp_state.mp_state == KVM_MP_STATE_UNINITIALIZED || s.mp_state.mp_state == KVM_MP_STATE_INIT_RECEIVED;
                        self.started.store(!waiting, Ordering::Relaxed);
                        VcpuResponse::Restored
                    }
                    Err(e) => VcpuResponse::Error(format!("vCPU {}: {e}", self.index)),
                };
                (RunState::Paused, response)
            }
            (VcpuEvent::SaveState | VcpuEvent::RestoreState(_), RunState::Running) => {
                (RunState::Running, VcpuResponse::Error(format!("vCPU {} is running; pause it first", self.index)))
            }
        };
        let _ = self.responses.send(response);
        Some(next)
    }
}

/// The VMM's side of one vCPU thread.
struct Vcpu {
    index: u8,
    thread: JoinHandle<()>,
    /// The thread's id (what /proc/PID/task lists and sched_setaffinity takes).
    tid: i32,
    state: Arc<AtomicU8>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    started: Arc<AtomicBool>,
}

impl Vcpu {
    fn kick(&self) {
        // SAFETY: the thread is alive: it is joined only when the `Vcpus` holding this handle is
        // dropped, which removes the handle first; the signal has a handler
        // (install_kick_handler).
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }
}

/// Every vCPU thread of a VM.
pub struct Vcpus {
    vcpus: Vec<Vcpu>,
}

impl Vcpus {
    /// Starts one thread per vCPU, each paused. `started[i]` says whether vCPU i already runs
    /// guest code (the boot vCPU, or a restored vCPU past its SIPI), so it needs no kicks.
    pub fn spawn(fds: Vec<VcpuFd>, shared: &Arc<Shared>, msrs: Arc<Vec<u32>>, started: &[bool]) -> std::io::Result<Vcpus> {
        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, fd) in fds.into_iter().enumerate() {
            let (events_tx, events) = channel();
            let (responses, responses_rx) = channel();
            let started = Arc::new(AtomicBool::new(started.get(index).copied().unwrap_or(false)));
            let index = index as u8;
            let state = Arc::new(AtomicU8::new(RunState::Paused as u8));
            let t = VcpuThread { index, fd, shared: shared.clone(), events, responses, started: started.clone(), msrs: msrs.clone(), state: state.clone() };
            let (tid_tx, tid_rx) = channel();
            let thread = seccomp::spawn(ThreadKind::Vcpu, &format!("vcpu{index}"), move || {
                let _ = tid_tx.send(affinity::current_tid());
                t.run()
            })?;
            let tid = tid_rx.recv().map_err(|_| std::io::Error::other(format!("vCPU {index}'s thread ended at once")))?;
            vcpus.push(Vcpu { index, thread, tid, state, events: events_tx, responses: responses_rx, started });
        }
        Ok(Vcpus { vcpus })
    }

    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Sends `events[i]` to vCPU i, kicks each, and collects every answer.
    fn request(&self, what: &str, events: Vec<VcpuEvent>) -> Result<Vec<VcpuResponse>, String> {
        for (v, event) in self.vcpus.iter().zip(events) {
            // Answers that came after an earlier request gave up must not answer this one.
            while v.responses.try_recv().is_ok() {}
            v.events.send(event).map_err(|_| format!("vCPU {} has ended", v.index))?;
            v.kick();
        }
        let deadline = Instant::now() + ANSWER_WITHIN;
        let mut answers = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            match v.responses.recv_timeout(left) {
                Ok(VcpuResponse::Error(e)) => return Err(e),
                Ok(VcpuResponse::Exited) => return Err(format!("vCPU {} has stopped: the VM is ending", v.index)),
                Ok(answer) => answers.push(answer),
                Err(_) => return Err(format!("vCPU {} did not {what} within {} s", v.index, ANSWER_WITHIN.as_secs())),
            }
        }
        Ok(answers)
    }

    /// The same event for every vCPU.
    fn all(&self, event: fn() -> VcpuEvent) -> Vec<VcpuEvent> {
        self.vcpus.iter().map(|_| event()).collect()
    }

    /// Parks every vCPU outside KVM_RUN; returns when all are parked.
    pub fn pause(&self) -> Result<(), String> {
        self.request("pause", self.all(|| VcpuEvent::Pause)).map(drop)
    }

    pub fn resume(&self) -> Result<(), String> {
        self.request("resume", self.all(|| VcpuEvent::Resume)).map(drop)
    }

    /// Every vCPU's KVM state, read on its own thread; the vCPUs must be paused.
    pub fn save(&self) -> Result<Vec<VcpuState>, String> {
        let answers = self.request("save its state", self.all(|| VcpuEvent::SaveState))?;
        answers
            .into_iter()
            .map(|a| match a {
                VcpuResponse::State(s) => Ok(*s),
                _ => Err("a vCPU answered SaveState with something else".to_string()),
            })
            .collect()
    }

    /// Writes saved states into the paused vCPUs, one each, in order.
    pub fn restore(&self, states: Vec<VcpuState>) -> Result<(), String> {
        if states.len() != self.vcpus.len() {
            return Err(format!("saved state has {} vCPUs, the VM {}", states.len(), self.vcpus.len()));
        }
        let events = states.into_iter().map(|s| VcpuEvent::RestoreState(Box::new(s))).collect();
        self.request("restore its state", events).map(drop)
    }

    /// Kicks every application processor the guest has not started yet (kvm-pvm, see the module
    /// notes); true while any remains.
    pub fn kick_unstarted(&self) -> bool {
        let mut waiting = false;
        for v in self.vcpus.iter().filter(|v| !v.started.load(Ordering::Relaxed)) {
            v.kick();
            waiting = true;
        }
        waiting
    }

    /// Whether some application processor has not been started by the guest yet.
    pub fn any_unstarted(&self) -> bool {
        self.vcpus.iter().any(|v| !v.started.load(Ordering::Relaxed))
    }

    /// CPU time used by each vCPU thread so far.
    pub fn cpu_times_ns(&self) -> Vec<u64> {
        self.vcpus.iter().map(|v| thread_cpu_time_ns(v.thread.as_pthread_t())).collect()
    }

    /// The thread id of every vCPU, in vCPU order.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.vcpus.iter().map(|v| v.tid).collect()
    }

    /// Each vCPU's thread, state, CPU time and the host CPUs it may run on.
    pub fn info(&self) -> Result<Vec<VcpuInfo>, String> {
        self.vcpus
            .iter()
            .map(|v| {
                let cpus = affinity::get(v.tid).map_err(|e| format!("vCPU {}: reading its CPU affinity: {e}", v.index))?;
                Ok(VcpuInfo {
                    vcpu: v.index,
                    thread_id: v.tid,
                    state: RunState::name(v.state.load(Ordering::Relaxed)).to_string(),
                    cpu_time_ns: thread_cpu_time_ns(v.thread.as_pthread_t()),
                    affinity: CpuList::from_cpus(cpus).ok_or_else(|| format!("vCPU {} may run on no CPU", v.index))?,
                })
            })
            .collect()
    }

    /// Lets vCPU `index` run only on `cpus` (checked against the host by the caller).
    pub fn pin(&self, index: usize, cpus: &CpuList) -> Result<(), String> {
        let v = self.vcpus.get(index).ok_or_else(|| format!("vCPU {index} does not exist (this VM has {})", self.vcpus.len()))?;
        affinity::set(v.tid, cpus.cpus()).map_err(|e| format!("pinning vCPU {index} to {cpus}: {e}"))
    }

}

/// Dropping the vCPUs ends every thread and waits for it.
impl Drop for Vcpus {
    fn drop(&mut self) {
        for v in &self.vcpus {
            let _ = v.events.send(VcpuEvent::Exit);
            v.kick();
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
    }
}

fn handle_exit(index: u8, exit: VcpuExit, shared: &Shared) -> Option<ExitReason> {
    let action = match exit {
        VcpuExit::IoOut(port, data) => shared.pio.write(u64::from(port), data),
        VcpuExit::IoIn(port, data) => {
            shared.pio.read(u64::from(port), data);
            BusAction::None
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.mmio.read(addr, data);
            BusAction::None
        }
        VcpuExit::MmioWrite(addr, data) => shared.mmio.write(addr, data),
        VcpuExit::Shutdown => return Some(ExitReason::Reset),
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => BusAction::PowerOff,
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => BusAction::Reset,
        VcpuExit::Hlt => return Some(ExitReason::Error(format!("vCPU {index} halted with interrupts off"))),
        VcpuExit::InternalError => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: KVM internal error (on kvm-pvm usually an instruction the emulator lacks, see docs/kvm-pvm.md)"
            )));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::Error(format!("vCPU {index}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})")));
        }
        other => return Some(ExitReason::Error(format!("vCPU {index}: unexpected exit {other:?}"))),
    };
    match action {
        BusAction::None => None,
        BusAction::PowerOff => Some(ExitReason::PowerOff),
        BusAction::Reset => Some(ExitReason::Reset),
        BusAction::DebugExit(status) => Some(ExitReason::DebugExit(status)),
    }
}

/// Prints where a vCPU died (registers and, for internal errors, KVM's suberror and data), so a
/// failure on kvm-pvm can be traced to the instruction the emulator refused.
fn describe_failure(index: u8, vcpu: &mut VcpuFd) {
    let run = vcpu.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: for KVM_EXIT_INTERNAL_ERROR, `internal` is the union member KVM filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        eprintln!("ferro: vCPU {index}: internal error suberror {} data {:x?}", internal.suberror, &internal.data[..n]);
    }
    if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        eprintln!(
            "ferro: vCPU {index}: rip {:#x} rsp {:#x} rax {:#x} rflags {:#x} cs {:#x} (l={} db={}) cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rax, r.rflags, s.cs.selector, s.cs.l, s.cs.db, s.cr0, s.cr3, s.cr4, s.efer
        );
    }
}

/// CPU time used so far by the thread `thread` (any thread of this process).
pub fn thread_cpu_time_ns(thread: libc::pthread_t) -> u64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread of this process (callers hold its JoinHandle).
    if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
        return 0;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
