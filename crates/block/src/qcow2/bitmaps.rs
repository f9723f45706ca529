//! Persistent dirty bitmaps in QEMU's qcow2 format: the bitmaps header extension points at a
//! directory of entries; each entry names a bitmap table whose entries point at clusters of
//! bitmap data. Bit n (least significant bit of byte n/8 first) covers the guest bytes
//! `[n * granularity, (n + 1) * granularity)`.
//!
//! While an image is open for writing, its bitmaps live in memory and every write path marks
//! the enabled ones (the `auto` flag). On disk they carry the `in_use` flag from the open on, so
//! an image left open by a crash has them marked inconsistent. Every directory change (the
//! in_use flags at open, the stored bitmaps at close) writes a new directory, and tables and
//! data, to new clusters, then switches the header to it, then frees the old clusters: a crash
//! anywhere leaves the old state or the new one, and at worst leaked clusters. A bitmap found in_use is kept but never trusted or tracked; it can only
//! be removed (as in QEMU). Autoclear bit 0 says the extension is valid: a program that does not
//! know bitmaps clears it when it writes, and we then drop the stale bitmaps on our next open.
use super::header::{EXT_BITMAPS, Extension, OFF_AUTOCLEAR};
use super::metamap::MetaKind;
use super::Qcow2;
use crate::error::{Error, Result};
use std::collections::BTreeSet;

/// Autoclear feature bit: the bitmaps extension is consistent with the image.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO;
const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limits: granularity 512 B ..= 2 GiB, names up to 1023 bytes, 65535 bitmaps, a
/// directory of at most 64 MiB, at most 512 MiB of bitmap data per bitmap.
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_BYTES: usize = 1023;
const MAX_BITMAPS: usize = 65535;
const MAX_DIR_BYTES: u64 = 64 << 20;
const MAX_BITMAP_BYTES: u64 = 512 << 20;
const ENTRY_FIXED: usize = 24;
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_ALL_ONES: u64 = 1;

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One allocated bitmap structure: file offset, length in bytes, and what it is.
pub(crate) type Region = (u64, u64, &'static str);

/// One bitmap of the directory.
#[derive(Clone, Debug)]
pub(crate) struct Bitmap {
    name: String,
    granularity_bits: u8,
    /// The flags as stored on disk now (in_use, auto).
    flags: u32,
    /// Where its table lies on disk now (offset 0: not stored yet).
    table_offset: u64,
    table_size: u32,
    /// The contents, for a consistent bitmap of an image open for writing. `None` for
    /// bitmaps found in_use (never trusted) and in read-only images (read on demand).
    data: Option<Vec<u8>>,
    /// Found in_use when the image was opened.
    inconsistent: bool,
}

/// What `info` and `ferro img bitmap` report about a bitmap (QEMU's names for the flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// The `auto` flag: the bitmap tracks writes.
    pub enabled: bool,
    /// The `in_use` flag: some program has it open for writing, or left it inconsistent.
    pub in_use: bool,
}

/// A copy of a bitmap's contents: which granules of the disk were written while it tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub granularity: u64,
    /// Virtual disk size the bitmap covers.
    pub size: u64,
    bits: Vec<u8>,
}

impl DirtyBitmap {
    /// An empty bitmap for a disk of `size` bytes.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        DirtyBitmap { granularity, size, bits: vec![0; bitmap_bytes(size, granularity.trailing_zeros() as u8) as usize] }
    }

    /// Whether granule `i` is dirty.
    pub fn is_set(&self, i: u64) -> bool {
        self.bits.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Marks every granule touching `[off, off+len)`.
    pub fn mark(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.size);
        if end > off {
            let g = self.granularity.trailing_zeros();
            set_bits(&mut self.bits, off >> g, ((end - 1) >> g) + 1);
        }
    }

    /// The dirty byte ranges `(offset, length)`, adjacent granules merged, clipped to the size.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let granules = self.size.div_ceil(self.granularity);
        let mut i = 0;
        while i < granules {
            if self.bits[(i / 8) as usize] == 0 {
                i = (i / 8 + 1) * 8;
                continue;
            }
            if self.is_set(i) {
                let off = i * self.granularity;
                let len = self.granularity.min(self.size - off);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => out.push((off, len)),
                }
            }
            i += 1;
        }
        out
    }

    /// Bytes of the disk the dirty granules cover.
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().iter().map(|r| r.1).sum()
    }

    /// Adds every dirty range of `other` (any granularity) to this bitmap.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (off, len) in other.ranges() {
            self.mark(off, len);
        }
    }
}

