//! Guest RAM: host mappings split around the 32-bit device hole, registered with KVM.
//!
//! [`create`] makes RAM for both a booted VM (fresh) and a restored one (from a memory file):
//! 2 MiB hugetlb pages or memory advised for transparent huge pages, optionally mergeable by
//! KSM. A restored VM without huge pages maps its memory file privately: pages are read from the
//! file when the guest first touches them and copied on write, so restoring costs the same for
//! any guest size and the file is never changed. [`save`] writes that file: the RAM regions back to back, in
//! guest address order, all-zero pages left as holes.

use crate::dirty::{self, DirtyMap};
use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START, MIN_MEMORY};
use crate::{Error, Result};
use ferro_hypervisor::host_memory::{HUGE_PAGE, HugePagePool};
use ferro_vmm_api::MemoryConfig;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use ferro_devices::virtio::GuestMemoryMmap;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Pages are compared and written in pieces this big when memory is saved.
const SAVE_CHUNK: usize = 64 << 10;

/// The (start, size) RAM ranges for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// Checks the size against our minimum and against what the host has.
pub fn check_size(size: u64) -> Result<()> {
    if size < MIN_MEMORY {
        return Err(Error::Config(format!("memory {} MiB is too small: at least {} MiB is needed", size >> 20, MIN_MEMORY >> 20)));
    }
    if let Ok((host, _)) = ferro_hypervisor::host_memory::ram() {
        if size > host {
            return Err(Error::Config(format!(
                "memory {} MiB is more than this host has ({} MiB in total)",
                size >> 20,
                host >> 20
            )));
        }
    }
    Ok(())
}

/// Where guest RAM's first contents come from: both boot and restore build memory through
/// [`create`], so hugepages, THP and KSM advice apply the same way to either.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// Zeroed memory for a guest that boots.
    Fresh,
    /// A memory file [`save`] wrote, for a guest that is restored.
    File(&'a Path),
}

/// Guest RAM as `config` describes it, holding what `source` says.
///
/// With `hugepages` RAM is an anonymous hugetlb mapping whose pages the kernel reserves at
/// `mmap` time, so a guest can never fault on a missing huge page later; a memory file is then
/// copied in (hugetlb pages cannot map a regular file). Without it, RAM is advised for
/// transparent huge pages, and a memory file is mapped privately: pages are read when the
/// guest first touches them and copied on write. With `merge` RAM is advised mergeable by KSM.
pub fn create(config: &MemoryConfig, source: Source) -> Result<GuestMemoryMmap> {
    check_size(config.size)?;
    let file = match source {
        Source::Fresh => None,
        Source::File(path) => Some(open_memory_file(config, path)?),
    };
    let mem = if config.hugepages {
        let mem = map_huge(config)?;
        if let (Some(file), Source::File(path)) = (&file, source) {
            copy_in(&mem, file).map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?;
        }
        mem
    } else {
        let mem = match (&file, source) {
            (Some(file), Source::File(path)) => map_file(config, file, path)?,
            _ => map_regions(config.size, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, None)?,
        };
        // A kernel built without THP refuses the advice (EINVAL); RAM then uses small pages.
        let _ = advise(&mem, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE");
        mem
    };
    if config.merge {
        advise(&mem, libc::MADV_MERGEABLE, "MADV_MERGEABLE (is KSM built into the kernel?)")?;
    }
    Ok(mem)
}

/// Maps `size` bytes of RAM split around the device hole with `flags`, file backed when
/// `file` is given (regions back to back in it).
fn map_regions(size: u64, flags: i32, file: Option<&File>) -> Result<GuestMemoryMmap> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        // The bitmap records what devices write (for pre-copy, with KVM's log of the vCPUs'
        // writes); `MmapRegionBuilder::new` would give an empty one, which records nothing.
        let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(flags & libc::MAP_HUGETLB != 0);
        if let Some(file) = file {
            builder = builder.with_file_offset(FileOffset::new(file.try_clone().map_err(|e| Error::Io("memory file", e))?, offset));
        }
        let region = builder.build().map_err(|e| Error::Config(format!("cannot map {} MiB of guest memory: {e}", len >> 20)))?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or_else(|| Error::Internal(format!("guest memory region at {addr:?}")))?);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Internal(format!("guest memory: {e}")))
}

