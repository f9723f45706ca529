//! Attaching virtio devices to a VM: which transport, where each device's registers and
//! interrupt go, and the KVM ioeventfds/irqfds that keep kicks and interrupts off the vCPU exit
//! path.

use crate::acpi::MmioSlot;
use crate::bus::Bus;
use crate::events::EventSink;
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use crate::pci::{FIRST_MSI_GSI, GsiRoutes, KvmIoEvents, PCI_MMIO_WINDOW};
use ferro_devices::IrqLine;
use ferro_devices::pci::bus::PciBus;
use ferro_devices::pci::msix::{MsiRoutes, MsixVector};
use ferro_devices::virtio::pci::{BAR_SIZE, PciResources, VirtioPciTransport};
use ferro_devices::virtio::mmio::{MMIO_WINDOW, MmioTransport, QUEUE_NOTIFY};
use ferro_devices::virtio::balloon::{Balloon, BalloonControl};
use ferro_devices::virtio::block::{Block, BlockCounters};
use ferro_devices::virtio::console::{Console, ConsoleIo};
use ferro_devices::virtio::net::NetCounters;
use ferro_devices::virtio::{VirtioDevice, net::Net, rng::Rng, vsock::Vsock};
use ferro_hypervisor::ioctl_err;
use ferro_vmm_api::control::{DiskStats, NicStats};
use ferro_vmm_api::{ConsoleBackend, DeviceConfig, DeviceKind, MacAddr};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// First virtio-mmio window, inside the 32-bit device hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// GSIs 16..24 of the IOAPIC are free of ISA legacy; one per virtio-mmio device.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
pub const VIRTIO_MMIO_MAX: usize = 8;

/// Handles to devices the VMM controls while the VM runs (the control socket uses them).
#[derive(Clone, Default)]
pub struct DeviceHandles {
    pub balloon: Option<Arc<BalloonControl>>,
    /// With a virtio console on stdio: where the VMM's stdin reader sends the terminal's input
    /// (instead of COM1). stdin is one per process, so there is at most one such console.
    pub console_input: Option<Arc<std::fs::File>>,
    /// Each disk's id and request counters, in configuration order.
    pub disks: Vec<(String, Arc<BlockCounters>)>,
    /// Each NIC's id, MAC and traffic counters, in configuration order.
    pub nics: Vec<(String, MacAddr, Arc<NetCounters>)>,
}

impl DeviceHandles {
    pub fn disk_stats(&self) -> Vec<DiskStats> {
        self.disks.iter().map(|(id, c)| c.stats(id)).collect()
    }

    pub fn nic_stats(&self) -> Vec<NicStats> {
        self.nics.iter().map(|(id, mac, c)| c.stats(id, &mac.to_string())).collect()
    }
}

fn build(config: &DeviceConfig, handles: &mut DeviceHandles) -> Result<Box<dyn VirtioDevice>> {
    let id = &config.id;
    match &config.kind {
        DeviceKind::Rng { rate } => Ok(Box::new(Rng::new(*rate))),
        DeviceKind::Balloon { size_mib, deflate_on_oom } => {
            if handles.balloon.is_some() {
                return Err(Error::Config("only one balloon device is supported".into()));
            }
            let balloon = Balloon::new(*size_mib, *deflate_on_oom).map_err(|e| Error::Io("eventfd", e))?;
            handles.balloon = Some(balloon.control());
            Ok(Box::new(balloon))
        }
        DeviceKind::Net { tap, mac } => {
            let net = Net::new(tap, *mac).map_err(|e| Error::Config(format!("{id}: --net tap={tap}: {e}")))?;
            handles.nics.push((id.clone(), net.mac(), net.counters()));
            Ok(Box::new(net))
        }
        DeviceKind::Block { path, format, readonly } => {
            let block = Block::new(path, *format, *readonly).map_err(|e| Error::Config(format!("{id}: {e}")))?;
            handles.disks.push((id.clone(), block.counters()));
            Ok(Box::new(block))
        }
        DeviceKind::Console { backend } => {
            let io = match backend {
                ConsoleBackend::Stdio => {
                    if handles.console_input.is_some() {
                        return Err(Error::Config("only one virtio console can be on stdio".into()));
                    }
                    let (input, feed) = console_pipe()?;
                    handles.console_input = Some(Arc::new(feed));
                    ConsoleIo::Stdio { input }
                }
                ConsoleBackend::Pty => ConsoleIo::Pty,
                ConsoleBackend::Socket(path) => ConsoleIo::Socket(path.clone()),
            };
            Ok(Box::new(Console::new(io).map_err(|e| Error::Config(format!("{id}: --console: {e}")))?))
        }
        DeviceKind::Vsock { cid, uds } => {
            Ok(Box::new(Vsock::new(*cid, uds).map_err(|e| Error::Config(format!("{id}: --vsock uds: {e}")))?))
        }
    }
}

