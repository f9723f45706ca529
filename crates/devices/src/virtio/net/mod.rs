//! virtio-net on a tap device: a receive and a transmit queue, the MAC and link status in the
//! configuration space, checksum/TSO offloads offered only when the tap takes them, and
//! mergeable receive buffers. Frames keep their virtio-net header end to end (the tap speaks the
//! same header), so the worker (`datapath`) only copies bytes between guest buffers and the tap.

mod datapath;
mod state;
pub mod tap;

pub use datapath::NetCounters;
pub use state::NetState;

use super::worker::Runner;
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioDeviceState, device_type, read_config_bytes};
use datapath::NetIo;
use virtio_queue::Queue;
use ferro_vmm_api::MacAddr;
use std::io;
use std::sync::Arc;
use tap::Tap;
use virtio_bindings::virtio_net as vn;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features that need the tap's offloads: the guest may hand us partial checksums and large
/// segments (CSUM, HOST_*), and receive them (GUEST_*).
const OFFLOAD_FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN);

const BASE_FEATURES: u64 = bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC;

pub struct Net {
    tap: Arc<Tap>,
    mac: MacAddr,
    offered: u64,
    acked: u64,
    counters: Arc<NetCounters>,
    runner: Runner<NetIo>,
}

const NAME: &str = "virtio-net";

/// TUN_F_* offloads the tap may use towards a guest that accepted `features`.
fn tap_offloads(features: u64) -> u32 {
    [
        (vn::VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
        (vn::VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (vn::VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (vn::VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
    ]
    .into_iter()
    .filter(|(f, _)| features & bit(*f) != 0)
    .fold(0, |acc, (_, t)| acc | t)
}

impl Net {
    /// Opens (or creates) the tap `tap`; `mac` None makes one up.
    pub fn new(tap: &str, mac: Option<MacAddr>) -> io::Result<Net> {
        Net::on(Tap::open(tap)?, mac)
    }

    /// Takes over the tap `tap` already open on the inherited descriptor `fd` (see
    /// [`Tap::from_fd`]); `mac` None makes one up.
    pub fn from_fd(fd: i32, tap: &str, mac: Option<MacAddr>) -> io::Result<Net> {
        Net::on(Tap::from_fd(fd, tap)?, mac)
    }

    fn on(tap: Tap, mac: Option<MacAddr>) -> io::Result<Net> {
        let offered = if tap.supports_offloads() { BASE_FEATURES | OFFLOAD_FEATURES } else { BASE_FEATURES };
        let mac = mac.unwrap_or_else(MacAddr::random);
        Ok(Net { tap: Arc::new(tap), mac, offered, acked: 0, counters: Arc::default(), runner: Runner::Idle })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The traffic counters the worker keeps.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac.bytes());
        c[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if a.queues.len() != 2 {
            return Err(format!("virtio-net needs 2 queues, got {}", a.queues.len()));
        }
        self.tap.set_offload(tap_offloads(a.features)).map_err(|e| format!("TUNSETOFFLOAD on {}: {e}", self.tap.name()))?;
        self.acked = a.features;
        let io = NetIo::new(self.tap.clone(), a, self.counters.clone()).map_err(|e| format!("starting the net worker: {e}"))?;
        self.runner.start(NAME, io)
    }

    fn pause(&mut self) -> Vec<Queue> {
        self.runner.pause()
    }

    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        self.runner.resume(NAME, queues)
    }

    fn reset(&mut self) {
        self.runner.stop();
        self.acked = 0;
        let _ = self.tap.set_offload(0);
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.state())
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Net(s) => self.restore_state(s),
            other => Err(other.mismatch(NAME)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_test_support::net::in_private_netns;

    #[test]
    fn state_round_trips_into_a_device_on_the_same_tap() {
        in_private_netns(|| {
            let mut net = Net::new("fsnap0", Some(MacAddr([0x52, 0x54, 0, 1, 2, 3]))).unwrap();
            let mut config = [0u8; 8];
            net.read_config(0, &mut config);
            assert_eq!(config, [0x52, 0x54, 0, 1, 2, 3, 1, 0], "MAC, then link up");
            assert_eq!(net.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES, "a tap takes checksum and TSO offloads");
            net.acked = BASE_FEATURES;
            let state = net.save();
            let json = serde_json::to_string(&state).unwrap();
            drop(net);
            // A configuration without a MAC makes one up; the saved one wins, as the guest knows it.
            let mut restored = Net::new("fsnap0", None).unwrap();
            restored.restore(&serde_json::from_str(&json).unwrap()).unwrap();
            assert_eq!(restored.save(), state);
            assert_eq!(restored.mac(), MacAddr([0x52, 0x54, 0, 1, 2, 3]));
            restored.offered = BASE_FEATURES;
            let VirtioDeviceState::Net(s) = &state else { unreachable!() };
            assert!(restored.restore_state(s).is_err(), "offloads the guest was offered must still be there");
        });
    }

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(BASE_FEATURES), 0);
        assert_eq!(tap_offloads(OFFLOAD_FEATURES), tap::ALL_OFFLOADS);
        assert_eq!(tap_offloads(bit(vn::VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
    }
}