/// Bytes of bitmap data for a disk of `size` bytes.
fn bitmap_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits).div_ceil(8)
}

/// Sets bits `[first, end)`.
fn set_bits(bits: &mut [u8], first: u64, end: u64) {
    let mut i = first;
    while i < end {
        if i % 8 == 0 && end - i >= 8 {
            let whole = ((end - i) / 8) as usize;
            let s = (i / 8) as usize;
            bits[s..s + whole].fill(0xff);
            i += whole as u64 * 8;
        } else {
            bits[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

/// Clears the bits at and past `count` (the spec wants the unused tail zero).
fn clear_tail(bits: &mut [u8], count: u64) {
    let full = (count / 8) as usize;
    if count % 8 != 0 {
        bits[full] &= (1u8 << (count % 8)) - 1;
        bits[full + 1..].fill(0);
    } else {
        bits[full..].fill(0);
    }
}

fn dir_entry_len(name_len: usize) -> usize {
    (ENTRY_FIXED + name_len).next_multiple_of(8)
}

impl Qcow2 {
    fn bitmap_ext(&self) -> Option<&Extension> {
        self.h.extensions.iter().find(|e| e.kind == EXT_BITMAPS)
    }

    /// The directory the header extension points at (data not loaded). No extension: empty.
    fn read_bitmap_dir(&self) -> Result<(Vec<Bitmap>, u64, u64)> {
        let Some(ext) = self.bitmap_ext() else { return Ok((Vec::new(), 0, 0)) };
        let bad = |r: String| Error::corrupt(&self.path, r);
        let ext = &ext.data;
        if ext.len() < 24 {
            return Err(bad("bitmaps header extension shorter than 24 bytes".into()));
        }
        let count = be32(ext, 0) as usize;
        let dir_size = be64(ext, 8);
        let dir_off = be64(ext, 16);
        if count == 0 || count > MAX_BITMAPS || dir_size > MAX_DIR_BYTES || dir_off % self.cs != 0 {
            return Err(bad(format!(
                "bitmaps extension: {count} bitmaps in a directory of {dir_size} bytes at {dir_off:#x} is invalid"
            )));
        }
        let dir = self.read_struct(dir_off, dir_size, "bitmap directory")?;
        let mut list: Vec<Bitmap> = Vec::with_capacity(count);
        let mut pos = 0usize;
        while pos < dir.len() {
            if list.len() == count {
                return Err(bad(format!("bitmap directory holds more than the {count} bitmaps the header names")));
            }
            if pos + ENTRY_FIXED > dir.len() {
                return Err(bad("bitmap directory entry runs past the directory".into()));
            }
            let table_offset = be64(&dir, pos);
            let table_size = be32(&dir, pos + 8);
            let flags = be32(&dir, pos + 12);
            let kind = dir[pos + 16];
            let granularity_bits = dir[pos + 17];
            let name_len = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra = be32(&dir, pos + 20);
            let end = pos + dir_entry_len(name_len);
            if end > dir.len() {
                return Err(bad("bitmap directory entry runs past the directory".into()));
            }
            let name = String::from_utf8(dir[pos + ENTRY_FIXED..pos + ENTRY_FIXED + name_len].to_vec())
                .map_err(|_| bad("bitmap name is not UTF-8".into()))?;
            if extra != 0 {
                return Err(Error::unsupported(&self.path, format!("bitmap {name:?} has extra data")));
            }
            let capacity_bits = (u64::from(table_size) * self.cs * 8).checked_shl(u32::from(granularity_bits));
            let valid = table_size != 0
                && table_offset != 0
                && table_offset % self.cs == 0
                && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits)
                && flags & !KNOWN_FLAGS == 0
                && name_len != 0
                && name_len <= MAX_NAME_BYTES
                && kind == TYPE_DIRTY_TRACKING
                && u64::from(table_size) * self.cs <= MAX_BITMAP_BYTES
                && (flags & FLAG_IN_USE != 0 || capacity_bits.is_none_or(|c| c >= self.h.size));
            if !valid {
                return Err(bad(format!("bitmap {name:?} does not satisfy the format's constraints")));
            }
            if list.iter().any(|b| b.name == name) {
                return Err(bad(format!("two bitmaps are named {name:?}")));
            }
            list.push(Bitmap {
                name,
                granularity_bits,
                flags,
                table_offset,
                table_size,
                data: None,
                inconsistent: flags & FLAG_IN_USE != 0,
            });
            pos = end;
        }
        if list.len() != count {
            return Err(bad(format!("bitmap directory holds {} bitmaps, the header names {count}", list.len())));
        }
        Ok((list, dir_off, dir_size))
    }

    /// A bitmap table's entries, each checked.
    fn read_bitmap_table(&self, b: &Bitmap) -> Result<Vec<u64>> {
        let raw = self.read_struct(b.table_offset, u64::from(b.table_size) * 8, "bitmap table")?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        for &e in &table {
            let off = e & TABLE_OFFSET_MASK;
            if e & TABLE_RESERVED != 0 || (off != 0 && e & TABLE_ALL_ONES != 0) || off.saturating_add(self.cs) > self.file_len {
                return Err(Error::corrupt(&self.path, format!("bitmap {:?}: table entry {e:#x} is invalid", b.name)));
            }
        }
        Ok(table)
    }

    /// Reads a consistent bitmap's data from the file.
    fn load_bitmap_data(&self, b: &Bitmap) -> Result<Vec<u8>> {
        let bytes = bitmap_bytes(self.h.size, b.granularity_bits);
        let needed = bytes.div_ceil(self.cs);
        if u64::from(b.table_size) != needed {
            return Err(Error::corrupt(
                &self.path,
                format!("bitmap {:?}: table of {} entries for an image that needs {needed}", b.name, b.table_size),
            ));
        }
        let mut data = vec![0u8; bytes as usize];
        for (i, e) in self.read_bitmap_table(b)?.into_iter().enumerate() {
            let start = i * self.cs as usize;
            let chunk = &mut data[start..(start + self.cs as usize).min(bytes as usize)];
            let off = e & TABLE_OFFSET_MASK;
            if off != 0 {
                self.pread(chunk, off)?;
            } else if e & TABLE_ALL_ONES != 0 {
                chunk.fill(0xff);
            }
        }
        clear_tail(&mut data, self.h.size.div_ceil(1 << b.granularity_bits));
        Ok(data)
    }

    /// Every region the bitmaps header extension references on disk (none without it).
    pub(crate) fn bitmap_regions(&self) -> Result<Vec<Region>> {
        let (list, dir_off, dir_size) = self.read_bitmap_dir()?;
        let mut regions = Vec::new();
        if dir_size > 0 {
            regions.push((dir_off, dir_size, "bitmap directory"));
        }
        for b in &list {
            regions.extend(self.bitmap_table_regions(b)?);
        }
        Ok(regions)
    }

    fn bitmap_table_regions(&self, b: &Bitmap) -> Result<Vec<Region>> {
        let mut regions = vec![(b.table_offset, u64::from(b.table_size) * 8, "bitmap table")];
        for e in self.read_bitmap_table(b)? {
            let off = e & TABLE_OFFSET_MASK;
            if off != 0 {
                regions.push((off, self.cs, "bitmap data"));
            }
        }
        Ok(regions)
    }

    /// Called at every open: reads the directory; for writing, loads the consistent bitmaps,
    /// marks them in_use on disk, and drops bitmaps a bitmap-unaware program made stale.
    pub(crate) fn open_bitmaps(&mut self) -> Result<()> {
        let has_ext = self.bitmap_ext().is_some();
        let valid = has_ext && self.h.version >= 3 && self.h.autoclear & AUTOCLEAR_BITMAPS != 0;
        if self.readonly {
            if valid {
                self.bitmaps = self.read_bitmap_dir()?.0;
            }
            return Ok(());
        }
        if has_ext && !valid {
            // Like QEMU: the extension is stale, so the bitmaps go (their clusters are freed).
            for (off, len, _) in self.bitmap_regions()? {
                self.free_later(off, len);
            }
            self.h.extensions.retain(|e| e.kind != EXT_BITMAPS);
            self.h.autoclear = 0;
            self.write_header()?;
            return self.writeback().and_then(|_| self.sync());
        }
        if !has_ext {
            if self.h.autoclear != 0 {
                // Clearing autoclear bits we do not know tells other readers that what those
                // features describe may be stale, as the spec asks.
                self.h.autoclear = 0;
                self.pwrite(&0u64.to_be_bytes(), OFF_AUTOCLEAR, "write header")?;
                self.sync()?;
            }
            return Ok(());
        }
        let (mut list, dir_off, dir_size) = self.read_bitmap_dir()?;
        let mut total = 0u64;
        for b in list.iter_mut().filter(|b| !b.inconsistent) {
            total += bitmap_bytes(self.h.size, b.granularity_bits);
            if total > MAX_BITMAP_BYTES {
                return Err(Error::unsupported(&self.path, "more than 512 MiB of dirty bitmaps"));
            }
            b.data = Some(self.load_bitmap_data(b)?);
            b.flags |= FLAG_IN_USE;
        }
        // The directory with the in_use flags goes to new clusters and the header switches to
        // it, so that a crash at any moment leaves one valid directory or the other.
        self.bitmaps = list;
        self.switch_bitmap_directory()?;
        self.free_later(dir_off, dir_size);
        self.writeback()?;
        self.sync()?;
        self.bitmaps_to_store = true;
        Ok(())
    }

    /// Writes the directory of `self.bitmaps` (whose tables are on disk) to new clusters and
    /// points the header at it (or removes the extension if there are no bitmaps). The old
    /// directory is the caller's to free.
    fn switch_bitmap_directory(&mut self) -> Result<()> {
        self.h.extensions.retain(|e| e.kind != EXT_BITMAPS);
        if self.bitmaps.is_empty() {
            self.h.autoclear = 0;
        } else {
            let dir = encode_dir(&self.bitmaps);
            let clusters = (dir.len() as u64).div_ceil(self.cs);
            let dir_off = self.alloc_contiguous(clusters)?;
            self.meta.insert(&self.path, self.cb, dir_off, clusters * self.cs, MetaKind::Bitmap)?;
            self.pwrite(&dir, dir_off, "write bitmap directory")?;
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(self.bitmaps.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&dir_off.to_be_bytes());
            self.h.extensions.push(Extension { kind: EXT_BITMAPS, data: ext });
            self.h.autoclear = AUTOCLEAR_BITMAPS;
        }
        self.write_refcounts()?;
        self.sync()?;
        self.write_header()
    }

    fn write_header(&mut self) -> Result<()> {
        let first = self.h.to_cluster(&self.path)?;
        self.pwrite(&first, 0, "write header")?;
        self.sync()
    }

    /// Writes the bitmaps back at close (see the module comment for the order).
    pub(crate) fn store_bitmaps(&mut self) -> Result<()> {
        if self.readonly || !self.bitmaps_to_store {
            return Ok(());
        }
        self.writeback()?;
        let mut old = BTreeSet::new();
        for (off, len, _) in self.bitmap_regions()? {
            old.extend((off >> self.cb)..=((off + len - 1) >> self.cb));
        }
        let mut kept = BTreeSet::new();
        let mut list = std::mem::take(&mut self.bitmaps);
        let stored = list.iter_mut().try_for_each(|b| -> Result<()> {
            let Some(data) = &b.data else {
                for (off, len, _) in self.bitmap_table_regions(b)? {
                    kept.extend((off >> self.cb)..=((off + len - 1) >> self.cb));
                }
                return Ok(());
            };
            let mut table = Vec::new();
            for chunk in data.chunks(self.cs as usize) {
                if chunk.iter().all(|&x| x == 0) {
                    table.extend_from_slice(&0u64.to_be_bytes());
                    continue;
                }
                let (off, _) = self.alloc_cluster()?;
                self.meta.insert(&self.path, self.cb, off, self.cs, MetaKind::Bitmap)?;
                let mut whole = chunk.to_vec();
                whole.resize(self.cs as usize, 0);
                self.pwrite(&whole, off, "write bitmap data")?;
                table.extend_from_slice(&off.to_be_bytes());
            }
            let clusters = (table.len() as u64).div_ceil(self.cs);
            let off = self.alloc_contiguous(clusters)?;
            self.meta.insert(&self.path, self.cb, off, clusters * self.cs, MetaKind::Bitmap)?;
            self.pwrite(&table, off, "write bitmap table")?;
            b.table_offset = off;
            b.table_size = (table.len() / 8) as u32;
            b.flags &= !FLAG_IN_USE;
            Ok(())
        });
        self.bitmaps = list;
        stored?;
        self.switch_bitmap_directory()?;
        for c in old.difference(&kept) {
            self.free_later(c << self.cb, self.cs);
        }
        self.writeback()?;
        self.sync()?;
        self.bitmaps_to_store = false;
        Ok(())
    }

    /// Marks every enabled, consistent bitmap for `[off, off+len)`.
    pub(crate) fn mark_dirty(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.h.size);
        if end <= off {
            return;
        }
        for b in &mut self.bitmaps {
            if b.flags & FLAG_AUTO == 0 {
                continue;
            }
            if let Some(data) = &mut b.data {
                let g = b.granularity_bits;
                set_bits(data, off >> g, ((end - 1) >> g) + 1);
            }
        }
    }

    /// A resize must not leave an inconsistent bitmap (whose size we cannot fix) or exceed the
    /// bitmap size limit.
    pub(crate) fn check_bitmaps_resizable(&self, size: u64) -> Result<()> {
        if let Some(b) = self.bitmaps.iter().find(|b| b.inconsistent) {
            return Err(Error::invalid(&self.path, format!("cannot resize: bitmap {:?} is inconsistent (remove it first)", b.name)));
        }
        if let Some(b) = self.bitmaps.iter().find(|b| bitmap_bytes(size, b.granularity_bits) > MAX_BITMAP_BYTES) {
            return Err(Error::invalid(&self.path, format!("cannot resize: bitmap {:?} would exceed 512 MiB", b.name)));
        }
        Ok(())
    }

    /// Follows a size change from `old` to the current size: the bitmaps get the new length,
    /// and a grown range counts as written.
    pub(crate) fn resize_bitmaps(&mut self, old: u64) {
        let size = self.h.size;
        for b in &mut self.bitmaps {
            if let Some(data) = &mut b.data {
                data.resize(bitmap_bytes(size, b.granularity_bits) as usize, 0);
                clear_tail(data, size.div_ceil(1 << b.granularity_bits));
            }
        }
        if size > old {
            self.mark_dirty(old, size - old);
        }
    }

    fn bitmap_index(&self, name: &str) -> Result<usize> {
        self.bitmaps
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| Error::invalid(&self.path, format!("no bitmap named {name:?}")))
    }

    /// The bitmap's contents, for writing; refused for inconsistent bitmaps.
    fn bitmap_data_mut(&mut self, name: &str) -> Result<(&mut Vec<u8>, u8)> {
        self.writable()?;
        let i = self.bitmap_index(name)?;
        let path = self.path.clone();
        let b = &mut self.bitmaps[i];
        match &mut b.data {
            Some(d) => Ok((d, b.granularity_bits)),
            None => Err(Error::invalid(&path, format!("bitmap {name:?} is inconsistent; it can only be removed"))),
        }
    }

    /// The bitmaps of the image, in directory order.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.bitmaps
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1 << b.granularity_bits,
                enabled: b.flags & FLAG_AUTO != 0,
                in_use: b.flags & FLAG_IN_USE != 0,
            })
            .collect()
    }

    /// A copy of a consistent bitmap's contents.
    pub fn dirty_bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        let b = &self.bitmaps[self.bitmap_index(name)?];
        let bits = match &b.data {
            Some(d) => d.clone(),
            None if b.inconsistent => {
                return Err(Error::invalid(&self.path, format!("bitmap {name:?} is inconsistent (in use or not saved)")));
            }
            None => self.load_bitmap_data(b)?,
        };
        Ok(DirtyBitmap { granularity: 1 << b.granularity_bits, size: self.h.size, bits })
    }

    /// Adds an empty bitmap (`granularity` defaults to the cluster size, at least 4 KiB, like
    /// QEMU). It reaches the file when the image is closed.
    pub fn add_bitmap(&mut self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.writable()?;
        if self.h.version < 3 {
            return Err(Error::unsupported(&self.path, "persistent bitmaps in a version 2 (compat=0.10) image"));
        }
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(&self.path, format!("bitmap name must have 1 to {MAX_NAME_BYTES} bytes")));
        }
        if self.bitmaps.iter().any(|b| b.name == name) {
            return Err(Error::invalid(&self.path, format!("a bitmap named {name:?} exists already")));
        }
        if self.bitmaps.len() >= MAX_BITMAPS {
            return Err(Error::invalid(&self.path, format!("an image holds at most {MAX_BITMAPS} bitmaps")));
        }
        let g = granularity.unwrap_or(self.cs.max(4096));
        let gbits = g.trailing_zeros() as u8;
        if !g.is_power_of_two() || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gbits) {
            return Err(Error::invalid(&self.path, format!("granularity {g} must be a power of two from 512 to 2G")));
        }
        let bytes = bitmap_bytes(self.h.size, gbits);
        if bytes > MAX_BITMAP_BYTES {
            return Err(Error::invalid(&self.path, format!("granularity {g} needs more than 512 MiB of bitmap (use a larger one)")));
        }
        let dir_len: usize = self.bitmaps.iter().map(|b| dir_entry_len(b.name.len())).sum::<usize>() + dir_entry_len(name.len());
        if dir_len as u64 > MAX_DIR_BYTES {
            return Err(Error::invalid(&self.path, "the bitmap directory would exceed 64 MiB"));
        }
        self.bitmaps.push(Bitmap {
            name: name.to_string(),
            granularity_bits: gbits,
            flags: FLAG_IN_USE | if enabled { FLAG_AUTO } else { 0 },
            table_offset: 0,
            table_size: 0,
            data: Some(vec![0; bytes as usize]),
            inconsistent: false,
        });
        self.bitmaps_to_store = true;
        Ok(())
    }

    /// Removes a bitmap (inconsistent ones too).
    pub fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        self.writable()?;
        let i = self.bitmap_index(name)?;
        self.bitmaps.remove(i);
        self.bitmaps_to_store = true;
        Ok(())
    }

    /// Clears every bit.
    pub fn clear_bitmap(&mut self, name: &str) -> Result<()> {
        self.bitmap_data_mut(name)?.0.fill(0);
        Ok(())
    }

    /// Enables (tracks writes) or disables a bitmap.
    pub fn set_bitmap_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_data_mut(name)?;
        let i = self.bitmap_index(name)?;
        let b = &mut self.bitmaps[i];
        b.flags = (b.flags & !FLAG_AUTO) | if enabled { FLAG_AUTO } else { 0 };
        Ok(())
    }

    /// Adds the dirty ranges of `source` to the bitmap `name`.
    pub fn merge_into_bitmap(&mut self, name: &str, source: &DirtyBitmap) -> Result<()> {
        let size = self.h.size;
        let (data, gbits) = self.bitmap_data_mut(name)?;
        let mut target = DirtyBitmap { granularity: 1 << gbits, size, bits: std::mem::take(data) };
        target.merge(source);
        *data = target.bits;
        Ok(())
    }

    /// Whether bitmap `name` exists and is consistent (usable).
    fn has_consistent_bitmap(&self, name: &str) -> bool {
        self.bitmaps.iter().any(|b| b.name == name && !b.inconsistent)
    }

    /// Makes checkpoint `name` (libvirt's model, one bitmap per checkpoint): a new tracking
    /// bitmap `name`, and `parent`'s bitmap (the previous checkpoint's, if the image has it
    /// consistent) stops tracking, so each bitmap holds the writes between its checkpoint and
    /// the next.
    pub fn add_checkpoint(&mut self, name: &str, parent: Option<&str>) -> Result<()> {
        self.add_bitmap(name, None, true)?;
        if let Some(parent) = parent.filter(|p| self.has_consistent_bitmap(p)) {
            self.set_bitmap_enabled(parent, false)?;
        }
        Ok(())
    }

    /// Removes checkpoint `name`: its bitmap is merged into `parent`'s (which tracks again if
    /// `name` was tracking) and removed. An image without the bitmap is left alone; an
    /// inconsistent one is only removed.
    pub fn remove_checkpoint(&mut self, name: &str, parent: Option<&str>) -> Result<()> {
        let Some(this) = self.bitmaps.iter().find(|b| b.name == name) else { return Ok(()) };
        let (enabled, consistent) = (this.flags & FLAG_AUTO != 0, !this.inconsistent);
        if let Some(parent) = parent.filter(|p| self.has_consistent_bitmap(p)) {
            if consistent {
                let bits = self.dirty_bitmap(name)?;
                self.merge_into_bitmap(parent, &bits)?;
            }
            if enabled {
                self.set_bitmap_enabled(parent, true)?;
            }
        }
        self.remove_bitmap(name)
    }

    /// What was written since the oldest of `checkpoints`, given the bitmaps of it and of every
    /// checkpoint after it: their union. Refused naming a bitmap that is missing or inconsistent.
    pub fn changed_since(&self, checkpoints: &[String]) -> Result<DirtyBitmap> {
        let mut union: Option<DirtyBitmap> = None;
        for name in checkpoints {
            let bits = self.dirty_bitmap(name)?;
            match &mut union {
                Some(u) => u.merge(&bits),
                None => union = Some(bits),
            }
        }
        union.ok_or_else(|| Error::invalid(&self.path, "no checkpoint bitmap named"))
    }
}

