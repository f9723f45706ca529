//! A VMM holds QEMU-compatible locks on its disks while it runs (the idle guest keeps it
//! running): qemu-img and `ferro img` refuse the disk unless `-U`, a second VMM is refused,
//! and a disk QEMU holds cannot be given to a VMM.

use ferro_block::lock::{Use, file_use};
use ferro_test_support::vm::{Vmm, ferro, stderr, stdout};
use ferro_test_support::{TempDir, run_ok, wait_for};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A child process killed when the test ends, whatever happens.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    stdout(o) + &stderr(o)
}

fn qemu(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/setup.sh installs qemu-utils)"))
}

/// `ferro vmm` with the idle guest on `disk`, in its own directory, run to its end.
fn second_vmm(dir: &TempDir, disk: &Path) -> Output {
    let api = dir.join("second.sock");
    let disk_arg = format!("path={},format=qcow2", disk.display());
    ferro(&["vmm", "--guest", "idle", "--memory", "64M", "--api-socket", p(&api), "--disk", &disk_arg])
}

#[test]
fn a_running_vmm_locks_its_disk_against_qemu_and_ferro() {
    let files = TempDir::new("disk-locks");
    let disk = files.join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&disk), "8M"]);

    let disk_arg = format!("path={},format=qcow2", disk.display());
    let mut vmm = Vmm::start(TempDir::new("disk-locks-vmm"), &["--guest", "idle", "--memory", "64M", "--disk", &disk_arg]);
    let out = qemu("qemu-img", &["info", p(&disk)]);
    assert!(!out.status.success() && text(&out).contains("lock"), "qemu-img info: {}", text(&out));
    let out = qemu("qemu-io", &["-c", "write 0 512", p(&disk)]);
    assert!(!out.status.success() && text(&out).contains("lock"), "qemu-io write: {}", text(&out));
    run_ok("qemu-img", &["info", "-U", p(&disk)]);
    let out = ferro(&["img", "info", p(&disk)]);
    assert!(!out.status.success() && text(&out).contains("image is in use"), "ferro img info: {}", text(&out));
    let out = ferro(&["img", "info", "-U", p(&disk)]);
    assert!(out.status.success(), "ferro img info -U: {}", text(&out));
    let out = second_vmm(&files, &disk);
    assert!(!out.status.success() && text(&out).contains("image is in use"), "second VMM: {}", text(&out));

    let reply = vmm.request(r#"{"op": "quit"}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    let status = vmm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "ferro vmm exit: {status}");
    run_ok("qemu-img", &["check", p(&disk)]);

    // Now QEMU holds the disk: the VMM refuses to start on it.
    let mut holder = Reaped(
        Command::new("qemu-io")
            .args(["-f", "qcow2", p(&disk)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-io (scripts/setup.sh installs qemu-utils)"),
    );
    wait_for("qemu-io to lock the disk", Duration::from_secs(20), || file_use(&disk).expect("probe") != Use::Unused);
    let out = second_vmm(&files, &disk);
    assert!(!out.status.success() && text(&out).contains("image is in use"), "VMM on a disk qemu holds: {}", text(&out));
    if let Some(mut stdin) = holder.0.stdin.take() {
        stdin.write_all(b"quit\n").expect("quit qemu-io");
    }
    assert!(holder.0.wait().expect("wait").success());
}
