//! An image file held in memory, so a fuzz input can be an image without touching the disk.

use ferro_block::storage::Storage;
use std::io;

/// The image file: grows when written past its end; at most [`MemoryFile::LIMIT`] bytes, so a
/// header that asks for terabytes fails instead of eating the host's memory.
pub struct MemoryFile(Vec<u8>);

impl MemoryFile {
    const LIMIT: u64 = 64 << 20;

    pub fn new(data: &[u8]) -> MemoryFile {
        MemoryFile(data.to_vec())
    }

    fn grow_to(&mut self, len: u64) -> io::Result<()> {
        if len > Self::LIMIT {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "the fuzzed image may not grow past 64 MiB"));
        }
        if len as usize > self.0.len() {
            self.0.resize(len as usize, 0);
        }
        Ok(())
    }
}

impl Storage for MemoryFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        buf.fill(0);
        let start = (off.min(self.0.len() as u64)) as usize;
        let end = (off.saturating_add(buf.len() as u64)).min(self.0.len() as u64) as usize;
        buf[..end - start].copy_from_slice(&self.0[start..end]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(|| io::Error::other("write past 2^64"))?;
        self.grow_to(end)?;
        self.0[off as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.grow_to(len)?;
        self.0.truncate(len as usize);
        Ok(())
    }

    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        let end = off.checked_add(len).ok_or_else(|| io::Error::other("range past 2^64"))?;
        self.grow_to(end)?;
        self.0[off as usize..end as usize].fill(0);
        Ok(())
    }

    fn discard(&mut self, off: u64, len: u64) {
        let _ = self.zero_range(off, len);
    }

    fn data_and_hole(&self, _off: u64) -> (Option<u64>, Option<u64>) {
        (None, None)
    }
}
