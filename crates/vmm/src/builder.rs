//! The two ways to build a VM: [`VmBuilder::boot`] from a configuration (fresh memory, ACPI
//! tables, a kernel loaded, the boot vCPU at its entry point) and [`VmBuilder::restore`] from a
//! saved state (memory filled from its file, no kernel or tables written: the memory already
//! holds them; devices built from the same configuration, then their saved state applied; every
//! vCPU's state written on its own thread). Either way the result is a paused [`Vm`] whose
//! [`run`](Vm::run) resumes it.

use crate::boot::{self, BootSource};
use crate::device_manager::DeviceManager;
use crate::events::EventSink;
use crate::exit::ExitSignal;
use crate::memory::{self, GuestMemoryMmap};
use crate::resources::{ResourceAllocator, ResourceState};
use crate::snapshot::{self, CpuFeatures, SnapshotState};
use crate::state::{SAVED_VM_VERSION, SavedVm};
use crate::vcpu::{self, Shared, Vcpus};
use crate::virtio::DiskOpening;
use crate::vm::{Start, Vm, VmControl, VmParts};
use crate::{Error, Result, acpi, cpuid, signals};
use ferro_hypervisor::{Hypervisor, ioctl_err};
use ferro_vmm_api::VmConfig;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Where the KVM TSS (three pages) goes: just below the IOAPIC, inside the device hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Builds one VM on an open `/dev/kvm`.
pub struct VmBuilder<'a> {
    hv: &'a Hypervisor,
    serial_out: Box<dyn Write + Send>,
    events: Arc<EventSink>,
}

/// A VM fd with its RAM registered and its in-kernel devices created.
struct Base {
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

impl<'a> VmBuilder<'a> {
    /// Guest console output is dropped and events go nowhere until set otherwise.
    pub fn new(hv: &'a Hypervisor) -> Self {
        VmBuilder { hv, serial_out: Box::new(std::io::sink()), events: EventSink::none() }
    }

    /// Where COM1's output goes.
    pub fn serial_out(mut self, out: Box<dyn Write + Send>) -> Self {
        self.serial_out = out;
        self
    }

    /// Where the supervisor hears about the VM (a device needing a reset, the VM ending).
    pub fn events(mut self, events: Arc<EventSink>) -> Self {
        self.events = events;
        self
    }

    /// A VM booted or restored, as `start` says.
    pub fn build(self, start: Start) -> Result<Vm> {
        match start {
            Start::Boot(config) => self.boot(config),
            Start::Restore(dir) => self.restore_snapshot(dir, None),
            Start::RestoreRewired(dir, config) => self.restore_snapshot(dir, Some(&config)),
        }
    }

    /// A new VM booting `config`'s kernel.
    pub fn boot(self, config: VmConfig) -> Result<Vm> {
        self.check(&config)?;
        let memory = memory::create(&config.memory, memory::Source::Fresh)?;
        let Base { vm, memory } = self.base(memory)?;
        let (devices, buses) =
            DeviceManager::new(&vm, &memory, &config, ResourceAllocator::new(), self.serial_out, &self.events, DiskOpening::Now)?;
        let rsdp = acpi::write_tables(&memory, config.vcpus, &devices.mmio_slots())?;
        let src = BootSource { kernel: &config.boot.kernel, initrd: config.boot.initrd.as_deref(), cmdline: &config.boot.cmdline, rsdp };
        let entry = boot::load(&memory, &src)?;
        boot::regs::write_tables(&memory, entry)?;
        let fds = create_vcpus(self.hv, &vm, config.vcpus)?;
        boot::regs::setup_boot_vcpu(&fds[0], entry)?;
        let started: Vec<bool> = (0..fds.len()).map(|i| i == 0).collect();
        let shared = new_shared(buses)?;
        let vcpus = Vcpus::spawn(fds, &shared, msr_list(self.hv)?, &started).map_err(|e| Error::Io("spawning a vCPU thread", e))?;
        let features = host_features(self.hv, config.vcpus);
        pinned(VmControl::new(VmParts { config, cpu_features: features, vcpus, devices, shared, events: self.events, vm, memory }))
    }

