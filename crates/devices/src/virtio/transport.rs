//! What every virtio transport does the same way (virtio 1.x sections 2 and 3): feature words
//! and their selectors, the device status state machine with FEATURES_OK checking, queue
//! configuration windows, activation of the device at DRIVER_OK, reset, and failing a device
//! (NEEDS_RESET) when the driver programmed something invalid. A transport maps its registers
//! onto this and adds its own interrupt bookkeeping.

use super::chains::{Broken, NeedsResetReport};
use super::{Activation, ActiveQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// The per-queue registers every transport has: size, ready, and the three ring addresses in
/// 32-bit halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRegister {
    Size,
    Ready,
    DescLo,
    DescHi,
    DriverLo,
    DriverHi,
    DeviceLo,
    DeviceHi,
}

pub struct VirtioCore {
    pub device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    /// One eventfd per queue, registered with KVM (ioeventfd) by the VMM.
    pub kicks: Vec<EventFd>,
    status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    driver_features: u64,
    pub queue_sel: u32,
    /// An invalid queue setting the driver wrote (see [`set_queue_size`]); fails DRIVER_OK.
    queue_error: Option<String>,
    /// Set when the driver broke the device; NEEDS_RESET until it resets it.
    broken: Broken,
}

impl VirtioCore {
    /// `kicks` must hold one eventfd per queue of `device`; `report` is told when the driver
    /// breaks the device.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        kicks: Vec<EventFd>,
        report: NeedsResetReport,
    ) -> Result<Self, String> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("queue of size {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if kicks.len() != queues.len() {
            return Err(format!("{} kick eventfds for {} queues", kicks.len(), queues.len()));
        }
        Ok(VirtioCore {
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
            broken: Broken::new(report),
        })
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// The device feature word `device_features_sel` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver feature word `driver_features_sel` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Sets the selected driver feature word; ignored once FEATURES_OK is set (spec 3.1.1).
    pub fn set_driver_features_word(&mut self, v: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The status the driver reads: what it set plus NEEDS_RESET when the device broke.
    pub fn status(&self) -> u8 {
        self.status | if self.broken.is_set() { status::NEEDS_RESET } else { 0 }
    }

    pub fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// A driver write to a register of the selected queue. Queues may be configured only between
    /// FEATURES_OK and DRIVER_OK; other writes are ignored.
    pub fn write_queue(&mut self, reg: QueueRegister, v: u32) {
        let allowed = self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize).filter(|_| allowed) else { return };
        match reg {
            QueueRegister::Size => {
                if let Err(e) = set_queue_size(q, v) {
                    self.queue_error = Some(e);
                }
            }
            QueueRegister::Ready => q.set_ready(v == 1),
            QueueRegister::DescLo => q.set_desc_table_address(Some(v), None),
            QueueRegister::DescHi => q.set_desc_table_address(None, Some(v)),
            QueueRegister::DriverLo => q.set_avail_ring_address(Some(v), None),
            QueueRegister::DriverHi => q.set_avail_ring_address(None, Some(v)),
            QueueRegister::DeviceLo => q.set_used_ring_address(Some(v), None),
            QueueRegister::DeviceHi => q.set_used_ring_address(None, Some(v)),
        }
    }

    /// Signals queue `q`'s kick eventfd: the path taken when a notification reached userspace
    /// instead of KVM's ioeventfd.
    pub fn kick(&self, q: usize) {
        if let Some(k) = self.kicks.get(q) {
            let _ = k.write(1);
        }
    }

    /// Stops the device and forgets everything the driver programmed.
    pub fn reset(&mut self) {
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
        self.broken.clear();
    }

    fn fail(&mut self, why: &str) {
        let device = format!("virtio device type {}", self.device.device_type());
        self.broken.set(&device, why, self.interrupt.as_ref());
    }

    /// A driver write of the status register. Writing 0 resets (the caller resets its own
    /// registers too); FEATURES_OK is refused (left clear) for features the device did not
    /// offer or without VERSION_1; DRIVER_OK activates the device.
    pub fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
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
            broken: self.broken.clone(),
        };
        if let Err(e) = self.device.activate(activation) {
            self.fail(&e);
        }
    }
}

/// Sets a queue's size as the driver wrote it. virtio-queue keeps the old size when the new one
/// is zero, above the maximum or not a power of two, so the device would use a ring of another
/// size than the driver's; the error lets the transport fail the device at DRIVER_OK instead.
pub fn set_queue_size(q: &mut Queue, v: u32) -> Result<(), String> {
    let max = q.max_size();
    match u16::try_from(v).map_err(|_| ()).and_then(|size| q.try_set_size(size).map_err(|_| ())) {
        Ok(()) => Ok(()),
        Err(()) => Err(format!("queue size {v} is zero, above {max} or not a power of two")),
    }
}
