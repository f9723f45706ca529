//! virtio-blk: a disk image from `ferro-block` (raw or qcow2) behind one request queue.
//!
//! Requests (read, write, flush, get-id, discard, write-zeroes) run on the device's worker
//! thread, never on a vCPU. Every request the driver gets wrong is answered with the status the
//! spec gives (IOERR for bad ranges, buffers and writes to a read-only disk, UNSUPP for unknown
//! types and flags); a request whose status byte cannot be written completes with length zero.
//! A broken queue marks the device NEEDS_RESET. `request` holds the request logic, `state` the
//! saved state. When the VM ends, [`VirtioDevice::shutdown`] flushes and closes the image.
//!
//! A writable image may also be *inactive*: closed while the VM is paused because another VMM
//! is to use it (a live migration hands it over, docs/migration.md). The source closes it
//! cleanly and so releases its locks ([`BlockDisk::inactivate`]); the destination builds its
//! device without opening it ([`Block::new_inactive`]) and opens it only once the source has let
//! go ([`BlockDisk::activate`]), as does a source that takes it back after a failed migration.

mod mirror;
mod request;
mod state;

pub use mirror::{DirtyGranules, GRANULE};
pub use request::BlockCounters;
pub use state::BlockState;

use super::chains::{self, Broken, Chain};
use super::worker::{Runner, Wake, WorkerState};
use super::{
    Activation, GuestMemoryMmap, InterruptReason, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt, device_type, read_config_bytes,
};
use ferro_block::{DiskImage, Format};
use ferro_vmm_api::DiskFormat;
use request::Requests;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

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

/// The image, shared by the device, its worker and the VMM's handle.
type SharedDisk = Arc<Mutex<Slot>>;

/// The image if it is open, and what it must be when it is opened again.
struct Slot {
    /// None once the device has shut down, or while the image is inactive.
    image: Option<Box<dyn DiskImage>>,
    /// Set while the image is inactive (another process may own it): its format, if known,
    /// and its capacity in sectors, once known (a destination learns both from the state).
    inactive: Option<(Option<DiskFormat>, Option<u64>)>,
    /// Set while a migration copies the disk along: the granules changed since it last looked.
    mirror: Option<DirtyGranules>,
}

fn to_block_format(format: DiskFormat) -> Format {
    match format {
        DiskFormat::Raw => Format::Raw,
        DiskFormat::Qcow2 => Format::Qcow2,
    }
}

pub struct Block {
    path: PathBuf,
    disk: SharedDisk,
    format: DiskFormat,
    readonly: bool,
    /// Size in 512-byte sectors (a partial last sector is not visible to the guest).
    capacity: u64,
    id: [u8; ID_BYTES],
    acked_features: u64,
    counters: Arc<BlockCounters>,
    runner: Runner<BlockWorker>,
}

const NAME: &str = "virtio-blk";

impl Block {
    /// Opens `path` (raw or qcow2; None to detect) for a guest disk.
    pub fn new(path: &Path, format: Option<DiskFormat>, readonly: bool) -> Result<Block, String> {
        let disk = ferro_block::open(path, format.map(to_block_format), readonly).map_err(|e| format!("disk {}: {e}", path.display()))?;
        let format = match disk.info().format {
            Format::Qcow2 => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        };
        let capacity = disk.size() / SECTOR_SIZE;
        Ok(Block {
            path: path.to_path_buf(),
            disk: Arc::new(Mutex::new(Slot { image: Some(disk), inactive: None, mirror: None })),
            format,
            readonly,
            capacity,
            id: serial_from_path(path),
            acked_features: 0,
            counters: Arc::default(),
            runner: Runner::Idle,
        })
    }

    /// A writable disk at `path` that another process owns for now (a migration's source): the
    /// image is neither opened nor locked, and nothing of it is read. Its format (unless given)
    /// and capacity come from the saved state restored into the device; [`BlockDisk::activate`]
    /// opens it, and checks it against them, once the other process has let go.
    pub fn new_inactive(path: &Path, format: Option<DiskFormat>) -> Block {
        Block {
            path: path.to_path_buf(),
            disk: Arc::new(Mutex::new(Slot { image: None, inactive: Some((format, None)), mirror: None })),
            format: format.unwrap_or(DiskFormat::Raw),
            readonly: false,
            capacity: 0,
            id: serial_from_path(path),
            acked_features: 0,
            counters: Arc::default(),
            runner: Runner::Idle,
        }
    }

    /// The request counters the worker keeps.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// A handle to the open image for disk snapshots (the VMM's control socket keeps it).
    pub fn disk_handle(&self) -> BlockDisk {
        BlockDisk { path: self.path.clone(), readonly: self.readonly, disk: self.disk.clone() }
    }

