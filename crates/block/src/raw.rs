//! Raw images: the file is the disk. Sparse-aware: holes are reported as zero extents, discard
//! punches holes, and write_zeroes uses fallocate instead of writing zero buffers.
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};
use crate::{Access, DiskImage, Extent, Format, ImageInfo, Status, check_range};
use std::path::{Path, PathBuf};

/// An open raw image.
pub struct RawImage {
    path: PathBuf,
    file: Box<dyn Storage>,
    size: u64,
    readonly: bool,
}

/// Creates (or truncates) a sparse raw image of `size` bytes.
pub fn create(path: &Path, size: u64) -> Result<()> {
    let f = crate::create_locked(path)?;
    f.set_len(size).map_err(Error::io(path, "set size"))
}

impl RawImage {
    /// Opens a raw image and takes its locks.
    pub fn open(path: &Path, access: Access) -> Result<RawImage> {
        let file = crate::open_locked(path, access)?;
        RawImage::open_on(Box::new(FileStorage(file)), path, access.readonly())
    }

    /// A raw image over any storage; `path` names it in errors.
    pub fn open_on(file: Box<dyn Storage>, path: &Path, readonly: bool) -> Result<RawImage> {
        let size = file.file_len().map_err(Error::io(path, "stat"))?;
        Ok(RawImage { path: path.to_path_buf(), file, size, readonly })
    }

    fn writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::invalid(&self.path, "image is open read-only"));
        }
        Ok(())
    }
}

impl DiskImage for RawImage {
    fn info(&self) -> ImageInfo {
        ImageInfo::plain(Format::Raw, &self.path, self.size, None)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(&self.path, off, buf.len() as u64, self.size)?;
        // If the file shrank under us, the rest reads as zeroes.
        self.file.read_at(buf, off).map_err(Error::io(&self.path, "read"))
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, buf.len() as u64, self.size)?;
        self.file.write_at(buf, off).map_err(Error::io(&self.path, "write"))
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data().map_err(Error::io(&self.path, "fdatasync"))
    }

    fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, len, self.size)?;
        if len > 0 {
            self.file.discard(off, len);
        }
        Ok(())
    }

    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, len, self.size)?;
        if len == 0 || self.file.zero_range(off, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.file.write_at(&zeroes[..n as usize], off + done).map_err(Error::io(&self.path, "write"))?;
            done += n;
        }
        Ok(())
    }

    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, off, len, self.size)?;
        let end = off + len;
        // Where data starts at or after off: if later, [off, data) is a hole.
        let (data, hole) = self.file.data_and_hole(off);
        let Some(data) = data else {
            // No data at or after off (ENXIO), or the file system cannot tell: treat as data.
            let status = if hole.is_some() { Status::Zero } else { Status::Data { offset: Some(off) } };
            return Ok(Extent { status, len });
        };
        if data > off {
            return Ok(Extent { status: Status::Zero, len: data.min(end) - off });
        }
        let hole = hole.unwrap_or(end);
        Ok(Extent { status: Status::Data { offset: Some(off) }, len: hole.clamp(off + 1, end) - off })
    }

    fn backing_mut(&mut self) -> Option<&mut dyn DiskImage> {
        None
    }

    fn resize(&mut self, size: u64) -> Result<()> {
        self.writable()?;
        self.file.set_len(size).map_err(Error::io(&self.path, "resize"))?;
        self.size = size;
        Ok(())
    }
}
