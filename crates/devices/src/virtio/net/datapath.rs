//! The virtio-net worker: moves frames between the tap and the guest's queues.
//!
//! Receive holds at most one frame read from the tap and not yet delivered. When the guest has
//! no receive buffers for it, the tap is taken out of the worker's interest (it sits in an inner
//! epoll whose fd the worker watches) until the guest adds buffers and kicks: no busy loop and no
//! buffering beyond that one frame; the kernel's tap queue absorbs (and then drops) the rest.

use super::tap::{Tap, VNET_HDR_LEN};
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::chains::{Broken, drain, next_chain};
use crate::virtio::worker::{Wake, WorkerState};
use crate::virtio::{Activation, GuestBitmapSlice, GuestMemoryMmap, InterruptReason, VirtioInterrupt};
use ferro_vmm_api::control::NicStats;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Largest frame on the tap: the header and a 64 KiB TSO segment with its Ethernet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

/// Frames and bytes (without the virtio-net header) since the device was created, as the guest
/// sees them: `rx` is what it received.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
}

impl NetCounters {
    /// The counters as the control socket reports them for the NIC `id`.
    pub fn stats(&self, id: &str, mac: &str) -> NicStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NicStats {
            id: id.to_owned(),
            mac: mac.to_owned(),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            rx_dropped: get(&self.rx_dropped),
        }
    }

    fn count(packets: &AtomicU64, bytes: &AtomicU64, frame_len: usize) {
        packets.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(frame_len.saturating_sub(VNET_HDR_LEN) as u64, Ordering::Relaxed);
    }
}

pub(super) struct NetIo {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Receive and transmit queue, in that order; taken out while the worker is paused.
    queues: Vec<Queue>,
    kicks: [EventFd; 2],
    tap: Arc<Tap>,
    /// Holds only the tap; readable when the tap is and we want its frames.
    tap_poll: Epoll,
    tap_wanted: bool,
    mergeable: bool,
    frame: Vec<u8>,
    /// Length of the frame in `frame` still to deliver; 0 when none.
    pending: usize,
    tx_buf: Vec<u8>,
    broken: Broken,
    counters: Arc<NetCounters>,
}

impl NetIo {
    /// The worker's state for an activation.
    pub(super) fn new(tap: Arc<Tap>, a: Activation, counters: Arc<NetCounters>) -> std::io::Result<NetIo> {
        let Activation { mem, interrupt, queues, features, broken } = a;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(std::io::Error::other("virtio-net needs its receive and transmit queues"));
        };
        let tap_poll = Epoll::new()?;
        tap_poll.ctl(ControlOperation::Add, tap.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        Ok(NetIo {
            mem,
            interrupt,
            queues: vec![rx.queue, tx.queue],
            kicks: [rx.kick, tx.kick],
            tap,
            tap_poll,
            tap_wanted: true,
            mergeable: features & (1 << vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
            frame: vec![0; MAX_FRAME],
            pending: 0,
            tx_buf: vec![0; MAX_FRAME],
            broken,
            counters,
        })
    }
}

impl WorkerState for NetIo {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Net;

    fn fds(&self) -> Vec<RawFd> {
        vec![self.kicks[RX_QUEUE].as_raw_fd(), self.kicks[TX_QUEUE].as_raw_fd(), self.tap_poll.as_raw_fd()]
    }

    fn wake(&mut self, wake: Wake) {
        if let Some(kick) = self.kicks.get(wake) {
            let _ = kick.read();
        }
        if self.broken.is_set() {
            // Until the driver resets the device: drain what wakes us, touch no ring.
            self.want_tap(false);
            return;
        }
        match wake {
            RX_QUEUE => {
                self.want_tap(true);
                self.receive();
            }
            TX_QUEUE => self.transmit(),
            _ => self.receive(),
        }
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}

impl NetIo {
    fn want_tap(&mut self, want: bool) {
        if want == self.tap_wanted {
            return;
        }
        let events = if want { EventSet::IN } else { EventSet::empty() };
        if self.tap_poll.ctl(ControlOperation::Modify, self.tap.as_raw_fd(), EpollEvent::new(events, 0)).is_ok() {
            self.tap_wanted = want;
        }
    }

    fn notify_rx(&mut self) {
        if self.queues[RX_QUEUE].needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(InterruptReason::Queue(RX_QUEUE as u16));
        }
    }

    /// Delivers frames from the tap until it is empty or the guest runs out of buffers.
    fn receive(&mut self) {
        let (mut delivered, mut rechecked) = (false, false);
        while !self.broken.is_set() {
            if self.pending == 0 {
                match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.pending = n,
                    Ok(_) => continue, // no frame behind the header: nothing to deliver
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock, or the tap went away
                }
            }
            match self.deliver() {
                Ok(true) => {
                    self.pending = 0;
                    delivered = true;
                    rechecked = false;
                }
                Ok(false) if !rechecked && self.queues[RX_QUEUE].enable_notification(&self.mem).unwrap_or(false) => rechecked = true,
                Ok(false) => {
                    // No buffers, and none arrived while we looked: wait for the guest's kick.
                    self.want_tap(false);
                    break;
                }
                Err(why) => self.broken.set("virtio-net", &format!("receive queue: {why}"), self.interrupt.as_ref()),
            }
        }
        if delivered {
            self.notify_rx();
        }
    }

