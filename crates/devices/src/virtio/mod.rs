//! Virtio 1.x: the device model shared by every transport and device.
//!
//! A transport (`mmio`, later `pci`) owns the registers the driver programs: status, feature
//! words, queue addresses. When the driver sets DRIVER_OK the transport hands the device its
//! guest memory, its configured queues with their notification eventfds (KVM ioeventfds, so a
//! kick never exits to userspace) and an interrupt to raise. The device then runs its own worker
//! thread (`worker`) and never blocks a vCPU. Every value a guest can write is checked; a bad
//! one fails the device (NEEDS_RESET) rather than the VMM.
//!
//! Pausing a device stops its worker, which hands its queues back to the transport; the
//! transport saves them with its registers ([`transport::VirtioCoreState`]), the device adds its
//! own [`VirtioDeviceState`].

pub mod balloon;
pub mod block;
pub mod chains;
pub mod console;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

use chains::Broken;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as devices see it. Every write through it (a used ring, a buffer filled for the
/// guest) marks its page in the region's bitmap, so a live migration resends pages devices
/// wrote as well as those the vCPUs did (KVM's dirty log sees only the latter).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// What a view into [`GuestMemoryMmap`] carries to mark the pages it writes.
pub type GuestBitmapSlice<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// Feature bits every device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids (virtio 1.x section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Why a device raises its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptReason {
    /// Buffers were put in used ring `queue`.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// How a device signals the driver; implemented by each transport.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, reason: InterruptReason);
}

/// A queue as handed to a device at activation: the ring and the eventfd KVM signals on a kick.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// What a device needs to run.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
    /// Features the driver accepted.
    pub features: u64,
    /// Set by the worker when the driver breaks a queue (see `chains`); the transport then
    /// shows NEEDS_RESET until the driver resets the device.
    pub broken: Broken,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the driver may choose smaller ones.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space; reads past its end return zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; unknown offsets are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device's worker (the driver set DRIVER_OK, or a restored device resumes).
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Stops the worker and hands back its queues, in queue order; the device keeps whatever
    /// else its worker had (connections, a frame in flight) for [`resume`](VirtioDevice::resume).
    /// Nothing touches guest memory until then. Hands back nothing when no worker runs.
    fn pause(&mut self) -> Vec<Queue>;
    /// Restarts the worker [`pause`](VirtioDevice::pause) stopped, with the queues it gave.
    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String>;
    /// Stops the worker and returns the device to its initial state (driver reset).
    fn reset(&mut self);
    /// The device's own state (the transport saves the queues and registers). Call it paused.
    fn save(&self) -> VirtioDeviceState;
    /// Applies a saved state of this kind of device to it, reset and not activated: the
    /// transport activates it when the VM resumes.
    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String>;
    /// Stops the worker for good and lets go of the host side (a disk is flushed and closed):
    /// the VM is ending. The device serves nothing afterwards.
    fn shutdown(&mut self) {
        self.reset();
    }
}

/// What each kind of virtio device saves of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioDeviceState {
    /// virtio-rng holds nothing beyond its queue.
    Rng,
    Block(block::BlockState),
    Net(net::NetState),
    Console(console::ConsoleState),
    Balloon(balloon::state::BalloonState),
    Vsock(vsock::VsockState),
}

impl VirtioDeviceState {
    /// The kind, for errors about a state that does not fit a device.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Rng => "virtio-rng",
            VirtioDeviceState::Block(_) => "virtio-blk",
            VirtioDeviceState::Net(_) => "virtio-net",
            VirtioDeviceState::Console(_) => "virtio-console",
            VirtioDeviceState::Balloon(_) => "virtio-balloon",
            VirtioDeviceState::Vsock(_) => "virtio-vsock",
        }
    }

    /// The error for a saved state given to a device of another kind.
    pub fn mismatch(&self, device: &str) -> String {
        format!("saved {} state does not fit a {device} device", self.kind())
    }
}

/// Reads `data.len()` bytes at `offset` of `config`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(start) = usize::try_from(offset) {
        if start < config.len() {
            let n = data.len().min(config.len() - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }
}
