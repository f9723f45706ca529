//! virtio-blk: a disk image from `ferro-block` (raw or qcow2) behind one request queue.
//!
//! Requests (read, write, flush, get-id, discard, write-zeroes) run on the device's worker
//! thread, never on a vCPU. Every request the driver gets wrong is answered with the status the
//! spec gives (IOERR for bad ranges, buffers and writes to a read-only disk, UNSUPP for unknown
//! types and flags); a request whose status byte cannot be written completes with length zero.
//! A broken queue marks the device NEEDS_RESET. `request` holds the request logic, `state` the
//! snapshot state.

mod request;
mod state;

pub use request::BlockCounters;
pub use state::BlockState;

use super::chains::{self, Chain};
use super::worker::Worker;
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, device_type, read_config_bytes};
use ferro_block::{DiskImage, Format};
use ferro_vmm_api::DiskFormat;
use request::Requests;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use virtio_bindings::bindings::virtio_blk::*;

const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments in one request (the queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Limits of one discard / write-zeroes request.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 16;
/// Bytes of the identification string GET_ID returns.
pub const ID_BYTES: usize = 20;

fn bit(b: u32) -> u64 {
    1 << b
}

pub struct Block {
    path: PathBuf,
    disk: Arc<Mutex<Box<dyn DiskImage>>>,
    readonly: bool,
    /// Size in 512-byte sectors (a partial last sector is not visible to the guest).
    capacity: u64,
    id: [u8; ID_BYTES],
    acked_features: u64,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path` (raw or qcow2; None to detect) for a guest disk.
    pub fn new(path: &Path, format: Option<DiskFormat>, readonly: bool) -> Result<Block, String> {
        let format = format.map(|f| match f {
            DiskFormat::Raw => Format::Raw,
            DiskFormat::Qcow2 => Format::Qcow2,
        });
        let disk = ferro_block::open(path, format, readonly).map_err(|e| format!("disk {}: {e}", path.display()))?;
        let capacity = disk.size() / SECTOR_SIZE;
        Ok(Block {
            path: path.to_path_buf(),
            disk: Arc::new(Mutex::new(disk)),
            readonly,
            capacity,
            id: serial_from_path(path),
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        })
    }

    /// The request counters the worker keeps.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c
    }
}

/// GET_ID's answer: the image's file name, cut to 20 bytes (NUL-padded when shorter).
fn serial_from_path(path: &Path) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.readonly {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let Activation { mem, interrupt, mut queues, features, broken } = a;
        let aq = queues.drain(..).next().ok_or("virtio-blk needs its request queue")?;
        let (mut queue, kick) = (aq.queue, aq.kick);
        self.acked_features = features;
        let disk = self.disk.clone();
        let mut requests = Requests::new(self.readonly, self.capacity * SECTOR_SIZE, self.id, self.counters.clone());
        let worker = Worker::spawn("virtio-blk", vec![kick.as_raw_fd()], move |_| {
            let _ = kick.read();
            if broken.is_set() {
                return;
            }
            let mut disk = disk.lock().unwrap_or_else(|p| p.into_inner());
            let served = chains::drain(&mut queue, &mem, |chain| {
                let chain = Chain::parse(chain, &mem);
                requests.serve(disk.as_mut(), &mem, &chain)
            });
            match served {
                Ok(true) => interrupt.trigger(super::InterruptReason::Queue(0)),
                Ok(false) => {}
                Err(why) => broken.set("virtio-blk", &why, interrupt.as_ref()),
            }
        })
        .map_err(|e| format!("starting the virtio-blk worker: {e}"))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked_features = 0;
        if !self.readonly {
            let _ = self.disk.lock().unwrap_or_else(|p| p.into_inner()).flush();
        }
    }
}
