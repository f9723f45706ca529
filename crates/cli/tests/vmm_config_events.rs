//! `ferro vmm` as ferrod drives it: the VM from a JSON `VmConfig` file (`--config`), events as
//! JSON lines on an inherited fd (`--event-fd`), typed control replies with real per-disk
//! counters, and a broken virtio queue reported as a `device_needs_reset` event, never as a
//! stderr line a supervisor could take for a guest reset.

use ferro_vmm_api::control::{Done, InfoReply, StatsReply, decode_reply};
use ferro_vmm_api::{BootConfig, DeviceConfig, DeviceKind, DiskFormat, ExitReason, Kernel, MemoryConfig, Transport, VmConfig, VmEvent};
use ferro_test_support::vm::ferro_command;
use ferro_test_support::{TempDir, wait_exit, wait_for};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// A `ferro vmm` child with its events, stdout and stderr read on the side.
struct Vmm {
    child: Child,
    events: Receiver<VmEvent>,
    stdout: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    console: String,
}

/// Lines of `reader` into a channel, parsed by `parse`.
fn lines<R: Read + Send + 'static, T: Send + 'static>(reader: R, parse: fn(&str) -> T) -> Receiver<T> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(parse(&line)).is_err() {
                return;
            }
        }
    });
    rx
}

