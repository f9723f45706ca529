//! The qcow2 internal snapshot table: parsing with bounds checks.
use super::Qcow2;
use super::header::MAX_L1_BYTES;
use crate::error::{Error, Result};

/// qemu's limits: at most 65536 snapshots, a table of at most 64 MiB, 1 KiB of extra data.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u64 = 1024;
/// Fixed part of a table entry.
const ENTRY_FIXED: u64 = 40;

/// One snapshot as recorded in the table.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotEntry {
    pub l1_offset: u64,
    pub l1_size: u32,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
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
            let extra = u64::from(be32(&fixed, 36));
            if extra > MAX_EXTRA {
                return Err(Error::corrupt(&self.path, format!("snapshot {i}: {extra} bytes of extra data (limit {MAX_EXTRA})")));
            }
            if u64::from(l1_size) * 8 > MAX_L1_BYTES || l1_offset % self.cs != 0 || (l1_size > 0 && l1_offset == 0) {
                return Err(Error::corrupt(
                    &self.path,
                    format!("snapshot {i}: L1 table at {l1_offset:#x} of {l1_size} entries is invalid"),
                ));
            }
            off = (off + ENTRY_FIXED + extra + id_len + name_len).next_multiple_of(8);
            if off - start > MAX_TABLE_BYTES {
                return Err(Error::corrupt(&self.path, "snapshot table larger than 64 MiB"));
            }
            entries.push(SnapshotEntry { l1_offset, l1_size });
        }
        self.read_struct(start, off - start, "snapshot table")?;
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
}
