//! The virtio-mmio transport (virtio 1.x section 4.2, version 2 registers): one 4 KiB window per
//! device, queue kicks through KVM ioeventfds on QueueNotify, interrupts through an irqfd. The
//! register semantics shared with virtio-pci live in `transport::VirtioCore`.

use super::transport::{QueueRegister, VirtioCore};
use super::chains::NeedsResetReport;
use super::{GuestMemoryMmap, InterruptReason, VirtioDevice, VirtioInterrupt};
use crate::{BusAction, BusDevice, IrqLine};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where KVM ioeventfds listen (datamatch = queue index).
pub const QUEUE_NOTIFY: u64 = 0x50;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x4f52_4546; // "FERO"
const CONFIG_START: u64 = 0x100;

/// Interrupt status bits and the irqfd behind them.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, reason: InterruptReason) {
        let bit = match reason {
            InterruptReason::Queue(_) => 1,
            InterruptReason::Config => 2,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        // A failed eventfd write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.irq.trigger();
    }
}

pub struct MmioTransport {
    core: VirtioCore,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// Wraps `device`; `kicks` must hold one eventfd per queue (registered with KVM by the
    /// caller), `irq` the device's interrupt line, `report` is told when the driver breaks it.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine, kicks: Vec<EventFd>, report: NeedsResetReport) -> Result<Self, String> {
        let interrupt = Arc::new(MmioInterrupt { status: AtomicU32::new(0), irq });
        let core = VirtioCore::new(device, mem, interrupt.clone(), kicks, report)?;
        Ok(MmioTransport { core, interrupt })
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let queue = match offset {
            0x38 => Some(QueueRegister::Size),
            0x44 => Some(QueueRegister::Ready),
            0x80 => Some(QueueRegister::DescLo),
            0x84 => Some(QueueRegister::DescHi),
            0x90 => Some(QueueRegister::DriverLo),
            0x94 => Some(QueueRegister::DriverHi),
            0xa0 => Some(QueueRegister::DeviceLo),
            0xa4 => Some(QueueRegister::DeviceHi),
            _ => None,
        };
        if let Some(reg) = queue {
            return self.core.write_queue(reg, v);
        }
        match offset {
            0x14 => self.core.device_features_sel = v,
            0x20 => self.core.set_driver_features_word(v),
            0x24 => self.core.driver_features_sel = v,
            0x30 => self.core.queue_sel = v,
            // Normally KVM's ioeventfd catches this write; this path runs only if it did not.
            QUEUE_NOTIFY => self.core.kick(v as usize),
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => {
                if v == 0 {
                    self.interrupt.status.store(0, Ordering::Release);
                }
                self.core.set_status(v as u8);
            }
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.core.queue();
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.core.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => self.core.device_features_word(),
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => u32::from(self.core.status()),
            0xfc => 0, // config generation: no device changes its config on its own yet
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            return self.core.device.read_config(offset - CONFIG_START, data);
        }
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset >= CONFIG_START {
            self.core.device.write_config(offset - CONFIG_START, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        BusAction::None
    }
}