/// Hugetlb RAM, after checking the host has enough free huge pages to say clearly what is
/// missing (mmap alone would only say ENOMEM).
fn map_huge(config: &MemoryConfig) -> Result<GuestMemoryMmap> {
    if config.size % HUGE_PAGE != 0 {
        return Err(Error::Config(format!("memory: {} bytes is not a whole number of 2 MiB huge pages", config.size)));
    }
    let needed = config.size / HUGE_PAGE;
    let pool = HugePagePool::read().map_err(|e| Error::Config(format!("memory: hugepages=on, but {e}")))?;
    if pool.available() < needed {
        return Err(Error::Config(format!("memory: {}", pool.shortage_message(needed))));
    }
    map_regions(config.size, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB, None).map_err(|e| {
        // Another process took the pages between the check and the mapping.
        Error::Config(format!("{e} ({})", HugePagePool::read().map(|p| p.shortage_message(needed)).unwrap_or_default()))
    })
}

/// Opens a memory file and checks it holds exactly `config.size` bytes.
fn open_memory_file(config: &MemoryConfig, path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?;
    let len = file.metadata().map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?.len();
    if len != config.size {
        return Err(Error::Config(format!("memory file {}: {len} bytes, the VM has {} bytes of RAM", path.display(), config.size)));
    }
    Ok(file)
}

/// Guest RAM mapped privately from a memory file (copy on write; the file never changes).
fn map_file(config: &MemoryConfig, file: &File, path: &Path) -> Result<GuestMemoryMmap> {
    map_regions(config.size, libc::MAP_PRIVATE | libc::MAP_NORESERVE, Some(file))
        .map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))
}

/// Copies the data extents of a memory file into `mem` (holes are zeros already), reading in
/// place: file offsets are guest RAM regions back to back, as [`save`] wrote them.
fn copy_in(mem: &GuestMemoryMmap, file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut offset = 0u64;
    for region in mem.iter() {
        let host = region_host(mem, region).map_err(|e| std::io::Error::other(e.to_string()))?;
        let len = region.len();
        // SAFETY: the slice is the region's whole live mapping, owned by `mem`, which nothing
        // else uses yet (no vCPU or device exists before memory is built).
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
        let mut at = 0u64;
        while at < len {
            // SAFETY: lseek on a file descriptor `file` owns.
            let data = unsafe { libc::lseek(file.as_raw_fd(), (offset + at) as i64, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // only holes are left
                }
                return Err(e);
            }
            let data = data as u64;
            if data >= offset + len {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(file.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let end = (hole as u64).min(offset + len);
            file.read_exact_at(&mut bytes[(data - offset) as usize..(end - offset) as usize], data)?;
            at = end - offset;
        }
        offset += len;
    }
    Ok(())
}

/// Gives `advice` for every region of `mem`.
fn advise(mem: &GuestMemoryMmap, advice: i32, name: &'static str) -> Result<()> {
    for region in mem.iter() {
        let host = region_host(mem, region)?;
        // SAFETY: madvise on a mapping `mem` owns, covering exactly the region; the advice
        // given here (THP, KSM) only changes how the kernel backs the pages, never their data.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, advice) } != 0 {
            return Err(Error::Io(name, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn region_host(mem: &GuestMemoryMmap, region: &GuestRegionMmap) -> Result<*mut u8> {
    mem.get_host_address(region.start_addr()).map_err(|e| Error::Internal(format!("guest memory region has no host address: {e}")))
}

/// Resident memory of this process outside guest RAM, from /proc/self/smaps: every mapping but
/// the ones [`register`] advised MADV_DONTFORK (`dc` in `VmFlags`), which only guest RAM is.
pub fn overhead_bytes() -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let mut total = 0;
    let mut rss = 0;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            rss = kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && !flags.split_whitespace().any(|f| f == "dc")
        {
            total += rss;
        }
    }
    total
}

/// Registers every region of `mem` with KVM as a memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region_host(mem, region)?;
        // Guest RAM is never needed in a forked child (see vm::defer_kvm_teardown); this also
        // keeps fork from copying its page tables.
        // SAFETY: madvise on a mapping `mem` owns, covering exactly the region.
        unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTFORK) };
        set_slot(vm, mem, slot, region, 0)?;
    }
    Ok(())
}

/// Sets (or changes the flags of) KVM memory slot `slot`, which maps `region`.
fn set_slot(vm: &VmFd, mem: &GuestMemoryMmap, slot: usize, region: &GuestRegionMmap, flags: u32) -> Result<()> {
    let desc = kvm_userspace_memory_region {
        slot: slot as u32,
        flags,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region_host(mem, region)? as u64,
    };
    // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the Vm
    // keeps both and drops the VM fd first), and the slots do not overlap.
    unsafe { vm.set_user_memory_region(desc) }.map_err(ferro_hypervisor::ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(())
}

/// Turns dirty page tracking on or off for all of guest RAM: KVM's dirty log for what the
/// vCPUs write, and each region's bitmap for what devices write through `mem`. Turning it on
/// starts both from clean.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<()> {
    let flags = if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    for (slot, region) in mem.iter().enumerate() {
        std::ops::Deref::deref(region).bitmap().reset();
        set_slot(vm, mem, slot, region, flags)?;
    }
    Ok(())
}

