//! The virtio-mmio transport (virtio 1.x section 4.2, version 2 registers): one 4 KiB window per
//! device, queue kicks through KVM ioeventfds on QueueNotify, interrupts through an irqfd.

use super::{Activation, ActiveQueue, GuestMemoryMmap, InterruptReason, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status};
use super::transport::set_queue_size;
use crate::{BusAction, BusDevice, IrqLine};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::{Queue, QueueT};
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
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// An invalid queue setting the driver wrote; fails DRIVER_OK.
    queue_error: Option<String>,
}

impl MmioTransport {
    /// Wraps `device`; `kicks` must hold one eventfd per queue (registered with KVM by the
    /// caller), `irq` the device's interrupt line.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine, kicks: Vec<EventFd>) -> Result<Self, String> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("queue of size {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if kicks.len() != queues.len() {
            return Err(format!("{} kick eventfds for {} queues", kicks.len(), queues.len()));
        }
        let interrupt = Arc::new(MmioInterrupt { status: AtomicU32::new(0), irq });
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            kicks,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queue_error: None,
        })
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queue_error = None;
        self.interrupt.status.store(0, Ordering::Release);
    }

    fn fail(&mut self, why: &str) {
        eprintln!("ferro: virtio device type {}: {why}; the driver must reset it", self.device.device_type());
        self.status |= status::NEEDS_RESET;
        self.interrupt.trigger(InterruptReason::Config);
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (spec 3.1.1).
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if new_bits & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            return self.fail("DRIVER_OK without FEATURES_OK");
        }
        if let Some(e) = self.queue_error.take() {
            return self.fail(&e);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.fail(&format!("queue {i} is not valid (size or ring addresses)"));
            }
        }
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (q, kick)) in self.queues.iter().zip(&self.kicks).enumerate() {
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            let queue = match Queue::try_from(state) {
                Ok(queue) => queue,
                Err(e) => return self.fail(&format!("queue {i}: {e:?}")),
            };
            match kick.try_clone() {
                Ok(kick) => queues.push(ActiveQueue { queue, kick }),
                Err(e) => return self.fail(&format!("cannot share a queue eventfd: {e}")),
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            features: self.driver_features,
        };
        if let Err(e) = self.device.activate(activation) {
            self.fail(&e);
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    match offset {
                        0x38 => {
                            if let Err(e) = set_queue_size(q, v) {
                                self.queue_error = Some(e);
                            }
                        }
                        0x44 => q.set_ready(v == 1),
                        0x80 => q.set_desc_table_address(Some(v), None),
                        0x84 => q.set_desc_table_address(None, Some(v)),
                        0x90 => q.set_avail_ring_address(Some(v), None),
                        0x94 => q.set_avail_ring_address(None, Some(v)),
                        0xa0 => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd catches this write; this path runs only if it did not.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => self.set_status(v as u8),
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => u32::from(self.status | if self.device.needs_reset() { status::NEEDS_RESET } else { 0 }),
            0xfc => 0, // config generation: no device changes its config on its own yet
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            return self.device.read_config(offset - CONFIG_START, data);
        }
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        BusAction::None
    }
}
