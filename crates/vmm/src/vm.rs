//! A built VM: [`VmControl`], what the run loop and the control socket share to pause, resume,
//! save and stop it, and [`Vm::run`], the loop that waits for the guest (or a signal, or the
//! console) to end it and then stops every vCPU, flushes and closes every disk, and tells the
//! supervisor why.

use crate::console::{EscapeDecoder, FdWriter, RawTerminal};
use crate::control;
use crate::device_manager::DeviceManager;
use crate::events::EventSink;
use crate::exit::ExitReason;
use crate::memory::{self, GuestMemoryMmap};
use crate::signals::SignalFd;
use crate::snapshot::CpuFeatures;
use crate::state::{SAVED_VM_VERSION, SavedVm};
use crate::vcpu::{Shared, Vcpus};
use crate::{Result, VmBuilder};
use ferro_devices::legacy::Serial;
use ferro_hypervisor::{Hypervisor, VmState};
use ferro_jail::affinity;
use ferro_vmm_api::CpuList;
use ferro_vmm_api::control::{InfoReply, RunState, StatsReply, VcpuInfoReply};
use ferro_vmm_api::{VmConfig, VmEvent};
use kvm_ioctls::VmFd;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How to run a built VM.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Feed COM1 from stdin when it is a terminal (raw mode, Ctrl-A x quits).
    pub interactive: bool,
    /// Serve the control protocol of docs/vmm-control.md on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// The process exits right after `run` returns: hand KVM's teardown to a child (see
    /// [`defer_kvm_teardown`]) so the exit is not delayed by it.
    pub exiting: bool,
    /// Leave the vCPUs stopped until a `resume` request (a snapshot restored paused).
    pub paused: bool,
}

/// What controls a VM while it exists: shared by the run loop and the control socket.
pub struct VmControl {
    config: VmConfig,
    /// What the guest was given (at boot, or by the VM a restore came from).
    cpu_features: CpuFeatures,
    /// The vCPU threads; None once the VM has stopped. Control operations hold this lock, so
    /// they happen one at a time.
    vcpus: Mutex<Option<Vcpus>>,
    paused: AtomicBool,
    devices: DeviceManager,
    shared: Arc<Shared>,
    events: Arc<EventSink>,
    /// The migration under way or the last one's outcome (docs/migration.md).
    migration: crate::migration::Tracker,
    /// Held by whoever uses dirty page tracking (a migration, a pre-copied snapshot): there is
    /// one dirty log, so one user at a time.
    dirty_tracking: Mutex<()>,
    // Field order matters for drop: the VM fd goes before the memory it maps.
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

/// What a VM is built from: the builder makes these, [`VmControl::new`] takes them over.
pub(crate) struct VmParts {
    pub config: VmConfig,
    pub cpu_features: CpuFeatures,
    pub vcpus: Vcpus,
    pub devices: DeviceManager,
    pub shared: Arc<Shared>,
    pub events: Arc<EventSink>,
    // Field order matters for drop: the VM fd goes before the memory it maps.
    pub vm: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
}

impl VmControl {
    pub(crate) fn new(parts: VmParts) -> VmControl {
        let VmParts { config, cpu_features, vcpus, devices, shared, events, vm, memory } = parts;
        VmControl {
            config,
            cpu_features,
            vcpus: Mutex::new(Some(vcpus)),
            paused: AtomicBool::new(true),
            devices,
            shared,
            events,
            migration: crate::migration::Tracker::default(),
            dirty_tracking: Mutex::new(()),
            vm,
            memory,
        }
    }

    fn lock_vcpus(&self) -> MutexGuard<'_, Option<Vcpus>> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn cpu_features(&self) -> &CpuFeatures {
        &self.cpu_features
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Stops every vCPU, then every device worker: nothing runs guest code or touches guest
    /// memory until [`resume`](Self::resume). Idempotent.
    pub fn pause(&self) -> std::result::Result<(), String> {
        let vcpus = self.lock_vcpus();
        let vcpus = vcpus.as_ref().ok_or("the VM has stopped")?;
        if self.is_paused() {
            return Ok(());
        }
        vcpus.pause()?;
        self.devices.pause();
        self.paused.store(true, Ordering::Release);
        Ok(())
    }

