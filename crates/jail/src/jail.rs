//! The jail of one VMM process: what it sees of the host's files, and who it runs as.
//!
//! ferrod describes a jail as a [`JailSpec`]: the host paths the VMM needs (its program and
//! libraries, its VM's kernel, disks and their backing files, its sockets directory, a few
//! devices), how it may use each, and the unprivileged user it runs as. The per-VM monitor turns
//! the spec into a [`Prepared`] jail before it forks the VMM, and the forked child calls
//! [`Prepared::enter`] just before exec: new mount, IPC and UTS namespaces, every path bind-mounted
//! at its own host path below the run's empty root directory, `pivot_root` into it, resource
//! limits, every capability dropped, the user's uid and gids, no_new_privs. The VMM's
//! configuration needs no rewriting: each file is where the configuration says it is.
//!
//! Files the VMM must open but the user could not (a disk only root may write) are handed to the
//! user by [`grant`] for the run, and given back by [`restore_owners`] when it ends.
//! docs/isolation.md ("The jail") argues each choice.

use serde::{Deserialize, Serialize};
use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How the VMM may use one host path in its jail; each is a bind mount with these flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Read only; nothing on it runs (read-only, nosuid, nodev, noexec).
    Read,
    /// Read and write; nothing on it runs (nosuid, nodev, noexec).
    Write,
    /// The VMM's program and its shared libraries (read-only, nosuid, nodev).
    Exec,
    /// A device node the VMM opens (/dev/kvm, /dev/net/tun): nosuid, noexec; writes go to the
    /// device, not to a file system.
    Device,
}

impl Access {
    fn mount_flags(self) -> libc::c_ulong {
        let base = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
        match self {
            Access::Read => base | libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Write => base | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Exec => base | libc::MS_RDONLY | libc::MS_NODEV,
            Access::Device => base | libc::MS_RDONLY | libc::MS_NOEXEC,
        }
    }
}

/// One host path in the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bind {
    pub path: PathBuf,
    pub access: Access,
}

/// Everything the monitor needs to jail a VMM (written by ferrod into the run directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailSpec {
    /// A directory of the run that becomes the VMM's `/` (made empty at each VMM start).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group of /dev/kvm when only that group may open it.
    pub groups: Vec<u32>,
    pub binds: Vec<Bind>,
    /// RLIMIT_NOFILE of the VMM.
    pub max_open_files: u64,
}

/// The unprivileged user VMMs run as (`ferro-vmm` unless ferrod's configuration names another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// The user `name` from the system's user database; root is refused (a jail as root keeps
    /// every file of the host writable through the binds and /proc).
    pub fn lookup(name: &str) -> Result<User, String> {
        let missing = || {
            format!(
                "the VMM user {name:?} does not exist: create it (scripts/setup.sh, or \
                 adduser --system --group --no-create-home {name}) or turn the jail off (jail = false)"
            )
        };
        let c_name = CString::new(name).map_err(|_| missing())?;
        let mut entry: libc::passwd = unsafe_zeroed_passwd();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to memory we own, valid for the call; `buf.len()` is its size.
        let rc = unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            return Err(missing());
        }
        if entry.pw_uid == 0 || entry.pw_gid == 0 {
            return Err(format!("the VMM user {name:?} is root or in group root: VMMs must run unprivileged"));
        }
        Ok(User { name: name.to_string(), uid: entry.pw_uid, gid: entry.pw_gid })
    }
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: `passwd` is a C struct of integers and pointers, for which all zeros is valid
    // (null pointers); getpwnam_r fills it in.
    unsafe { std::mem::zeroed() }
}

