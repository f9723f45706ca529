//! Persistent dirty bitmaps: we do not maintain them, but their directory, tables and data
//! clusters are allocated and must be counted by `check` and never overwritten.
use super::header::EXT_BITMAPS;
use super::{L1E_OFFSET_MASK, Qcow2};
use crate::error::{Error, Result};

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One allocated bitmap structure: file offset, length in bytes, and what it is.
pub(crate) type Region = (u64, u64, &'static str);

impl Qcow2 {
    /// Every region the bitmaps header extension references (none without the extension).
    pub(crate) fn bitmap_regions(&self) -> Result<Vec<Region>> {
        let Some(ext) = self.h.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
            return Ok(Vec::new());
        };
        let ext = &ext.data;
        if ext.len() < 24 {
            return Err(Error::corrupt(&self.path, "bitmaps header extension shorter than 24 bytes"));
        }
        let count = be32(ext, 0);
        let dir_size = be64(ext, 8);
        let dir_off = be64(ext, 16);
        let dir = self.read_struct(dir_off, dir_size, "bitmap directory")?;
        let mut regions = vec![(dir_off, dir_size, "bitmap directory")];
        let mut pos = 0usize;
        for _ in 0..count {
            if pos + 24 > dir.len() {
                return Err(Error::corrupt(&self.path, "bitmap directory entry runs past the directory"));
            }
            let table_off = be64(&dir, pos);
            let table_size = u64::from(be32(&dir, pos + 8));
            let name_len = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra = be32(&dir, pos + 20) as usize;
            let table = self.read_struct(table_off, table_size * 8, "bitmap table")?;
            regions.push((table_off, table_size * 8, "bitmap table"));
            for e in table.chunks_exact(8) {
                let off = u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & L1E_OFFSET_MASK;
                if off != 0 {
                    regions.push((off, self.cs, "bitmap data"));
                }
            }
            pos = (pos + 24 + extra + name_len).next_multiple_of(8);
        }
        Ok(regions)
    }
}
