//! The vsock worker: connects guest streams to host unix sockets (Firecracker's convention).
//!
//! - The guest connects to host port P: we connect to the unix socket `<uds>_P`.
//! - A host process connects to `<uds>` and writes `CONNECT <port>\n`: we send the guest a
//!   REQUEST from a fresh host port, and when the guest accepts we answer `OK <host port>\n`;
//!   from then on the socket is the stream.
//!
//! Host sockets sit in an inner epoll whose fd the worker watches. A socket is polled for input
//! only while its guest can take data (credit) and the guest has receive buffers, and for output
//! only while guest data waits for it, so nothing spins and nothing buffers without bound.

use super::connection::{Conn, State};
use super::packet::*;
use crate::virtio::chains::{Broken, next_chain};
use crate::virtio::{GuestBitmapSlice, GuestMemoryMmap, InterruptReason, VirtioInterrupt};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use crate::virtio::worker::{Wake, WorkerState};
use std::os::fd::RawFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// Largest payload of one packet in either direction.
const MAX_PKT_DATA: u32 = 64 * 1024;
const MAX_CONNECTIONS: usize = 1024;
/// RSTs owed for packets on unknown connections; more are dropped (the guest times out).
const MAX_PENDING_RST: usize = 256;
/// Host ports we give host-initiated connections start here (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const CONNECT_LINE_MAX: usize = 32;
/// How long a host client may take to send its CONNECT line, and a closing stream to finish.
const GRACE: Duration = Duration::from_secs(2);
const TOKEN_LISTENER: u64 = 0;

/// A host client that has not finished its `CONNECT <port>` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Receive, transmit and event queue, in that order; taken out while the worker is paused.
    queues: Vec<Queue>,
    kicks: [EventFd; 3],
    listener: UnixListener,
    poll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    next_token: u64,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    /// Connections that may have something for the guest.
    rx_work: VecDeque<u64>,
    /// RSTs for packets on connections we do not know: (local port, peer port).
    rsts: VecDeque<(u32, u32)>,
    next_local_port: u32,
    /// The guest has no receive buffers: host sockets are not read until it adds some.
    rx_stalled: bool,
    /// A TRANSPORT_RESET event is owed to the guest (after a restore).
    reset_event: bool,
    scratch: Vec<u8>,
    broken: Broken,
}

/// Connects to a unix socket without blocking (a full backlog fails instead of waiting).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes that lives for the call.
    if unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// The worker waits on the three kicks, the host sockets' epoll and the grace timer.
impl WorkerState for Muxer {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Vsock;

    fn fds(&self) -> Vec<RawFd> {
        vec![self.kicks[RX_QUEUE].as_raw_fd(), self.kicks[TX_QUEUE].as_raw_fd(), self.kicks[EVENT_QUEUE].as_raw_fd(), self.poll_fd(), self.timer.as_raw_fd()]
    }

