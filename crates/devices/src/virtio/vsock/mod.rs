//! virtio-vsock: guest AF_VSOCK streams to host unix sockets, with Firecracker's host-side
//! convention (see `muxer`). Three queues: receive, transmit, and events; the guest's CID in the
//! configuration space. The `virtio-vsock` crate parses packets; the muxer owns the streams.

mod connection;
mod muxer;
mod packet;
mod state;

pub use state::VsockState;

use super::worker::Runner;
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioDeviceState, device_type, read_config_bytes};
use muxer::Muxer;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const NAME: &str = "virtio-vsock";

pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    acked: u64,
    /// Restored from a saved state: the guest must hear that its streams are gone.
    reset_event: bool,
    runner: Runner<Muxer>,
}

impl Vsock {
    /// Listens on `uds` for host-initiated connections; `cid` is the guest's address.
    pub fn new(cid: u64, uds: &Path) -> io::Result<Vsock> {
        let listener = UnixListener::bind(uds).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AddrInUse { " (remove it if no VM uses it)" } else { "" };
            io::Error::new(e.kind(), format!("{}: {e}{hint}", uds.display()))
        })?;
        listener.set_nonblocking(true)?;
        Ok(Vsock { cid, uds: uds.to_owned(), listener, acked: 0, reset_event: false, runner: Runner::Idle })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let Activation { mem, interrupt, queues, features, broken } = a;
        let (queues, kicks): (Vec<_>, Vec<_>) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
        let Ok(kicks) = <[EventFd; 3]>::try_from(kicks) else {
            return Err("virtio-vsock needs its rx, tx and event queues".into());
        };
        let listener = self.listener.try_clone().map_err(|e| format!("vsock listener: {e}"))?;
        let muxer = Muxer::new(self.cid, self.uds.clone(), listener, mem, interrupt, queues, kicks, self.reset_event, broken)
            .map_err(|e| format!("vsock: {e}"))?;
        self.runner.start(NAME, muxer)?;
        self.acked = features;
        self.reset_event = false;
        Ok(())
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
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(VsockState { cid: self.cid, uds: self.uds.clone(), acked_features: self.acked })
    }

    /// Streams do not survive (their host sockets belong to the old process): as Firecracker
    /// does, the guest is told with a TRANSPORT_RESET event when the device runs again.
    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        let VirtioDeviceState::Vsock(s) = state else { return Err(state.mismatch(NAME)) };
        if s.cid != self.cid {
            return Err(format!("vsock: guest CID {} now, {} when saved", self.cid, s.cid));
        }
        self.acked = s.acked_features;
        self.reset_event = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_holds_the_cid_and_the_state_round_trips() {
        let dir = ferro_test_support::TempDir::new("vsock-unit");
        let uds = dir.join("v.sock");
        let mut v = Vsock::new(0x1_0000_0003, &uds).unwrap();
        let mut cfg = [0u8; 8];
        v.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1_0000_0003);
        assert!(Vsock::new(3, &uds).is_err(), "a second device on the same socket");
        v.acked = 1 << 32;
        let state = v.save();
        drop(v);
        assert!(!uds.exists(), "the socket goes away with the device");
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = Vsock::new(0x1_0000_0003, &uds).unwrap();
        restored.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.save(), state);
        assert!(restored.reset_event, "a restored guest hears its streams are gone");
        drop(restored);
        let mut other = Vsock::new(4, &uds).unwrap();
        assert!(other.restore(&state).unwrap_err().contains("CID 4 now"));
        drop(other);
    }

    /// A restored device tells the guest its streams are gone: a TRANSPORT_RESET event on the
    /// event queue as soon as it runs, as Firecracker does.
    #[test]
    fn a_restored_device_sends_a_transport_reset_event() {
        use crate::virtio::chains::tests::{F_WRITE, InterruptLog, broken, memory};
        use super::muxer::EVENT_QUEUE;
        use crate::virtio::{Activation, ActiveQueue};
        use virtio_queue::desc::{RawDescriptor, split::Descriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Address, Bytes, GuestAddress};

        let dir = std::env::temp_dir().join(format!("ferro-vsock-reset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let mut v = Vsock::new(3, &uds).unwrap();
        v.restore(&VirtioDeviceState::Vsock(VsockState { cid: 3, uds: uds.clone(), acked_features: 1 << 32 })).unwrap();
        let mem = memory();
        let vqs: Vec<_> = (0..3u64).map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * (i + 1)), 16)).collect();
        let event = &vqs[EVENT_QUEUE];
        event.desc_table().store(0, RawDescriptor::from(Descriptor::new(0x8000, 4, F_WRITE, 0))).unwrap();
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x8000)).unwrap();
        event.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        event.avail().idx().store(1u16.to_le());
        let queues: Vec<ActiveQueue> = vqs.iter().map(|q| ActiveQueue { queue: q.create_queue().unwrap(), kick: EventFd::new(libc::EFD_NONBLOCK).unwrap() }).collect();
        let kick = queues_kick(&queues);
        let irq = std::sync::Arc::new(InterruptLog::default());
        v.activate(Activation { mem: mem.clone(), interrupt: irq.clone(), queues, features: 1 << 32, broken: broken() }).unwrap();
        kick.write(1).unwrap();
        let start = std::time::Instant::now();
        while mem.read_obj::<u16>(event.used_addr().unchecked_add(2)).unwrap() != 1 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "no event reached the guest");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x8000)).unwrap(), packet::EVENT_TRANSPORT_RESET);
        v.reset();
        drop(v);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A second handle on the receive queue's kick, to wake the worker as a driver would.
    fn queues_kick(queues: &[crate::virtio::ActiveQueue]) -> EventFd {
        queues[super::muxer::RX_QUEUE].kick.try_clone().unwrap()
    }
}
