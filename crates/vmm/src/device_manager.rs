//! Every device of one VM, keyed by id: COM1, the ACPI power management block, the i8042 reset
//! line, the debug-exit port (test guests only), the PCI host bridge and its configuration ports,
//! and the configuration's virtio devices on their transport. The manager builds them, places
//! them through the [`ResourceAllocator`], wires their kicks and interrupts to KVM (ioeventfds
//! and irqfds, so the hot path never exits to userspace), maps them on the buses the vCPUs
//! dispatch to, and pauses, saves, restores and shuts them down as one.

use crate::acpi::MmioSlot;
use crate::bus::Bus;
use crate::events::EventSink;
use crate::memory::GuestMemoryMmap;
use crate::pci::{GsiRoutes, KvmIoEvents, PCI_MMIO_WINDOW};
use crate::resources::{ResourceAllocator, ResourceState};
use crate::virtio::{self, DeviceHandles, DiskOpening};
use crate::{Error, Result};
use ferro_devices::IrqLine;
use ferro_devices::acpi::{AcpiPm, AcpiPmState, GED_IRQ, PM_BASE, PM_SIZE};
use ferro_devices::legacy::debug_exit::{DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use ferro_devices::legacy::i8042::{I8042_DATA_PORT, I8042_SIZE};
use ferro_devices::legacy::serial::{COM1_IRQ, COM1_PORT, SERIAL_SIZE};
use ferro_devices::legacy::{DebugExit, I8042, Serial, SerialState};
use ferro_devices::pci::HostBridge;
use ferro_devices::pci::bus::{PciBus, PciConfigIo, PciConfigIoState};
use ferro_devices::pci::config::ConfigSpaceState;
use ferro_devices::pci::msix::{MsiRoutes, MsixVector};
use ferro_devices::state::Persist;
use ferro_devices::virtio::mmio::{MmioState, MmioTransport, QUEUE_NOTIFY};
use ferro_devices::virtio::pci::{PciResources, VirtioPciState, VirtioPciTransport};
use ferro_hypervisor::ioctl_err;
use ferro_vmm_api::{DeviceConfig, Transport, VmConfig};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::EventFd;

/// The ids of the built-in devices; configured devices may not take them.
pub const COM1: &str = "com1";
pub const ACPI_PM: &str = "acpi-pm";
pub const I8042_ID: &str = "i8042";
pub const DEBUG_EXIT: &str = "debug-exit";
pub const PCI_HOST_BRIDGE: &str = "pci-host-bridge";
pub const PCI_CONFIG_PORTS: &str = "pci-config-ports";
const BUILT_IN: [&str; 6] = [COM1, ACPI_PM, I8042_ID, DEBUG_EXIT, PCI_HOST_BRIDGE, PCI_CONFIG_PORTS];

/// One device's saved state, by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Serial(SerialState),
    AcpiPm(AcpiPmState),
    I8042,
    DebugExit,
    PciHostBridge(ConfigSpaceState),
    PciConfigPorts(PciConfigIoState),
    VirtioMmio(MmioState),
    VirtioPci(VirtioPciState),
}

impl DeviceState {
    fn kind(&self) -> &'static str {
        match self {
            DeviceState::Serial(_) => "serial",
            DeviceState::AcpiPm(_) => "acpi_pm",
            DeviceState::I8042 => "i8042",
            DeviceState::DebugExit => "debug_exit",
            DeviceState::PciHostBridge(_) => "pci_host_bridge",
            DeviceState::PciConfigPorts(_) => "pci_config_ports",
            DeviceState::VirtioMmio(_) => "virtio_mmio",
            DeviceState::VirtioPci(_) => "virtio_pci",
        }
    }
}

/// Every device's state by id, and the placement they were given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceManagerState {
    pub resources: ResourceState,
    pub devices: BTreeMap<String, DeviceState>,
}

/// A virtio device on its transport.
enum VirtioTransport {
    Mmio(Arc<Mutex<MmioTransport>>),
    Pci(Arc<Mutex<VirtioPciTransport>>),
}

/// The buses the vCPU threads dispatch port I/O and MMIO exits to.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

