//! virtio-balloon (virtio 1.x section 5.5): the host sets a target (`num_pages`) and the driver
//! inflates towards it by giving pages on the inflate queue, which the host releases with
//! MADV_DONTNEED (the VMM's RSS drops), or deflates by taking pages back on the deflate queue
//! (nothing to do on the host: they fault back in, zero-filled, when the guest touches them).
//! The statistics queue carries the guest's memory statistics: the device keeps the driver's
//! buffer and hands it back for a refill when someone asks for fresh numbers.
//! DEFLATE_ON_OOM is offered when configured. Page numbers outside guest RAM are ignored; a
//! broken queue marks the device NEEDS_RESET. The state shared with the VMM's control socket
//! (target, actual, statistics) lives in [`BalloonControl`].

mod control;
pub mod pages;
pub mod state;

pub use control::BalloonControl;

use super::chains::{self, Broken};
use super::worker::{Runner, Wake, WorkerState};
use super::{Activation, GuestMemoryMmap, InterruptReason, VirtioDevice, VirtioDeviceState, VirtioInterrupt, device_type, read_config_bytes};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// The driver reports statistics on a third queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// The driver may take pages back from the balloon when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;

const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
/// Most statistics bytes read from one buffer (the spec's ten tags take 100).
const MAX_STATS_BYTES: usize = 4096;

pub struct Balloon {
    control: Arc<BalloonControl>,
    deflate_on_oom: bool,
    /// The transport's interrupt while the device is active.
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    runner: Runner<QueueWorker>,
}

const NAME: &str = "virtio-balloon";

impl Balloon {
    /// A balloon whose initial target is `target_mib` MiB taken from the guest.
    pub fn new(target_mib: u64, deflate_on_oom: bool) -> std::io::Result<Self> {
        let pages = u32::try_from(target_mib << (20 - pages::PAGE_SHIFT)).unwrap_or(u32::MAX);
        Ok(Balloon { control: Arc::new(BalloonControl::new(pages)?), deflate_on_oom, interrupt: None, runner: Runner::Idle })
    }

    /// The handle the VMM keeps to change the target and read statistics at run time.
    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        let oom = if self.deflate_on_oom { F_DEFLATE_ON_OOM } else { 0 };
        super::VIRTIO_RING_F_EVENT_IDX | super::VIRTIO_RING_F_INDIRECT_DESC | F_STATS_VQ | oom
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let inner = self.control.lock();
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&inner.num_pages.to_le_bytes());
        config[4..].copy_from_slice(&inner.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write; any byte-wise part of it is accepted.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut inner = self.control.lock();
        let mut actual = inner.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = offset.checked_add(i as u64).and_then(|o| o.checked_sub(4)).and_then(|o| actual.get_mut(o as usize)) {
                *slot = *b;
            }
        }
        inner.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let Activation { mem, interrupt, queues, features, broken } = a;
        if queues.len() != 3 {
            return Err(format!("balloon needs 3 queues, got {}", queues.len()));
        }
        let (queues, kicks): (Vec<_>, Vec<_>) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
        let max_pages = mem.iter().map(|r| r.len() >> pages::PAGE_SHIFT).sum();
        let worker = QueueWorker {
            mem,
            interrupt: interrupt.clone(),
            queues,
            kicks,
            stats_enabled: features & F_STATS_VQ != 0,
            control: self.control.clone(),
            max_pages,
            broken,
        };
        self.runner.start(NAME, worker)?;
        self.control.connect(interrupt.clone());
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn pause(&mut self) -> Vec<Queue> {
        // A new target set while paused is announced on resume, not into a paused guest.
        self.control.disconnect();
        self.runner.pause()
    }

    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        self.runner.resume(NAME, queues)?;
        if let Some(interrupt) = &self.interrupt {
            self.control.connect(interrupt.clone());
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.runner.stop();
        self.interrupt = None;
        self.control.disconnect();
        let mut inner = self.control.lock();
        inner.actual = 0;
        inner.stats_head = None;
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(self.control.state())
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Balloon(s) => {
                self.control.restore(s);
                Ok(())
            }
            other => Err(other.mismatch(NAME)),
        }
    }
}