    /// The VM saved in snapshot directory `dir` (docs/snapshot-format.md), wired to this host
    /// by `wiring` when given (see [`VmConfig::rewired`]).
    pub fn restore_snapshot(self, dir: &Path, wiring: Option<&VmConfig>) -> Result<Vm> {
        let mut state = snapshot::load(dir).map_err(Error::Config)?;
        if let Some(given) = wiring {
            state.config = state.config.rewired(given).map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
        }
        self.restore(state, &snapshot::memory_path(dir))
    }

    /// The VM `state` describes, built from the configuration it was saved under, its RAM
    /// made from `memory_file` (written by [`VmControl::save_memory`]). Refused
    /// when this host lacks a CPU feature the guest was given.
    pub fn restore(self, state: SnapshotState, memory_file: &Path) -> Result<Vm> {
        self.restore_with(state, |config| memory::create(&config.memory, memory::Source::File(memory_file)))
    }

    /// The VM `state` describes, its RAM made by `memory` once the state has checked out.
    fn restore_with(self, state: SnapshotState, memory: impl FnOnce(&VmConfig) -> Result<GuestMemoryMmap>) -> Result<Vm> {
        let SnapshotState { config, cpu_features, vm: saved } = state;
        check_saved(&saved, &config)?;
        self.check_restorable(&config, &cpu_features)?;
        let memory = memory(&config)?;
        let resources = saved.devices.resources.clone();
        self.prepare_restore(config, cpu_features, resources, memory, DiskOpening::Now)?.restore(saved)
    }

    /// Everything of a restored VM but its saved state: `memory` registered, the in-kernel
    /// devices, the devices placed by `resources` as the saved VM had them, and paused vCPU
    /// threads. A migration's destination builds this while memory still arrives, so that only
    /// applying the state (and opening the writable disks, `DiskOpening::Later`) is left for
    /// the switch-over.
    pub(crate) fn prepare_restore(
        self,
        config: VmConfig,
        cpu_features: CpuFeatures,
        resources: ResourceState,
        memory: GuestMemoryMmap,
        disks: DiskOpening,
    ) -> Result<Unrestored> {
        self.check_restorable(&config, &cpu_features)?;
        let Base { vm, memory } = self.base(memory)?;
        let (devices, buses) =
            DeviceManager::new(&vm, &memory, &config, ResourceAllocator::restored(resources), self.serial_out, &self.events, disks)?;
        let fds = create_vcpus(self.hv, &vm, config.vcpus)?;
        let shared = new_shared(buses)?;
        let vcpus = Vcpus::spawn(fds, &shared, msr_list(self.hv)?, &vec![false; usize::from(config.vcpus)])
            .map_err(|e| Error::Io("spawning a vCPU thread", e))?;
        Ok(Unrestored(VmParts { config, cpu_features, vcpus, devices, shared, events: self.events, vm, memory }))
    }

    /// Refuses a VM this host cannot take over: a configuration it cannot run, or CPU features
    /// the guest was given that this host lacks (guest code may already use them).
    pub(crate) fn check_restorable(&self, config: &VmConfig, cpu_features: &CpuFeatures) -> Result<()> {
        self.check(config)?;
        let missing = cpu_features.missing_on(&host_features(self.hv, config.vcpus));
        if !missing.is_empty() {
            return Err(Error::Config(format!("this host's CPU lacks features the saved guest was given: {}", missing.join(", "))));
        }
        Ok(())
    }

    /// Refuses a configuration this host or this VMM cannot run, before anything is built, and
    /// readies the process for VM threads.
    fn check(&self, config: &VmConfig) -> Result<()> {
        let max = self.hv.max_vcpus().min(usize::from(u8::MAX));
        if config.vcpus == 0 || usize::from(config.vcpus) > max {
            return Err(Error::Config(format!("{} vCPUs requested; this host allows 1 to {max}", config.vcpus)));
        }
        memory::check_size(config.memory.size)?;
        boot::check_cmdline(&config.boot.cmdline)?;
        config.validate().map_err(Error::Config)?;
        // Threads started from here on (vCPUs, device workers, sockets) inherit the mask, so
        // SIGINT and SIGTERM reach only the run loop's signalfd.
        signals::block_exit_signals()?;
        vcpu::install_kick_handler().map_err(|e| Error::Io("installing the vCPU kick handler", e))
    }