pub struct DeviceManager {
    serial: Arc<Mutex<Serial>>,
    pm: Arc<Mutex<AcpiPm>>,
    i8042: Arc<Mutex<I8042>>,
    debug_exit: Option<Arc<Mutex<DebugExit>>>,
    host_bridge: Arc<Mutex<HostBridge>>,
    config_ports: Arc<Mutex<PciConfigIo>>,
    /// In configuration order.
    virtio: Vec<(String, VirtioTransport)>,
    resources: ResourceState,
    handles: DeviceHandles,
}

/// Locks a device, recovering from a poisoned lock (a panic elsewhere must not take the VMM's
/// control of every other device with it).
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))
}

/// An eventfd registered with KVM as the irqfd of `gsi`.
fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine> {
    let fd = eventfd()?;
    vm.register_irqfd(&fd, gsi).map_err(ioctl_err("KVM_IRQFD"))?;
    Ok(IrqLine(fd))
}

impl DeviceManager {
    /// Builds every device of `config` (opening what they use on the host, writable disks as
    /// `disks` says) and the buses that reach them; placement comes from `resources` (a restored
    /// VM's saved allocator).
    pub fn new(
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        config: &VmConfig,
        mut resources: ResourceAllocator,
        serial_out: Box<dyn std::io::Write + Send>,
        events: &Arc<EventSink>,
        disks: DiskOpening,
    ) -> Result<(DeviceManager, Buses)> {
        if let Some(d) = config.devices.iter().find(|d| BUILT_IN.contains(&d.id.as_str())) {
            return Err(Error::Config(format!("device id {:?} is taken by a built-in device ({})", d.id, BUILT_IN.join(", "))));
        }
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let serial = Arc::new(Mutex::new(Serial::new(irq_line(vm, COM1_IRQ)?, serial_out)));
        let pm = Arc::new(Mutex::new(AcpiPm::new(irq_line(vm, GED_IRQ)?)));
        let i8042 = Arc::new(Mutex::new(I8042));
        pio.insert(u64::from(COM1_PORT), u64::from(SERIAL_SIZE), serial.clone());
        pio.insert(u64::from(PM_BASE), u64::from(PM_SIZE), pm.clone());
        pio.insert(u64::from(I8042_DATA_PORT), u64::from(I8042_SIZE), i8042.clone());
        let debug_exit = config.debug_exit_enabled().then(|| Arc::new(Mutex::new(DebugExit)));
        if let Some(d) = &debug_exit {
            pio.insert(u64::from(DEBUG_EXIT_PORT), u64::from(DEBUG_EXIT_SIZE), d.clone());
        }

        let mut handles = DeviceHandles::default();
        let mut pci = PciBus::default();
        let host_bridge = pci.host_bridge();
        let routes: Arc<dyn MsiRoutes> = Arc::new(GsiRoutes::new(vm.clone()));
        let mut virtio = Vec::with_capacity(config.devices.len());
        for dc in &config.devices {
            let transport = match config.transport {
                Transport::Mmio => VirtioTransport::Mmio(attach_mmio(vm, mem, dc, &mut resources, &mut mmio, &mut handles, disks, events)?),
                Transport::Pci => VirtioTransport::Pci(attach_pci(vm, mem, dc, &mut resources, &mut pci, &routes, &mut handles, disks, events)?),
            };
            virtio.push((dc.id.clone(), transport));
        }
        let config_ports = crate::pci::install(pci, &mut pio, &mut mmio);
        let manager = DeviceManager {
            serial,
            pm,
            i8042,
            debug_exit,
            host_bridge,
            config_ports,
            virtio,
            resources: resources.state().clone(),
            handles,
        };
        Ok((manager, Buses { pio, mmio }))
    }

    /// The virtio-mmio windows, in configuration order, for the DSDT.
    pub fn mmio_slots(&self) -> Vec<MmioSlot> {
        self.virtio
            .iter()
            .filter_map(|(id, _)| match self.resources.placements.get(id) {
                Some(crate::resources::Placement::Mmio(slot)) => Some(*slot),
                _ => None,
            })
            .collect()
    }

    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    pub fn acpi_pm(&self) -> Arc<Mutex<AcpiPm>> {
        self.pm.clone()
    }

