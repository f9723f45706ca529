//! qcow2 internal snapshots, compatible with QEMU: the snapshot table (parsing with bounds
//! checks, serialisation), and creating, listing, applying and deleting snapshots.
//!
//! Refcount model (the one QEMU uses): an L2 table's refcount is the number of L1 tables that
//! point at it, and a data cluster's refcount is the number of (L1 table, L2 entry) paths that
//! reach it, so a data cluster in an L2 table shared by two L1 tables counts twice. Copying a
//! shared L2 table therefore leaves data refcounts unchanged. The COPIED flag (bit 63) of an
//! active L1 or L2 entry means "refcount is 1, write in place"; without it a write copies.
//!
//! Crash safety (see docs/qcow2-snapshots.md): refcount increments are durable before any
//! table that points at the clusters; the snapshot table switches in one 12-byte header write
//! (count and offset); decrements happen only after nothing durable points at the clusters.
//! A crash at any point leaves leaked clusters at worst, never a cluster in use with a refcount
//! too low.
use super::header::MAX_L1_BYTES;
use super::metamap::MetaKind;
use super::{L1E_OFFSET_MASK, L2Entry, OFLAG_COPIED, Qcow2};
use crate::error::{Error, Result};
use std::time::{SystemTime, UNIX_EPOCH};

/// qemu's limits: at most 65536 snapshots, a table of at most 64 MiB, 1 KiB of extra data.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u64 = 1024;
/// Fixed part of a table entry.
const ENTRY_FIXED: u64 = 40;
/// Extra data we write: large vm_state_size, disk size, icount (-1: no record/replay).
const OUR_EXTRA: usize = 24;
/// Byte offset of nb_snapshots (u32) followed by snapshots_offset (u64) in the header.
const OFF_SNAPSHOTS: u64 = 60;
/// Longest snapshot name we create (qemu's id and name fields are u16-sized).
const MAX_NAME: usize = 255;

/// One snapshot as recorded in the table. Id, name and extra data are kept as raw bytes so that
/// rewriting the table preserves what another program wrote.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotEntry {
    pub l1_offset: u64,
    pub l1_size: u32,
    id: Vec<u8>,
    name: Vec<u8>,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u64,
    disk_size: Option<u64>,
    extra: Vec<u8>,
}

/// A snapshot as `Qcow2::snapshots` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// QEMU's unique numeric id ("1", "2", ...).
    pub id: String,
    pub name: String,
    /// Creation time, seconds and nanoseconds since the Unix epoch.
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest run time when the snapshot was taken (0 for disk-only snapshots).
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with it (QEMU `savevm`; 0 for ours).
    pub vm_state_size: u64,
    /// Virtual disk size when it was taken (absent in old version 2 entries).
    pub disk_size: Option<u64>,
    /// QEMU's record/replay instruction count, if it was recording.
    pub icount: Option<u64>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

impl SnapshotEntry {
    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: String::from_utf8_lossy(&self.id).into_owned(),
            name: String::from_utf8_lossy(&self.name).into_owned(),
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            vm_state_size: self.vm_state_size,
            disk_size: self.disk_size,
            icount: (self.extra.len() >= 24).then(|| be64(&self.extra, 16)).filter(|&n| n != u64::MAX),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(start + (out.len() - start).next_multiple_of(8), 0);
    }
}