/// The pages written since dirty logging was turned on or this was last called, one bitmap per
/// region in `mem`'s order (bit `i` of word `w` is page `64 * w + i` of the region), and both
/// logs cleared: KVM's for the vCPUs' writes, OR-ed with the region's for the devices'.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut bits = vm.get_dirty_log(slot as u32, region.len() as usize).map_err(ferro_hypervisor::ioctl_err("KVM_GET_DIRTY_LOG"))?;
            let by_devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (word, device_word) in bits.iter_mut().zip(by_devices) {
                *word |= device_word;
            }
            Ok(bits)
        })
        .collect()
}

/// Writes guest RAM to a new file at `path` in the layout [`create`] reads: regions back to
/// back, pages that are all zeros left as holes. The guest must not run meanwhile. Returns the
/// bytes written (the rest are holes). The file is not synced: the caller decides when, so the
/// guest need not wait for the disk.
///
/// Anonymous memory the guest never touched (or gave back through the balloon) is not even read:
/// `/proc/self/pagemap` says which pages are neither in RAM nor in swap, and reading those would
/// only map the zero page into them. Memory mapped from a file is read whole, since a page not
/// in RAM there still holds the file's data.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<u64> {
    let io = |e: std::io::Error| Error::Io("writing the memory file", e);
    let file = File::options().write(true).create_new(true).open(path).map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?;
    let pagemap = PageMap::open()?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let host = region_host(mem, region)?;
        let len = region.len() as usize;
        // SAFETY: the slice is the region's whole live mapping, which `mem` keeps mapped for this
        // call; the guest and every device are paused (the caller's contract), so nothing
        // writes these bytes while the slice exists.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let anonymous = region.file_offset().is_none();
        for (window_start, window) in bytes.chunks(PAGEMAP_WINDOW).enumerate().map(|(i, w)| (i * PAGEMAP_WINDOW, w)) {
            let touched = if anonymous { Some(pagemap.touched(window.as_ptr(), window.len())?) } else { None };
            for (i, chunk) in window.chunks(SAVE_CHUNK).enumerate() {
                let pages = i * SAVE_CHUNK / PAGE..(i * SAVE_CHUNK + chunk.len()).div_ceil(PAGE);
                let may_hold_data = touched.as_ref().is_none_or(|t| t[pages].iter().any(|&p| p));
                if may_hold_data && chunk.iter().any(|&b| b != 0) {
                    file.write_all_at(chunk, offset + (window_start + i * SAVE_CHUNK) as u64).map_err(io)?;
                    written += chunk.len() as u64;
                }
            }
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(io)?;
    Ok(written)
}

/// A memory file written while the guest runs, for a snapshot whose pause must be short. Dirty
/// logging is turned on first; [`LiveSave::start`] writes every page that may hold data,
/// [`LiveSave::converge`] the pages dirtied meanwhile, in rounds, until few are left; the caller
/// then pauses the guest and [`LiveSave::finish`] writes the last ones. The file ends up as
/// [`save`] would have written it at the moment of the pause. Dropping it turns dirty logging
/// off again.
pub struct LiveSave<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    file: File,
    path: std::path::PathBuf,
    /// Where each region starts in the file.
    offsets: Vec<u64>,
    /// Dirtied pages not yet written again.
    pending: DirtyMap,
    buf: Vec<u8>,
}

/// Rounds of dirty pages written before the guest is paused anyway.
const LIVE_ROUNDS: usize = 8;
/// Dirty pages left for the pause once a round leaves no more than this (8 MiB: a few ms of
/// writes into the page cache).
const LIVE_FEW_PAGES: u64 = 2048;
/// Pages read and written at a time after the first pass.
const LIVE_RUN: usize = 64;

