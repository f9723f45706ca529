//! vCPU threads: one per vCPU, each looping on KVM_RUN and dispatching exits to the bus.
//!
//! Stopping: the VMM sets the shared stop flag and sends [`kick_signal`] to every vCPU thread;
//! the handler sets `immediate_exit` in that thread's `kvm_run`, so KVM_RUN returns at once even
//! if the signal arrived just before it was entered.
//!
//! kvm-pvm: an application processor blocked in KVM_RUN is not woken by the guest's SIPI
//! (docs/kvm-pvm.md). Until each AP runs, it is kicked at growing intervals; after the kick,
//! KVM_RUN is entered again and KVM delivers the pending INIT/SIPI.

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use ferro_devices::BusAction;
use kvm_bindings::{KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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

/// What every vCPU thread shares.
pub struct Shared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: ExitSignal,
    pub stop: AtomicBool,
    /// Total exits to userspace, all vCPUs.
    pub exits: AtomicU64,
    /// Pause gate: while true, vCPU threads park outside KVM_RUN.
    /// Written only through [`Shared::set_paused`], which keeps it and `pause_flag` in step.
    pub paused: Mutex<bool>,
    /// Lock-free copy of `paused` for the exit path, which checks it on every exit.
    pub pause_flag: AtomicBool,
    pub resume: Condvar,
    /// How many vCPU threads are parked right now.
    pub parked: AtomicUsize,
}

impl Shared {
    /// Pauses or resumes every vCPU (a pause takes effect at each vCPU's next exit or kick).
    pub fn set_paused(&self, paused: bool) {
        let mut guard = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        *guard = paused;
        self.pause_flag.store(paused, Ordering::Release);
        if !paused {
            self.resume.notify_all();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.pause_flag.load(Ordering::Acquire)
    }

    /// Parks the calling vCPU thread while the VM is paused (and not stopping).
    fn park_while_paused(&self) {
        if !self.is_paused() {
            return;
        }
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if !*paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        while *paused && !self.stop.load(Ordering::Acquire) {
            paused = self.resume.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

/// State of one vCPU visible to other threads.
pub struct VcpuHandle {
    pub started: AtomicBool,
}

/// Runs vCPU `index` until the VM stops.
pub fn run(index: u8, mut vcpu: VcpuFd, shared: Arc<Shared>, handle: Arc<VcpuHandle>) {
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    while !shared.stop.load(Ordering::Acquire) {
        shared.park_while_paused();
        let action = match vcpu.run() {
            Ok(exit) => {
                shared.exits.fetch_add(1, Ordering::Relaxed);
                let failed = matches!(exit, VcpuExit::InternalError | VcpuExit::FailEntry(..) | VcpuExit::Shutdown);
                let reason = handle_exit(index, exit, &shared);
                if failed {
                    describe_failure(index, &mut vcpu);
                }
                reason
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if !handle.started.load(Ordering::Relaxed) {
                    if let Ok(mp) = vcpu.get_mp_state() {
                        let waiting = mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED;
                        handle.started.store(!waiting, Ordering::Relaxed);
                    }
                }
                None
            }
            Err(e) => Some(ExitReason::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        };
        if let Some(reason) = action {
            // Every reason ends the VM: stop this vCPU now rather than re-entering the guest.
            shared.exit.request(reason);
            break;
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
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
