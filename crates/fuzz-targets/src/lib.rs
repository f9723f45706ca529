//! What each fuzz target does with one input, in one place: the cargo-fuzz targets in `fuzz/`
//! call these functions, and `tests/corpora.rs` replays every committed corpus file through them
//! on the stable toolchain, so CI catches a regression without a fuzzer (docs/fuzzing.md).
//!
//! Every function takes bytes an attacker controls (a guest's memory and queues, an image
//! file) and must return without panicking, whatever they are.

mod definition;
mod guest_memory;
mod kernel;
mod memory_file;
mod transport;

pub use definition::{DefinitionRun, definition};
pub use kernel::kernel;
pub use transport::{TransportRun, transport, transport_settled};

use ferro_block::DiskImage;
use ferro_devices::virtio::chains::{Chain, drain, gather, scatter};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the virtqueue target: the input's first bytes, the rest zero.
const GUEST_MEMORY: usize = 64 << 10;
/// Where the driver's structures lie in that memory.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// A split virtqueue whose descriptor table, available ring and buffers are the input (the
/// first byte chooses the queue size): every chain the device would serve is walked as the
/// device workers walk them (segments checked, readable then writable, copied in and out).
/// Returns how many chains were served without a fault.
pub fn virtqueue(data: &[u8]) -> usize {
    let Some((&size_byte, memory)) = data.split_first() else { return 0 };
    let size = 1u16 << (size_byte % 9); // 1 ..= 256, powers of two as the spec requires
    let Some(lease) = guest_memory::Lease::new(GUEST_MEMORY) else { return 0 };
    let mem = lease.mem();
    let len = memory.len().min(GUEST_MEMORY);
    if mem.write_slice(&memory[..len], GuestAddress(0)).is_err() {
        return 0;
    }
    let Ok(mut queue) = Queue::new(256) else { return 0 };
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return 0;
    }
    let mut buf = vec![0u8; 4096];
    let mut served = 0;
    let _ = drain(&mut queue, mem, |chain| {
        let chain = Chain::parse(chain, mem);
        if chain.fault.is_some() {
            return 0;
        }
        served += 1;
        let _ = gather(mem, &chain.readable, 0, &mut buf);
        if scatter(mem, &chain.writable, 0, &buf) { buf.len() as u32 } else { 0 }
    });
    served
}

/// A qcow2 image file that is the input (held in memory): opened, read at a few places, and
/// written where the image can take it; errors are fine, panics and hangs are not. Returns
/// whether the image opened.
pub fn qcow2(data: &[u8]) -> bool {
    let storage = memory_file::MemoryFile::new(data);
    // A backing file the header names is looked up beside this path, which does not exist.
    let path = std::path::Path::new("/nonexistent/fuzz.qcow2");
    let Ok(mut image) = ferro_block::qcow2::Qcow2::open_on(Box::new(storage), path, false) else { return false };
    let size = image.size();
    let mut buf = vec![0u8; 65536];
    for off in [0, size / 2, size.saturating_sub(512)] {
        let off = off & !511;
        let len = (size - off.min(size)).min(buf.len() as u64) as usize;
        if image.read_at(&mut buf[..len], off).is_err() || image.write_at(&buf[..len.min(4096)], off).is_err() {
            return true;
        }
    }
    let _ = image.block_status(0, size);
    let _ = image.flush();
    true
}

/// A raw disk that is the input, searched for what it boots as ferrod does for a domain with
/// `boot.from = "disk"` (partition table, MBR or GPT, then each partition's ext4 file system,
/// the boot loader's configuration and the kernel it names): the disk's bytes are whatever the
/// guest wrote, and ferrod reads them as root. Written to a file of this process like [`vmdk`]'s.
/// Returns whether a kernel was found.
pub fn disk_boot(data: &[u8]) -> bool {
    let Some(path) = scratch_file("disk_boot.raw", data) else { return false };
    let found = ferro_images::boot::find(&path, Some(ferro_block::Format::Raw)).is_ok();
    let _ = std::fs::remove_file(&path);
    found
}

/// A file made once per process, `/dev/shm/ferro-fuzz-{prefix}{pid}{suffix}` holding `contents`
/// (one per process, so that parallel fuzz jobs do not share it); the files of this kind of
/// processes that are gone are removed first, so that runs do not pile them up.
fn process_file(prefix: &str, suffix: &str, contents: &[u8]) -> Option<std::path::PathBuf> {
    let prefix = format!("ferro-fuzz-{prefix}");
    for entry in std::fs::read_dir("/dev/shm").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(suffix));
        if pid.is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit()) && !std::path::Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let path = std::path::PathBuf::from(format!("/dev/shm/{prefix}{}{suffix}", std::process::id()));
    std::fs::write(&path, contents).ok()?;
    Some(path)
}

/// `data` in a file of this process (in /dev/shm when there is one) named after `name`.
fn scratch_file(name: &str, data: &[u8]) -> Option<std::path::PathBuf> {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let path = dir.join(format!("ferro-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, data).ok().map(|()| path)
}

/// A VMDK file that is the input (sparse or streamOptimized; written to a file of this process
/// in /dev/shm, since VMDK images are opened by path; one file per process, so parallel
/// fuzz jobs do not share it): opened read-only and read at the start,
/// middle and end. Returns whether the image opened.
pub fn vmdk(data: &[u8]) -> bool {
    let Some(path) = scratch_file("image.vmdk", data) else { return false };
    let opened = ferro_block::vmdk::VmdkImage::open(&path, ferro_block::Access::Read);
    let through = opened.is_ok();
    if let Ok(mut image) = opened {
        let size = image.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(512)] {
            let off = off & !511;
            let len = (size - off.min(size)).min(buf.len() as u64) as usize;
            if image.read_at(&mut buf[..len], off).is_err() {
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    through
}