    /// A VM with `memory` registered, the TSS placed, and the in-kernel irqchip and PIT.
    fn base(&self, memory: GuestMemoryMmap) -> Result<Base> {
        let vm = Arc::new(self.hv.create_vm()?);
        // Guest RAM goes in before the irqchip: on kvm-pvm a memslot added after
        // KVM_CREATE_IRQCHIP costs ~7 ms instead of ~0.3 ms (measured; KVM then has to
        // synchronize with the irqchip's readers on every slot change).
        memory::register(&vm, &memory)?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        Ok(Base { vm, memory })
    }
}

/// Refuses a saved VM of another version, or with another vCPU count than `config`.
fn check_saved(saved: &SavedVm, config: &VmConfig) -> Result<()> {
    if saved.version != SAVED_VM_VERSION {
        return Err(Error::Config(format!("saved VM state version {}: this VMM reads version {SAVED_VM_VERSION}", saved.version)));
    }
    if saved.vcpus.len() != usize::from(config.vcpus) {
        return Err(Error::Config(format!("the saved VM has {} vCPUs, the configuration {}", saved.vcpus.len(), config.vcpus)));
    }
    Ok(())
}

/// A restored VM built but for its saved state (see [`VmBuilder::prepare_restore`]).
pub(crate) struct Unrestored(VmParts);

impl Unrestored {
    /// Guest RAM, to fill before the state is applied.
    pub(crate) fn memory(&self) -> &GuestMemoryMmap {
        &self.0.memory
    }

    /// The disks' handles, in the configuration's order (a migration's destination writes the
    /// disks it receives through them).
    pub(crate) fn disks(&self) -> Vec<ferro_devices::virtio::block::BlockDisk> {
        self.0.devices.handles().disk_images.clone()
    }

    /// Applies `saved` (KVM's VM-wide state, the devices', every vCPU's on its own thread): a
    /// paused VM. Refused when `saved` is of another version, another vCPU count, or placed its
    /// devices elsewhere than this VM was built with.
    pub(crate) fn restore(self, saved: SavedVm) -> Result<Vm> {
        let parts = self.0;
        check_saved(&saved, &parts.config)?;
        if &saved.devices.resources != parts.devices.resources() {
            return Err(Error::Config("the saved VM's devices are placed otherwise than announced".into()));
        }
        saved.kvm.restore(&parts.vm)?;
        parts.devices.restore(&saved.devices)?;
        parts.vcpus.restore(saved.vcpus).map_err(Error::Internal)?;
        pinned(VmControl::new(parts))
    }
}

/// The built VM, its threads placed on the host CPUs its configuration pins them to.
fn pinned(control: VmControl) -> Result<Vm> {
    control.apply_pinning().map_err(Error::Config)?;
    Ok(Vm::new(control))
}

/// Creates every vCPU with its CPUID, FPU, MSRs and LAPIC LINT pins (what any guest expects at
/// reset; a restore then overwrites it).
fn create_vcpus(hv: &Hypervisor, vm: &VmFd, count: u8) -> Result<Vec<VcpuFd>> {
    (0..count)
        .map(|index| {
            let fd = vm.create_vcpu(u64::from(index)).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(hv.supported_cpuid(), index, count)).map_err(ioctl_err("KVM_SET_CPUID2"))?;
            boot::regs::setup_fpu_and_msrs(&fd)?;
            boot::regs::setup_lapic_lint(&fd)?;
            Ok(fd)
        })
        .collect()
}

fn new_shared(buses: crate::device_manager::Buses) -> Result<Arc<Shared>> {
    Ok(Arc::new(Shared {
        pio: buses.pio,
        mmio: buses.mmio,
        exit: ExitSignal::new().map_err(|e| Error::Io("eventfd", e))?,
        exits: AtomicU64::new(0),
    }))
}

/// The CPU features a guest of `vcpus` vCPUs gets on this host.
fn host_features(hv: &Hypervisor, vcpus: u8) -> CpuFeatures {
    CpuFeatures::from_cpuid(&cpuid::for_vcpu(hv.supported_cpuid(), 0, vcpus))
}

/// The MSRs a vCPU's saved state holds: every one KVM can save (KVM_GET_MSR_INDEX_LIST).
fn msr_list(hv: &Hypervisor) -> Result<Arc<Vec<u32>>> {
    let list = hv.kvm().get_msr_index_list().map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(Arc::new(list.as_slice().to_vec()))
}
