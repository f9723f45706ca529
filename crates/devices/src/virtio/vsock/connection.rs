//! One vsock stream between a guest port and a host unix socket: its state, what it owes the
//! guest (control packets, data), and credit in both directions.
//!
//! Guest-to-host data is written to the unix socket at once; what the socket does not take waits
//! in `to_host`, which the guest cannot overfill because we advertise exactly that much buffer
//! (`BUF_ALLOC`) and count what we forwarded (`fwd_cnt`). Host-to-guest data is read from the
//! socket only while the guest's advertised credit allows.

use super::packet::{OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_BOTH, ToGuest};
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Buffer we advertise per connection for guest-to-host data.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or about to be), waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// Waiting for the guest to finish (its RST) until the deadline; then we reset it.
    Closing(Instant),
}

/// Control packets owed to the guest, sent in this order of priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owed {
    pub rst: bool,
    pub request: bool,
    pub response: bool,
    pub shutdown: bool,
    pub credit_update: bool,
}

pub struct Conn {
    pub stream: UnixStream,
    pub guest_cid: u64,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    pub owed: Owed,
    /// Guest data the socket has not taken yet.
    pub to_host: Vec<u8>,
    /// Bytes forwarded to the socket; what we last told the guest.
    pub fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// The guest's receive buffer and how much of our data it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we sent the guest.
    pub rx_cnt: u32,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host end will send nothing more (EOF, hang-up or error).
    pub host_done: bool,
    /// Whether the stream is in the host epoll (taken out after a hang-up).
    pub polled: bool,
    /// Whether the connection is in the muxer's receive work list.
    pub queued: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Conn {
        Conn {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            owed: Owed::default(),
            to_host: Vec::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            peer_shutdown: 0,
            host_done: false,
            polled: true,
            queued: false,
        }
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether we should read host data for the guest.
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_done && self.peer_shutdown & super::packet::SHUTDOWN_RCV == 0 && self.peer_credit() > 0
    }

    /// Takes guest data for the host. Err when the guest sent more than our advertised buffer.
    pub fn take_guest_data(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.to_host.len() + data.len() > BUF_ALLOC as usize {
            return Err(());
        }
        self.to_host.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes buffered guest data to the socket. Err when the socket failed.
    pub fn flush_to_host(&mut self) -> Result<(), ()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Err(()),
            }
        }
        // Tell the guest about freed buffer before it could run dry (it waits at zero credit).
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
            self.owed.credit_update = true;
        }
        Ok(())
    }

    /// Header for a packet to the guest (which also carries our credit).
    pub fn header(&mut self, op: u16, flags: u32, len: u32) -> ToGuest {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        if op == super::packet::OP_RW {
            self.rx_cnt = self.rx_cnt.wrapping_add(len);
        }
        ToGuest {
            guest_cid: self.guest_cid,
            local_port: self.local_port,
            peer_port: self.peer_port,
            op,
            flags,
            len,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next control packet owed, clearing it: (op, flags).
    pub fn take_owed(&mut self) -> Option<(u16, u32)> {
        let o = &mut self.owed;
        let (op, flags) = if std::mem::take(&mut o.rst) {
            (OP_RST, 0)
        } else if std::mem::take(&mut o.request) {
            (OP_REQUEST, 0)
        } else if std::mem::take(&mut o.response) {
            (OP_RESPONSE, 0)
        } else if std::mem::take(&mut o.shutdown) {
            (OP_SHUTDOWN, SHUTDOWN_BOTH)
        } else if std::mem::take(&mut o.credit_update) {
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        Some((op, flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Conn::new(a, 3, 1024, 5000, State::Established), b)
    }

    #[test]
    fn credit_counts_wrap_and_never_go_negative() {
        let (mut c, _b) = pair();
        c.peer_buf_alloc = 100;
        c.peer_fwd_cnt = u32::MAX - 10;
        c.rx_cnt = u32::MAX - 10;
        assert_eq!(c.peer_credit(), 100);
        c.header(super::super::packet::OP_RW, 0, 60);
        assert_eq!(c.peer_credit(), 40);
        c.rx_cnt = c.rx_cnt.wrapping_add(1000); // a guest that lies about fwd_cnt
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_past_the_advertised_buffer_is_refused_and_forwarded_data_is_counted() {
        let (mut c, mut b) = pair();
        c.take_guest_data(b"hello").unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(c.fwd_cnt, 5);
        // Nobody reads `b` now: the socket fills, the rest waits, and no more than BUF_ALLOC.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        while c.take_guest_data(&chunk).is_ok() {
            sent += chunk.len();
            assert!(sent < 64 << 20, "never refused");
        }
        assert!(c.to_host.len() <= BUF_ALLOC as usize);
        assert!(c.owed.credit_update, "a credit update is owed once half the buffer moved");
    }

    #[test]
    fn owed_packets_come_out_rst_first_then_once_each() {
        let (mut c, _b) = pair();
        c.owed = Owed { rst: true, request: false, response: true, shutdown: true, credit_update: true };
        let ops: Vec<u16> = std::iter::from_fn(|| c.take_owed().map(|(op, _)| op)).collect();
        assert_eq!(ops, [OP_RST, OP_RESPONSE, OP_SHUTDOWN, OP_CREDIT_UPDATE]);
        assert_eq!(c.take_owed(), None);
    }
}