    /// Lets the devices, then the vCPUs, run again. Idempotent. Disks handed over by a
    /// migration are taken back first: refused, the VM staying paused, while another process
    /// holds one, or when the destination may run the guest (the migration is unconfirmed).
    pub fn resume(&self) -> std::result::Result<(), String> {
        let vcpus = self.lock_vcpus();
        let vcpus = vcpus.as_ref().ok_or("the VM has stopped")?;
        if !self.is_paused() {
            return Ok(());
        }
        let handed_over = self.writable_disks().iter().any(|d| d.is_inactive());
        if handed_over && self.migration.info().state == ferro_vmm_api::control::MigrationState::Unconfirmed {
            return Err("the disks went to a migration's destination that was told to run the guest and did not confirm it: \
                        the guest may run there, so it does not resume here (end this VMM)"
                .into());
        }
        self.activate_disks(Duration::ZERO)?;
        self.devices.resume().map_err(|e| e.to_string())?;
        vcpus.resume()?;
        self.paused.store(false, Ordering::Release);
        Ok(())
    }

    /// The whole state of the paused VM besides its memory (see [`SavedVm`]); vCPU state is read
    /// on each vCPU's own thread.
    pub fn save(&self) -> std::result::Result<SavedVm, String> {
        let vcpus = self.lock_vcpus();
        let vcpus = vcpus.as_ref().ok_or("the VM has stopped")?;
        if !self.is_paused() {
            return Err("the VM is running; pause it before saving its state".into());
        }
        Ok(SavedVm {
            version: SAVED_VM_VERSION,
            kvm: VmState::save(&self.vm).map_err(|e| e.to_string())?,
            vcpus: vcpus.save()?,
            devices: self.devices.save(),
        })
    }

    /// Writes the paused VM's memory to a new file at `path`, for [`VmBuilder::restore`];
    /// returns the bytes written (zero pages are holes).
    pub fn save_memory(&self, path: &Path) -> std::result::Result<u64, String> {
        let _vcpus = self.lock_vcpus();
        if !self.is_paused() {
            return Err("the VM is running; pause it before saving its memory".into());
        }
        memory::save(&self.memory, path).map_err(|e| e.to_string())
    }

    /// Guest RAM, for the migration stream (docs/migration.md).
    pub(crate) fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The disks the guest may write (their images are what snapshots and backups change).
    pub(crate) fn writable_disks(&self) -> Vec<ferro_devices::virtio::block::BlockDisk> {
        self.devices.handles().disk_images.iter().filter(|d| !d.readonly()).cloned().collect()
    }

    /// Hands the writable disks over to another process (a migration's destination): each is
    /// closed cleanly, releasing its locks (see `BlockDisk::inactivate`). The VM must be paused
    /// and stay so until [`activate_disks`](Self::activate_disks). On failure some disks may be
    /// inactive: `activate_disks` takes them back.
    pub(crate) fn inactivate_disks(&self) -> std::result::Result<(), String> {
        if !self.is_paused() {
            return Err("the VM is running; pause it before handing its disks over".into());
        }
        self.writable_disks().iter().try_for_each(|disk| disk.inactivate())
    }