/// A pipe from the VMM's stdin reader to a stdio console: (read end, write end). The write end is
/// nonblocking so a guest that never reads cannot stall the VMM's main loop (input is dropped).
fn console_pipe() -> Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and belong to nobody else.
    let (read, write) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFL on the write end we own.
    unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((read, write))
}

/// Attaches every configured device on virtio-mmio; returns their slots for ACPI and fills in
/// `handles`.
pub fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    configs: &[DeviceConfig],
    handles: &mut DeviceHandles,
    events: &Arc<EventSink>,
) -> Result<Vec<MmioSlot>> {
    if configs.len() > VIRTIO_MMIO_MAX {
        return Err(Error::Config(format!("{} virtio devices requested; at most {VIRTIO_MMIO_MAX} fit on virtio-mmio", configs.len())));
    }
    let mut slots = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let slot = MmioSlot { base: VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW, size: MMIO_WINDOW, gsi: VIRTIO_MMIO_FIRST_GSI + i as u32 };
        let device = build(config, handles)?;
        let mut kicks = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY), q as u32)
                .map_err(ioctl_err("KVM_IOEVENTFD"))?;
            kicks.push(kick);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
        vm.register_irqfd(&irq, slot.gsi).map_err(ioctl_err("KVM_IRQFD"))?;
        let report = events.needs_reset_report(&config.id);
        let transport = MmioTransport::new(device, mem.clone(), IrqLine(irq), kicks, report).map_err(Error::Internal)?;
        bus.insert(slot.base, slot.size, Arc::new(Mutex::new(transport)));
        slots.push(slot);
    }
    Ok(slots)
}

/// Attaches every configured device as a virtio-pci function on `bus`: BAR 0 of device i at
/// the i-th 32 KiB of the PCI window, one MSI-X vector (a GSI with an irqfd) per queue plus one
/// for configuration changes. Kick ioeventfds are registered by the transport when the guest
/// enables memory decoding.
pub fn attach_pci(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    bus: &mut PciBus,
    configs: &[DeviceConfig],
    handles: &mut DeviceHandles,
    events: &Arc<EventSink>,
) -> Result<()> {
    let routes: Arc<dyn MsiRoutes> = Arc::new(GsiRoutes::new(vm.clone()));
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e));
    let mut gsi = FIRST_MSI_GSI;
    for (i, config) in configs.iter().enumerate() {
        let device = build(config, handles)?;
        let queues = device.queue_max_sizes().len();
        let kicks = (0..queues).map(|_| eventfd()).collect::<Result<Vec<_>>>()?;
        let mut vectors = Vec::with_capacity(queues + 1);
        for _ in 0..=queues {
            let irq = eventfd()?;
            vm.register_irqfd(&irq, gsi).map_err(ioctl_err("KVM_IRQFD"))?;
            vectors.push(MsixVector { gsi, irq: IrqLine(irq) });
            gsi += 1;
        }
        let resources = PciResources {
            bar: PCI_MMIO_WINDOW.start + i as u64 * BAR_SIZE,
            window: PCI_MMIO_WINDOW,
            kicks,
            vectors,
            routes: routes.clone(),
            ioevents: Box::new(KvmIoEvents(vm.clone())),
            report: events.needs_reset_report(&config.id),
        };
        let transport = VirtioPciTransport::new(device, mem.clone(), resources).map_err(Error::Internal)?;
        if bus.add(Arc::new(Mutex::new(transport))).is_none() {
            return Err(Error::Config(format!("{} virtio devices requested; PCI bus 0 has room for 31", configs.len())));
        }
    }
    Ok(())
}