    pub fn handles(&self) -> &DeviceHandles {
        &self.handles
    }

    /// Stops every device worker; no device touches guest memory until [`resume`](Self::resume).
    pub fn pause(&self) {
        for (_, t) in &self.virtio {
            match t {
                VirtioTransport::Mmio(t) => lock(t).pause(),
                VirtioTransport::Pci(t) => lock(t).pause(),
            }
        }
    }

    /// Lets every device run again (and activates restored ones).
    pub fn resume(&self) -> Result<()> {
        for (id, t) in &self.virtio {
            let resumed = match t {
                VirtioTransport::Mmio(t) => lock(t).resume(),
                VirtioTransport::Pci(t) => lock(t).resume(),
            };
            resumed.map_err(|e| Error::Internal(format!("device {id}: {e}")))?;
        }
        Ok(())
    }

    /// Every device's state; call it paused.
    /// Where each device was placed (MMIO window, PCI slot, BARs, GSIs).
    pub fn resources(&self) -> &ResourceState {
        &self.resources
    }

    pub fn save(&self) -> DeviceManagerState {
        let mut devices = BTreeMap::new();
        devices.insert(COM1.to_owned(), DeviceState::Serial(lock(&self.serial).save()));
        devices.insert(ACPI_PM.to_owned(), DeviceState::AcpiPm(lock(&self.pm).save()));
        devices.insert(I8042_ID.to_owned(), DeviceState::I8042);
        if self.debug_exit.is_some() {
            devices.insert(DEBUG_EXIT.to_owned(), DeviceState::DebugExit);
        }
        devices.insert(PCI_HOST_BRIDGE.to_owned(), DeviceState::PciHostBridge(lock(&self.host_bridge).save()));
        devices.insert(PCI_CONFIG_PORTS.to_owned(), DeviceState::PciConfigPorts(lock(&self.config_ports).save()));
        for (id, t) in &self.virtio {
            let state = match t {
                VirtioTransport::Mmio(t) => DeviceState::VirtioMmio(lock(t).save()),
                VirtioTransport::Pci(t) => DeviceState::VirtioPci(lock(t).save()),
            };
            devices.insert(id.clone(), state);
        }
        DeviceManagerState { resources: self.resources.clone(), devices }
    }

    /// Applies saved states to the devices of the same ids (built from the configuration the
    /// state was saved under, with its saved placement). Every device must have a state of its
    /// kind and every state a device: anything else is an error naming the device.
    pub fn restore(&self, state: &DeviceManagerState) -> Result<()> {
        let mine = self.ids();
        if let Some(extra) = state.devices.keys().find(|id| !mine.contains(id)) {
            return Err(Error::Config(format!("saved device {extra:?} is not in this VM's configuration")));
        }
        let bad = |id: &str, s: &DeviceState| Error::Config(format!("device {id}: saved state of a {} device does not fit it", s.kind()));
        fn fail(id: &str) -> impl Fn(String) -> Error + '_ {
            move |e| Error::Config(format!("device {id}: {e}"))
        }
        for id in &mine {
            let Some(s) = state.devices.get(id) else {
                return Err(Error::Config(format!("device {id:?} has no saved state")));
            };
            match (id.as_str(), s) {
                (COM1, DeviceState::Serial(s)) => lock(&self.serial).restore(s).map_err(fail(id))?,
                (ACPI_PM, DeviceState::AcpiPm(s)) => lock(&self.pm).restore(s).map_err(fail(id))?,
                (I8042_ID, DeviceState::I8042) => lock(&self.i8042).restore(&()).map_err(fail(id))?,
                (DEBUG_EXIT, DeviceState::DebugExit) => {}
                (PCI_HOST_BRIDGE, DeviceState::PciHostBridge(s)) => lock(&self.host_bridge).restore(s).map_err(fail(id))?,
                (PCI_CONFIG_PORTS, DeviceState::PciConfigPorts(s)) => lock(&self.config_ports).restore(s).map_err(fail(id))?,
                (id, s) => match (self.virtio.iter().find(|(v, _)| v == id).map(|(_, t)| t), s) {
                    (Some(VirtioTransport::Mmio(t)), DeviceState::VirtioMmio(s)) => lock(t).restore(s).map_err(fail(id))?,
                    (Some(VirtioTransport::Pci(t)), DeviceState::VirtioPci(s)) => lock(t).restore(s).map_err(fail(id))?,
                    _ => return Err(bad(id, s)),
                },
            }
        }
        Ok(())
    }

    /// Ends every device for good: workers stop, disks are flushed and closed. The VM is over.
    pub fn shutdown(&self) {
        for (_, t) in &self.virtio {
            match t {
                VirtioTransport::Mmio(t) => lock(t).shutdown(),
                VirtioTransport::Pci(t) => lock(t).shutdown(),
            }
        }
    }

    /// The ids of every device this VM has.
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = [COM1, ACPI_PM, I8042_ID, PCI_HOST_BRIDGE, PCI_CONFIG_PORTS].map(str::to_owned).to_vec();
        if self.debug_exit.is_some() {
            ids.push(DEBUG_EXIT.to_owned());
        }
        ids.extend(self.virtio.iter().map(|(id, _)| id.clone()));
        ids
    }
}