impl Vmm {
    /// Starts `ferro vmm ARGS --event-fd 3` with the write end of a pipe on fd 3.
    fn start(args: &[&str]) -> Vmm {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new fds into the array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let write_fd = write.as_raw_fd();
        let mut cmd = ferro_command();
        cmd.arg("vmm").args(args).args(["--event-fd", "3"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec and only
        // puts the pipe's write end on fd 3 (dup2 clears close-on-exec on the copy).
        unsafe {
            cmd.pre_exec(move || if libc::dup2(write_fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
        }
        let mut child = cmd.spawn().expect("run ferro vmm");
        drop(write);
        let events = lines(read, |l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")));
        let stdout = lines(child.stdout.take().unwrap(), str::to_owned);
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Vmm { child, events, stdout, stderr: Some(stderr), console: String::new() }
    }

    fn event(&self) -> VmEvent {
        self.events.recv_timeout(Duration::from_secs(20)).expect("no event from the VMM within 20 s")
    }

    fn wait_console(&mut self, needle: &str) {
        let start = Instant::now();
        while !self.console.contains(needle) {
            let left = Duration::from_secs(30).saturating_sub(start.elapsed());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.console.push_str(&line);
                    self.console.push('\n');
                }
                Err(_) => panic!("never saw {needle:?} on the console:\n{}", self.console),
            }
        }
    }

    /// Waits for the process to end; its exit code and everything it wrote on stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = wait_exit(&mut self.child, Duration::from_secs(30)).expect("the VMM did not exit");
        (status.code(), self.stderr.take().map(|t| t.join().unwrap()).unwrap_or_default())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(api: &mut BufReader<UnixStream>, line: &str) -> String {
    api.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    api.read_line(&mut reply).unwrap();
    reply
}

fn virtio_guest_config(name: &str, cmdline: &str, disk: &Path) -> VmConfig {
    VmConfig {
        name: name.into(),
        boot: BootConfig { kernel: Kernel::TestGuest("virtio".into()), initrd: None, cmdline: cmdline.into() },
        memory: MemoryConfig::new(64 << 20),
        vcpus: 1,
        devices: DeviceConfig::with_default_ids(vec![DeviceKind::Block { path: disk.into(), format: Some(DiskFormat::Raw), readonly: false }]),
        transport: Transport::Mmio,
        debug_exit: false,
        pinning: Default::default(),
    }
}

#[test]
fn config_file_events_and_disk_counters() {
    let dir = TempDir::new("vmm-ev-config");
    let disk = dir.join("disk.raw");
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let config = virtio_guest_config("cfg1", "blk.seed=5 blk.sector=1 virtio.hold=1", &disk);
    let config_file = dir.join("vm.json");
    std::fs::write(&config_file, serde_json::to_vec(&config).unwrap()).unwrap();
    let api_path = dir.join("api.sock");
    let mut vmm = Vmm::start(&["--config", config_file.to_str().unwrap(), "--api-socket", api_path.to_str().unwrap()]);

    assert_eq!(vmm.event(), VmEvent::Started { pid: vmm.child.id() });
    wait_for("the control socket", Duration::from_secs(10), || api_path.exists());
    vmm.wait_console("virtio: all devices passed");
    let mut api = BufReader::new(UnixStream::connect(&api_path).unwrap());
    let info: InfoReply = decode_reply(&request(&mut api, r#"{"op":"info"}"#)).unwrap();
    assert_eq!((info.name.as_str(), info.memory_bytes, info.vcpus), ("cfg1", 64 << 20, 1));

    let stats: StatsReply = decode_reply(&request(&mut api, r#"{"op":"stats"}"#)).unwrap();
    assert!(stats.nics.is_empty() && stats.balloon.is_none(), "{stats:?}");
    let [vda] = stats.disks.as_slice() else { panic!("one disk expected: {stats:?}") };
    assert_eq!(vda.id, "vda");
    // The guest (guests/kit/virtio_blk.c) writes 9 sectors, reads them back and one more after
    // write-zeroes, flushes once; a read past the end, one straddling it, an unknown request
    // type and a discard with the unmap flag get error statuses.
    assert_eq!((vda.write_ops, vda.write_bytes), (1, 9 * 512), "{vda:?}");
    assert!(vda.read_ops >= 2 && vda.read_bytes >= 10 * 512, "{vda:?}");
    assert_eq!((vda.flush_ops, vda.errors), (1, 4), "{vda:?}");

    let bad: Result<Done, String> = decode_reply(&request(&mut api, r#"{"op":"balloon","target_mib":1}"#));
    assert!(bad.unwrap_err().contains("no balloon"));
    let _: Done = decode_reply(&request(&mut api, r#"{"op":"quit"}"#)).unwrap();
    assert_eq!(vmm.event(), VmEvent::Exited { reason: ExitReason::Quit });
    let (code, _) = vmm.finish();
    assert_eq!(code, Some(0));
}

#[test]
fn a_config_file_that_is_not_a_vm_is_refused_with_an_exited_event() {
    let dir = TempDir::new("vmm-ev-badconfig");
    let config_file = dir.join("vm.json");
    std::fs::write(&config_file, r#"{"name":"x","vcpu":1}"#).unwrap();
    let vmm = Vmm::start(&["--config", config_file.to_str().unwrap()]);
    let VmEvent::Exited { reason: ExitReason::Error(why) } = vmm.event() else { panic!("expected an exited event with an error") };
    assert!(why.contains("vm.json") && why.contains("vcpu"), "{why}");
    let (code, err) = vmm.finish();
    assert_eq!(code, Some(2));
    assert!(err.contains("vm.json"), "{err}");
}

/// The hostile guest breaks virtio-blk's rings on purpose (see virtio_hostile.rs): the VMM
/// reports each as an event naming the device, and the guest recovers and powers off.
#[test]
fn a_broken_queue_is_an_event_not_a_reset_line() {
    let dir = TempDir::new("vmm-ev-hostile");
    let disk = dir.join("disk.raw");
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let disk_flag = format!("path={}", disk.display());
    let args = ["--guest", "virtio_hostile", "--memory", "64M", "--transport", "mmio", "--disk", &disk_flag, "--rng"];
    let cmdline = ["--cmdline", "hostile.head=1 hostile.avail=1"];
    let vmm = Vmm::start(&[&args[..], &cmdline[..]].concat());
    assert!(matches!(vmm.event(), VmEvent::Started { .. }));
    let mut resets = Vec::new();
    let reason = loop {
        match vmm.event() {
            VmEvent::DeviceNeedsReset { device, reason } => resets.push(format!("{device}: {reason}")),
            VmEvent::Exited { reason } => break reason,
            other => panic!("unexpected event {other:?}"),
        }
    };
    assert_eq!(reason, ExitReason::PowerOff, "{resets:?}");
    assert_eq!(resets.len(), 2, "{resets:?}");
    assert!(resets.iter().any(|r| r.starts_with("vda: virtio-blk: descriptor head 200")), "{resets:?}");
    assert!(resets.iter().any(|r| r.starts_with("vda: virtio-blk: available ring")), "{resets:?}");
    let (code, err) = vmm.finish();
    assert_eq!(code, Some(0));
    assert!(!err.contains("virtio-blk"), "with an event fd the supervisor hears it as an event: {err}");

    // Without an event fd it is a log line, and no line ends the way a reset line does.
    let o = ferro_command().arg("run").args(args).args(cmdline).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vda: virtio-blk: descriptor head 200"), "{err}");
    for line in err.lines() {
        assert!(!line.trim_end().ends_with("reset"), "a supervisor would take this for a guest reset: {line:?}");
    }
}