/// The worker's side: the three queues and what it needs to serve them.
struct QueueWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    /// The driver accepted the statistics queue.
    stats_enabled: bool,
    control: Arc<BalloonControl>,
    /// Page numbers accepted from one buffer: as many as the guest has pages.
    max_pages: u64,
    broken: Broken,
}

impl WorkerState for QueueWorker {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Balloon;

    /// The three kicks, then the control's refresh request.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.kicks.iter().map(|k| k.as_raw_fd()).collect();
        fds.push(self.control.refresh.as_raw_fd());
        fds
    }

    fn wake(&mut self, wake: Wake) {
        match self.kicks.get(wake) {
            Some(kick) => {
                let _ = kick.read();
            }
            None => {
                let _ = self.control.refresh.read();
            }
        }
        if self.broken.is_set() {
            return;
        }
        match wake {
            INFLATE => self.pages(INFLATE, true),
            DEFLATE => self.pages(DEFLATE, false),
            STATS if self.stats_enabled => self.stats(),
            STATS => {}
            _ if self.stats_enabled => self.give_back_stats_buffer(),
            _ => {}
        }
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}

impl QueueWorker {
    fn notify(&mut self, q: usize) {
        if self.queues[q].needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(InterruptReason::Queue(q as u16));
        }
    }

    fn fail(&self, why: &str) {
        self.broken.set("virtio-balloon", why, self.interrupt.as_ref());
    }

    /// Serves the inflate (`release`) or deflate queue until the driver adds nothing more.
    fn pages(&mut self, q: usize, release: bool) {
        let (mem, control, max_pages) = (&self.mem, &self.control, self.max_pages);
        let drained = chains::drain(&mut self.queues[q], mem, |chain| {
            let count = pages::process(mem, chain.readable(), max_pages, release);
            let mut inner = control.lock();
            if release {
                inner.inflated += count.valid;
            } else {
                inner.deflated += count.valid;
            }
            inner.invalid += count.invalid;
            0
        });
        match drained {
            Ok(true) => self.interrupt.trigger(InterruptReason::Queue(q as u16)),
            Ok(false) => {}
            Err(why) => self.fail(&why),
        }
    }

    /// Takes the driver's statistics buffer: records what it says and keeps it until fresh
    /// numbers are wanted.
    fn stats(&mut self) {
        match self.take_stats_buffers() {
            Ok(true) => self.notify(STATS),
            Ok(false) => {}
            Err(why) => self.fail(&why),
        }
    }

    /// Pops every statistics buffer the driver added, re-arming notifications as it goes (with
    /// EVENT_IDX that publishes `avail_event`, without which the driver stops kicking after its
    /// first buffer). True when an older buffer went back to the driver.
    fn take_stats_buffers(&mut self) -> Result<bool, String> {
        let (mem, queue) = (&self.mem, &mut self.queues[STATS]);
        if !queue.ready() {
            return Ok(false);
        }
        let mut returned = false;
        loop {
            queue.disable_notification(mem).map_err(|e| format!("used ring: {e}"))?;
            while let Some(chain) = chains::next_chain(queue, mem)? {
                let head = chain.head_index();
                let mut bytes = Vec::new();
                for desc in chain.readable() {
                    let n = (desc.len() as usize).min(MAX_STATS_BYTES - bytes.len());
                    let start = bytes.len();
                    bytes.resize(start + n, 0);
                    if mem.read_slice(&mut bytes[start..], desc.addr()).is_err() {
                        bytes.truncate(start);
                        break;
                    }
                }
                let mut stats = Vec::new();
                control::parse_stats(&bytes, &mut stats);
                let older = {
                    let mut inner = self.control.lock();
                    inner.stats = stats;
                    inner.stats_time = Some(Instant::now());
                    inner.stats_head.replace(head)
                };
                // The driver keeps one buffer in flight; if it sent another, the older goes back.
                if let Some(old) = older {
                    queue.add_used(mem, old, 0).map_err(|e| format!("statistics buffer {old}: {e}"))?;
                    returned = true;
                }
            }
            if !queue.enable_notification(mem).map_err(|e| format!("used ring: {e}"))? {
                break;
            }
        }
        Ok(returned)
    }

    /// Returns the held statistics buffer so the driver refills it with fresh numbers.
    fn give_back_stats_buffer(&mut self) {
        let Some(head) = self.control.lock().stats_head.take() else { return };
        match self.queues[STATS].add_used(&self.mem, head, 0) {
            Ok(()) => self.notify(STATS),
            Err(e) => self.fail(&format!("statistics buffer {head}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chains::tests::InterruptLog;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    fn stat(tag: u16, value: u64) -> Vec<u8> {
        [tag.to_le_bytes().as_slice(), value.to_le_bytes().as_slice()].concat()
    }

    /// The driver's side of the statistics queue: offers one buffer of `stats` per call.
    fn offer(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, n: u16, stats: &[u8]) {
        let addr = 0x8000 + u64::from(n) * 0x100;
        mem.write_slice(stats, GuestAddress(addr)).unwrap();
        vq.desc_table().store(n, RawDescriptor::from(Descriptor::new(addr, stats.len() as u32, 0, 0))).unwrap();
        vq.avail().ring().ref_at(usize::from(n)).unwrap().store(n.to_le());
        vq.avail().idx().store((n + 1).to_le());
    }

    #[test]
    fn the_stats_buffer_is_held_until_a_refresh_and_avail_event_is_published() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vqs: Vec<_> = (0..3u64).map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * (i + 1)), 16)).collect();
        let queues = vqs
            .iter()
            .map(|vq| {
                let mut q: Queue = vq.create_queue().unwrap();
                q.set_event_idx(true);
                q
            })
            .collect();
        let irq = Arc::new(InterruptLog::default());
        let balloon = Balloon::new(0, false).unwrap();
        let mut w = QueueWorker {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
            kicks: Vec::new(),
            stats_enabled: true,
            control: balloon.control(),
            max_pages: 256,
            broken: crate::virtio::chains::tests::broken(),
        };
        let used_idx = |vq: &MockSplitQueue<GuestMemoryMmap>| u16::from_le(vq.used().idx().load());
        let avail_event = |vq: &MockSplitQueue<GuestMemoryMmap>| {
            mem.read_obj::<u16>(vq.used_addr().unchecked_add(4 + 8 * 16)).unwrap()
        };

        offer(&mem, &vqs[STATS], 0, &[stat(4, 1000), stat(5, 4000)].concat());
        w.stats();
        assert_eq!(balloon.control().stats().guest_stats.get("free_memory"), Some(&1000));
        assert_eq!(used_idx(&vqs[STATS]), 0, "the buffer is held");
        assert_eq!(avail_event(&vqs[STATS]), 1, "the driver is told to kick for its next buffer");

        w.give_back_stats_buffer();
        assert_eq!(used_idx(&vqs[STATS]), 1);
        assert_eq!(irq.reasons(), vec![InterruptReason::Queue(STATS as u16)]);
        w.give_back_stats_buffer();
        assert_eq!(used_idx(&vqs[STATS]), 1, "nothing held, nothing returned");

        offer(&mem, &vqs[STATS], 1, &stat(4, 2000));
        w.stats();
        assert_eq!(balloon.control().stats().guest_stats.get("free_memory"), Some(&2000));
        assert_eq!(avail_event(&vqs[STATS]), 2);

        // A queue whose available index runs ahead of its size is broken: NEEDS_RESET.
        vqs[STATS].avail().idx().store(40u16.to_le());
        w.stats();
        assert!(w.broken.is_set());
    }
}