impl<'a> LiveSave<'a> {
    /// Creates the memory file at `path` (it must not exist), turns dirty logging on and writes
    /// every page that may hold data while the guest runs.
    pub fn start(vm: &'a VmFd, mem: &'a GuestMemoryMmap, path: &Path) -> Result<LiveSave<'a>> {
        let file = File::options().write(true).create_new(true).open(path).map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?;
        let mut offsets = Vec::new();
        let mut total = 0u64;
        for region in mem.iter() {
            offsets.push(total);
            total += region.len();
        }
        file.set_len(total).map_err(|e| Error::Io("sizing the memory file", e))?;
        set_dirty_logging(vm, mem, true)?;
        let mut live = LiveSave { vm, mem, file, path: path.to_owned(), offsets, pending: clean_map(mem), buf: vec![0; SAVE_CHUNK.max(LIVE_RUN * PAGE)] };
        live.write_everything()?;
        Ok(live)
    }

    /// Writes the pages dirtied since the last look, round after round, until a round finds
    /// few (they are left for [`LiveSave::finish`]) or the rounds run out.
    pub fn converge(&mut self) -> Result<()> {
        for _ in 0..LIVE_ROUNDS {
            let dirty = take_dirty(self.vm, self.mem)?;
            dirty::merge(&mut self.pending, &dirty);
            if dirty::count(&self.pending) <= LIVE_FEW_PAGES {
                return Ok(());
            }
            self.write_pending()?;
        }
        Ok(())
    }

    /// With the guest and its devices paused: writes the pages still dirty. Returns the bytes
    /// the file holds (all-zero pages are holes). The file is not synced.
    pub fn finish(mut self) -> Result<u64> {
        let dirty = take_dirty(self.vm, self.mem)?;
        dirty::merge(&mut self.pending, &dirty);
        self.write_pending()?;
        let meta = self.file.metadata().map_err(|e| Error::Io("reading the memory file's size", e))?;
        Ok(std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
    }

    /// The first pass: [`save`]'s walk, reading through `mem` since the guest may be writing.
    fn write_everything(&mut self) -> Result<()> {
        let pagemap = PageMap::open()?;
        let regions: Vec<(u64, u64, Option<*const u8>, u64)> = self
            .mem
            .iter()
            .zip(&self.offsets)
            .map(|(r, &offset)| {
                let anonymous = r.file_offset().is_none();
                (r.start_addr().0, r.len(), anonymous.then(|| region_host(self.mem, r).ok()).flatten().map(|h| h.cast_const()), offset)
            })
            .collect();
        for (start, len, anonymous_at, offset) in regions {
            let mut at = 0u64;
            while at < len {
                let n = (SAVE_CHUNK as u64).min(len - at) as usize;
                let may_hold_data = match anonymous_at {
                    // SAFETY: only the address is formed (inside the region's mapping); pagemap
                    // is asked about it, the memory is not read.
                    Some(host) => pagemap.touched(unsafe { host.add(at as usize) }, n)?.iter().any(|&t| t),
                    None => true,
                };
                if may_hold_data {
                    self.copy(start + at, offset + at, n, false)?;
                }
                at += n as u64;
            }
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<()> {
        let pending = std::mem::replace(&mut self.pending, clean_map(self.mem));
        let places: Vec<(u64, u64)> = self.mem.iter().map(|r| r.start_addr().0).zip(self.offsets.iter().copied()).collect();
        for ((start, offset), bits) in places.into_iter().zip(&pending) {
            for (first, count) in dirty::runs(bits, LIVE_RUN) {
                let at = (first * PAGE) as u64;
                self.copy(start + at, offset + at, count * PAGE, true)?;
            }
        }
        Ok(())
    }

    /// Copies `len` bytes of guest memory at `gpa` to the file at `offset`. All zeros are not
    /// written: they become a hole when `zeros_matter` (the file may hold older data there),
    /// else they are skipped (the file is a hole there already).
    fn copy(&mut self, gpa: u64, offset: u64, len: usize, zeros_matter: bool) -> Result<()> {
        let bytes = &mut self.buf[..len];
        self.mem.read_slice(bytes, GuestAddress(gpa)).map_err(|e| Error::Internal(format!("reading guest memory at {gpa:#x}: {e}")))?;
        let io = |e: std::io::Error| Error::Io("writing the memory file", e);
        if bytes.iter().any(|&b| b != 0) {
            self.file.write_all_at(bytes, offset).map_err(io)?;
        } else if zeros_matter {
            punch_hole(&self.file, offset, len as u64).map_err(io)?;
        }
        Ok(())
    }
}

impl Drop for LiveSave<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_dirty_logging(self.vm, self.mem, false) {
            eprintln!("ferro: turning dirty logging off after saving {}: {e}", self.path.display());
        }
    }
}

/// A dirty map of `mem` with no page set.
fn clean_map(mem: &GuestMemoryMmap) -> DirtyMap {
    mem.iter().map(|r| vec![0u64; (r.len() as usize / PAGE).div_ceil(64)]).collect()
}

/// Makes `len` bytes of `file` at `offset` a hole (reads give zeros), keeping its size.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor `file` owns, with plain integer arguments; it touches no
    // memory of this process.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub const PAGE: usize = 4096;
