//! Page frame numbers from the inflate and deflate queues: read from the driver's buffers in
//! bounded chunks, grouped into runs of consecutive frames, checked against guest memory and,
//! for inflate, released on the host with MADV_DONTNEED so the VMM's resident set shrinks. A
//! released page reads back as zeros when the guest touches it again (anonymous private memory).

use super::super::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Balloon pages are 4 KiB whatever the page size of guest or host (virtio 1.x 5.5.6).
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Page numbers read from guest memory at a time.
const CHUNK: usize = 1024;

/// What became of the page numbers in one buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCount {
    /// Pages inside guest RAM (released, for inflate).
    pub valid: u64,
    /// Page numbers outside guest RAM: ignored.
    pub invalid: u64,
}

/// Consecutive page numbers `start..start + len`.
struct Run {
    start: u64,
    len: u64,
}

/// Walks the le32 page numbers of `descs` (the readable descriptors of one chain), at most
/// `max_pages` of them, and applies `release` (true: MADV_DONTNEED) to each run inside guest RAM.
/// A descriptor that cannot be read ends the walk; a trailing partial number is ignored.
pub fn process<I>(mem: &GuestMemoryMmap, descs: I, max_pages: u64, release: bool) -> PageCount
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut count = PageCount::default();
    let mut run: Option<Run> = None;
    let mut seen = 0u64;
    let mut buf = [0u8; CHUNK * 4];
    'descs: for desc in descs {
        let total = (u64::from(desc.len()) / 4).min(max_pages - seen);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK as u64) as usize;
            let Some(addr) = desc.addr().0.checked_add(done * 4) else { break 'descs };
            if mem.read_slice(&mut buf[..n * 4], GuestAddress(addr)).is_err() {
                break 'descs;
            }
            for word in buf[..n * 4].chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
                match &mut run {
                    Some(r) if r.start + r.len == pfn => r.len += 1,
                    _ => {
                        if let Some(r) = run.replace(Run { start: pfn, len: 1 }) {
                            apply(mem, &r, release, &mut count);
                        }
                    }
                }
            }
            done += n as u64;
        }
        seen += total;
        if seen >= max_pages {
            break;
        }
    }
    if let Some(r) = run {
        apply(mem, &r, release, &mut count);
    }
    count
}

/// Checks (and releases) one run; a run that is not wholly inside one RAM region is done page by
/// page so that its valid pages still count.
fn apply(mem: &GuestMemoryMmap, run: &Run, release: bool, count: &mut PageCount) {
    if range_ok(mem, run.start, run.len, release) {
        count.valid += run.len;
    } else if run.len > 1 {
        for pfn in run.start..run.start + run.len {
            apply(mem, &Run { start: pfn, len: 1 }, release, count);
        }
    } else {
        count.invalid += 1;
    }
}

/// True when pages `pfn..pfn + len` lie in one RAM region; with `release`, they are then given
/// back to the host.
fn range_ok(mem: &GuestMemoryMmap, pfn: u64, len: u64, release: bool) -> bool {
    let Ok(bytes) = usize::try_from(len << PAGE_SHIFT) else { return false };
    let Ok(slice) = mem.get_slice(GuestAddress(pfn << PAGE_SHIFT), bytes) else { return false };
    if release {
        let host = slice.ptr_guard_mut().as_ptr();
        // SAFETY: `host..host + bytes` lies inside one guest RAM mapping that `mem` keeps alive,
        // and is 4 KiB aligned (regions are mapped page aligned and start at 4 KiB multiples).
        // MADV_DONTNEED only drops the pages' contents, which the guest has given up; Rust holds
        // no references into guest memory (it is accessed through volatile copies), and KVM's
        // MMU notifier unmaps the pages from the guest before they are freed.
        // madvise cannot fail on a valid, aligned, mapped range; if it somehow did, the pages
        // would only stay resident, which the guest cannot tell apart.
        unsafe { libc::madvise(host.cast(), bytes, libc::MADV_DONTNEED) };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryRegion;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them, like guest RAM around the device hole.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn write_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> Descriptor {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        desc(at, bytes.len() as u32)
    }

    #[test]
    fn released_pages_read_back_as_zeros_and_others_keep_their_data() {
        let m = mem();
        let data = vec![0xabu8; 8 * PAGE_SIZE as usize];
        m.write_slice(&data, GuestAddress(0x10_0000 - 8 * PAGE_SIZE)).unwrap();
        // Pages 0xf8..0xfc released, 0xfc..0x100 kept.
        let d = write_pfns(&m, 0x1000, &[0xf8, 0xf9, 0xfa, 0xfb]);
        assert_eq!(process(&m, [d], u64::MAX, true), PageCount { valid: 4, invalid: 0 });
        let mut back = vec![0u8; 8 * PAGE_SIZE as usize];
        m.read_slice(&mut back, GuestAddress(0xf8 << PAGE_SHIFT)).unwrap();
        assert!(back[..4 * PAGE_SIZE as usize].iter().all(|&b| b == 0));
        assert!(back[4 * PAGE_SIZE as usize..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn page_numbers_outside_ram_are_counted_and_skipped() {
        let m = mem();
        // Last page of region 0, two in the hole, first of region 1, one far away, u32::MAX.
        let d = write_pfns(&m, 0x1000, &[0xff, 0x100, 0x1ff, 0x200, 0x10_0000, u32::MAX]);
        assert_eq!(process(&m, [d], u64::MAX, true), PageCount { valid: 2, invalid: 4 });
    }

    #[test]
    fn bad_descriptors_and_limits_do_not_overrun() {
        let m = mem();
        let d = write_pfns(&m, 0x1000, &[1, 2, 3, 4, 5]);
        assert_eq!(process(&m, [d], 3, false), PageCount { valid: 3, invalid: 0 });
        // A descriptor pointing outside guest memory, one with a huge length, a partial number.
        let last = m.iter().last().unwrap();
        let end = last.start_addr().0 + last.len();
        assert_eq!(process(&m, [desc(end, 4096)], u64::MAX, false), PageCount::default());
        // A huge length is read until guest memory ends (zeros: page 0, over and over).
        assert_eq!(process(&m, [desc(0x2000, u32::MAX)], u64::MAX, false), PageCount { valid: (0xfe000 / 4), invalid: 0 });
        assert_eq!(process(&m, [desc(0x1000, 3)], u64::MAX, false), PageCount::default());
        assert_eq!(process(&m, [desc(0x1000, 7)], u64::MAX, false), PageCount { valid: 1, invalid: 0 });
    }
}