/// The files a dynamically linked `program` needs to run: itself, its ELF interpreter and the
/// shared libraries the interpreter loads for it (`<interpreter> --list`, what ldd does). A
/// static program needs only itself. `program` is listed as given (it is what is executed) and,
/// when that is a link, as the file it leads to.
pub fn program_files(program: &Path) -> Result<Vec<PathBuf>, String> {
    if !program.is_absolute() {
        return Err(format!("VMM program {}: not an absolute path", program.display()));
    }
    let given = program.to_path_buf();
    let program = program.canonicalize().map_err(|e| format!("VMM program {}: {e}", program.display()))?;
    let image = std::fs::read(&program).map_err(|e| format!("cannot read {}: {e}", program.display()))?;
    let mut files = vec![given];
    if program != files[0] {
        files.push(program.clone());
    }
    let Some(interpreter) = elf_interpreter(&image).map_err(|e| format!("{}: {e}", program.display()))? else {
        return Ok(files);
    };
    let listed = std::process::Command::new(&interpreter)
        .arg("--list")
        .arg(&program)
        .output()
        .map_err(|e| format!("cannot run {} --list {}: {e}", interpreter.display(), program.display()))?;
    if !listed.status.success() {
        return Err(format!("{} --list {} failed: {}", interpreter.display(), program.display(), String::from_utf8_lossy(&listed.stderr).trim()));
    }
    files.push(interpreter);
    // Lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
    // `linux-vdso.so.1 (0x...)` (in the kernel, no file).
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let path = line.split_once("=>").map_or(line, |(_, p)| p).split_whitespace().next().unwrap_or("");
        if path.starts_with('/') && !files.iter().any(|f| f == Path::new(path)) {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// The PT_INTERP path of a 64-bit little-endian ELF image, None for a static one.
fn elf_interpreter(image: &[u8]) -> Result<Option<PathBuf>, String> {
    const PT_INTERP: u32 = 3;
    if image.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF program".to_string());
    }
    let u16_at = |at: usize| image.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |at: usize| image.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let truncated = || "truncated ELF headers".to_string();
    let phoff = u64_at(0x20).ok_or_else(truncated)? as usize;
    let (phentsize, phnum) = (u16_at(0x36).ok_or_else(truncated)?, u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        let header = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(truncated)?).ok_or_else(truncated)?;
        let kind = image.get(header..header + 4).ok_or_else(truncated)?;
        if u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]) != PT_INTERP {
            continue;
        }
        let offset = u64_at(header + 8).ok_or_else(truncated)? as usize;
        let size = u64_at(header + 0x20).ok_or_else(truncated)? as usize;
        let name = image.get(offset..offset.saturating_add(size)).ok_or_else(truncated)?;
        let name = CStr::from_bytes_until_nul(name).map_err(|_| "PT_INTERP is not a C string".to_string())?;
        return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()))));
    }
    Ok(None)
}

/// The owner a file had before [`grant`] handed it to the VMM user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The host's system directories: no pool may be defined on or in one, and no file in one is
/// handed to the VMM user.
pub const SYSTEM_DIRECTORIES: [&str; 14] =
    ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run", "/sbin", "/sys", "/usr"];

/// The system directory `path` (absolute, resolved) is or lies in, `/` for the root itself.
pub fn system_directory(path: &Path) -> Option<&'static str> {
    if path == Path::new("/") {
        return Some("/");
    }
    SYSTEM_DIRECTORIES.into_iter().find(|dir| path.starts_with(dir))
}

/// Makes every bound file and directory usable by the jail's user: one it must write, or read,
/// and may not becomes the user's (the read-only bind keeps a file it reads read-only for the VMM
/// whoever owns it). Files in system directories and devices are never handed over: one the user
/// cannot use is an error naming it. Returns the previous owners, for [`restore_owners`].
pub fn grant(spec: &JailSpec) -> Result<Vec<Owner>, String> {
    let mut changed = Vec::new();
    for bind in &spec.binds {
        let meta = std::fs::metadata(&bind.path).map_err(|e| format!("jail: {}: {e}", bind.path.display()))?;
        let mode = meta.mode();
        let needs = match bind.access {
            Access::Write | Access::Device => 0o6,
            Access::Read if meta.is_dir() => 0o5,
            Access::Read => 0o4,
            Access::Exec => continue,
        };
        let allowed = if meta.uid() == spec.uid {
            (mode >> 6) & needs == needs
        } else if meta.gid() == spec.gid || spec.groups.contains(&meta.gid()) {
            (mode >> 3) & needs == needs
        } else {
            mode & needs == needs
        };
        if allowed {
            continue;
        }
        // Judged where the path leads: a link to a system file is a system file.
        let resolved = std::fs::canonicalize(&bind.path).map_err(|e| format!("jail: {}: {e}", bind.path.display()))?;
        if let Some(dir) = system_directory(&resolved).or((bind.access == Access::Device).then_some("/dev")) {
            let how = if needs & 0o2 != 0 { "read and write" } else { "read" };
            return Err(format!(
                "jail: the VMM user (uid {}) may not {how} {}, and files in {dir} are not handed over: give the user access, or run VMMs unjailed (jail = false)",
                spec.uid,
                bind.path.display()
            ));
        }
        std::os::unix::fs::chown(&bind.path, Some(spec.uid), Some(spec.gid))
            .map_err(|e| format!("jail: cannot hand {} to uid {}: {e}", bind.path.display(), spec.uid))?;
        if (mode >> 6) & needs != needs {
            let permissions = std::os::unix::fs::PermissionsExt::from_mode((mode | (needs << 6)) & 0o7777);
            std::fs::set_permissions(&bind.path, permissions).map_err(|e| format!("jail: cannot chmod {}: {e}", bind.path.display()))?;
        }
        changed.push(Owner { path: bind.path.clone(), uid: meta.uid(), gid: meta.gid(), mode: mode & 0o7777 });
    }
    Ok(changed)
}