    fn lock_disk(&self) -> MutexGuard<'_, Slot> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every completed write durable; a closed disk has nothing left to flush.
    fn flush(&self) -> Result<(), String> {
        match self.lock_disk().image.as_mut() {
            Some(disk) if !self.readonly => disk.flush().map_err(|e| format!("disk {}: flush: {e}", self.path.display())),
            _ => Ok(()),
        }
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

/// A block device's open image as the VMM's snapshot op sees it. Internal snapshots are taken
/// only while the VM is paused: the device's worker is stopped then, so no request is in flight
/// and every completed write is in the image.
#[derive(Clone)]
pub struct BlockDisk {
    path: PathBuf,
    readonly: bool,
    disk: SharedDisk,
}

impl BlockDisk {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A read-only disk cannot change, so a VM snapshot leaves it alone.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Runs `f` on the image's qcow2 layer; a disk of another format (or closed) is refused
    /// naming it.
    fn with_qcow2<T>(&self, f: impl FnOnce(&mut ferro_block::qcow2::Qcow2) -> ferro_block::Result<T>) -> Result<T, String> {
        let mut guard = self.lock();
        let Slot { image, inactive, .. } = &mut *guard;
        let disk = image.as_mut().ok_or_else(|| self.unavailable(inactive.is_some()))?;
        let qcow2 = ferro_block::snapshot_capable(disk.as_mut()).map_err(|e| format!("disk {e}"))?;
        f(qcow2).map_err(|e| format!("disk {e}"))
    }

    /// Refuses, changing nothing, a disk that cannot take snapshot `name`: not qcow2, or it
    /// has a snapshot of that name already.
    pub fn check_snapshot(&self, name: &str) -> Result<(), String> {
        let exists = self.with_qcow2(|q| Ok(q.snapshots()?.iter().any(|s| s.name == name)))?;
        if exists {
            return Err(format!("disk {} has a snapshot named {name:?} already", self.path.display()));
        }
        Ok(())
    }

    /// Makes every completed write durable while the guest runs (its disk requests wait for
    /// the flush, its vCPUs do not): done just before a pause that flushes again, it leaves the
    /// paused flush only what the guest wrote in between, so the pause no longer grows with
    /// the writes since the guest's own last flush. A closed or read-only disk has nothing to do.
    pub fn flush(&self) -> Result<(), String> {
        match self.lock().image.as_mut() {
            Some(disk) if !self.readonly => disk.flush().map_err(|e| format!("disk {}: flush: {e}", self.path.display())),
            _ => Ok(()),
        }
    }

    /// Flushes the image and takes internal snapshot `name` (the VM must be paused).
    pub fn create_snapshot(&self, name: &str) -> Result<(), String> {
        self.with_qcow2(|q| {
            ferro_block::DiskImage::flush(q)?;
            q.create_snapshot(name).map(drop)
        })
    }

    /// Deletes snapshot `name` (undoing a VM snapshot that failed on another disk).
    pub fn delete_snapshot(&self, name: &str) -> Result<(), String> {
        self.with_qcow2(|q| q.delete_snapshot(name))
    }

    /// Whether the image has internal snapshot `name`.
    pub fn has_snapshot(&self, name: &str) -> Result<bool, String> {
        self.with_qcow2(|q| Ok(q.snapshots()?.iter().any(|s| s.name == name)))
    }

    /// Refuses, changing nothing, a disk that cannot start a backup: not qcow2, snapshot
    /// `snapshot` or bitmap `checkpoint` there already, or a bitmap of `since` missing or
    /// inconsistent.
    pub fn check_backup(&self, checkpoint: &str, snapshot: &str, since: &[String]) -> Result<(), String> {
        self.check_snapshot(snapshot)?;
        if self.with_qcow2(|q| Ok(q.bitmaps().iter().any(|b| b.name == checkpoint)))? {
            return Err(format!("disk {} has a bitmap named {checkpoint:?} already", self.path.display()));
        }
        if !since.is_empty() {
            self.changed_since(since)?;
        }
        Ok(())
    }

    /// Makes checkpoint `name` (see `Qcow2::add_checkpoint`).
    pub fn add_checkpoint(&self, name: &str, parent: Option<&str>) -> Result<(), String> {
        self.with_qcow2(|q| q.add_checkpoint(name, parent))
    }

    /// Removes checkpoint `name`, merging it into `parent` (see `Qcow2::remove_checkpoint`).
    pub fn remove_checkpoint(&self, name: &str, parent: Option<&str>) -> Result<(), String> {
        self.with_qcow2(|q| q.remove_checkpoint(name, parent))
    }

    /// The byte ranges written since the oldest checkpoint of `since` (see `Qcow2::changed_since`).
    pub fn changed_since(&self, since: &[String]) -> Result<Vec<(u64, u64)>, String> {
        self.with_qcow2(|q| Ok(q.changed_since(since)?.ranges()))
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the image is not open, naming the disk: handed over by a migration, or closed.
    fn unavailable(&self, inactive: bool) -> String {
        let why = if inactive { "inactive (handed over to another VMM by a migration)" } else { "closed" };
        format!("disk {} is {why}", self.path.display())
    }

    /// Runs `f` on the open image; a closed or inactive one is refused naming the disk.
    fn with_image<T>(&self, f: impl FnOnce(&mut dyn DiskImage, &mut Option<DirtyGranules>) -> ferro_block::Result<T>) -> Result<T, String> {
        let mut guard = self.lock();
        let Slot { image, mirror, inactive } = &mut *guard;
        let disk = image.as_mut().ok_or_else(|| self.unavailable(inactive.is_some()))?;
        f(disk.as_mut(), mirror).map_err(|e| format!("disk {}: {e}", self.path.display()))
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> Result<u64, String> {
        self.with_image(|disk, _| Ok(disk.size()))
    }

    /// The image's format.
    pub fn format(&self) -> Result<DiskFormat, String> {
        self.with_image(|disk, _| Ok(if disk.info().format == Format::Qcow2 { DiskFormat::Qcow2 } else { DiskFormat::Raw }))
    }

    /// Starts marking what the guest changes (see [`DirtyGranules`]); the marks start empty.
    pub fn start_mirror(&self) -> Result<(), String> {
        if self.readonly {
            return Err(format!("disk {} is read-only", self.path.display()));
        }
        self.with_image(|disk, mirror| {
            *mirror = Some(DirtyGranules::new(disk.size()));
            Ok(())
        })
    }

    /// Stops marking (a migration that copied the disk ended).
    pub fn stop_mirror(&self) {
        self.lock().mirror = None;
    }

    /// The ranges marked since the last look, clearing them (empty when not marking).
    pub fn take_mirror(&self) -> Vec<(u64, u64)> {
        self.lock().mirror.as_mut().map(DirtyGranules::take).unwrap_or_default()
    }

    /// Bytes marked since the last look.
    pub fn mirror_bytes(&self) -> u64 {
        self.lock().mirror.as_ref().map_or(0, DirtyGranules::bytes)
    }

    /// How the disk reads from `off` (below its size): `(len, true)` when the next `len` bytes
    /// read as zeroes without reading them (this layer says so, or has nothing and no backing
    /// file), `(len, false)` when they may hold data.
    pub fn extent(&self, off: u64, len: u64) -> Result<(u64, bool), String> {
        self.with_image(|disk, _| {
            let e = disk.block_status(off, len)?;
            let zero = match e.status {
                ferro_block::Status::Zero => true,
                ferro_block::Status::Unallocated => disk.backing_mut().is_none(),
                _ => false,
            };
            Ok((e.len.clamp(1, len), zero))
        })
    }

    /// Reads `buf.len()` bytes at `off` as the guest would.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        self.with_image(|disk, _| disk.read_at(buf, off))
    }

    /// Writes `buf` at `off` (a migration's destination filling its copy); the range must lie
    /// within the disk, which the caller checks.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<(), String> {
        if self.readonly {
            return Err(format!("disk {} is read-only", self.path.display()));
        }
        self.with_image(|disk, _| disk.write_at(buf, off))
    }

    /// Makes `len` bytes at `off` read as zeroes (a migration's destination).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<(), String> {
        if self.readonly {
            return Err(format!("disk {} is read-only", self.path.display()));
        }
        self.with_image(|disk, _| disk.write_zeroes(off, len))
    }

    /// Whether the image is inactive (closed until [`activate`](Self::activate)).
    pub fn is_inactive(&self) -> bool {
        self.lock().inactive.is_some()
    }

    /// Closes a writable image as a clean close does (writes durable, qcow2 metadata and dirty
    /// bitmaps stored, their `in_use` flags cleared) and so releases its locks, for another
    /// process to open it. The device's worker must be paused (the VM is). A read-only or
    /// already inactive image is left as it is. On failure the image is closed all the same (it
    /// is inactive, and its locks are released): [`activate`](Self::activate) opens it again.
    pub fn inactivate(&self) -> Result<(), String> {
        let mut slot = self.lock();
        if self.readonly || slot.inactive.is_some() {
            return Ok(());
        }
        let Some(image) = slot.image.take() else { return Err(format!("disk {} is closed", self.path.display())) };
        let format = match image.info().format {
            Format::Qcow2 => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        };
        slot.inactive = Some((Some(format), Some(image.size() / SECTOR_SIZE)));
        ferro_block::close(image).map_err(|e| format!("disk {}: closing it for the hand-over: {e}", self.path.display()))
    }

    /// Opens an inactive image again (its locks taken, its metadata read afresh), and checks it
    /// is what the device exposes: the format and capacity it had (or, on a migration's
    /// destination, that the restored state gave). `Err((true, why))` when another process
    /// still holds the image (its locks refuse the open), `Err((false, why))` for any other
    /// failure. An active image is left as it is.
    pub fn activate(&self) -> Result<(), (bool, String)> {
        let mut slot = self.lock();
        let Some((format, capacity)) = slot.inactive else { return Ok(()) };
        let here = self.path.display();
        let Some(capacity) = capacity else {
            return Err((false, format!("disk {here}: its size is not known yet (no state was restored)")));
        };
        let image = ferro_block::open(&self.path, format.map(to_block_format), false).map_err(|e| {
            let in_use = matches!(e, ferro_block::Error::InUse { .. });
            (in_use, format!("disk {here}: {e}"))
        })?;
        let opened = match image.info().format {
            Format::Qcow2 => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        };
        if format.is_some_and(|f| f != opened) {
            return Err((false, format!("disk {here}: it is {} now, {} before", opened.name(), format.map_or("?", |f| f.name()))));
        }
        if image.size() / SECTOR_SIZE != capacity {
            return Err((false, format!("disk {here}: {} sectors now, {capacity} before", image.size() / SECTOR_SIZE)));
        }
        slot.image = Some(image);
        slot.inactive = None;
        Ok(())
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
        let Activation { mem, interrupt, queues, features, broken } = a;
        let (queues, mut kicks): (Vec<_>, Vec<_>) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
        let kick = kicks.pop().ok_or("virtio-blk needs its request queue")?;
        self.acked_features = features;
        let requests = Requests::new(self.readonly, self.capacity * SECTOR_SIZE, self.id, self.counters.clone());
        self.runner.start(NAME, BlockWorker { mem, interrupt, broken, queues, kick, disk: self.disk.clone(), requests })
    }

    fn pause(&mut self) -> Vec<Queue> {
        self.runner.pause()
    }

    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        self.runner.resume(NAME, queues)
    }