/// Puts device `config` on virtio-mmio: its window on the MMIO bus, a KVM ioeventfd per queue on
/// QueueNotify (datamatch = queue index), its interrupt an irqfd on its pin.
#[allow(clippy::too_many_arguments)]
fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &DeviceConfig,
    resources: &mut ResourceAllocator,
    bus: &mut Bus,
    handles: &mut DeviceHandles,
    disks: DiskOpening,
    events: &Arc<EventSink>,
) -> Result<Arc<Mutex<MmioTransport>>> {
    let slot = resources.mmio(&config.id)?;
    let device = virtio::build(config, handles, disks)?;
    let mut kicks = Vec::new();
    for q in 0..device.queue_max_sizes().len() {
        let kick = eventfd()?;
        vm.register_ioevent(&kick, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY), q as u32).map_err(ioctl_err("KVM_IOEVENTFD"))?;
        kicks.push(kick);
    }
    let irq = irq_line(vm, slot.gsi)?;
    let report = events.needs_reset_report(&config.id);
    let transport = Arc::new(Mutex::new(MmioTransport::new(device, mem.clone(), irq, kicks, report).map_err(Error::Internal)?));
    bus.insert(slot.base, slot.size, transport.clone());
    Ok(transport)
}

/// Puts device `config` on PCI bus 0 as a virtio-pci function: BAR 0 where the allocator says,
/// one MSI-X vector (a GSI with an irqfd) per queue plus one for configuration changes. Kick
/// ioeventfds are registered by the transport when the guest enables memory decoding.
#[allow(clippy::too_many_arguments)]
fn attach_pci(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    config: &DeviceConfig,
    resources: &mut ResourceAllocator,
    bus: &mut PciBus,
    routes: &Arc<dyn MsiRoutes>,
    handles: &mut DeviceHandles,
    disks: DiskOpening,
    events: &Arc<EventSink>,
) -> Result<Arc<Mutex<VirtioPciTransport>>> {
    let device = virtio::build(config, handles, disks)?;
    let queues = device.queue_max_sizes().len();
    let placement = resources.pci(&config.id, queues + 1)?;
    let kicks = (0..queues).map(|_| eventfd()).collect::<Result<Vec<_>>>()?;
    let vectors = placement.gsis.iter().map(|&gsi| Ok(MsixVector { gsi, irq: irq_line(vm, gsi)? })).collect::<Result<Vec<_>>>()?;
    let res = PciResources {
        bar: placement.bar,
        window: PCI_MMIO_WINDOW,
        kicks,
        vectors,
        routes: routes.clone(),
        ioevents: Box::new(KvmIoEvents(vm.clone())),
        report: events.needs_reset_report(&config.id),
    };
    let transport = Arc::new(Mutex::new(VirtioPciTransport::new(device, mem.clone(), res).map_err(Error::Internal)?));
    bus.insert(placement.device, transport.clone()).map_err(|e| Error::Internal(format!("{}: {e}", config.id)))?;
    Ok(transport)
}
