//! Reading a file a VMM wrote, as ferrod (root) reads it: the VMM may write the directory, so
//! it could have put a symbolic link, a FIFO or a device under the name. The name is opened
//! without following a link and without blocking, and only a regular file no larger than the
//! caller's bound is read (a link to /dev/zero would never end, a FIFO would never answer).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a file a VMM wrote was not read; each caller names the file its own way.
#[derive(Debug)]
pub enum Unreadable {
    /// Opening failed; `ELOOP` means the name is a symbolic link.
    Open(std::io::Error),
    NotRegular,
    /// Its size, over the bound.
    TooLarge(u64),
    Read(std::io::Error),
}

impl Unreadable {
    /// Whether the name was a symbolic link (which is never followed).
    pub fn is_link(&self) -> bool {
        matches!(self, Unreadable::Open(e) if e.raw_os_error() == Some(libc::ELOOP))
    }
}

/// The whole of regular file `path`, at most `most` bytes long.
pub fn read(path: &Path, most: u64) -> Result<Vec<u8>, Unreadable> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(Unreadable::Open)?;
    let meta = file.metadata().map_err(Unreadable::Read)?;
    if !meta.is_file() {
        return Err(Unreadable::NotRegular);
    }
    if meta.len() > most {
        return Err(Unreadable::TooLarge(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(most + 1).read_to_end(&mut bytes).map_err(Unreadable::Read)?;
    Ok(bytes)
}