    fn reset(&mut self) {
        self.runner.stop();
        self.acked_features = 0;
        if let Err(e) = self.flush() {
            eprintln!("ferro: {e}");
        }
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.state())
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Block(s) => self.restore_state(s),
            other => Err(other.mismatch(NAME)),
        }
    }

    /// Stops the worker, then flushes and closes the image (qcow2 writes back its metadata).
    fn shutdown(&mut self) {
        self.runner.stop();
        if let Err(e) = self.flush() {
            eprintln!("ferro: {e}");
        }
        let mut slot = self.lock_disk();
        slot.inactive = None;
        slot.mirror = None;
        drop(slot.image.take());
    }
}

/// The worker's side: the request queue, its kick, the image and the request logic.
struct BlockWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    broken: Broken,
    queues: Vec<Queue>,
    kick: EventFd,
    disk: SharedDisk,
    requests: Requests,
}

impl WorkerState for BlockWorker {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Block;

    fn fds(&self) -> Vec<RawFd> {
        vec![self.kick.as_raw_fd()]
    }

    fn wake(&mut self, _: Wake) {
        let _ = self.kick.read();
        let Some(queue) = self.queues.first_mut() else { return };
        if self.broken.is_set() {
            return;
        }
        let mut slot = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let Slot { image, mirror, .. } = &mut *slot;
        let Some(disk) = image.as_mut() else { return };
        let mut marking;
        let disk: &mut dyn DiskImage = match mirror {
            Some(dirty) => {
                marking = mirror::Marking { inner: disk.as_mut(), dirty };
                &mut marking
            }
            None => disk.as_mut(),
        };
        let (mem, requests) = (&self.mem, &mut self.requests);
        let served = chains::drain(queue, mem, |chain| {
            let chain = Chain::parse(chain, mem);
            requests.serve(&mut *disk, mem, &chain)
        });
        match served {
            Ok(true) => self.interrupt.trigger(InterruptReason::Queue(0)),
            Ok(false) => {}
            Err(why) => self.broken.set(NAME, &why, self.interrupt.as_ref()),
        }
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}