    /// Opens every inactive writable disk again (locks taken, metadata read afresh). While
    /// another process still holds one (its locks refuse the open), tries again until `wait`
    /// has passed; then, or on any other failure, the error names the disk.
    pub(crate) fn activate_disks(&self, wait: Duration) -> std::result::Result<(), String> {
        let deadline = Instant::now() + wait;
        for disk in self.writable_disks() {
            loop {
                match disk.activate() {
                    Ok(()) => break,
                    Err((true, _)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    Err((_, why)) => return Err(why),
                }
            }
        }
        Ok(())
    }

    pub(crate) fn migration(&self) -> &crate::migration::Tracker {
        &self.migration
    }

    /// The right to use dirty page tracking until the guard drops, or an error saying `what`
    /// cannot start now because a migration or a snapshot holds it.
    pub(crate) fn claim_dirty_tracking(&self, what: &str) -> std::result::Result<MutexGuard<'_, ()>, String> {
        match self.dirty_tracking.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(format!("cannot {what} now: a migration or a snapshot of this VM is already under way")),
        }
    }

    /// Holds the vCPUs (not the devices) out of the guest for `hold`, then lets them run again:
    /// one step of auto-converge's throttle. Nothing happens when the VM is paused or stopped;
    /// other control operations wait meanwhile.
    pub(crate) fn hold_vcpus(&self, hold: Duration) -> std::result::Result<(), String> {
        let vcpus = self.lock_vcpus();
        let Some(vcpus) = vcpus.as_ref() else { return Ok(()) };
        if self.is_paused() {
            return Ok(());
        }
        vcpus.pause()?;
        std::thread::sleep(hold);
        vcpus.resume()
    }

