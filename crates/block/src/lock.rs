//! Image locks that QEMU understands: every open of an image file takes open-file-description
//! (OFD) byte-range locks at the offsets QEMU's file driver uses, so ferro (VMM, ferrod,
//! `ferro img`) and QEMU (qemu-system, qemu-img, qemu-io) refuse to open an image the other
//! side uses in a conflicting way. The scheme is described in docs/image-locking.md.
//!
//! The locks live as long as the open file description: dropping the image (closing its file)
//! releases them, and so does the death of the process. They are advisory: a program that
//! takes no locks is not stopped.
use crate::error::{Error, Result};
use crate::{Format, ops};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Byte `PERM_BASE + bit` is locked by every user that holds permission `bit`.
const PERM_BASE: i64 = 100;
/// Byte `UNSHARED_BASE + bit` is locked by every user that does not let others hold `bit`.
const UNSHARED_BASE: i64 = 200;

/// QEMU's permission bits (the lock byte is a base plus the bit number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perm {
    ConsistentRead = 0,
    Write = 1,
    Resize = 3,
}

impl Perm {
    /// The name QEMU gives the permission in its messages.
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::Resize => "resize",
        }
    }
}

/// How an open uses its file, which decides the lock bytes it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes (and may grow the file); nobody else may write or resize it. This is
    /// what QEMU takes for a writable disk.
    Write,
    /// Reads; nobody else may write or resize it meanwhile. QEMU takes this for read-only
    /// opens and for backing files.
    Read,
    /// Reads while others may write (`-U`, `--force-share`): what it reads may be
    /// inconsistent, and it never blocks anyone.
    ReadShared,
}

impl Access {
    pub fn readonly(self) -> bool {
        self != Access::Write
    }

    /// Permissions this access holds.
    fn held(self) -> &'static [Perm] {
        match self {
            Access::Write => &[Perm::ConsistentRead, Perm::Write, Perm::Resize],
            Access::Read | Access::ReadShared => &[Perm::ConsistentRead],
        }
    }

    /// Permissions this access does not share with others.
    fn unshared(self) -> &'static [Perm] {
        match self {
            Access::Write | Access::Read => &[Perm::Write, Perm::Resize],
            Access::ReadShared => &[],
        }
    }

    /// The access for the backing files below an image opened with `self`: backing files are
    /// only read, and `-U` reaches down the chain.
    pub(crate) fn for_backing(self) -> Access {
        match self {
            Access::ReadShared => Access::ReadShared,
            Access::Write | Access::Read => Access::Read,
        }
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value of this plain C struct (l_pid must be 0 for
    // OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on one byte (shared locks never conflict with each other).
fn lock_byte(file: &File, path: &Path, byte: i64) -> Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock we pass; the fd is owned by `file`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(Error::io(path, "lock")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether another open file description (another process, or another open in this one)
/// holds a lock on `byte`.
fn locked_by_other(file: &File, path: &Path, byte: i64) -> Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass; the fd is owned by `file`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(Error::io(path, "test lock")(std::io::Error::last_os_error()));
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// How long a conflict must last before an open is refused. A child that another thread of
/// this process forks holds copies of our open files, and so their locks, until it execs: for
/// that moment a file we have just closed still looks held. Real conflicts last longer.
const SETTLE: Duration = Duration::from_millis(200);

/// Takes the locks of `access` on an open image file, or refuses if another user's locks
/// conflict. On refusal, closing `file` releases whatever was taken.
pub(crate) fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    for &p in access.held() {
        lock_byte(file, path, PERM_BASE + p as i64)?;
    }
    for &p in access.unshared() {
        lock_byte(file, path, UNSHARED_BASE + p as i64)?;
    }
    match settled(|| conflict(file, path, access), Option::is_some)? {
        Some(reason) => Err(Error::InUse { path: path.to_path_buf(), reason }),
        None => Ok(()),
    }
}

/// Probes until the answer is not `busy` or SETTLE has passed, and returns the last answer: a
/// use seen must last that long to count.
fn settled<T>(mut probe: impl FnMut() -> Result<T>, busy: impl Fn(&T) -> bool) -> Result<T> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let answer = probe()?;
        if !busy(&answer) || Instant::now() >= deadline {
            return Ok(answer);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What in other opens' locks conflicts with `access`, if anything.
fn conflict(file: &File, path: &Path, access: Access) -> Result<Option<String>> {
    for &p in access.held() {
        if locked_by_other(file, path, UNSHARED_BASE + p as i64)? {
            return Ok(Some(format!("another process does not share the \"{}\" permission", p.name())));
        }
    }
    for &p in access.unshared() {
        if locked_by_other(file, path, PERM_BASE + p as i64)? {
            return Ok(Some(format!("another process holds the \"{}\" permission", p.name())));
        }
    }
    Ok(None)
}

/// How others use a file, as their locks say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    Unused,
    /// Someone reads it (including `-U` readers).
    Read,
    /// Someone may write it.
    Write,
}

/// How other opens (other processes, or other opens in this process) use the file at `path`.
pub fn file_use(path: &Path) -> Result<Use> {
    let file = File::open(path).map_err(Error::io(path, "open"))?;
    let probe = || -> Result<Use> {
        Ok(if locked_by_other(&file, path, PERM_BASE + Perm::Write as i64)? {
            Use::Write
        } else if locked_by_other(&file, path, PERM_BASE + Perm::ConsistentRead as i64)? {
            Use::Read
        } else {
            Use::Unused
        })
    };
    // A forked child may briefly hold copies of files this process has just closed (see SETTLE).
    settled(probe, |used| *used != Use::Unused)
}

/// One file of an image's backing chain, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainFile {
    /// Canonical path (symbolic links and relative backing names resolved).
    pub path: PathBuf,
    pub format: Format,
    /// Device and inode: two paths name the same file when these are equal.
    pub dev: u64,
    pub ino: u64,
    /// How others use the file right now.
    pub used: Use,
}

/// The files of an image's backing chain, top first, each with how others use it. A domain
/// that would write `path` must find every entry `Unused` (the top) or not `Write` (the
/// backing files); one that only reads needs no `Write` anywhere.
pub fn chain_usage(path: &Path, format: Option<Format>) -> Result<Vec<ChainFile>> {
    let mut out = Vec::new();
    for info in ops::info(path, format, true, true)? {
        let canonical = info.path.canonicalize().map_err(Error::io(&info.path, "resolve"))?;
        let meta = std::fs::metadata(&canonical).map_err(Error::io(&canonical, "stat"))?;
        let used = file_use(&canonical)?;
        out.push(ChainFile { path: canonical, format: info.format, dev: meta.dev(), ino: meta.ino(), used });
    }
    Ok(out)
}
