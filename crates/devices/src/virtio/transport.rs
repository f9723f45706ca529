//! What every virtio transport does the same way (virtio 1.x sections 2 and 3): feature words
//! and their selectors, the device status state machine with FEATURES_OK checking, queue
//! configuration windows, activation of the device at DRIVER_OK, reset, and failing a device
//! (NEEDS_RESET) when the driver programmed something invalid. A transport maps its registers
//! onto this and adds its own interrupt bookkeeping.
//!
//! It also runs the device through pause and resume: pausing stops the device's worker, which
//! hands its queues back here, so [`VirtioCoreState`] holds every queue with its indices; a
//! restored core activates its device again when the VM resumes, and every resume kicks every
//! queue so requests the driver posted meanwhile (or before the save) are served.

use super::chains::{Broken, NeedsResetReport};
use super::{Activation, ActiveQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice, VirtioDeviceState, VirtioInterrupt, status};
use serde::{Deserialize, Serialize};
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

/// Where the device's worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not activated, or activated by a restore and waiting for the VM to resume.
    Idle,
    /// The worker runs and holds the queues (the copies here are stale).
    Running,
    /// The worker is paused: the queues are here, the rest stays with the device.
    Paused,
}

/// One queue as saved: virtio-queue's state, made serializable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Where the device goes on in the available ring and the used ring.
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<&Queue> for QueueState {
    fn from(q: &Queue) -> QueueState {
        let s = q.state();
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl QueueState {
    /// The queue, if the state is one virtio-queue accepts (sizes, alignments).
    fn to_queue(self) -> Result<Queue, String> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| format!("{e:?}"))
    }
}

/// Everything a transport shares of a device's state: registers, queues, and the device's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioCoreState {
    pub device_type: u32,
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queue_error: Option<String>,
    /// The driver broke the device (NEEDS_RESET until it resets it).
    pub broken: bool,
    /// DRIVER_OK was accepted: the device runs when the VM does.
    pub activated: bool,
    pub queues: Vec<QueueState>,
    pub device: VirtioDeviceState,
}

pub struct VirtioCore {
    pub device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    phase: Phase,
    /// DRIVER_OK was accepted and not undone by a reset.
    activated: bool,
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
            phase: Phase::Idle,
            activated: false,
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
        self.phase = Phase::Idle;
        self.activated = false;
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
        match self.device.activate(self.activation(queues)) {
            Ok(()) => {
                self.phase = Phase::Running;
                self.activated = true;
            }
            Err(e) => self.fail(&e),
        }
    }

    /// What the device's worker runs with: guest memory, the interrupt, `queues`, the features
    /// the driver acknowledged.
    fn activation(&self, queues: Vec<ActiveQueue>) -> Activation {
        Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            features: self.driver_features,
            broken: self.broken.clone(),
        }
    }

    /// Stops the device's worker; its queues come back here. Nothing happens if none runs.
    pub fn pause(&mut self) {
        if self.phase == Phase::Running {
            let queues = self.device.pause();
            if queues.len() == self.queues.len() {
                self.queues = queues;
            }
            self.phase = Phase::Paused;
        }
    }

    /// Lets the device run again: a paused worker carries on with its queues, a restored device
    /// is activated with the saved ones. Every queue is kicked, since kicks that came while the
    /// device was paused (or before the save) went nowhere.
    pub fn resume(&mut self) -> Result<(), String> {
        let resumed = match self.phase {
            Phase::Paused => self.device.resume(copies(&self.queues)?),
            Phase::Idle if self.activated => {
                let queues = copies(&self.queues)?
                    .into_iter()
                    .zip(&self.kicks)
                    .map(|(queue, kick)| Ok(ActiveQueue { queue, kick: kick.try_clone().map_err(|e| format!("queue eventfd: {e}"))? }))
                    .collect::<Result<Vec<_>, String>>()?;
                self.device.activate(self.activation(queues))
            }
            Phase::Idle | Phase::Running => return Ok(()),
        };
        resumed?;
        self.phase = Phase::Running;
        for kick in &self.kicks {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// Stops the device for good and lets it release what it holds on the host.
    pub fn shutdown(&mut self) {
        self.device.shutdown();
        self.phase = Phase::Idle;
        self.activated = false;
    }

    /// The state of registers, queues and device. Call it paused: while the device runs, its
    /// worker holds the queues and the indices here are stale.
    pub fn save(&self) -> VirtioCoreState {
        debug_assert!(self.phase != Phase::Running, "virtio device saved while running");
        VirtioCoreState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queue_error: self.queue_error.clone(),
            broken: self.broken.is_set(),
            activated: self.activated,
            queues: self.queues.iter().map(QueueState::from).collect(),
            device: self.device.save(),
        }
    }

    /// Applies a saved state to a core built for the same device; the device stays idle and is
    /// activated on [`resume`](Self::resume). Values are checked as strictly as a driver's writes.
    pub fn restore(&mut self, s: &VirtioCoreState) -> Result<(), String> {
        let ty = self.device.device_type();
        if s.device_type != ty {
            return Err(format!("saved virtio device type {} does not fit this device of type {ty}", s.device_type));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!("saved {} queues, this device has {}", s.queues.len(), self.queues.len()));
        }
        if s.driver_features & !self.offered_features() != 0 {
            return Err(format!("saved driver features {:#x} include some this device does not offer", s.driver_features));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (saved, now)) in s.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != now.max_size() {
                return Err(format!("queue {i}: saved maximum size {}, this device's is {}", saved.max_size, now.max_size()));
            }
            let queue = saved.to_queue().map_err(|e| format!("queue {i}: {e}"))?;
            if s.activated && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            queues.push(queue);
        }
        self.reset();
        self.device.restore(&s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.queue_error = s.queue_error.clone();
        if s.broken {
            self.broken.mark();
        }
        self.activated = s.activated;
        Ok(())
    }
}

/// Copies of `queues` for a device to run with (the transport keeps its own for the registers).
fn copies(queues: &[Queue]) -> Result<Vec<Queue>, String> {
    queues.iter().enumerate().map(|(i, q)| Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e:?}"))).collect()
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