/// The directory entries of `list`, with the flags and table positions it records.
fn encode_dir(list: &[Bitmap]) -> Vec<u8> {
    let mut dir = Vec::new();
    for b in list {
        let start = dir.len();
        dir.extend_from_slice(&b.table_offset.to_be_bytes());
        dir.extend_from_slice(&b.table_size.to_be_bytes());
        dir.extend_from_slice(&b.flags.to_be_bytes());
        dir.push(TYPE_DIRTY_TRACKING);
        dir.push(b.granularity_bits);
        dir.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(b.name.as_bytes());
        dir.resize(start + dir_entry_len(b.name.len()), 0);
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges_round_trip() {
        let mut b = DirtyBitmap::new(1 << 20, 4096);
        b.mark(0, 1);
        b.mark(8192, 3 * 4096 + 1);
        b.mark((1 << 20) - 10, 100);
        assert_eq!(b.ranges(), vec![(0, 4096), (8192, 4 * 4096), ((1 << 20) - 4096, 4096)]);
        let mut coarse = DirtyBitmap::new(1 << 20, 65536);
        coarse.merge(&b);
        assert_eq!(coarse.ranges(), vec![(0, 65536), ((1 << 20) - 65536, 65536)]);
        let mut bits = vec![0xffu8; 4];
        clear_tail(&mut bits, 11);
        assert_eq!(bits, vec![0xff, 0x07, 0, 0]);
    }
}
