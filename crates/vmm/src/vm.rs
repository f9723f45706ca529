//! Building a VM from a [`VmConfig`] and running it to the end.

use crate::boot::{self, BootSource, EntryPoint};
use crate::bus::Bus;
use crate::events::EventSink;
use crate::virtio;
use crate::console::{EscapeDecoder, FdWriter, RawTerminal};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::{self, Shared, VcpuHandle};
use crate::control::{self, Controller};
use crate::{Error, Result, acpi, cpuid, pci};
use ferro_devices::acpi::{AcpiPm, GED_IRQ, PM_BASE, PM_SIZE};
use ferro_devices::legacy::debug_exit::{DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use ferro_devices::legacy::i8042::{I8042_DATA_PORT, I8042_SIZE};
use ferro_devices::legacy::serial::{COM1_IRQ, COM1_PORT, SERIAL_SIZE};
use ferro_devices::legacy::{DebugExit, I8042, Serial};
use ferro_devices::IrqLine;
use ferro_devices::pci::bus::PciBus;
use ferro_hypervisor::{Hypervisor, ioctl_err};
use ferro_vmm_api::{Transport, VmConfig, VmEvent};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// Where the KVM TSS (three pages) goes: just below the IOAPIC, inside the device hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

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
}

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and the VM fd go before the memory they map.
    vcpus: Vec<VcpuFd>,
    vm: Arc<VmFd>,
    _memory: GuestMemoryMmap,
    serial: Arc<Mutex<Serial>>,
    pm: Arc<Mutex<AcpiPm>>,
    shared: Arc<Shared>,
    devices: virtio::DeviceHandles,
    events: Arc<EventSink>,
}