/// Gives files back to the owners (and modes) [`grant`] took them from; returns one line per
/// failure.
pub fn restore_owners(owners: &[Owner]) -> Vec<String> {
    owners
        .iter()
        .filter_map(|o| {
            let permissions = std::os::unix::fs::PermissionsExt::from_mode(o.mode);
            std::os::unix::fs::chown(&o.path, Some(o.uid), Some(o.gid))
                .and_then(|()| std::fs::set_permissions(&o.path, permissions))
                .err()
                .map(|e| format!("jail: cannot give {} back to uid {}: {e}", o.path.display(), o.uid))
        })
        .collect()
}

/// One bind mount, ready for the forked child: source, target below the root, remount flags.
struct Mount {
    source: CString,
    target: CString,
    flags: libc::c_ulong,
}

/// A jail whose root directory is ready and whose every string is allocated, so that
/// [`Prepared::enter`] only makes system calls (it runs between fork and exec).
pub struct Prepared {
    root: CString,
    mounts: Vec<Mount>,
    /// `<root>/proc/self`: where the VMM's own /proc/PID directory is bound.
    proc_self: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    max_open_files: u64,
    last_cap: libc::c_ulong,
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("jail: path {} has a NUL byte", path.display()))
}

impl Prepared {
    /// Makes the root directory afresh with an empty mount point for every bind (a directory
    /// for a directory, an empty file for anything else) and /proc/self.
    pub fn new(spec: &JailSpec) -> Result<Prepared, String> {
        let fail = |what: &str, path: &Path, e: io::Error| format!("jail: cannot {what} {}: {e}", path.display());
        match std::fs::remove_dir_all(&spec.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail("empty", &spec.root, e)),
            _ => {}
        }
        let proc_self = spec.root.join("proc/self");
        std::fs::create_dir_all(&proc_self).map_err(|e| fail("create", &proc_self, e))?;
        // Parents before children: a bind below another one is mounted on top of it.
        let mut binds: Vec<&Bind> = spec.binds.iter().collect();
        binds.sort_by_key(|b| b.path.components().count());
        let mut mounts = Vec::new();
        for bind in binds {
            let relative = bind.path.strip_prefix("/").map_err(|_| format!("jail: {} is not an absolute path", bind.path.display()))?;
            let target = spec.root.join(relative);
            let is_dir = std::fs::metadata(&bind.path).map_err(|e| fail("stat", &bind.path, e))?.is_dir();
            if is_dir {
                std::fs::create_dir_all(&target).map_err(|e| fail("create", &target, e))?;
            } else {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| fail("create", parent, e))?;
                }
                std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&target).map_err(|e| fail("create", &target, e))?;
            }
            mounts.push(Mount { source: c_path(&bind.path)?, target: c_path(&target)?, flags: bind.access.mount_flags() });
        }
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("jail: cannot read /proc/sys/kernel/cap_last_cap")?;
        Ok(Prepared {
            root: c_path(&spec.root)?,
            mounts,
            proc_self: c_path(&proc_self)?,
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
            max_open_files: spec.max_open_files,
            last_cap,
        })
    }

    /// Enters the jail; called in the forked child just before exec. Only system calls (and
    /// writes of prepared bytes to stderr naming the step that failed), no allocation: the
    /// child of a multi-threaded parent may call nothing else.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: unshare only changes this (single-threaded, forked) process's namespaces.
        step(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) }, b"make new namespaces", None)?;
        // Nothing mounted from here on propagates back to the host's namespace.
        let slash = c"/";
        step(mount(None, slash, libc::MS_REC | libc::MS_PRIVATE), b"make mounts private", None)?;
        // pivot_root needs the new root to be a mount point.
        step(mount(Some(&self.root), &self.root, libc::MS_BIND), b"bind the root onto itself", Some(&self.root))?;
        for m in &self.mounts {
            step(mount(Some(&m.source), &m.target, libc::MS_BIND), b"bind", Some(&m.source))?;
            step(mount(None, &m.target, m.flags), b"restrict the bind of", Some(&m.source))?;
        }
        let mut proc_pid = [0u8; 32];
        // SAFETY: getpid has no arguments and cannot fail.
        let proc_pid = proc_dir(&mut proc_pid, unsafe { libc::getpid() });
        step(mount(Some(proc_pid), &self.proc_self, libc::MS_BIND), b"bind /proc/PID", None)?;
        let read_only = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        step(mount(None, &self.proc_self, read_only), b"restrict /proc/self", None)?;
        // SAFETY: a NUL-terminated path this struct owns.
        step(unsafe { libc::chdir(self.root.as_ptr()) }, b"enter the root", Some(&self.root))?;
        let dot = c".";
        // pivot_root(".", "."): the old root ends up on top of the new one, detached right after.
        // SAFETY: pivot_root and umount2 take static NUL-terminated paths.
        step(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int, b"pivot_root", None)?;
        // SAFETY: as above.
        step(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }, b"detach the host's root", None)?;
        // SAFETY: a static NUL-terminated path.
        step(unsafe { libc::chdir(slash.as_ptr()) }, b"chdir /", None)?;
        step(mount(None, slash, read_only), b"make / read-only", None)?;

        let files = libc::rlimit { rlim_cur: self.max_open_files, rlim_max: self.max_open_files };
        // SAFETY: setrlimit reads the struct on our stack.
        step(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) }, b"limit open files", None)?;
        // A core dump of a VMM would be a copy of its guest's memory.
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above.
        step(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) }, b"forbid core dumps", None)?;
        for cap in 0..=self.last_cap {
            // SAFETY: prctl with integer arguments only.
            step(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) }, b"drop capabilities from the bounding set", None)?;
        }
        // SAFETY: setgroups reads `groups.len()` gids from the vector this struct owns.
        step(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) }, b"set groups", None)?;
        // SAFETY: integer arguments only.
        step(unsafe { libc::setresgid(self.gid, self.gid, self.gid) }, b"set gid", None)?;
        // Leaving uid 0 clears the permitted, effective and ambient capabilities.
        // SAFETY: integer arguments only.
        step(unsafe { libc::setresuid(self.uid, self.uid, self.uid) }, b"set uid", None)?;
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData::default(); 2];
        // SAFETY: capset reads the header and the two data structs (version 3) on our stack.
        step(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as libc::c_int, b"clear capabilities", None)?;
        // SAFETY: prctl with integer arguments only.
        step(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, b"set no_new_privs", None)?;
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// mount(2) of a bind or a change of flags: no file system type, no data.
fn mount(source: Option<&CStr>, target: &CStr, flags: libc::c_ulong) -> libc::c_int {
    let source = source.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: the strings are NUL-terminated and outlive the call; type and data are null.
    unsafe { libc::mount(source, target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) }
}