    fn wake(&mut self, wake: Wake) {
        if let Some(kick) = self.kicks.get(wake) {
            let _ = kick.read();
        } else if wake == 4 {
            let _ = self.timer.wait();
        }
        if self.broken.is_set() {
            // Until the driver resets the device: touch no ring, and drop the streams.
            self.close_all();
            return;
        }
        match wake {
            RX_QUEUE => self.rx_kicked(),
            TX_QUEUE => self.process_tx(),
            EVENT_QUEUE => {}
            3 => self.process_host(),
            _ => self.expire(),
        }
        self.settle();
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}

impl Muxer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        guest_cid: u64,
        uds: PathBuf,
        listener: UnixListener,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        kicks: [EventFd; 3],
        reset_event: bool,
        broken: Broken,
    ) -> std::io::Result<Muxer> {
        let poll = Epoll::new()?;
        poll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))?;
        Ok(Muxer {
            guest_cid,
            uds,
            mem,
            interrupt,
            queues,
            kicks,
            listener,
            poll,
            timer: TimerFd::new()?,
            timer_armed: false,
            next_token: TOKEN_LISTENER + 1,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            rx_work: VecDeque::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_stalled: false,
            reset_event,
            scratch: vec![0; MAX_PKT_DATA as usize],
            broken,
        })
    }

    fn poll_fd(&self) -> i32 {
        self.poll.as_raw_fd()
    }

    /// The guest added receive buffers.
    fn rx_kicked(&mut self) {
        if self.rx_stalled {
            self.rx_stalled = false;
            let tokens: Vec<u64> = self.conns.keys().copied().collect();
            for t in tokens {
                self.refresh(t);
                if !self.conns[&t].polled {
                    self.schedule(t); // no poll will say when it has data: look now
                }
            }
        }
    }

    /// Called after every wake: sends what is owed to the guest and re-arms the timer.
    fn settle(&mut self) {
        if self.broken.is_set() {
            return;
        }
        self.fill_rx();
        self.send_reset_event();
        let want_timer = !self.handshakes.is_empty() || self.conns.values().any(|c| matches!(c.state, State::Closing(_)));
        if want_timer != self.timer_armed {
            let r = if want_timer { self.timer.reset(GRACE / 4, Some(GRACE / 4)) } else { self.timer.clear() };
            self.timer_armed = r.is_ok() && want_timer;
        }
    }

    fn notify(&self, queue: u16) {
        self.interrupt.trigger(InterruptReason::Queue(queue));
    }

    fn send_reset_event(&mut self) {
        if !self.reset_event {
            return;
        }
        let chain = match next_chain(&mut self.queues[EVENT_QUEUE], &self.mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(why) => return self.broken.set("virtio-vsock", &format!("event queue: {why}"), self.interrupt.as_ref()),
        };
        let head = chain.head_index();
        let mut len = 0;
        if let Some(d) = chain.writable().next() {
            if d.len() >= 4 && self.mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()).is_ok() {
                len = 4;
            }
        }
        self.reset_event = len == 0;
        if let Err(e) = self.queues[EVENT_QUEUE].add_used(&self.mem, head, len) {
            let why = format!("event queue: descriptor head {head}: {e}");
            return self.broken.set("virtio-vsock", &why, self.interrupt.as_ref());
        }
        if self.queues[EVENT_QUEUE].needs_notification(&self.mem).unwrap_or(true) {
            self.notify(EVENT_QUEUE as u16);
        }
    }

    // ---- guest to host ----

    /// Handles every packet the guest queued.
    fn process_tx(&mut self) {
        let mem = self.mem.clone();
        let (mut any, mut rechecked) = (false, false);
        let result = loop {
            let mut chain = match next_chain(&mut self.queues[TX_QUEUE], &mem) {
                Ok(Some(chain)) => chain,
                // Re-arms the kick; looks once more in case packets came meanwhile.
                Ok(None) if !rechecked && self.queues[TX_QUEUE].enable_notification(&mem).unwrap_or(false) => {
                    rechecked = true;
                    continue;
                }
                Ok(None) => break Ok(()),
                Err(why) => break Err(why),
            };
            rechecked = false;
            let head = chain.head_index();
            // A malformed packet (bad addresses, too short, too long) is dropped.
            if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                let mut data = Vec::new();
                if let Some(slice) = pkt.data_slice() {
                    data.resize(slice.len(), 0);
                    slice.copy_to(&mut data[..]);
                }
                self.handle_guest_packet(&pkt, &data);
            }
            if let Err(e) = self.queues[TX_QUEUE].add_used(&mem, head, 0) {
                break Err(format!("descriptor head {head}: {e}"));
            }
            any = true;
        };
        if let Err(why) = result {
            return self.broken.set("virtio-vsock", &format!("transmit queue: {why}"), self.interrupt.as_ref());
        }
        if any && self.queues[TX_QUEUE].needs_notification(&mem).unwrap_or(true) {
            self.notify(TX_QUEUE as u16);
        }
    }

    fn owe_rst(&mut self, local: u32, peer: u32) {
        if self.rsts.len() < MAX_PENDING_RST {
            self.rsts.push_back((local, peer));
        }
    }

    fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, GuestBitmapSlice<'_>>, data: &[u8]) {
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            return; // not from our guest, or not for the host: nowhere to go
        }
        let (local, peer, op) = (pkt.dst_port(), pkt.src_port(), pkt.op());
        if pkt.type_() != TYPE_STREAM {
            if op != OP_RST {
                self.owe_rst(local, peer);
            }
            return;
        }
        let Some(&token) = self.by_ports.get(&(local, peer)) else {
            match op {
                OP_REQUEST => self.guest_connect(local, peer, pkt.buf_alloc(), pkt.fwd_cnt()),
                OP_RST => {}
                _ => self.owe_rst(local, peer),
            }
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else { return };
        c.peer_buf_alloc = pkt.buf_alloc();
        c.peer_fwd_cnt = pkt.fwd_cnt();
        match (c.state, op) {
            (_, OP_RST) => return self.remove(token),
            (State::Connecting, OP_RESPONSE) => {
                let reply = format!("OK {}\n", c.local_port);
                // A fresh socket takes a short line whole; if not, the client is gone.
                if c.stream.write(reply.as_bytes()).ok() == Some(reply.len()) {
                    c.state = State::Established;
                } else {
                    c.owed.rst = true;
                }
            }
            (State::Established | State::Closing(_), OP_RW) => {
                if c.take_guest_data(data).is_err() {
                    c.owed.rst = true; // more than our buffer, or the host socket failed
                }
            }
            (_, OP_CREDIT_UPDATE) => {}
            (_, OP_CREDIT_REQUEST) => c.owed.credit_update = true,
            (State::Established | State::Closing(_), OP_SHUTDOWN) => {
                c.peer_shutdown |= pkt.flags() & SHUTDOWN_BOTH;
                if c.state == State::Established && c.peer_shutdown == SHUTDOWN_BOTH {
                    c.state = State::Closing(Instant::now() + GRACE);
                }
                Self::finish_guest_side(c);
            }
            // REQUEST on a live connection, RESPONSE when not connecting, SHUTDOWN before
            // the connection exists: a confused guest; reset the stream.
            _ => c.owed.rst = true,
        }
        self.schedule(token);
        self.refresh(token);
    }

    /// Once the guest sends no more and its data reached the socket: half-close the socket,
    /// and when the guest also receives no more, finish with a RST.
    fn finish_guest_side(c: &mut Conn) {
        if c.peer_shutdown & SHUTDOWN_SEND != 0 && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.peer_shutdown == SHUTDOWN_BOTH {
                c.owed.rst = true;
            }
        }
    }

    fn guest_connect(&mut self, local: u32, peer: u32, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            return self.owe_rst(local, peer);
        }
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{local}"));
        let Ok(stream) = connect_nonblocking(Path::new(&path)) else { return self.owe_rst(local, peer) };
        let mut c = Conn::new(stream, self.guest_cid, local, peer, State::Established);
        c.peer_buf_alloc = buf_alloc;
        c.peer_fwd_cnt = fwd_cnt;
        c.owed.response = true;
        if let Some(token) = self.insert(c) {
            self.schedule(token);
        } else {
            self.owe_rst(local, peer);
        }
    }

    fn insert(&mut self, c: Conn) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let events = if c.wants_host_data() && !self.rx_stalled { EventSet::IN } else { EventSet::empty() };
        self.poll.ctl(ControlOperation::Add, c.stream.as_raw_fd(), EpollEvent::new(events, token)).ok()?;
        self.by_ports.insert((c.local_port, c.peer_port), token);
        self.conns.insert(token, c);
        Some(token)
    }

    fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
            if c.polled {
                let _ = self.poll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            }
        }
    }

    fn schedule(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.queued {
                c.queued = true;
                self.rx_work.push_back(token);
            }
        }
    }

    /// Sets what the connection's socket is polled for.
    fn refresh(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        if !c.polled {
            return;
        }
        let mut events = EventSet::empty();
        if c.wants_host_data() && !self.rx_stalled {
            events |= EventSet::IN;
        }
        if !c.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        let _ = self.poll.ctl(ControlOperation::Modify, c.stream.as_raw_fd(), EpollEvent::new(events, token));
    }

    // ---- host side ----

    /// Handles whatever the host sockets reported.
    fn process_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = self.poll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let (token, set) = (ev.data(), ev.event_set());
            if token == TOKEN_LISTENER {
                self.accept();
            } else if self.handshakes.contains_key(&token) {
                self.handshake(token);
            } else {
                self.conn_event(token, set);
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue; // dropped: the client sees the connection close
            }
            let token = self.next_token;
            self.next_token += 1;
            if self.poll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)).is_ok() {
                self.handshakes.insert(token, Handshake { stream, line: Vec::new(), deadline: Instant::now() + GRACE });
            }
        }
    }

    /// Reads the CONNECT line a byte at a time (nothing after it is consumed).
    fn handshake(&mut self, token: u64) {
        let Some(h) = self.handshakes.get_mut(&token) else { return };
        let mut byte = [0u8];
        let done = loop {
            match h.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break true,
                Ok(1) if h.line.len() < CONNECT_LINE_MAX => h.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break false, // EOF, error, or a line too long
            }
        };
        let Some(h) = self.handshakes.remove(&token) else { return };
        let _ = self.poll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
        let port = std::str::from_utf8(&h.line).ok().and_then(|l| l.strip_prefix("CONNECT ")).and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer) = port.filter(|_| done) else { return };
        let local = self.free_local_port(peer);
        let mut c = Conn::new(h.stream, self.guest_cid, local, peer, State::Connecting);
        c.owed.request = true;
        if let Some(token) = self.insert(c) {
            self.schedule(token);
        }
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    fn conn_event(&mut self, token: u64, set: EventSet) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        if set.contains(EventSet::OUT) {
            if c.flush_to_host().is_err() {
                c.owed.rst = true;
            }
            Self::finish_guest_side(c);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !set.contains(EventSet::IN) {
            // A hang-up is reported whatever we poll for: stop polling. Data still in the
            // socket is read when the guest has room (every guest packet schedules the
            // connection), then the EOF ends the stream.
            let _ = self.poll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            c.polled = false;
            if c.state == State::Connecting {
                c.owed.rst = true;
            }
        }
        self.schedule(token);
        self.refresh(token);
    }

    /// Drops every stream and stops listening: the device is broken until the driver resets it.
    fn close_all(&mut self) {
        for (_, h) in self.handshakes.drain() {
            let _ = self.poll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
        }
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t);
        }
        self.rx_work.clear();
        self.rsts.clear();
        let _ = self.poll.ctl(ControlOperation::Delete, self.listener.as_raw_fd(), EpollEvent::default());
        let _ = self.timer.clear();
    }

    /// Resets streams whose grace ran out and drops silent host clients.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(t, _)| *t).collect();
        for t in late {
            if let Some(h) = self.handshakes.remove(&t) {
                let _ = self.poll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
            }
        }
        let late: Vec<u64> = self.conns.iter().filter(|(_, c)| matches!(c.state, State::Closing(d) if d <= now)).map(|(t, _)| *t).collect();
        for t in late {
            if let Some(c) = self.conns.get_mut(&t) {
                c.owed.rst = true;
            }
            self.schedule(t);
        }
    }

    // ---- host to guest ----

    /// Fills guest receive buffers with owed packets and host data until either runs out.
    fn fill_rx(&mut self) {
        let mem = self.mem.clone();
        let (mut any, mut rechecked) = (false, false);
        loop {
            if self.rsts.is_empty() && self.rx_work.is_empty() {
                break;
            }
            let next = match next_chain(&mut self.queues[RX_QUEUE], &mem) {
                Ok(next) => next,
                Err(why) => return self.broken.set("virtio-vsock", &format!("receive queue: {why}"), self.interrupt.as_ref()),
            };
            let Some(mut chain) = next else {
                // Buffers may have come while we looked (once: a ring that claims buffers but
                // yields none is broken, and must not make us spin).
                if !rechecked && self.queues[RX_QUEUE].enable_notification(&mem).unwrap_or(false) {
                    rechecked = true;
                    continue;
                }
                self.rx_stalled = true;
                let tokens: Vec<u64> = self.conns.keys().copied().collect();
                for t in tokens {
                    self.refresh(t);
                }
                break;
            };
            let head = chain.head_index();
            let used = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.next_packet(&mut pkt) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: give the buffer back to the ring.
                        self.queues[RX_QUEUE].go_to_previous_position();
                        continue;
                    }
                },
                Err(_) => 0, // a buffer we cannot use goes back empty
            };
            if let Err(e) = self.queues[RX_QUEUE].add_used(&mem, head, used) {
                let why = format!("receive queue: descriptor head {head}: {e}");
                return self.broken.set("virtio-vsock", &why, self.interrupt.as_ref());
            }
            any = true;
        }
        if any && self.queues[RX_QUEUE].needs_notification(&mem).unwrap_or(true) {
            self.notify(RX_QUEUE as u16);
        }
    }

    /// Writes the next packet for the guest into `pkt`; its total length, or None if the work
    /// lists turned out to hold nothing.
    fn next_packet(&mut self, pkt: &mut VsockPacket<'_, GuestBitmapSlice<'_>>) -> Option<u32> {
        let hdr_len = pkt.header_slice().len() as u32;
        if let Some((local, peer)) = self.rsts.pop_front() {
            let h = ToGuest { guest_cid: self.guest_cid, local_port: local, peer_port: peer, op: OP_RST, ..Default::default() };
            h.write(pkt);
            return Some(hdr_len);
        }
        while let Some(token) = self.rx_work.pop_front() {
            let Some(c) = self.conns.get_mut(&token) else { continue };
            c.queued = false;
            if let Some((op, flags)) = c.take_owed() {
                c.header(op, flags, 0).write(pkt);
                if op == OP_RST {
                    self.remove(token);
                } else {
                    if op == OP_SHUTDOWN {
                        c.state = State::Closing(Instant::now() + GRACE);
                    }
                    self.schedule(token);
                }
                return Some(hdr_len);
            }
            if !c.wants_host_data() || self.rx_stalled {
                continue;
            }
            let room = pkt.data_slice().map_or(0, |d| d.len()).min(c.peer_credit() as usize).min(self.scratch.len());
            if room == 0 {
                continue;
            }
            match c.stream.read(&mut self.scratch[..room]) {
                Ok(0) => {
                    c.host_done = true;
                    c.owed.shutdown = true;
                    self.rx_work.push_front(token);
                    c.queued = true;
                }
                Ok(n) => {
                    if let Some(d) = pkt.data_slice() {
                        d.copy_from(&self.scratch[..n]);
                    }
                    c.header(OP_RW, 0, n as u32).write(pkt);
                    self.schedule(token);
                    self.refresh(token);
                    return Some(hdr_len + n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    c.host_done = true;
                    c.owed.rst = true;
                    self.rx_work.push_front(token);
                    c.queued = true;
                }
            }
            self.refresh(token);
        }
        None
    }
}
