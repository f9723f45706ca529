//! The vsock wire protocol (virtio 1.x section 5.10): operations, flags, and the header the
//! device writes into a guest receive buffer. Parsing guest packets is the `virtio-vsock`
//! crate's job.

use crate::virtio::GuestBitmapSlice;
use virtio_vsock::packet::VsockPacket;

pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event queue: the transport was reset (connections are gone, the CID may have changed).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A header from the host to the guest. The data, if any, is already in the packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToGuest {
    pub guest_cid: u64,
    /// Host side port (src), guest side port (dst).
    pub local_port: u32,
    pub peer_port: u32,
    pub op: u16,
    pub flags: u32,
    pub len: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl ToGuest {
    pub fn write(&self, pkt: &mut VsockPacket<'_, GuestBitmapSlice<'_>>) {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(self.local_port)
            .set_dst_port(self.peer_port)
            .set_len(self.len)
            .set_type(TYPE_STREAM)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }
}