    /// Puts the pending frame in the guest's receive buffers: one chain, or as many as it
    /// takes with mergeable buffers. False when the guest has too few buffers for it (they are
    /// left in the ring). A frame that cannot be delivered (a chain too small without mergeable
    /// buffers, or with bad addresses) is dropped and its buffers returned empty. Err for a
    /// broken ring.
    fn deliver(&mut self) -> Result<bool, String> {
        let len = self.pending;
        let mut chains: Vec<(u16, Option<Writer<'_, GuestBitmapSlice<'_>>>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = next_chain(&mut self.queues[RX_QUEUE], &self.mem)? else {
                for _ in &chains {
                    self.queues[RX_QUEUE].go_to_previous_position();
                }
                return Ok(false);
            };
            let head = chain.head_index();
            let writer = Writer::new(&self.mem, chain).ok();
            room += writer.as_ref().map_or(0, Writer::available_bytes);
            let bad = writer.as_ref().is_none_or(|w| w.available_bytes() == 0);
            chains.push((head, writer));
            if bad || !self.mergeable {
                break;
            }
        }
        let ok = room >= len && chains.iter().all(|(_, w)| w.is_some());
        if ok {
            NetCounters::count(&self.counters.rx_packets, &self.counters.rx_bytes, len);
        } else {
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        let count = chains.len() as u16;
        self.frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut off = 0;
        let mut used = Vec::with_capacity(chains.len());
        for (head, writer) in chains {
            let mut n = 0;
            if let (true, Some(mut w)) = (ok, writer) {
                n = w.available_bytes().min(len - off);
                if w.write_all(&self.frame[off..off + n]).is_err() {
                    n = 0;
                }
                off += n;
            }
            used.push((head, n as u32));
        }
        for (head, n) in used {
            self.queues[RX_QUEUE].add_used(&self.mem, head, n).map_err(|e| format!("descriptor head {head}: {e}"))?;
        }
        Ok(true)
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let (mem, tap, buf, counters) = (&self.mem, &self.tap, &mut self.tx_buf, &self.counters);
        let sent = drain(&mut self.queues[TX_QUEUE], mem, |chain| {
            if let Ok(mut r) = Reader::new(mem, chain) {
                let n = r.available_bytes();
                // Frames without a header, or larger than any the tap takes, are dropped.
                if n > VNET_HDR_LEN && n <= MAX_FRAME && r.read_exact(&mut buf[..n]).is_ok() {
                    // A full or downed tap drops the frame, as a real link would.
                    if tap.write_frame(&buf[..n]).is_ok() {
                        NetCounters::count(&counters.tx_packets, &counters.tx_bytes, n);
                    }
                }
            }
            0
        });
        match sent {
            Ok(true) => self.interrupt.trigger(InterruptReason::Queue(TX_QUEUE as u16)),
            Ok(false) => {}
            Err(why) => self.broken.set("virtio-net", &format!("transmit queue: {why}"), self.interrupt.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActiveQueue;
    use crate::virtio::chains::tests::{F_WRITE, InterruptLog, memory};
    use ferro_test_support::net::{ETH_P_ALL, in_private_netns, packet_socket};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    /// Sends raw Ethernet frames out of `dev` (so they come out of its tap fd).
    fn inject(dev: &str, frames: &[Vec<u8>]) {
        let sock = std::fs::File::from(packet_socket(dev, ETH_P_ALL));
        for f in frames {
            assert_eq!((&sock).write(f).expect("send a frame"), f.len());
        }
    }

    /// A frame of a local experimental ethertype, numbered `i`.
    fn frame(i: u8) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2, 0x88, 0xb5];
        f.extend(std::iter::repeat_n(i, 100));
        f
    }

    #[test]
    fn receive_stops_reading_the_tap_without_guest_buffers_and_resumes_on_a_kick() {
        in_private_netns(|| {
            // No IPv6 chatter from the kernel on the new tap: only our frames cross it.
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let tap = Arc::new(Tap::open("fdp0").unwrap());
            let mem = memory();
            let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
            let irq = Arc::new(InterruptLog::default());
            let queue = |q: &MockSplitQueue<GuestMemoryMmap>| ActiveQueue { queue: q.create_queue().unwrap(), kick: EventFd::new(libc::EFD_NONBLOCK).unwrap() };
            let activation =
                Activation { mem: mem.clone(), interrupt: irq.clone(), queues: vec![queue(&rxq), queue(&txq)], features: 0, broken: crate::virtio::chains::tests::broken() };
            let mut io = NetIo::new(tap.clone(), activation, Arc::default()).unwrap();
            inject("fdp0", &[frame(1), frame(2), frame(3)]);
            std::thread::sleep(std::time::Duration::from_millis(50));

            // No receive buffers: one frame is held, the tap leaves the poll set, nothing used.
            io.receive();
            assert_eq!(io.pending, VNET_HDR_LEN + frame(1).len());
            assert!(!io.tap_wanted);
            let mut events = [EpollEvent::default(); 1];
            assert_eq!(io.tap_poll.wait(0, &mut events).unwrap(), 0, "a stalled tap must not wake the worker");
            assert_eq!(irq.count(), 0);

            // The guest adds one buffer and kicks: frame 1 lands in it, frame 2 waits.
            let buf = GuestAddress(0x8000);
            rxq.desc_table().store(0, RawDescriptor::from(Descriptor::new(buf.0, 2048, F_WRITE, 0))).unwrap();
            rxq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
            rxq.avail().idx().store(1u16.to_le());
            io.want_tap(true);
            io.receive();
            let used_idx: u16 = mem.read_obj(rxq.used_addr().unchecked_add(2)).unwrap();
            let used_len: u32 = mem.read_obj(rxq.used_addr().unchecked_add(8)).unwrap();
            assert_eq!(used_idx, 1);
            assert_eq!(used_len as usize, VNET_HDR_LEN + frame(1).len());
            let num_buffers: u16 = mem.read_obj(buf.unchecked_add(NUM_BUFFERS as u64)).unwrap();
            assert_eq!(num_buffers, 1);
            let mut got = vec![0u8; frame(1).len()];
            mem.read_slice(&mut got, buf.unchecked_add(VNET_HDR_LEN as u64)).unwrap();
            assert_eq!(got, frame(1));
            assert_eq!(irq.count(), 1);
            assert!(!io.tap_wanted && io.pending == VNET_HDR_LEN + frame(2).len(), "frame 2 waits for the next buffer");
            let stats = io.counters.stats("net0", "52:54:00:00:00:01");
            assert_eq!((stats.rx_packets, stats.rx_bytes, stats.rx_dropped), (1, frame(1).len() as u64, 0));
        });
    }

    fn tap_readable(tap: &Tap, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    /// Pausing the device stops its receive path: frames that reach the tap while it is paused
    /// stay there (no guest memory is written, no used entry appears) and arrive after resume.
    #[test]
    fn a_paused_nic_writes_no_guest_memory_and_delivers_on_resume() {
        in_private_netns(|| {
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let mut net = super::super::Net::new("fpause0", None).unwrap();
            let mem = memory();
            let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
            let buf = |i: u16| GuestAddress(0x8000 + u64::from(i) * 0x1000);
            for i in 0..4u16 {
                rxq.desc_table().store(i, RawDescriptor::from(Descriptor::new(buf(i).0, 2048, F_WRITE, 0))).unwrap();
                rxq.avail().ring().ref_at(usize::from(i)).unwrap().store(i.to_le());
            }
            rxq.avail().idx().store(4u16.to_le());
            let queue = |q: &MockSplitQueue<GuestMemoryMmap>| ActiveQueue { queue: q.create_queue().unwrap(), kick: EventFd::new(libc::EFD_NONBLOCK).unwrap() };
            let irq = Arc::new(InterruptLog::default());
            let activation =
                Activation { mem: mem.clone(), interrupt: irq.clone(), queues: vec![queue(&rxq), queue(&txq)], features: 0, broken: crate::virtio::chains::tests::broken() };
            crate::virtio::VirtioDevice::activate(&mut net, activation).unwrap();
            let queues = crate::virtio::VirtioDevice::pause(&mut net);
            assert_eq!(queues.len(), 2, "both queues come back");

            inject("fpause0", &[frame(1), frame(2)]);
            assert!(tap_readable(&net.tap, 5000), "the frames reach the tap");
            // Give a worker that should not exist every chance to take them.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let used_idx = || mem.read_obj::<u16>(rxq.used_addr().unchecked_add(2)).unwrap();
            assert_eq!(used_idx(), 0, "no used entry while paused");
            let mut first = vec![0u8; 2048];
            mem.read_slice(&mut first, buf(0)).unwrap();
            assert!(first.iter().all(|&b| b == 0), "no frame written into guest memory while paused");
            assert!(tap_readable(&net.tap, 0), "the frames wait in the tap");
            assert_eq!(irq.count(), 0);

            crate::virtio::VirtioDevice::resume(&mut net, queues).unwrap();
            let start = std::time::Instant::now();
            while used_idx() != 2 {
                assert!(start.elapsed() < std::time::Duration::from_secs(5), "frames not delivered after resume");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for (i, n) in [(0u16, 1u8), (1, 2)] {
                let mut got = vec![0u8; frame(n).len()];
                mem.read_slice(&mut got, buf(i).unchecked_add(VNET_HDR_LEN as u64)).unwrap();
                assert_eq!(got, frame(n));
            }
            crate::virtio::VirtioDevice::reset(&mut net);
        });
    }
}
