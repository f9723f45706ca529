//! Guest RAM: host mappings split around the 32-bit device hole, registered with KVM.
//!
//! A booted VM gets fresh anonymous memory (optionally 2 MiB huge pages, optionally mergeable
//! by KSM). A restored VM maps a memory file privately: pages are read from the file when the
//! guest first touches them and copied on write, so restoring costs the same for any guest size
//! and the file is never changed. [`save`] writes that file: the RAM regions back to back, in
//! guest address order, all-zero pages left as holes.

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START, MIN_MEMORY};
use crate::{Error, Result};
use ferro_vmm_api::MemoryConfig;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

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
    if let Some(host) = host_memory_bytes() {
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

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Fresh guest RAM as `config` describes it.
pub fn anonymous(config: &MemoryConfig) -> Result<GuestMemoryMmap> {
    check_size(config.size)?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if config.hugepages {
        if config.size % (2 << 20) != 0 {
            return Err(Error::Config(format!("memory: {} bytes is not a whole number of 2 MiB huge pages", config.size)));
        }
        flags |= libc::MAP_HUGETLB;
    }
    let regions = ram_ranges(config.size)
        .into_iter()
        .map(|(addr, len)| {
            let region = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(config.hugepages)
                .build()
                .map_err(|e| {
                    let hint = if config.hugepages { " (are enough 2 MiB huge pages reserved in /proc/sys/vm/nr_hugepages?)" } else { "" };
                    Error::Config(format!("cannot map {} MiB of guest memory: {e}{hint}", len >> 20))
                })?;
            GuestRegionMmap::new(region, addr).ok_or_else(|| Error::Internal(format!("guest memory region at {addr:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Internal(format!("guest memory: {e}")))?;
    if config.merge {
        for region in mem.iter() {
            let host = region_host(&mem, region)?;
            // SAFETY: madvise on a mapping `mem` owns, covering exactly the region; MERGEABLE
            // only lets KSM share identical pages copy-on-write.
            if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_MERGEABLE) } != 0 {
                return Err(Error::Io("madvise(MADV_MERGEABLE) on guest memory (is KSM built into the kernel?)", std::io::Error::last_os_error()));
            }
        }
    }
    Ok(mem)
}

/// Guest RAM of `config.size` bytes mapped privately from `path`, a file [`save`] wrote.
pub fn from_file(config: &MemoryConfig, path: &Path) -> Result<GuestMemoryMmap> {
    check_size(config.size)?;
    if config.hugepages {
        return Err(Error::Config("memory: a VM restored from a memory file cannot use huge pages".into()));
    }
    let file = File::open(path).map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?;
    let len = file.metadata().map_err(|e| Error::Config(format!("memory file {}: {e}", path.display())))?.len();
    if len != config.size {
        return Err(Error::Config(format!("memory file {}: {len} bytes, the VM has {} bytes of RAM", path.display(), config.size)));
    }
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, size) in ram_ranges(config.size) {
        let fo = FileOffset::new(file.try_clone().map_err(|e| Error::Io("memory file", e))?, offset);
        let region = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(fo)
            .build()
            .map_err(|e| Error::Config(format!("memory file {}: cannot map it: {e}", path.display())))?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or_else(|| Error::Internal(format!("guest memory region at {addr:?}")))?);
        offset += size as u64;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Internal(format!("guest memory: {e}")))?;
    if config.merge {
        for region in mem.iter() {
            let host = region_host(&mem, region)?;
            // SAFETY: as in `anonymous`: advice on a mapping `mem` owns.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_MERGEABLE) };
        }
    }
    Ok(mem)
}

fn region_host(mem: &GuestMemoryMmap, region: &GuestRegionMmap) -> Result<*mut u8> {
    mem.get_host_address(region.start_addr()).map_err(|e| Error::Internal(format!("guest memory region has no host address: {e}")))
}

/// Registers every region of `mem` with KVM as a memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region_host(mem, region)?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // Guest RAM is never needed in a forked child (see vm::defer_kvm_teardown); this also
        // keeps fork from copying its page tables.
        // SAFETY: madvise on a mapping `mem` owns, covering exactly the region.
        unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTFORK) };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the Vm
        // keeps both and drops the VM fd first), and the slots do not overlap.
        unsafe { vm.set_user_memory_region(desc) }.map_err(ferro_hypervisor::ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Writes guest RAM to a new file at `path` in the layout [`from_file`] maps: regions back to
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
            let touched = if anonymous { Some(pagemap.touched(window)?) } else { None };
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

const PAGE: usize = 4096;
/// Guest memory whose page states are read from pagemap in one go (8 bytes a page: 512 KiB).
const PAGEMAP_WINDOW: usize = 256 << 20;

/// This process's `/proc/self/pagemap`.
struct PageMap(File);

impl PageMap {
    fn open() -> Result<PageMap> {
        File::open("/proc/self/pagemap").map(PageMap).map_err(|e| Error::Io("opening /proc/self/pagemap", e))
    }

    /// For each page of `bytes` (page aligned), whether it is in RAM or in swap (pagemap bits 63
    /// and 62), i.e. may hold something other than zeros.
    fn touched(&self, bytes: &[u8]) -> Result<Vec<bool>> {
        const PRESENT_OR_SWAPPED: u64 = 3 << 62;
        let mut entries = vec![0u8; bytes.len().div_ceil(PAGE) * 8];
        let at = bytes.as_ptr() as u64 / PAGE as u64 * 8;
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

    #[test]
    fn saved_memory_maps_back_privately_and_sparsely() {
        let path = std::env::temp_dir().join(format!("ferro-mem-{}.bin", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = MemoryConfig { size: 32 << 20, hugepages: false, merge: true };
        let mem = anonymous(&config).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x5566u16, GuestAddress((32 << 20) - 2)).unwrap();
        assert_eq!(save(&mem, &path).unwrap(), 2 * SAVE_CHUNK as u64, "only the two chunks with data are written");
        assert!(save(&mem, &path).unwrap_err().to_string().contains("exists"), "a memory file is never overwritten");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        assert!(meta.blocks() * 512 <= 2 * SAVE_CHUNK as u64 + 8192, "zero pages are holes: {} bytes allocated", meta.blocks() * 512);

        let back = from_file(&config, &path).unwrap();
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344);
        assert_eq!(back.read_obj::<u16>(GuestAddress((32 << 20) - 2)).unwrap(), 0x5566);
        back.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let again = from_file(&config, &path).unwrap();
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344, "writes stay private: the file is unchanged");
        // Saving memory mapped from a file keeps the file's data, touched here or not.
        let resaved = path.with_extension("again");
        let _ = std::fs::remove_file(&resaved);
        assert_eq!(save(&again, &resaved).unwrap(), 2 * SAVE_CHUNK as u64);
        let third = from_file(&config, &resaved).unwrap();
        assert_eq!(third.read_obj::<u16>(GuestAddress((32 << 20) - 2)).unwrap(), 0x5566);
        std::fs::remove_file(&resaved).unwrap();
        let wrong = MemoryConfig::new(64 << 20);
        assert!(from_file(&wrong, &path).unwrap_err().to_string().contains("the VM has 67108864 bytes"));
        std::fs::remove_file(&path).unwrap();
    }
}
