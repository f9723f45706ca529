//! What a migration that copies a disk along (`--copy-storage-all`, docs/migration.md) must send
//! again: while the copy runs, every guest write, discard and write-zeroes marks the granules it
//! touched; the sender takes the marks (clearing them) and sends those granules once more, until
//! few are left, and takes the last ones with the guest paused.
//!
//! Marks are set under the disk's lock, by the request that changes the image, and taken under
//! the same lock: a granule read after its mark was taken holds at least that write, and a
//! later write marks it again.

use ferro_block::{DiskImage, Extent, ImageInfo, Result};

/// The unit of the marks: 64 KiB, qcow2's default cluster.
pub const GRANULE: u64 = 64 << 10;

/// One bit per granule of a disk of `size` bytes.
pub struct DirtyGranules {
    bits: Vec<u64>,
    size: u64,
    set: u64,
}

impl DirtyGranules {
    pub fn new(size: u64) -> DirtyGranules {
        let granules = size.div_ceil(GRANULE);
        DirtyGranules { bits: vec![0; granules.div_ceil(64) as usize], size, set: 0 }
    }

    /// Marks every granule `len` bytes from `off` touch (clipped to the disk).
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        for g in off / GRANULE..end.div_ceil(GRANULE) {
            let (word, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if self.bits[word] & bit == 0 {
                self.bits[word] |= bit;
                self.set += 1;
            }
        }
    }

    /// Bytes marked (whole granules; the disk's last one may be shorter).
    pub fn bytes(&self) -> u64 {
        let tail = self.size % GRANULE;
        let last = self.size.div_ceil(GRANULE).saturating_sub(1);
        let short_last_set = tail != 0 && self.bits.get((last / 64) as usize).is_some_and(|w| w & (1 << (last % 64)) != 0);
        self.set * GRANULE - if short_last_set { GRANULE - tail } else { 0 }
    }

    /// The marked ranges as (offset, length), joined where adjacent and clipped to the disk;
    /// the marks are cleared.
    pub fn take(&mut self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let g = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let off = g * GRANULE;
                let len = GRANULE.min(self.size - off);
                match ranges.last_mut() {
                    Some((start, l)) if *start + *l == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
        }
        self.set = 0;
        ranges
    }
}

/// An image whose changes are marked in `dirty` as they are made.
pub(super) struct Marking<'a> {
    pub inner: &'a mut dyn DiskImage,
    pub dirty: &'a mut DirtyGranules,
}

impl DiskImage for Marking<'_> {
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_at(buf, off)
    }
    // Marked whether or not the change succeeded: a failed write may have changed part of
    // the range, and sending a granule again is always safe.
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.dirty.mark(off, buf.len() as u64);
        self.inner.write_at(buf, off)
    }
    fn flush(&mut self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.dirty.mark(off, len);
        self.inner.discard(off, len)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.dirty.mark(off, len);
        self.inner.write_zeroes(off, len)
    }
    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(off, len)
    }
    fn backing_mut(&mut self) -> Option<&mut dyn DiskImage> {
        self.inner.backing_mut()
    }
    fn resize(&mut self, size: u64) -> Result<()> {
        self.inner.resize(size)
    }
    fn as_qcow2(&mut self) -> Option<&mut ferro_block::qcow2::Qcow2> {
        self.inner.as_qcow2()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_whole_granules_and_are_cleared_when_taken() {
        let size = 10 * GRANULE + 512;
        let mut d = DirtyGranules::new(size);
        assert!(d.take().is_empty());
        d.mark(GRANULE - 1, 2); // granules 0 and 1
        d.mark(GRANULE + 5, 10); // 1 again
        d.mark(5 * GRANULE, 0); // nothing
        d.mark(10 * GRANULE + 100, 1 << 40); // the short last granule, clipped
        d.mark(size, 4096); // past the end: nothing
        assert_eq!(d.bytes(), 2 * GRANULE + 512);
        assert_eq!(d.take(), [(0, 2 * GRANULE), (10 * GRANULE, 512)]);
        assert_eq!(d.bytes(), 0);
        assert!(d.take().is_empty());
        // A range across a 64-granule word boundary.
        let mut d = DirtyGranules::new(200 * GRANULE);
        d.mark(63 * GRANULE, 3 * GRANULE);
        d.mark(u64::MAX - 1, 10);
        assert_eq!(d.take(), [(63 * GRANULE, 3 * GRANULE)]);
    }
}
