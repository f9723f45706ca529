//! What Ferrovisor's tests (and `ferro-bench`) share, so that no test file carries its own copy:
//!
//! - this module: where the `ferro` and `ferrod` binaries of this build are, scratch directories
//!   that remove themselves, running a host tool, waiting for a condition or a child process;
//! - [`net`]: network namespaces the tests create and delete (never the host's own interfaces),
//!   and raw AF_PACKET sockets to see or inject frames on a tap;
//! - [`vm`]: `ferro run` with a built-in test guest, `ferro vmm` with its control socket, and the
//!   cached Linux test guest;
//! - [`daemon`]: a real `ferrod` in a private `FERRO_HOME`, its REST API (every answer checked
//!   against `crates/manager/openapi.json`) and the `ferro` CLI pointed at it;
//! - [`grammar`]: the sizes and MAC addresses every parser of them must accept or refuse;
//! - [`qemu`]: qemu-img and qemu-io, the peers of image tests.
//!
//! A missing prerequisite (a tool, a binary, the right to make a namespace) panics with what is
//! missing and how to get it: a test never passes without having run. docs/testing.md describes
//! how to use all this.

pub mod daemon;
pub mod grammar;
pub mod hugepages;
pub mod net;
pub mod qemu;
pub mod vm;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `ferro` binary of this build (cargo builds it for ferro-cli's own tests; other packages'
/// tests need `cargo build -p ferro-cli` first, which `cargo test --workspace` does).
pub fn ferro_bin() -> PathBuf {
    built_binary("ferro", "ferro-cli")
}

/// The `ferrod` binary of this build (see [`ferro_bin`]).
pub fn ferrod_bin() -> PathBuf {
    built_binary("ferrod", "ferro-manager")
}

/// `name` beside the running executable: cargo puts test executables in `target/<profile>/deps/`
/// and binaries in `target/<profile>/`; a binary such as ferro-bench runs from the latter.
fn built_binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let dir = exe.parent().expect("the executable's directory");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target/<profile>") } else { dir };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build -p {package}` first", path.display());
    path
}

/// A scratch directory under the system temporary directory, unique to this process and call,
/// removed with everything in it when dropped (also when the test fails).
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMPDIR/ferro-<tag>-<pid>-<n>`, empty.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferro-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a host tool and returns its stdout; panics with its stderr when it fails, and with a
/// pointer to scripts/setup.sh when it is not installed.
pub fn run_ok(program: impl AsRef<OsStr>, args: &[&str]) -> String {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (scripts/setup.sh installs the tools the tests need)", program.to_string_lossy()));
    assert!(out.status.success(), "{} {args:?} failed: {}", program.to_string_lossy(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `done` holds, checking every 10 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The child's exit status once it exits, or None if it is still running after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The cgroup of `pid` in the hierarchy holding `controller` (v1), or in the unified one ("").
pub fn cgroup_of(pid: u32, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_else(|e| panic!("/proc/{pid}/cgroup: {e}"));
    text.lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let hit = if controller.is_empty() { controllers.is_empty() } else { controllers.split(',').any(|c| c == controller) };
            hit.then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("process {pid} is in no {controller:?} cgroup: {text}"))
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()), Some("Z" | "X")),
        Err(_) => false,
    }
}
