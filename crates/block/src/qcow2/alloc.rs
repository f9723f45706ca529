//! Cluster allocation, refcounts and the ordered write-back that keeps a qcow2 image
//! consistent when the process dies at any point.
//!
//! Rules: (1) a refcount increment reaches the file before any table that points at the new
//! cluster, with an fdatasync in between; (2) a cluster is dereferenced only after the table
//! that stopped pointing at it is durable (`pending_free`); (3) refcount blocks may therefore be
//! written at any time; (4) a moved table (refcount table, L1) is complete and synced before the
//! 12-byte header field switch that makes it live. Breaking off anywhere leaves leaks only.
use super::Qcow2;
use super::header::OFF_REFTABLE;
use super::metamap::MetaKind;
use super::{REFT_OFFSET_MASK, cache::Slot};
use crate::error::{Error, Result};

/// Reads refcount entry `i` of a refcount block with 2^order-bit entries.
pub(crate) fn get_rc(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let s = i as usize * w;
        block[s..s + w].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = i * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Writes refcount entry `i` (the value must fit the width).
pub(crate) fn set_rc(block: &mut [u8], i: u64, order: u32, val: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let s = i as usize * w;
        let be = val.to_be_bytes();
        block[s..s + w].copy_from_slice(&be[8 - w..]);
    } else {
        let bit = i * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        let byte = &mut block[(bit / 8) as usize];
        let shift = bit % 8;
        *byte = (*byte & !(mask << shift)) | (((val as u8) & mask) << shift);
    }
}

impl Qcow2 {
    /// log2 of the number of clusters one refcount block describes.
    pub(crate) fn rb_bits(&self) -> u32 {
        self.cb + 3 - self.h.refcount_order
    }