impl Qcow2 {
    /// Reads the snapshot table the header points at. Returns the entries and the table's
    /// length in bytes.
    pub(crate) fn read_snapshot_table(&self) -> Result<(Vec<SnapshotEntry>, u64)> {
        let count = self.h.nb_snapshots;
        if count == 0 {
            return Ok((Vec::new(), 0));
        }
        if count > MAX_SNAPSHOTS {
            return Err(Error::corrupt(&self.path, format!("{count} snapshots (limit {MAX_SNAPSHOTS})")));
        }
        let start = self.h.snapshots_offset;
        let mut entries = Vec::with_capacity(count as usize);
        let mut off = start;
        for i in 0..count {
            let fixed = self.read_struct(off, ENTRY_FIXED, "snapshot table entry")?;
            let l1_offset = be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
            let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let extra_len = u64::from(be32(&fixed, 36));
            if extra_len > MAX_EXTRA {
                return Err(Error::corrupt(&self.path, format!("snapshot {i}: {extra_len} bytes of extra data (limit {MAX_EXTRA})")));
            }
            if u64::from(l1_size) * 8 > MAX_L1_BYTES || l1_offset % self.cs != 0 || (l1_size > 0 && l1_offset == 0) {
                return Err(Error::corrupt(
                    &self.path,
                    format!("snapshot {i}: L1 table at {l1_offset:#x} of {l1_size} entries is invalid"),
                ));
            }
            let var = self.read_struct(off + ENTRY_FIXED, extra_len + id_len + name_len, "snapshot table entry")?;
            let (extra, rest) = var.split_at(extra_len as usize);
            let (id, name) = rest.split_at(id_len as usize);
            let vm_state_size = if extra.len() >= 8 { be64(extra, 0) } else { u64::from(be32(&fixed, 32)) };
            let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
            entries.push(SnapshotEntry {
                l1_offset,
                l1_size,
                id: id.to_vec(),
                name: name.to_vec(),
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                vm_clock_nsec: be64(&fixed, 24),
                vm_state_size,
                disk_size,
                extra: extra.to_vec(),
            });
            off = (off + ENTRY_FIXED + extra_len + id_len + name_len).next_multiple_of(8);
            if off - start > MAX_TABLE_BYTES {
                return Err(Error::corrupt(&self.path, "snapshot table larger than 64 MiB"));
            }
        }
        Ok((entries, off - start))
    }

    /// Reads a snapshot's L1 table.
    pub(crate) fn read_snapshot_l1(&self, s: &SnapshotEntry) -> Result<Vec<u64>> {
        let raw = self.read_struct(s.l1_offset, u64::from(s.l1_size) * 8, "snapshot L1 table")?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    }

