//! virtio-vsock: guest AF_VSOCK streams to host unix sockets, with Firecracker's host-side
//! convention (see `muxer`). Three queues: receive, transmit, and events; the guest's CID in the
//! configuration space. The `virtio-vsock` crate parses packets; the muxer owns the streams.

mod connection;
mod muxer;
mod packet;
mod state;

pub use state::VsockState;

use super::worker::Worker;
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, device_type, read_config_bytes};
use muxer::{EVENT_QUEUE, Muxer, RX_QUEUE, TX_QUEUE};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

const QUEUE_SIZE: u16 = 256;

pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    acked: u64,
    /// Restored from a snapshot: the guest must hear that its streams are gone.
    reset_event: bool,
    worker: Option<Worker>,
}

impl Vsock {
    /// Listens on `uds` for host-initiated connections; `cid` is the guest's address.
    pub fn new(cid: u64, uds: &Path) -> io::Result<Vsock> {
        let listener = UnixListener::bind(uds).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AddrInUse { " (remove it if no VM uses it)" } else { "" };
            io::Error::new(e.kind(), format!("{}: {e}{hint}", uds.display()))
        })?;
        listener.set_nonblocking(true)?;
        Ok(Vsock { cid, uds: uds.to_owned(), listener, acked: 0, reset_event: false, worker: None })
    }

    pub fn snapshot(&self) -> VsockState {
        VsockState { cid: self.cid, uds: self.uds.clone(), acked_features: self.acked }
    }

    /// A device for a restored guest: same CID and socket; the guest learns at activation that
    /// its old streams are gone.
    pub fn restore(s: &VsockState) -> io::Result<Vsock> {
        let mut v = Vsock::new(s.cid, &s.uds)?;
        v.acked = s.acked_features;
        v.reset_event = true;
        Ok(v)
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
        let Ok([rx, tx, event]) = <[_; 3]>::try_from(queues) else {
            return Err("virtio-vsock needs its rx, tx and event queues".into());
        };
        let listener = self.listener.try_clone().map_err(|e| format!("vsock listener: {e}"))?;
        let queues = [rx.queue, tx.queue, event.queue];
        let mut m = Muxer::new(self.cid, self.uds.clone(), listener, mem, interrupt, queues, self.reset_event, broken)
            .map_err(|e| format!("vsock: {e}"))?;
        let kicks = [rx.kick, tx.kick, event.kick];
        let fds = vec![kicks[0].as_raw_fd(), kicks[1].as_raw_fd(), kicks[2].as_raw_fd(), m.poll_fd(), m.timer.as_raw_fd()];
        let worker = Worker::spawn("virtio-vsock", fds, move |wake| {
            if m.broken.is_set() {
                // Until the driver resets the device: drain what wakes us, touch no ring, and
                // drop the streams.
                if wake < kicks.len() {
                    let _ = kicks[wake].read();
                } else if wake == 4 {
                    let _ = m.timer.wait();
                }
                m.close_all();
                return;
            }
            match wake {
                RX_QUEUE => {
                    let _ = kicks[RX_QUEUE].read();
                    m.rx_kicked();
                }
                TX_QUEUE => {
                    let _ = kicks[TX_QUEUE].read();
                    m.process_tx();
                }
                EVENT_QUEUE => {
                    let _ = kicks[EVENT_QUEUE].read();
                }
                3 => m.process_host(),
                _ => {
                    let _ = m.timer.wait();
                    m.expire();
                }
            }
            m.settle();
        })
        .map_err(|e| format!("starting the vsock worker: {e}"))?;
        self.acked = features;
        self.reset_event = false;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_holds_the_cid_and_the_snapshot_round_trips() {
        let dir = ferro_test_support::TempDir::new("vsock-unit");
        let uds = dir.join("v.sock");
        let v = Vsock::new(0x1_0000_0003, &uds).unwrap();
        let mut cfg = [0u8; 8];
        v.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1_0000_0003);
        assert!(Vsock::new(3, &uds).is_err(), "a second device on the same socket");
        let state = v.snapshot();
        drop(v);
        assert!(!uds.exists(), "the socket goes away with the device");
        let json = serde_json::to_string(&state).unwrap();
        let restored = Vsock::restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.snapshot(), state);
        assert!(restored.reset_event, "a restored guest hears its streams are gone");
    }
}
