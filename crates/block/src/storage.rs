//! The file under an image. Raw and qcow2 do all their I/O through [`Storage`], so that a test
//! can put something else in place of the file: the power-loss tests use a recorder that logs
//! every write and sync and can rebuild the file as a crash at any moment would leave it.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The operations an image does on its file. Errors are plain I/O errors; the image adds the
/// path and what it was doing.
pub trait Storage: Send {
    /// Fills `buf` from `off`; what lies past the end of the file reads as zeroes.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`, extending the file if needed.
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// The file's length.
    fn file_len(&self) -> io::Result<u64>;
    /// Truncates or extends the file (an extension reads as zeroes).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes `[off, off+len)` read as zeroes without writing zero buffers where the file system
    /// can (a hole, or zeroed extents). Fails if it cannot; the caller then writes zeroes.
    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()>;
    /// Releases `[off, off+len)`; its contents become zeroes where the file system can punch
    /// holes and stay as they were otherwise.
    fn discard(&mut self, off: u64, len: u64);
    /// The first offset at or after `off` that holds data, and the first hole at or after
    /// `off`, where the file system can tell (`None` otherwise).
    fn data_and_hole(&self, off: u64) -> (Option<u64>, Option<u64>);
}

/// A real file (the lock taken at open lives as long as it does).
pub struct FileStorage(pub File);

impl FileStorage {
    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.0.
        let r = unsafe { libc::fallocate(self.0.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
        if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    fn seek(&self, off: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek only reads its integer arguments; the fd is owned by self.0.
        let r = unsafe { libc::lseek(self.0.as_raw_fd(), off as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.0.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
            .or_else(|_| self.fallocate(libc::FALLOC_FL_ZERO_RANGE, off, len))
    }

    fn discard(&mut self, off: u64, len: u64) {
        // Discard is advisory: a file system without hole punching just keeps the data.
        let _ = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len);
    }

    fn data_and_hole(&self, off: u64) -> (Option<u64>, Option<u64>) {
        (self.seek(off, libc::SEEK_DATA), self.seek(off, libc::SEEK_HOLE))
    }
}