    /// Reads `len` bytes of a metadata structure that must lie inside the file.
    pub(crate) fn read_struct(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > self.file_len) || len > MAX_TABLE_BYTES {
            return Err(Error::corrupt(&self.path, format!("{what} at {off:#x} ({len} bytes) is past the end of the file")));
        }
        let mut b = vec![0u8; len as usize];
        self.pread(&mut b, off)?;
        Ok(b)
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.read_snapshot_table()?.0.iter().map(SnapshotEntry::info).collect())
    }

    /// Finds a snapshot by name, or else by id (as qemu-img does). A name that two snapshots
    /// share is refused: reverting or deleting the wrong one would lose data.
    fn find_snapshot(&self, entries: &[SnapshotEntry], name: &str) -> Result<usize> {
        let by = |pick: fn(&SnapshotEntry) -> &[u8]| -> Vec<usize> {
            entries.iter().enumerate().filter(|(_, e)| pick(e) == name.as_bytes()).map(|(i, _)| i).collect()
        };
        let mut found = by(|e| &e.name);
        if found.is_empty() {
            found = by(|e| &e.id);
        }
        match found.as_slice() {
            [i] => Ok(*i),
            [] => Err(Error::invalid(&self.path, format!("no snapshot named {name:?}"))),
            many => {
                let ids: Vec<String> = many.iter().map(|&i| String::from_utf8_lossy(&entries[i].id).into_owned()).collect();
                Err(Error::invalid(
                    &self.path,
                    format!("snapshot name {name:?} is ambiguous: snapshots with ids {} carry it", ids.join(", ")),
                ))
            }
        }
    }

    /// Takes an internal snapshot of the current disk contents named `name`.
    pub fn create_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.writable()?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(Error::invalid(&self.path, format!("snapshot name must be 1 to {MAX_NAME} bytes")));
        }
        if self.h.refcount_order == 0 {
            return Err(Error::unsupported(&self.path, "internal snapshots need refcount_bits of at least 2"));
        }
        let (mut entries, _) = self.read_snapshot_table()?;
        if entries.iter().any(|e| e.name == name.as_bytes()) {
            return Err(Error::invalid(&self.path, format!("a snapshot named {name:?} exists already")));
        }
        if entries.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::invalid(&self.path, format!("the image has the maximum of {MAX_SNAPSHOTS} snapshots")));
        }
        crate::DiskImage::flush(self)?;
        // The snapshot's L1 table: a copy of the active one (flags are meaningless there).
        let l1_bytes = self.l1.len() as u64 * 8;
        let l1_offset = if l1_bytes == 0 { 0 } else { self.alloc_contiguous(l1_bytes.div_ceil(self.cs))? };
        self.meta.insert(&self.path, self.cb, l1_offset, l1_bytes, MetaKind::SnapshotL1Table)?;
        let copy: Vec<u8> = self.l1.iter().flat_map(|e| (e & !OFLAG_COPIED).to_be_bytes()).collect();
        if !copy.is_empty() {
            self.pwrite(&copy, l1_offset, "write snapshot L1 table")?;
        }
        // Everything the active tree reaches gains a reference, durably, before the flags say
        // "shared" and long before the table points at the copy.
        let active = self.l1.clone();
        self.add_tree_refcounts(&active, 1)?;
        self.write_refcounts()?;
        self.sync()?;
        self.update_copied_flags()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let next_id = entries.iter().filter_map(|e| std::str::from_utf8(&e.id).ok()?.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        let mut extra = vec![0u8; OUR_EXTRA];
        extra[8..16].copy_from_slice(&self.h.size.to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        let entry = SnapshotEntry {
            l1_offset,
            l1_size: self.l1.len() as u32,
            id: next_id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: now.as_secs().min(u64::from(u32::MAX)) as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.h.size),
            extra,
        };
        let info = entry.info();
        entries.push(entry);
        self.write_snapshot_table(&entries)?;
        Ok(info)
    }

    /// Reverts the disk to snapshot `name` (by name, else by id). The snapshot stays. A
    /// snapshot taken at another virtual size brings that size back too (as QEMU's revert does),
    /// unless persistent bitmaps forbid the resize.
    pub fn apply_snapshot(&mut self, name: &str) -> Result<()> {
        self.writable()?;
        let (entries, _) = self.read_snapshot_table()?;
        let s = entries[self.find_snapshot(&entries, name)?].clone();
        let old_size = self.h.size;
        let new_size = s.disk_size.filter(|&size| size != old_size);
        if let Some(size) = new_size {
            self.check_bitmaps_resizable(size)?;
        }
        crate::DiskImage::flush(self)?;
        if s.l1_size as usize > self.l1.len() {
            self.grow_l1(u64::from(s.l1_size))?;
        }
        let mut new_l1: Vec<u64> = self.read_snapshot_l1(&s)?.iter().map(|e| e & !OFLAG_COPIED).collect();
        new_l1.resize(self.l1.len(), 0);
        // Guest data changes wherever the L2 tables differ: the bitmaps must say so.
        let span = self.cs * self.l2_entries();
        let changed: Vec<usize> =
            (0..new_l1.len()).filter(|&i| self.l1[i] & L1E_OFFSET_MASK != new_l1[i] & L1E_OFFSET_MASK).collect();
        for i in changed {
            self.mark_dirty(i as u64 * span, span);
        }
        // 1. The snapshot's tree gains the reference the active L1 is about to make.
        self.add_tree_refcounts(&new_l1, 1)?;
        self.write_refcounts()?;
        self.sync()?;
        // 2. The active L1 becomes the snapshot's, in place, without COPIED flags (a torn write
        //    mixes two trees that both hold references: leaks only).
        let bytes: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&bytes, self.h.l1_table_offset, "write L1 table")?;
        self.sync()?;
        // 3. The old active tree loses its reference; clusters only it used are freed.
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        self.add_tree_refcounts(&old_l1, -1)?;
        self.write_refcounts()?;
        self.sync()?;
        // 4. The snapshot's size: its tree holds nothing beyond it, and what lies beyond the
        //    old size within it is the snapshot's data.
        if let Some(size) = new_size {
            self.write_size(size)?;
            self.resize_bitmaps(old_size);
        }
        self.update_copied_flags()
    }

    /// Makes a read-only image read as its internal snapshot `name` (its backing chain stays
    /// under it). With `ReadShared` access this reads a snapshot of an image another process
    /// writes: nothing a snapshot reaches is ever written in place (its clusters have more than
    /// one reference or are the snapshot's alone, and writes copy them), so the view stays
    /// whole for as long as the snapshot exists.
    pub fn view_snapshot(&mut self, name: &str) -> Result<()> {
        if !self.readonly {
            return Err(Error::invalid(&self.path, "only an image opened read-only can show a snapshot"));
        }
        let (entries, _) = self.read_snapshot_table()?;
        let s = entries[self.find_snapshot(&entries, name)?].clone();
        if let Some(size) = s.disk_size.filter(|&size| size != self.h.size) {
            return Err(Error::unsupported(
                &self.path,
                format!("snapshot {name:?} was taken at a virtual size of {size} bytes, the image has {} now", self.h.size),
            ));
        }
        let mut l1: Vec<u64> = self.read_snapshot_l1(&s)?.iter().map(|e| e & !OFLAG_COPIED).collect();
        l1.resize(self.l1.len().max(l1.len()), 0);
        // The L2 cache is keyed by file offset and holds clean tables only (read-only), so
        // what it has is right for the snapshot's tables too.
        self.l1 = l1;
        Ok(())
    }

    /// Deletes snapshot `name` (by name, else by id), freeing clusters only it used.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        self.writable()?;
        let (mut entries, _) = self.read_snapshot_table()?;
        let s = entries.remove(self.find_snapshot(&entries, name)?);
        crate::DiskImage::flush(self)?;
        let l1 = self.read_snapshot_l1(&s)?;
        // The table stops pointing at the snapshot first; then its references go.
        self.write_snapshot_table(&entries)?;
        self.add_tree_refcounts(&l1, -1)?;
        self.free_later(s.l1_offset, u64::from(s.l1_size) * 8);
        self.writeback()?;
        self.sync()?;
        self.update_copied_flags()
    }

    /// Adds `delta` (+1 or -1) to the refcount of every L2 table and data cluster that `l1`
    /// reaches (data once per L2 entry, as QEMU counts). Clusters that reach 0 are free.
    fn add_tree_refcounts(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        for &e in l1 {
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let table = self.l2_table(l2_off)?.data.clone();
            for raw in table.chunks_exact(8) {
                let entry = self.decode(u64::from_be_bytes(raw.try_into().unwrap_or([0; 8])))?;
                self.check_host(entry)?;
                match entry {
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. } => {
                        self.add_refcount(host, self.cs, delta)?
                    }
                    L2Entry::Compressed { host, len } => self.add_refcount(host, len, delta)?,
                    L2Entry::Zero { host: None, .. } | L2Entry::Unallocated => {}
                }
            }
            self.add_refcount(l2_off, self.cs, delta)?;
        }
        Ok(())
    }

    /// Sets the COPIED flag of every active L1 and L2 entry whose cluster has refcount 1 and
    /// clears it elsewhere, then writes the changed tables back (QEMU's `addend == 0` pass).
    /// Run after refcounts changed durably, so a flag never claims more than is true. Tables
    /// shared with a snapshot are written too, but only ever lose flags there: every data
    /// cluster they reach is counted once per L1 table that reaches them, so at least twice.
    fn update_copied_flags(&mut self) -> Result<()> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let exclusive = self.get_refcount(l2_off >> self.cb)? == 1;
            let want = if exclusive { l2_off | OFLAG_COPIED } else { l2_off };
            if want != e {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
            for j in 0..self.l2_entries() as usize {
                let raw = self.l2_get(l2_off, j)?;
                let host = match self.decode(raw)? {
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. } => host,
                    _ => continue,
                };
                let flag = if self.get_refcount(host >> self.cb)? == 1 { OFLAG_COPIED } else { 0 };
                if raw & OFLAG_COPIED != flag {
                    self.l2_set(l2_off, j, (raw & !OFLAG_COPIED) | flag)?;
                }
            }
        }
        crate::DiskImage::flush(self)
    }

    /// Writes `entries` as the new snapshot table in fresh clusters, switches the header to it
    /// in one write, and frees the old table.
    fn write_snapshot_table(&mut self, entries: &[SnapshotEntry]) -> Result<()> {
        let mut bytes = Vec::new();
        for e in entries {
            e.encode(&mut bytes);
        }
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::invalid(&self.path, "snapshot table would exceed 64 MiB"));
        }
        let offset = if bytes.is_empty() { 0 } else { self.alloc_contiguous((bytes.len() as u64).div_ceil(self.cs))? };
        self.meta.insert(&self.path, self.cb, offset, bytes.len() as u64, MetaKind::SnapshotTable)?;
        if !bytes.is_empty() {
            self.pwrite(&bytes, offset, "write snapshot table")?;
        }
        self.write_refcounts()?;
        self.sync()?;
        let mut fields = [0u8; 12];
        fields[0..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        fields[4..12].copy_from_slice(&offset.to_be_bytes());
        self.pwrite(&fields, OFF_SNAPSHOTS, "write header")?;
        self.sync()?;
        let old = (self.h.snapshots_offset, self.h.nb_snapshots);
        let (_, old_bytes) = self.read_snapshot_table()?;
        if old.1 > 0 {
            self.free_later(old.0, old_bytes);
        }
        self.h.nb_snapshots = entries.len() as u32;
        self.h.snapshots_offset = offset;
        Ok(())
    }
}
