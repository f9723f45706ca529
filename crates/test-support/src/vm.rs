//! Running VMs under test: `ferro run` with a built-in test guest (guests/), `ferro vmm` with its
//! control socket, and where the cached Linux test guest (guests/linux) is.

use crate::TempDir;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// `ferro` with stdin closed, ready for arguments.
pub fn ferro_command() -> Command {
    let mut c = Command::new(crate::ferro_bin());
    c.stdin(Stdio::null());
    c
}

/// Runs `ferro ARGS` to the end.
pub fn ferro(args: &[&str]) -> Output {
    ferro_command().args(args).output().expect("run ferro")
}

/// Stdout and stderr of a finished run, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the `virtio` test guest (64 MiB) with `extra` flags; asserts that it passed every device
/// check and exited 0 without a panic in the VMM, and returns its console output.
pub fn run_virtio_guest(extra: &[&str]) -> String {
    let mut args = vec!["run", "--guest", "virtio", "--memory", "64M"];
    args.extend_from_slice(extra);
    let o = ferro(&args);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{extra:?}: {out}{err}");
    assert!(out.contains("virtio: all devices passed"), "{out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

/// A `ferro vmm` process with its control socket, in a scratch directory of its own; killed
/// (and the directory removed) when dropped.
pub struct Vmm {
    pub child: Child,
    dir: TempDir,
    api: BufReader<UnixStream>,
}

impl Vmm {
    /// Starts `ferro vmm --api-socket DIR/api.sock ARGS` with stdout piped (see [`Vmm::stdout`])
    /// and waits for the control socket. `args` may name other files in `dir`.
    pub fn start(dir: TempDir, args: &[&str]) -> Vmm {
        Vmm::start_with(dir, args, |_| {})
    }

    /// Like [`Vmm::start`], after `configure` has adjusted the command (stdout, stderr).
    pub fn start_with(dir: TempDir, args: &[&str], configure: impl FnOnce(&mut Command)) -> Vmm {
        let api_path = dir.join("api.sock");
        let mut cmd = ferro_command();
        cmd.arg("vmm").arg("--api-socket").arg(&api_path).args(args).stdout(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ferro vmm");
        let mut api = None;
        crate::wait_for(&format!("{} to accept connections", api_path.display()), Duration::from_secs(10), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ferro vmm exited with {status} before opening its control socket");
            }
            api = UnixStream::connect(&api_path).ok();
            api.is_some()
        });
        Vmm { child, dir, api: BufReader::new(api.expect("connected")) }
    }

    /// A path in the VMM's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn api_path(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The VMM's stdout (the serial console unless `--serial-socket` moved it); once.
    pub fn stdout(&mut self) -> BufReader<ChildStdout> {
        BufReader::new(self.child.stdout.take().expect("stdout is piped and taken once"))
    }

    /// Sends one request line on the control socket and parses the one-line JSON reply.
    pub fn request(&mut self, line: &str) -> Value {
        self.api.get_mut().write_all(format!("{line}\n").as_bytes()).expect("write to the control socket");
        let mut reply = String::new();
        self.api.read_line(&mut reply).expect("read from the control socket");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    /// The exit status once the VMM exits; panics if it runs on past `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        crate::wait_exit(&mut self.child, limit).unwrap_or_else(|| panic!("ferro vmm still runs after {limit:?}"))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory of guests/ in this repository.
fn guests_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../guests"))
}

/// The cached build of the Linux test guest: $FERRO_LINUX_DIR, or the directory
/// guests/linux/build.sh prints (instant when the recipe has not changed; a full kernel build
/// otherwise).
pub fn linux_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERRO_LINUX_DIR") {
        return PathBuf::from(d);
    }
    let out = Command::new("bash")
        .arg(guests_dir().join("linux/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run guests/linux/build.sh");
    assert!(out.status.success(), "guests/linux/build.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("a UTF-8 path").lines().last().expect("build.sh printed no directory"))
}

/// guests/linux/cmdline.txt: the switches the guest kernel needs on kvm-pvm.
pub fn linux_cmdline() -> String {
    std::fs::read_to_string(guests_dir().join("linux/cmdline.txt")).expect("guests/linux/cmdline.txt").trim().to_owned()
}

/// `ferro run` booting the Linux test guest's `kernel` (vmlinux or bzImage) with its initramfs,
/// whose init runs `guest_cmd` (the `ferro.cmd=` argument, '+' for spaces) and reports on the
/// console (FERRO-GUEST-UP, FERRO-CMD-RC, FERRO-POWEROFF). It runs under coreutils' `timeout`
/// so that a hung boot fails its test, not the whole run (SIGTERM stops ferro cleanly); `prefix`
/// goes between the two (such as `ip netns exec NS`). Callers add --memory and devices.
pub fn linux_run(limit_secs: u32, prefix: &[&str], kernel: &str, guest_cmd: &str) -> Command {
    let dir = linux_dir();
    let mut c = Command::new("timeout");
    c.arg(limit_secs.to_string()).args(prefix).arg(crate::ferro_bin()).args(["run", "--kernel"]).arg(dir.join(kernel));
    c.arg("--initrd").arg(dir.join("initramfs.cpio"));
    c.arg("--cmdline").arg(format!("{} ferro.cmd={guest_cmd}", linux_cmdline()));
    c.stdin(Stdio::null());
    c
}

/// A guest's serial console socket, read line by line (the counter guest's protocol).
pub struct Console {
    pub stream: UnixStream,
    seen: String,
}

impl Console {
    /// Waits (20 s at most) for the socket at `path` and connects to it.
    pub fn connect(path: &Path) -> Console {
        crate::wait_for("the serial socket", Duration::from_secs(20), || path.exists());
        Console::on(UnixStream::connect(path).unwrap())
    }

    /// A console already connected (through ferrod, say).
    pub fn on(stream: UnixStream) -> Console {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Console { stream, seen: String::new() }
    }

    pub fn type_keys(&mut self, keys: &str) {
        self.stream.write_all(keys.as_bytes()).unwrap();
    }

    /// Waits for the whole line that starts with `prefix` and returns it (output before it is
    /// dropped).
    pub fn line(&mut self, prefix: &str) -> String {
        read_until_within(&mut self.stream, &mut self.seen, prefix, Duration::from_secs(20));
        let at = self.seen.find(prefix).expect("read_until saw it");
        let mut line = self.seen.split_off(at);
        read_until_within(&mut self.stream, &mut line, "\n", Duration::from_secs(10));
        self.seen = line.split_off(line.find('\n').expect("read_until saw it") + 1);
        line.trim_end().to_owned()
    }
}

/// The value after `key=` in a line such as the counter guest's `counter: 3 seed=.. errors=0`.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key}= in {line:?}")) + key.len() + 1;
    line[at..].split_whitespace().next().unwrap()
}

/// Reads from a console (a pty, a socket, a pipe) until `seen` contains `what`; panics with what
/// it saw on end of stream, on an error, or when a read returns after 10 s without it.
pub fn read_until(r: &mut dyn Read, seen: &mut String, what: &str) {
    read_until_within(r, seen, what, Duration::from_secs(10));
}

/// [`read_until`] with another time limit (a Linux boot takes minutes on kvm-pvm).
pub fn read_until_within(r: &mut dyn Read, seen: &mut String, what: &str, limit: Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while !seen.contains(what) {
        assert!(start.elapsed() < limit, "never saw {what:?} within {limit:?}: {seen:?}");
        match r.read(&mut buf) {
            Ok(0) => panic!("end of stream before {what:?}: {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading for {what:?}: {e}; saw {seen:?}"),
        }
    }
}