impl Vm {
    /// Creates the VM, loads the guest and prepares every vCPU. Guest output goes to `serial_out`,
    /// what the supervisor must hear to `events`.
    pub fn new(hv: &Hypervisor, config: VmConfig, serial_out: Box<dyn std::io::Write + Send>, events: Arc<EventSink>) -> Result<Self> {
        let max = hv.max_vcpus().min(usize::from(u8::MAX));
        if config.vcpus == 0 || usize::from(config.vcpus) > max {
            return Err(Error::Config(format!("{} vCPUs requested; this host allows 1 to {max}", config.vcpus)));
        }
        memory::check_size(config.memory.size)?;
        boot::check_cmdline(&config.boot.cmdline)?;
        config.validate().map_err(Error::Config)?;
        if config.memory.hugepages || config.memory.merge {
            return Err(Error::Config("memory: hugepages and merge are not supported by this VMM yet".into()));
        }
        let vm = Arc::new(hv.create_vm()?);
        // Guest RAM goes in before the irqchip: on kvm-pvm a memslot added after
        // KVM_CREATE_IRQCHIP costs ~7 ms instead of ~0.3 ms (measured; KVM then has to
        // synchronize with the irqchip's readers on every slot change).
        let memory = memory::create(&vm, config.memory.size)?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;

        let irq = |gsi: u32| -> Result<IrqLine> {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
            vm.register_irqfd(&fd, gsi).map_err(ioctl_err("KVM_IRQFD"))?;
            Ok(IrqLine(fd))
        };
        let serial = Arc::new(Mutex::new(Serial::new(irq(COM1_IRQ)?, serial_out)));
        let pm = Arc::new(Mutex::new(AcpiPm::new(irq(GED_IRQ)?)));
        let mut pio = Bus::default();
        pio.insert(u64::from(COM1_PORT), u64::from(SERIAL_SIZE), serial.clone());
        pio.insert(u64::from(PM_BASE), u64::from(PM_SIZE), pm.clone());
        if config.debug_exit_enabled() {
            pio.insert(u64::from(DEBUG_EXIT_PORT), u64::from(DEBUG_EXIT_SIZE), Arc::new(Mutex::new(DebugExit)));
        }
        pio.insert(u64::from(I8042_DATA_PORT), u64::from(I8042_SIZE), Arc::new(Mutex::new(I8042)));
        let mut mmio = Bus::default();
        let mut devices = virtio::DeviceHandles::default();
        let mut pci = PciBus::default();
        let mmio_slots = match config.transport {
            Transport::Mmio => virtio::attach_mmio(&vm, &memory, &mut mmio, &config.devices, &mut devices, &events)?,
            Transport::Pci => {
                virtio::attach_pci(&vm, &memory, &mut pci, &config.devices, &mut devices, &events)?;
                Vec::new()
            }
        };
        pci::install(pci, &mut pio, &mut mmio);

        let rsdp = acpi::write_tables(&memory, config.vcpus, &mmio_slots)?;
        let src = BootSource {
            kernel: &config.boot.kernel,
            initrd: config.boot.initrd.as_deref(),
            cmdline: &config.boot.cmdline,
            rsdp,
        };
        let entry: EntryPoint = boot::load(&memory, &src)?;
        boot::regs::write_tables(&memory, entry)?;

        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(index)).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(hv.supported_cpuid(), index, config.vcpus))
                .map_err(ioctl_err("KVM_SET_CPUID2"))?;
            boot::regs::setup_fpu_and_msrs(&fd)?;
            boot::regs::setup_lapic_lint(&fd)?;
            if index == 0 {
                boot::regs::setup_boot_vcpu(&fd, entry)?;
            }
            vcpus.push(fd);
        }
        let shared = Arc::new(Shared {
            pio,
            mmio,
            exit: ExitSignal::new().map_err(|e| Error::Io("eventfd", e))?,
            stop: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            paused: Mutex::new(false),
            pause_flag: AtomicBool::new(false),
            resume: Condvar::new(),
            parked: AtomicUsize::new(0),
        });
        Ok(Vm { config, vcpus, vm, _memory: memory, serial, pm, shared, devices, events })
    }

    /// The KVM VM, for state save/restore.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The vCPUs before they run, for state save/restore.
    pub fn vcpu_fds(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.pm.lock().unwrap_or_else(|p| p.into_inner()).press_power_button()
    }

    /// The serial device, for a console socket.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Runs the VM until it stops.
    pub fn run(mut self, opts: &RunOptions) -> Result<ExitReason> {
        let interactive = opts.interactive;
        vcpu::install_kick_handler().map_err(|e| Error::Io("installing the vCPU kick handler", e))?;
        let signals = SignalFd::block_and_open(&[libc::SIGINT, libc::SIGTERM])?;
        let stdin = std::io::stdin();
        let _raw = if interactive { RawTerminal::enable(stdin.as_fd()) } else { None };
        if _raw.is_some() {
            let to = if self.devices.console_input.is_some() { "the virtio console" } else { "COM1" };
            eprintln!("ferro: console attached to {to}; press Ctrl-A x to quit\r");
        }

        let handles: Vec<Arc<VcpuHandle>> = (0..self.vcpus.len())
            .map(|i| Arc::new(VcpuHandle { started: AtomicBool::new(i == 0) }))
            .collect();
        let mut threads = Vec::new();
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let (shared, handle) = (self.shared.clone(), handles[index].clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run(index as u8, fd, shared, handle))
                .map_err(|e| Error::Io("spawning a vCPU thread", e))?;
            threads.push(t);
        }

        let controller = Arc::new(Controller {
            shared: self.shared.clone(),
            pm: self.pm.clone(),
            vcpu_threads: Mutex::new(threads.iter().map(|t| t.as_pthread_t()).collect()),
            name: self.config.name.clone(),
            vcpus: self.config.vcpus,
            memory: self.config.memory.size,
            devices: self.devices.clone(),
        });
        let served = match &opts.api_socket {
            Some(path) => control::serve(path, controller.clone()).map_err(|e| format!("control socket {}: {e}", path.display())),
            None => Ok(()),
        };
        let reason = match served {
            Ok(()) => {
                self.events.emit(&VmEvent::Started { pid: std::process::id() });
                self.main_loop(&signals, _raw.is_some(), &threads, &handles)
            }
            Err(e) => ExitReason::Error(e),
        };

        self.shared.stop.store(true, Ordering::Release);
        controller.resume();
        // From here on the control socket must not signal these threads.
        controller.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for t in &threads {
            // SAFETY: the pthread handle is valid until join below; the signal has a handler.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
        for t in threads {
            let _ = t.join();
        }
        self.events.emit(&VmEvent::Exited { reason: reason.clone() });
        if opts.exiting {
            defer_kvm_teardown();
        }
        Ok(reason)
    }

    fn main_loop(
        &self,
        signals: &SignalFd,
        interactive: bool,
        threads: &[std::thread::JoinHandle<()>],
        handles: &[Arc<VcpuHandle>],
    ) -> ExitReason {
        let exit_fd = self.shared.exit.event.as_raw_fd();
        let mut decoder = EscapeDecoder::default();
        let mut kick_interval = Duration::from_millis(1);
        loop {
            let aps_waiting = handles.iter().any(|h| !h.started.load(Ordering::Relaxed));
            let timeout = if aps_waiting { kick_interval.as_millis() as i32 } else { -1 };
            let mut fds = vec![
                libc::pollfd { fd: exit_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: signals.0, events: libc::POLLIN, revents: 0 },
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
                for (t, h) in threads.iter().zip(handles) {
                    if !h.started.load(Ordering::Relaxed) {
                        // SAFETY: the thread is alive (joined only after this loop).
                        unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
                    }
                }
                kick_interval = (kick_interval * 2).min(Duration::from_millis(50));
                continue;
            }
            if fds[0].revents != 0 {
                if let Some(reason) = self.shared.exit.take() {
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
                match &self.devices.console_input {
                    // Full pipe: the guest is not reading its console; like a full UART, drop.
                    Some(feed) => drop((&**feed).write(&to_guest)),
                    None => drop(self.serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(&to_guest)),
                }
            }
        }
    }

    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
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

/// Runs `config` with the console on this process's stdout (and stdin when it is a terminal).
pub fn run_foreground(hv: &Hypervisor, config: VmConfig) -> Result<ExitReason> {
    let vm = Vm::new(hv, config, Box::new(FdWriter(1)), EventSink::none())?;
    vm.run(&RunOptions { interactive: true, exiting: true, ..Default::default() })
}

/// Blocks the given signals for the whole process (threads spawned later inherit the mask) and
/// reads them from a signalfd instead.
struct SignalFd(i32);

impl SignalFd {
    fn block_and_open(signals: &[i32]) -> Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
        }
        // SAFETY: `set` is initialised; the old mask is not needed.
        if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
            return Err(Error::Io("blocking signals", std::io::Error::last_os_error()));
        }
        // SAFETY: creates a new fd from a valid mask.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io("signalfd", std::io::Error::last_os_error()));
        }
        Ok(SignalFd(fd))
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe { libc::read(self.0, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}
