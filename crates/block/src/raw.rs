//! Raw images: the file is the disk. Sparse-aware: holes are reported as zero extents, discard
//! punches holes, and write_zeroes uses fallocate instead of writing zero buffers.
use crate::error::{Error, Result};
use crate::{Access, DiskImage, Extent, Format, ImageInfo, Status, check_range, read_padded};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An open raw image.
pub struct RawImage {
    path: PathBuf,
    file: File,
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
        let size = file.metadata().map_err(Error::io(path, "stat"))?.len();
        Ok(RawImage { path: path.to_path_buf(), file, size, readonly: access.readonly() })
    }

    fn writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::invalid(&self.path, "image is open read-only"));
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    fn seek(&self, off: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
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
        read_padded(&self.file, &self.path, buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, off).map_err(Error::io(&self.path, "write"))
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
        if len == 0 {
            return Ok(());
        }
        // Discard is advisory: a file system without hole punching just keeps the data.
        let _ = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len);
        Ok(())
    }

    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len).is_ok()
            || self.fallocate(libc::FALLOC_FL_ZERO_RANGE, off, len).is_ok()
        {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.file.write_all_at(&zeroes[..n as usize], off + done).map_err(Error::io(&self.path, "write"))?;
            done += n;
        }
        Ok(())
    }

    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, off, len, self.size)?;
        let end = off + len;
        // SEEK_DATA from off: if data starts later, [off, data) is a hole.
        let data = self.seek(off, libc::SEEK_DATA);
        let Some(data) = data else {
            // No data at or after off (ENXIO), or the file system cannot tell: treat as data.
            let hole_to_end = self.seek(off, libc::SEEK_HOLE).is_some();
            let status = if hole_to_end { Status::Zero } else { Status::Data { offset: Some(off) } };
            return Ok(Extent { status, len });
        };
        if data > off {
            return Ok(Extent { status: Status::Zero, len: data.min(end) - off });
        }
        let hole = self.seek(off, libc::SEEK_HOLE).unwrap_or(end);
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