    /// Asks the run loop to end the VM with `reason` (the first reason asked for wins).
    pub fn request_exit(&self, reason: ExitReason) {
        self.shared.exit.request(reason);
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.devices.acpi_pm().lock().unwrap_or_else(|p| p.into_inner()).press_power_button()
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The KVM VM, for what reads or changes VM-wide KVM state directly.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    pub fn info(&self) -> InfoReply {
        InfoReply {
            state: if self.is_paused() { RunState::Paused } else { RunState::Running },
            pid: std::process::id(),
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory.size,
            name: self.config.name.clone(),
        }
    }

    /// Each vCPU's thread, state, CPU time and affinity, and the emulator threads' affinity.
    pub fn vcpu_info(&self) -> std::result::Result<VcpuInfoReply, String> {
        let vcpus = self.lock_vcpus();
        let vcpus = vcpus.as_ref().ok_or("the VM has stopped")?;
        // The main thread's id is the process id; every non-vCPU thread shares its CPUs.
        let main = affinity::get(std::process::id() as i32).map_err(|e| format!("reading the emulator's CPU affinity: {e}"))?;
        let emulator_affinity = CpuList::from_cpus(main).ok_or("the emulator may run on no CPU")?;
        Ok(VcpuInfoReply { vcpus: vcpus.info()?, emulator_affinity })
    }

    /// Lets vCPU `vcpu` run only on `cpus`, which must be online host CPUs.
    pub fn pin_vcpu(&self, vcpu: u8, cpus: &CpuList) -> std::result::Result<(), String> {
        cpus.check_within(&CpuList::host_online()?)?;
        let vcpus = self.lock_vcpus();
        vcpus.as_ref().ok_or("the VM has stopped")?.pin(usize::from(vcpu), cpus)
    }

    /// Lets every thread but the vCPUs (also those started later) run only on `cpus`, which
    /// must be online host CPUs.
    pub fn pin_emulator(&self, cpus: &CpuList) -> std::result::Result<(), String> {
        cpus.check_within(&CpuList::host_online()?)?;
        let vcpus = self.lock_vcpus();
        let tids = vcpus.as_ref().ok_or("the VM has stopped")?.thread_ids();
        affinity::pin_emulator(cpus.cpus(), &tids).map_err(|e| format!("pinning the emulator to {cpus}: {e}"))
    }

    /// Applies the configuration's pinning (a VM just built, before it runs).
    pub(crate) fn apply_pinning(&self) -> std::result::Result<(), String> {
        let pinning = &self.config.pinning;
        for (vcpu, cpus) in pinning.vcpus.iter().enumerate() {
            self.pin_vcpu(vcpu as u8, cpus).map_err(|e| format!("pinning.vcpus[{vcpu}]: {e}"))?;
        }
        if let Some(cpus) = &pinning.emulator {
            self.pin_emulator(cpus).map_err(|e| format!("pinning.emulator: {e}"))?;
        }
        Ok(())
    }

    /// The VM's counters; asks the balloon driver for fresh statistics for the next call.
    pub fn stats(&self) -> StatsReply {
        let vcpu_time_ns = self.lock_vcpus().as_ref().map(Vcpus::cpu_times_ns).unwrap_or_default();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        let handles = self.devices.handles();
        StatsReply {
            vcpu_time_ns,
            cpu_time_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            rss_bytes: rss_bytes(),
            exits: self.shared.exits.load(Ordering::Relaxed),
            disks: handles.disk_stats(),
            nics: handles.nic_stats(),
            balloon: handles.balloon.as_ref().map(|b| {
                // Answer with what the guest last said, and ask it for fresh numbers for next time.
                b.request_stats();
                b.stats()
            }),
            ksm_merging_pages: ferro_hypervisor::host_memory::ksm_merging_pages(std::process::id()).ok(),
            overhead_bytes: memory::overhead_bytes(),
        }
    }

    /// Ends the VM for good: every vCPU thread stops, then every device (workers end, disks are
    /// flushed and closed). Later calls do nothing.
    fn stop(&self) {
        let vcpus = self.lock_vcpus().take();
        if let Some(vcpus) = vcpus {
            drop(vcpus);
            self.devices.shutdown();
        }
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// A built VM, paused until [`run`](Vm::run). Dropping it stops it like the end of `run`.
pub struct Vm {
    control: Arc<VmControl>,
}

impl Vm {
    pub(crate) fn new(control: VmControl) -> Vm {
        Vm { control: Arc::new(control) }
    }

    /// The VM's controls, for use while it runs (from another thread, or the control socket).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// The serial device, for a console socket.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.control.devices.serial()
    }

    /// Runs the VM until it stops, then stops every vCPU and device (disks flushed and closed)
    /// whatever the reason, reports it to the supervisor, and returns it.
    pub fn run(self, opts: &RunOptions) -> Result<ExitReason> {
        let signals = SignalFd::open()?;
        let stdin = std::io::stdin();
        let raw = if opts.interactive { RawTerminal::enable(stdin.as_fd()) } else { None };
        let console_input = self.control.devices.handles().console_input.clone();
        if raw.is_some() {
            let to = if console_input.is_some() { "the virtio console" } else { "COM1" };
            eprintln!("ferro: console attached to {to}; press Ctrl-A x to quit\r");
        }
        let served = match &opts.api_socket {
            Some(path) => control::serve(path, self.control.clone()).map_err(|e| format!("control socket {}: {e}", path.display())),
            None => Ok(()),
        };
        let resumed = served.and_then(|()| if opts.paused { Ok(()) } else { self.control.resume() });
        let reason = match resumed {
            Ok(()) => {
                self.control.events.emit(&VmEvent::Started { pid: std::process::id() });
                match ferro_jail::seccomp::install(ferro_jail::seccomp::ThreadKind::Main) {
                    Ok(()) => self.main_loop(&signals, raw.is_some(), console_input.as_deref()),
                    Err(e) => ExitReason::Error(e),
                }
            }
            Err(e) => ExitReason::Error(e),
        };
        self.control.stop();
        self.control.events.emit(&VmEvent::Exited { reason: reason.clone() });
        if opts.exiting {
            defer_kvm_teardown();
        }
        Ok(reason)
    }

    fn main_loop(&self, signals: &SignalFd, interactive: bool, console_input: Option<&std::fs::File>) -> ExitReason {
        let exit_fd = self.control.shared.exit.event.as_raw_fd();
        let mut decoder = EscapeDecoder::default();
        let mut kick_interval = Duration::from_millis(1);
        loop {
            let aps_waiting = self.control.lock_vcpus().as_ref().is_some_and(Vcpus::any_unstarted);
            let timeout = if aps_waiting { kick_interval.as_millis() as i32 } else { -1 };
            let mut fds = vec![
                libc::pollfd { fd: exit_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: signals.raw(), events: libc::POLLIN, revents: 0 },
            ];
            if interactive {
                fds.push(libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return ExitReason::Error(format!("poll: {err}"));
            }
            if n == 0 {
                // kvm-pvm: application processors blocked in KVM_RUN miss their SIPI (vcpu.rs).
                if let Some(vcpus) = self.control.lock_vcpus().as_ref() {
                    vcpus.kick_unstarted();
                }
                kick_interval = (kick_interval * 2).min(Duration::from_millis(50));
                continue;
            }
            if fds[0].revents != 0 {
                if let Some(reason) = self.control.shared.exit.take() {
                    return reason;
                }
            }
            if fds[1].revents != 0 {
                if let Some(sig) = signals.read() {
                    return ExitReason::Signal(sig);
                }
            }
            if interactive && fds[2].revents != 0 {
                let mut buf = [0u8; 64];
                // SAFETY: reading into a buffer we own, within its length.
                let got = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if got <= 0 {
                    continue;
                }
                let mut to_guest = Vec::new();
                if decoder.feed(&buf[..got as usize], &mut to_guest) {
                    return ExitReason::Quit;
                }
                match console_input {
                    // Full pipe: the guest is not reading its console; like a full UART, drop.
                    Some(mut feed) => drop(feed.write(&to_guest)),
                    None => drop(self.control.devices.serial().lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(&to_guest)),
                }
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.control.stop();
    }
}

/// Lets the process exit without waiting for KVM to destroy the VM.
///
/// On kvm-pvm, closing the last VM fd takes 15-20 ms (measured: almost all of it the in-kernel
/// PIT's worker thread being stopped), and the kernel does that inside the exiting process before
/// its parent learns it exited. A forked child inherits the KVM fds, closes stdio at once so
/// nobody waits on it for output, waits until this process is gone (EOF on a pipe only we hold),
/// then closes everything: the VM is destroyed in the child, after we have already exited.
/// If fork fails the teardown simply happens here, as usual.
fn defer_kvm_teardown() {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe() writes two fds into the array we own.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: all vCPU threads are joined; the child calls only async-signal-safe functions
    // (close, read, syscall, _exit) before it exits.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: closing fds and blocking on our own pipe; no allocation, no locks.
            unsafe {
                libc::close(pipe[1]);
                libc::close(0);
                libc::close(1);
                libc::close(2);
                let mut b = 0u8;
                while libc::read(pipe[0], (&mut b as *mut u8).cast(), 1) > 0 {}
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                libc::_exit(0);
            }
        }
        -1 => {
            // SAFETY: closing the pipe we just created.
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
        // The write end stays open (deliberately never closed) until this process exits.
        // SAFETY: closing our copy of the read end.
        _ => unsafe {
            libc::close(pipe[0]);
        },
    }
}

/// What a foreground VM starts from.
pub enum Start<'a> {
    Boot(VmConfig),
    /// A snapshot directory.
    Restore(&'a Path),
    /// A snapshot directory, wired to this host by a configuration of the same VM (see
    /// [`VmConfig::rewired`]): its NICs' taps and descriptors, and what a later reset boots.
    RestoreRewired(&'a Path, VmConfig),
}

/// Boots or restores a VM with the console on this process's stdout (and stdin when it is a
/// terminal), and runs it to the end.
pub fn run_foreground(hv: &Hypervisor, start: Start) -> Result<ExitReason> {
    let vm = VmBuilder::new(hv).serial_out(Box::new(FdWriter(1))).build(start)?;
    vm.run(&RunOptions { interactive: true, exiting: true, ..Default::default() })
}
