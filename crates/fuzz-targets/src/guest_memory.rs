//! Guest memory for the targets, mapped once per size and process and lent to one input at a
//! time: mapping, faulting in and unmapping fresh memory for every input cost the targets more
//! than the code they test (docs/fuzzing.md, "Throughput"). A lent memory is all zero, as a
//! fresh one would be: when it comes back, the pages its dirty bitmap marks (every write through
//! vm-memory marks one, as the VMM's migration relies on) are zeroed.
//!
//! Each memory has an inaccessible page on either side, so that a write just outside guest
//! memory faults (the fuzzer reports the SIGSEGV as a crash) instead of landing unnoticed in
//! whatever the host mapped there.

use ferro_devices::virtio::GuestMemoryMmap;
use std::sync::Mutex;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: usize = 4096;

/// Memories not lent at the moment, with their sizes (tests run targets on several threads).
static IDLE: Mutex<Vec<(usize, GuestMemoryMmap)>> = Mutex::new(Vec::new());

/// `size` bytes of zeroed guest memory at guest address 0, lent to one input and given back
/// (cleared) when dropped.
pub struct Lease {
    size: usize,
    mem: GuestMemoryMmap,
}

impl Lease {
    /// A memory of `size` bytes (a whole number of pages), or None if it cannot be mapped.
    pub fn new(size: usize) -> Option<Lease> {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        let mem = match idle.iter().position(|(s, _)| *s == size) {
            Some(i) => idle.swap_remove(i).1,
            None => {
                drop(idle);
                map(size)?
            }
        };
        Some(Lease { size, mem })
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A memory that could not be cleared is not lent again (it stays mapped: see `map`).
        if clear(&self.mem) {
            IDLE.lock().unwrap_or_else(|p| p.into_inner()).push((self.size, self.mem.clone()));
        }
    }
}

/// Zeroes the pages written since the memory was lent and resets its dirty bitmap.
fn clear(mem: &GuestMemoryMmap) -> bool {
    let zeros = [0u8; PAGE];
    for region in mem.iter() {
        let bitmap = std::ops::Deref::deref(region).bitmap();
        let dirty = bitmap.get_and_reset();
        for (w, word) in dirty.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let page = (w * 64 + bits.trailing_zeros() as usize) as u64;
                bits &= bits - 1;
                let Some(addr) = region.start_addr().0.checked_add(page * PAGE as u64).map(GuestAddress) else { return false };
                if region.len() < (page + 1) * PAGE as u64 || mem.write_slice(&zeros, addr).is_err() {
                    return false;
                }
            }
        }
        // The zeroing marked the pages again.
        bitmap.reset();
    }
    true
}

/// Maps `size` bytes (whole pages) of guest memory between two inaccessible pages. The mapping is
/// never unmapped: memories live as long as the process, in [`IDLE`] or lent.
fn map(size: usize) -> Option<GuestMemoryMmap> {
    if size == 0 || size % PAGE != 0 {
        return None;
    }
    let total = size.checked_add(2 * PAGE)?;
    // SAFETY: a new private anonymous mapping where the kernel chooses: it affects no memory
    // that exists; the result is checked.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let start = base.cast::<u8>().wrapping_add(PAGE);
    // SAFETY: [start, start + size) lies inside the mapping just made, which nothing else uses;
    // the pages around it stay inaccessible.
    if unsafe { libc::mprotect(start.cast(), size, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
        return None;
    }
    // The bitmap must cover the memory: `MmapRegionBuilder::new` gives an empty one, which
    // records no write at all.
    let bitmap = AtomicBitmap::with_len(size);
    // SAFETY: `start` is page-aligned and the start of `size` readable and writable bytes that
    // stay mapped for the rest of the process (this module never unmaps them) and that nothing
    // but this region accesses.
    let builder = unsafe { MmapRegionBuilder::new_with_bitmap(size, bitmap).with_raw_mmap_pointer(start) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
    let region = builder.build().ok()?;
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))?;
    GuestMemoryMmap::from_regions(vec![region]).ok()
}

#[cfg(test)]
mod tests {
    use super::Lease;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// A memory is lent again all zero, whatever the previous input wrote and however.
    #[test]
    fn comes_back_zeroed() {
        const SIZE: usize = 64 << 10;
        let lease = Lease::new(SIZE).unwrap();
        let mem = lease.mem();
        assert_eq!(mem.last_addr(), GuestAddress(SIZE as u64 - 1));
        mem.write_slice(&[0xaa; 5000], GuestAddress(100)).unwrap();
        mem.write_obj(0x1234u16, GuestAddress(SIZE as u64 - 2)).unwrap();
        // Used rings are updated by atomic stores.
        mem.store(7u16, GuestAddress(0x3002), std::sync::atomic::Ordering::Release).unwrap();
        let mut file = std::io::Cursor::new(vec![0x55u8; 3000]);
        mem.read_exact_volatile_from(GuestAddress(0x9000), &mut file, 3000).unwrap();
        assert!(mem.write_slice(&[1], GuestAddress(SIZE as u64)).is_err(), "a write past the end must be refused");
        let first = mem.clone();
        drop(lease);
        // Lent again (tests on other threads may take it first: then a new one is all zero too).
        let lease = Lease::new(SIZE).unwrap();
        let mut all = vec![1u8; SIZE];
        lease.mem().read_slice(&mut all, GuestAddress(0)).unwrap();
        assert!(all.iter().all(|b| *b == 0), "a lent memory holds what an earlier input wrote");
        let mut again = vec![1u8; SIZE];
        first.read_slice(&mut again, GuestAddress(0)).unwrap();
        assert!(again.iter().all(|b| *b == 0), "the memory given back was not cleared");
    }
}
