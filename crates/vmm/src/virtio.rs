//! Attaching virtio devices to a VM: which transport, where each device's registers and
//! interrupt go, and the KVM ioeventfds/irqfds that keep kicks and interrupts off the vCPU exit
//! path.

use crate::acpi::MmioSlot;
use crate::bus::Bus;
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use ferro_devices::IrqLine;
use ferro_devices::virtio::mmio::{MMIO_WINDOW, MmioTransport, QUEUE_NOTIFY};
use ferro_devices::virtio::balloon::{Balloon, BalloonControl};
use ferro_devices::virtio::block::Block;
use ferro_devices::virtio::{VirtioDevice, net::Net, rng::Rng};
use ferro_hypervisor::ioctl_err;
use kvm_ioctls::{IoEventAddress, VmFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// First virtio-mmio window, inside the 32-bit device hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// GSIs 16..24 of the IOAPIC are free of ISA legacy; one per virtio-mmio device.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
pub const VIRTIO_MMIO_MAX: usize = 8;

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Mmio,
    Pci,
}

/// A virtio device to attach (parsed from `ferro run` flags or a domain definition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioConfig {
    /// Entropy from the host; `rate` limits bytes per second.
    Rng { rate: Option<u64> },
    /// A disk image; `format` None means detect (qcow2 by its magic, else raw).
    Block { path: PathBuf, format: Option<String>, readonly: bool },
    /// A NIC on a tap device (created if missing); `mac` None means a generated address.
    Net { tap: String, mac: Option<[u8; 6]> },
    /// A virtio-console port.
    Console { backend: ConsoleBackend },
    /// A memory balloon; `size_mib` is the initial target of memory taken from the guest.
    Balloon { size_mib: u64, deflate_on_oom: bool },
    /// AF_VSOCK with Firecracker's host convention: guest CID `cid`, host side on unix socket `uds`.
    Vsock { cid: u64, uds: PathBuf },
}

/// Where a virtio-console port's other end is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// This process's stdin/stdout (the terminal of `ferro run`).
    Stdio,
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
    /// A unix socket the VMM listens on.
    Socket(PathBuf),
}

/// Handles to devices the VMM controls while the VM runs (the control socket uses them).
#[derive(Clone, Default)]
pub struct DeviceHandles {
    pub balloon: Option<Arc<BalloonControl>>,
}

fn build(config: &VirtioConfig, handles: &mut DeviceHandles) -> Result<Box<dyn VirtioDevice>> {
    match config {
        VirtioConfig::Rng { rate } => Ok(Box::new(Rng::new(*rate))),
        VirtioConfig::Balloon { size_mib, deflate_on_oom } => {
            if handles.balloon.is_some() {
                return Err(Error::Config("only one balloon device is supported".into()));
            }
            let balloon = Balloon::new(*size_mib, *deflate_on_oom).map_err(|e| Error::Io("eventfd", e))?;
            handles.balloon = Some(balloon.control());
            Ok(Box::new(balloon))
        }
        VirtioConfig::Net { tap, mac } => {
            Ok(Box::new(Net::new(tap, *mac).map_err(|e| Error::Config(format!("--net tap={tap}: {e}")))?))
        }
        VirtioConfig::Block { path, format, readonly } => {
            Ok(Box::new(Block::new(path, format.as_deref(), *readonly).map_err(Error::Config)?))
        }
        other => Err(Error::Config(format!("{other:?}: this virtio device is not available yet"))),
    }
}

/// Attaches every configured device on virtio-mmio; returns their slots for ACPI and fills in
/// `handles`.
pub fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    configs: &[VirtioConfig],
    handles: &mut DeviceHandles,
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
        let transport = MmioTransport::new(device, mem.clone(), IrqLine(irq), kicks).map_err(Error::Internal)?;
        bus.insert(slot.base, slot.size, Arc::new(Mutex::new(transport)));
        slots.push(slot);
    }
    Ok(slots)
}