/// `/proc/<pid>` in `buf`, NUL-terminated, without allocating.
fn proc_dir(buf: &mut [u8; 32], pid: libc::pid_t) -> &CStr {
    let prefix = b"/proc/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/proc/self")
}

/// A failed step's error, after one line on stderr naming it (and its path) for the monitor's
/// report: `ferro jail: cannot <what> [<path>]`.
fn step(rc: libc::c_int, what: &[u8], path: Option<&CStr>) -> io::Result<()> {
    if rc >= 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    let mut line: [&[u8]; 5] = [b"ferro jail: cannot ", what, b"", b"", b"\n"];
    if let Some(path) = path {
        line[2] = b" ";
        line[3] = path.to_bytes();
    }
    for part in line {
        // SAFETY: writes bytes we own to stderr; a failed write changes nothing.
        let _ = unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_files_are_the_binary_its_interpreter_and_libraries() {
        let files = program_files(Path::new("/bin/true")).unwrap();
        assert_eq!(files[0], Path::new("/bin/true"));
        assert!(files.contains(&Path::new("/bin/true").canonicalize().unwrap()), "{files:?}");
        assert!(program_files(Path::new("true")).is_err());
        assert!(files.iter().any(|f| f.to_string_lossy().contains("ld-linux")), "{files:?}");
        assert!(files.iter().any(|f| f.to_string_lossy().contains("libc.so")), "{files:?}");
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(b"\x7fELF\x02\x01\x01").is_err(), "truncated headers are refused, not read past");
    }

    #[test]
    fn system_directories_are_named_whatever_lies_below_them() {
        assert_eq!(system_directory(Path::new("/")), Some("/"));
        assert_eq!(system_directory(Path::new("/etc/ferrovisor/images")), Some("/etc"));
        assert_eq!(system_directory(Path::new("/dev")), Some("/dev"));
        assert_eq!(system_directory(Path::new("/srv/images")), None);
        assert_eq!(system_directory(Path::new("/etcetera")), None, "by component, not by prefix");
    }

    /// Run as root (ferrod's jail needs it): a disk only root may write becomes the VMM user's for
    /// the run and root's again after; a file others may read stays as it is; a file in a system
    /// directory is never handed over.
    #[test]
    fn grant_hands_files_over_for_a_run_and_gives_them_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = ferro_test_support::TempDir::new("jail-grant");
        let (disk, kernel) = (dir.join("disk.raw"), dir.join("kernel"));
        for (file, mode) in [(&disk, 0o600), (&kernel, 0o644)] {
            std::fs::write(file, b"x").unwrap();
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let spec = |binds: Vec<Bind>| JailSpec { root: dir.join("root"), uid: 54321, gid: 54322, groups: Vec::new(), binds, max_open_files: 64 };
        let owners = grant(&spec(vec![Bind { path: disk.clone(), access: Access::Write }, Bind { path: kernel.clone(), access: Access::Read }]))
            .unwrap_or_else(|e| panic!("{e} (this test runs as root)"));
        assert_eq!(owners, [Owner { path: disk.clone(), uid: 0, gid: 0, mode: 0o600 }]);
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!((meta(&disk).uid(), meta(&disk).gid(), meta(&disk).mode() & 0o777), (54321, 54322, 0o600));
        assert_eq!(meta(&kernel).uid(), 0, "a file others may read keeps its owner");
        assert!(restore_owners(&owners).is_empty());
        assert_eq!((meta(&disk).uid(), meta(&disk).gid()), (0, 0));

        let shadow = Path::new("/etc/shadow");
        let error = grant(&spec(vec![Bind { path: shadow.to_path_buf(), access: Access::Read }])).unwrap_err();
        assert!(error.contains("may not read /etc/shadow, and files in /etc are not handed over"), "{error}");
        assert_eq!(meta(shadow).uid(), 0);
        // A link to it, wherever it lies, is judged where it leads.
        let link = dir.join("innocent.raw");
        std::os::unix::fs::symlink(shadow, &link).unwrap();
        let error = grant(&spec(vec![Bind { path: link.clone(), access: Access::Write }])).unwrap_err();
        assert!(error.contains(&format!("may not read and write {}, and files in /etc are not handed over", link.display())), "{error}");
        assert_eq!((meta(shadow).uid(), meta(shadow).mode() & 0o777), (0, 0o640));
    }

    #[test]
    fn proc_dir_formats_a_pid_without_allocating() {
        let mut buf = [0u8; 32];
        assert_eq!(proc_dir(&mut buf, 4_194_304).to_bytes(), b"/proc/4194304");
        assert_eq!(proc_dir(&mut buf, 7).to_bytes(), b"/proc/7");
    }
}
