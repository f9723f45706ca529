//! The virtio-net worker: moves frames between the tap and the guest's queues.
//!
//! Receive holds at most one frame read from the tap and not yet delivered. When the guest has
//! no receive buffers for it, the tap is taken out of the worker's interest (it sits in an inner
//! epoll whose fd the worker watches) until the guest adds buffers and kicks: no busy loop and no
//! buffering beyond that one frame; the kernel's tap queue absorbs (and then drops) the rest.

use super::tap::{Tap, VNET_HDR_LEN};
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::worker::Worker;
use crate::virtio::{Activation, GuestMemoryMmap, InterruptReason, VirtioInterrupt};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Largest frame on the tap: the header and a 64 KiB TSO segment with its Ethernet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

struct NetIo {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    tap: Arc<Tap>,
    /// Holds only the tap; readable when the tap is and we want its frames.
    tap_poll: Epoll,
    tap_wanted: bool,
    mergeable: bool,
    frame: Vec<u8>,
    /// Length of the frame in `frame` still to deliver; 0 when none.
    pending: usize,
    tx_buf: Vec<u8>,
}

/// Starts the worker; it stops when the returned handle is dropped.
pub(super) fn spawn(tap: Arc<Tap>, a: Activation) -> std::io::Result<Worker> {
    let Activation { mem, interrupt, queues, features } = a;
    let mut queues = queues.into_iter();
    let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
        return Err(std::io::Error::other("virtio-net needs its receive and transmit queues"));
    };
    let tap_poll = Epoll::new()?;
    tap_poll.ctl(ControlOperation::Add, tap.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
    let fds = vec![rx.kick.as_raw_fd(), tx.kick.as_raw_fd(), tap_poll.as_raw_fd()];
    let kicks: [EventFd; 2] = [rx.kick, tx.kick];
    let mut io = NetIo {
        mem,
        interrupt,
        rx: rx.queue,
        tx: tx.queue,
        tap,
        tap_poll,
        tap_wanted: true,
        mergeable: features & (1 << vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
        frame: vec![0; MAX_FRAME],
        pending: 0,
        tx_buf: vec![0; MAX_FRAME],
    };
    Worker::spawn("virtio-net", fds, move |wake| match wake {
        RX_QUEUE => {
            let _ = kicks[RX_QUEUE].read();
            io.want_tap(true);
            io.receive();
        }
        TX_QUEUE => {
            let _ = kicks[TX_QUEUE].read();
            io.transmit();
        }
        _ => io.receive(),
    })
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

    fn notify(&mut self, queue: usize) {
        let q = if queue == RX_QUEUE { &mut self.rx } else { &mut self.tx };
        if q.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(InterruptReason::Queue(queue as u16));
        }
    }

    /// Delivers frames from the tap until it is empty or the guest runs out of buffers.
    fn receive(&mut self) {
        let mut delivered = false;
        loop {
            if self.pending == 0 {
                match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.pending = n,
                    Ok(_) => continue, // no frame behind the header: nothing to deliver
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock, or the tap went away
                }
            }
            if self.deliver() {
                self.pending = 0;
                delivered = true;
            } else if !self.rx.enable_notification(&self.mem).unwrap_or(false) {
                // No buffers, and none arrived while we looked: wait for the guest's kick.
                self.want_tap(false);
                break;
            }
        }
        if delivered {
            self.notify(RX_QUEUE);
        }
    }

    /// Puts the pending frame in the guest's receive buffers: one chain, or as many as it
    /// takes with mergeable buffers. False when the guest has too few buffers for it (they are
    /// left in the ring). A frame that cannot be delivered (a chain too small without mergeable
    /// buffers, or with bad addresses) is dropped and its buffers returned empty.
    fn deliver(&mut self) -> bool {
        let len = self.pending;
        let mut chains: Vec<(u16, Option<Writer<'_>>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                for _ in &chains {
                    self.rx.go_to_previous_position();
                }
                return false;
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
            // add_used fails only for a head outside the ring, which pop never returns.
            let _ = self.rx.add_used(&self.mem, head, n);
        }
        true
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let mut sent = false;
        loop {
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                if let Ok(mut r) = Reader::new(&self.mem, chain) {
                    let n = r.available_bytes();
                    // Frames without a header, or larger than any the tap takes, are dropped.
                    if n > VNET_HDR_LEN && n <= MAX_FRAME && r.read_exact(&mut self.tx_buf[..n]).is_ok() {
                        // A full or downed tap drops the frame, as a real link would.
                        let _ = self.tap.write_frame(&self.tx_buf[..n]);
                    }
                }
                let _ = self.tx.add_used(&self.mem, head, 0);
                sent = true;
            }
            // Re-arms the kick (with EVENT_IDX: avail_event); true if frames came meanwhile.
            if !self.tx.enable_notification(&self.mem).unwrap_or(false) {
                break;
            }
        }
        if sent {
            self.notify(TX_QUEUE);
        }
    }
}