/// Guest memory whose page states are read from pagemap in one go (8 bytes a page: 512 KiB).
const PAGEMAP_WINDOW: usize = 256 << 20;

/// This process's `/proc/self/pagemap`.
pub(crate) struct PageMap(File);

impl PageMap {
    pub(crate) fn open() -> Result<PageMap> {
        File::open("/proc/self/pagemap").map(PageMap).map_err(|e| Error::Io("opening /proc/self/pagemap", e))
    }

    /// For each page of the `len` bytes of this process's memory at `start` (page aligned),
    /// whether it is in RAM or in swap (pagemap bits 63 and 62), i.e. may hold something other
    /// than zeros. Only the addresses are used: the memory is not read.
    pub(crate) fn touched(&self, start: *const u8, len: usize) -> Result<Vec<bool>> {
        const PRESENT_OR_SWAPPED: u64 = 3 << 62;
        let mut entries = vec![0u8; len.div_ceil(PAGE) * 8];
        let at = start as u64 / PAGE as u64 * 8;
        self.0.read_exact_at(&mut entries, at).map_err(|e| Error::Io("reading /proc/self/pagemap", e))?;
        Ok(entries.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & PRESENT_OR_SWAPPED != 0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), (1 << 30) as usize));
    }

    #[test]
    fn too_small_and_too_large_are_refused() {
        assert!(check_size(1 << 20).unwrap_err().to_string().contains("too small"));
        assert!(check_size(1 << 50).unwrap_err().to_string().contains("more than this host has"));
        assert!(check_size(64 << 20).is_ok());
    }

    /// What devices write is recorded in each region's bitmap (migration and pre-copied
    /// snapshots send those pages again): page by page, whichever way the write is made.
    #[test]
    fn device_writes_are_recorded() {
        let mem = create(&MemoryConfig::new(32 << 20), Source::Fresh).unwrap();
        mem.write_slice(&[1; 5000], GuestAddress(0x3000)).unwrap();
        mem.store(7u16, GuestAddress(0x10_0002), std::sync::atomic::Ordering::Release).unwrap();
        let mut disk = std::io::Cursor::new(vec![2u8; 512]);
        mem.read_exact_volatile_from(GuestAddress((32 << 20) - 512), &mut disk, 512).unwrap();
        let region = mem.iter().next().unwrap();
        let bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let dirty: Vec<usize> = (0..bits.len() * 64).filter(|&page| bits[page / 64] & (1 << (page % 64)) != 0).collect();
        assert_eq!(dirty, [3, 4, 0x100, (32 << 20) / 4096 - 1], "the pages written, by number");
        assert!(std::ops::Deref::deref(region).bitmap().get_and_reset().iter().all(|w| *w == 0), "taking the pages clears them");
    }

    #[test]
    fn saved_memory_maps_back_privately_and_sparsely() {
        let path = std::env::temp_dir().join(format!("ferro-mem-{}.bin", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = MemoryConfig { size: 32 << 20, hugepages: false, merge: true };
        let mem = create(&config, Source::Fresh).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x5566u16, GuestAddress((32 << 20) - 2)).unwrap();
        assert_eq!(save(&mem, &path).unwrap(), 2 * SAVE_CHUNK as u64, "only the two chunks with data are written");
        assert!(save(&mem, &path).unwrap_err().to_string().contains("exists"), "a memory file is never overwritten");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        assert!(meta.blocks() * 512 <= 2 * SAVE_CHUNK as u64 + 8192, "zero pages are holes: {} bytes allocated", meta.blocks() * 512);

        let back = create(&config, Source::File(&path)).unwrap();
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344);
        assert_eq!(back.read_obj::<u16>(GuestAddress((32 << 20) - 2)).unwrap(), 0x5566);
        back.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let again = create(&config, Source::File(&path)).unwrap();
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344, "writes stay private: the file is unchanged");
        // Saving memory mapped from a file keeps the file's data, touched here or not.
        let resaved = path.with_extension("again");
        let _ = std::fs::remove_file(&resaved);
        assert_eq!(save(&again, &resaved).unwrap(), 2 * SAVE_CHUNK as u64);
        let third = create(&config, Source::File(&resaved)).unwrap();
        assert_eq!(third.read_obj::<u16>(GuestAddress((32 << 20) - 2)).unwrap(), 0x5566);
        std::fs::remove_file(&resaved).unwrap();
        let wrong = MemoryConfig::new(64 << 20);
        assert!(create(&wrong, Source::File(&path)).unwrap_err().to_string().contains("the VM has 67108864 bytes"));
        std::fs::remove_file(&path).unwrap();
    }
}