    fn rc_max(&self) -> u64 {
        let bits = 1u32 << self.h.refcount_order;
        if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 }
    }

    fn rb_present(&self, ti: u64) -> Option<u64> {
        let off = *self.reftable.get(ti as usize)? & REFT_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    fn refblock(&mut self, off: u64) -> Result<&mut Slot> {
        if !self.rb_cache.contains(off) {
            self.evict_one_rb()?;
            let data = self.read_meta(off, "refcount block")?;
            return Ok(self.rb_cache.insert(off, data, false));
        }
        self.rb_cache
            .get_mut(off)
            .ok_or_else(|| Error::corrupt(&self.path, "refcount cache lost an entry"))
    }

    /// Refcount blocks can be written at any time (rule 3), so eviction just writes them.
    fn evict_one_rb(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.rb_cache.victim() {
            if let Some(slot) = self.rb_cache.remove(victim) {
                if dirty {
                    self.pwrite(&slot.data, victim, "write refcount block")?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn get_refcount(&mut self, cluster: u64) -> Result<u64> {
        let rb_bits = self.rb_bits();
        let Some(off) = self.rb_present(cluster >> rb_bits) else { return Ok(0) };
        let order = self.h.refcount_order;
        let i = cluster & ((1 << rb_bits) - 1);
        Ok(get_rc(&self.refblock(off)?.data, i, order))
    }

    pub(crate) fn set_refcount(&mut self, cluster: u64, val: u64) -> Result<()> {
        if val > self.rc_max() {
            return Err(Error::corrupt(&self.path, format!("refcount of cluster {cluster} would overflow")));
        }
        let rb_bits = self.rb_bits();
        let ti = cluster >> rb_bits;
        if self.rb_present(ti).is_none() {
            self.provision_refblocks(ti)?;
        }
        let off = self
            .rb_present(ti)
            .ok_or_else(|| Error::corrupt(&self.path, "refcount block missing after allocation"))?;
        let order = self.h.refcount_order;
        let slot = self.refblock(off)?;
        set_rc(&mut slot.data, cluster & ((1 << rb_bits) - 1), order, val);
        slot.dirty = true;
        Ok(())
    }

    /// Creates the refcount block for table index `want`, placing new blocks (and, if the table
    /// is too small, a new larger table) at the end of the file, refcounted by themselves.
    fn provision_refblocks(&mut self, want: u64) -> Result<()> {
        let cs = self.cs;
        let per_block = 1u64 << self.rb_bits();
        let per_table_cluster = cs / 8;
        let start = self.end_cluster;
        let old_len = self.reftable.len() as u64;
        let (mut nblocks, mut tclusters) = (0u64, 0u64);
        let mut missing;
        let mut new_len;
        let mut rounds = 0;
        loop {
            let region_end = start + nblocks + tclusters;
            missing = vec![want];
            for ti in start / per_block..=(region_end.max(start + 1) - 1) / per_block {
                if ti != want && self.rb_present(ti).is_none() {
                    missing.push(ti);
                }
            }
            let max_ti = missing.iter().copied().max().unwrap_or(want);
            new_len = if max_ti >= old_len {
                (max_ti + 1).max(old_len * 2).next_multiple_of(per_table_cluster)
            } else {
                old_len
            };
            let t = if new_len > old_len { new_len / per_table_cluster } else { 0 };
            if missing.len() as u64 == nblocks && t == tclusters {
                break;
            }
            nblocks = missing.len() as u64;
            tclusters = t;
            rounds += 1;
            if rounds > 64 {
                return Err(Error::corrupt(&self.path, "refcount structure growth did not converge"));
            }
        }
        if new_len * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::invalid(&self.path, "image too large: refcount table would exceed 8 MiB"));
        }
        self.end_cluster = start + nblocks + tclusters;
        if new_len > old_len {
            let old_off = self.h.refcount_table_offset;
            let old_clusters = u64::from(self.h.refcount_table_clusters);
            self.reftable.resize(new_len as usize, 0);
            self.h.refcount_table_offset = (start + nblocks) * cs;
            self.h.refcount_table_clusters = tclusters as u32;
            self.reftable_moved = true;
            self.free_later(old_off, old_clusters * cs);
        }
        if new_len > old_len {
            self.meta.insert(&self.path, self.cb, (start + nblocks) * cs, tclusters * cs, MetaKind::RefcountTable)?;
        }
        for (i, &ti) in missing.iter().enumerate() {
            let off = (start + i as u64) * cs;
            self.meta.insert(&self.path, self.cb, off, cs, MetaKind::RefcountBlock)?;
            self.rb_cache.remove(off);
            self.evict_one_rb()?;
            self.rb_cache.insert(off, vec![0u8; cs as usize], true);
            self.reftable[ti as usize] = off;
        }
        self.reftable_dirty = true;
        for c in start..self.end_cluster {
            let cur = self.get_refcount(c)?;
            self.set_refcount(c, cur + 1)?;
        }
        self.extend_file()
    }

    fn extend_file(&mut self) -> Result<()> {
        let want = self.end_cluster * self.cs;
        if want > self.file_len {
            self.file.set_len(want).map_err(Error::io(&self.path, "grow file"))?;
            self.file_len = want;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Allocates one cluster. Returns its offset and whether it is fresh (past the old end of
    /// the file, so it reads as zeroes without being written).
    pub(crate) fn alloc_cluster(&mut self) -> Result<(u64, bool)> {
        let mut c = self.free_hint;
        while c < self.end_cluster {
            // A metadata cluster is never handed out, even if a damaged refcount says it is free.
            if !self.meta.contains(c) && self.get_refcount(c)? == 0 {
                break;
            }
            c += 1;
        }
        let old_len = self.file_len;
        if c >= self.end_cluster {
            self.end_cluster = c + 1;
        }
        self.free_hint = c + 1;
        self.set_refcount(c, 1)?;
        self.extend_file()?;
        let off = c * self.cs;
        Ok((off, off >= old_len))
    }

    /// Allocates `n` contiguous clusters at the end of the file.
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        let start = self.end_cluster;
        self.end_cluster += n;
        for c in start..start + n {
            self.set_refcount(c, 1)?;
        }
        self.extend_file()?;
        Ok(start * self.cs)
    }

    /// Queues the host clusters covering `[off, off+len)` for dereferencing after write-back.
    pub(crate) fn free_later(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.cb;
        let last = (off + len - 1) >> self.cb;
        self.pending_free.push((first, last - first + 1));
    }

    fn apply_frees(&mut self) -> Result<()> {
        for (first, n) in std::mem::take(&mut self.pending_free) {
            self.add_refcount(first << self.cb, n << self.cb, -1)?;
        }
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcounts of the host clusters covering `[off, off+len)`
    /// now, without ordering: callers decide when that is safe (see the module comment). A
    /// cluster whose refcount reaches 0 is free and forgotten by the metadata map and caches.
    pub(crate) fn add_refcount(&mut self, off: u64, len: u64, delta: i64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in off >> self.cb..=(off + len - 1) >> self.cb {
            let r = self.get_refcount(c)?;
            let Some(new) = r.checked_add_signed(delta) else {
                return Err(Error::corrupt(&self.path, format!("freeing cluster {c} whose refcount is already 0")));
            };
            self.set_refcount(c, new)?;
            if new == 0 {
                self.meta.remove(c);
                self.l2_cache.remove(c << self.cb);
                self.free_hint = self.free_hint.min(c);
                if self.compressed_cache.as_ref().is_some_and(|(h, _)| h >> self.cb == c) {
                    self.compressed_cache = None;
                }
            }
        }
        Ok(())
    }

    /// Writes dirty refcount blocks, then (after a sync) the refcount table, then (after another
    /// sync) the header fields of a moved table.
    pub(crate) fn write_refcounts(&mut self) -> Result<()> {
        for off in self.rb_cache.dirty() {
            if let Some(slot) = self.rb_cache.get_mut(off) {
                slot.dirty = false;
                let data = slot.data.clone();
                self.pwrite(&data, off, "write refcount block")?;
            }
        }
        if self.reftable_dirty {
            self.sync()?;
            let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.pwrite(&bytes, self.h.refcount_table_offset, "write refcount table")?;
            self.reftable_dirty = false;
        }
        if self.reftable_moved {
            self.sync()?;
            let mut fields = [0u8; 12];
            fields[0..8].copy_from_slice(&self.h.refcount_table_offset.to_be_bytes());
            fields[8..12].copy_from_slice(&self.h.refcount_table_clusters.to_be_bytes());
            self.pwrite(&fields, OFF_REFTABLE, "write header")?;
            self.reftable_moved = false;
        }
        Ok(())
    }

    /// Ordered write-back of all dirty metadata (see the module comment). Does not end with a
    /// sync; `flush` adds it.
    pub(crate) fn writeback(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.write_refcounts()?;
        let dirty_l2 = self.l2_cache.dirty();
        if !dirty_l2.is_empty() || self.l1_dirty {
            self.sync()?;
            for off in dirty_l2 {
                if let Some(slot) = self.l2_cache.get_mut(off) {
                    slot.dirty = false;
                    let data = slot.data.clone();
                    self.pwrite(&data, off, "write L2 table")?;
                }
            }
            if self.l1_dirty {
                self.sync()?;
                let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.pwrite(&bytes, self.h.l1_table_offset, "write L1 table")?;
                self.l1_dirty = false;
            }
        }
        if !self.pending_free.is_empty() {
            self.sync()?;
            self.apply_frees()?;
            self.write_refcounts()?;
        }
        Ok(())
    }
}
