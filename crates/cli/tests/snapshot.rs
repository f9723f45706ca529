//! VM snapshots at the VMM level (docs/snapshot-format.md): `ferro vmm`'s `snapshot` control op
//! saves a running guest, `ferro vmm --restore DIR` / `ferro run --restore DIR` start it again.
//! The counter guest proves the restored VM continues where it was saved, with every page of
//! its memory: its count goes on from the snapshot's, its pattern checks clean, and a snapshot
//! taken before the pattern was rewritten brings the old pattern back. Damaged snapshots are
//! refused with a message saying what is wrong.

use ferro_test_support::vm::{Vmm, ferro, linux_cmdline, linux_dir, read_until_within, stderr};
use ferro_test_support::{TempDir, run_ok, wait_for};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const MEMORY: u64 = 64 << 20;

/// A `ferro vmm` under its seccomp filters (as ferrod runs it) with its console on a socket, and
/// that console.
struct Guest {
    vmm: Vmm,
    console: UnixStream,
    seen: String,
}

impl Guest {
    fn start(tag: &str, args: &[&str]) -> Guest {
        let dir = TempDir::new(tag);
        let serial = dir.join("serial.sock");
        let mut all = vec!["--seccomp"];
        all.extend(args);
        all.extend(["--serial-socket", serial.to_str().unwrap()]);
        let vmm = Vmm::start(dir, &all);
        wait_for("the serial socket", Duration::from_secs(10), || serial.exists());
        let console = UnixStream::connect(&serial).unwrap();
        console.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Guest { vmm, console, seen: String::new() }
    }

    fn type_keys(&mut self, keys: &str) {
        use std::io::Write;
        self.console.write_all(keys.as_bytes()).unwrap();
    }

    /// Sends `keys` and waits for `answer` on the console (output since the last wait).
    fn type_and_wait(&mut self, keys: &str, answer: &str) -> String {
        self.type_keys(keys);
        self.wait(answer)
    }

    fn wait(&mut self, what: &str) -> String {
        self.wait_within(what, Duration::from_secs(10))
    }

    fn wait_within(&mut self, what: &str, limit: Duration) -> String {
        read_until_within(&mut self.console, &mut self.seen, what, limit);
        std::mem::take(&mut self.seen)
    }

    /// Waits for the whole line that starts with `prefix` and returns it.
    fn line(&mut self, prefix: &str) -> String {
        read_until_within(&mut self.console, &mut self.seen, prefix, Duration::from_secs(10));
        let at = self.seen.find(prefix).expect("read_until saw it");
        let mut line = self.seen.split_off(at);
        read_until_within(&mut self.console, &mut line, "\n", Duration::from_secs(10));
        self.seen = line.split_off(line.find('\n').expect("read_until saw it") + 1);
        line.trim_end().to_owned()
    }

    fn snapshot(&mut self, dir: &Path, resume: bool) -> serde_json::Value {
        let reply = self.vmm.request(&serde_json::json!({"op": "snapshot", "dir": dir, "resume": resume}).to_string());
        assert_eq!(reply["ok"], true, "{reply}");
        reply
    }

    fn quit(mut self) {
        assert_eq!(self.vmm.request(r#"{"op":"quit"}"#)["ok"], true);
        assert_eq!(self.vmm.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
}

/// The seed in a "counter: up seed=X" or "counter: reseeded seed=X" line.
fn seed(line: &str) -> String {
    line.rsplit_once("seed=").unwrap_or_else(|| panic!("no seed in {line:?}")).1.to_owned()
}

#[test]
fn a_restored_guest_continues_with_its_memory_and_an_older_snapshot_goes_back_in_time() {
    let snaps = TempDir::new("snapshots");
    let (early, late) = (snaps.join("early"), snaps.join("late"));

    let mut a = Guest::start("snap-a", &["--guest", "counter", "--memory", "64M", "--cpus", "2", "--name", "snap"]);
    let first = seed(&a.line("counter: up seed="));
    a.type_and_wait("ccc", &format!("counter: 3 seed={first} errors=0"));

    // Saved while running, and running on afterwards.
    let reply = a.snapshot(&early, true);
    assert_eq!(reply["state"], "running");
    assert!(reply["pause_us"].as_u64().unwrap() > 0);
    let written = reply["memory_bytes_written"].as_u64().unwrap();
    assert!(written >= 16 << 20, "the guest's 16 MiB pattern is in the memory file: {written} bytes written");
    let mem = std::fs::metadata(early.join("memory")).unwrap();
    assert_eq!(mem.len(), MEMORY, "the memory file covers all of RAM");
    assert!(mem.blocks() * 512 < MEMORY / 2, "untouched pages are holes: {} bytes allocated", mem.blocks() * 512);

    a.type_keys("r");
    let second = seed(&a.line("counter: reseeded seed="));
    assert_ne!(second, first);
    a.type_and_wait("c", &format!("counter: 4 seed={second} errors=0"));

    // Saved paused: the VM stays paused.
    assert_eq!(a.snapshot(&late, false)["state"], "paused");
    assert_eq!(a.vmm.request(r#"{"op":"info"}"#)["state"], "paused");
    let err = a.vmm.request(&serde_json::json!({"op": "snapshot", "dir": late}).to_string());
    assert!(err["error"].as_str().unwrap().contains("is not empty"), "{err}");
    a.quit();

    // The early snapshot: the first pattern and count 3, in a new process, without a reboot.
    let mut b = Guest::start("snap-b", &["--restore", early.to_str().unwrap()]);
    let out = b.type_and_wait("c", &format!("counter: 4 seed={first} errors=0"));
    assert!(!out.contains("counter: up"), "the restored guest rebooted: {out}");
    let info = b.vmm.request(r#"{"op":"info"}"#);
    assert_eq!((info["state"].as_str(), info["name"].as_str(), info["vcpus"].as_u64()), (Some("running"), Some("snap"), Some(2)));
    b.type_and_wait("cc", &format!("counter: 6 seed={first} errors=0"));
    b.quit();

    // The late one: the second pattern and count 4. A snapshot restores any number of times.
    for _ in 0..2 {
        let mut c = Guest::start("snap-c", &["--restore", late.to_str().unwrap()]);
        c.type_and_wait("c", &format!("counter: 5 seed={second} errors=0"));
        c.quit();
    }
}

/// A snapshot of a guest that goes on running is written while it runs (pre-copy) and the guest
/// is paused only for the pages it dirtied meanwhile. The counter guest rewrites and checks its
/// 16 MiB pattern the whole time: the restored guest goes on churning from the snapshot's
/// instant without one stale word, so every page written again after the first pass made it
/// into the file.
#[test]
fn a_snapshot_of_a_guest_rewriting_its_memory_restores_every_page() {
    let snaps = TempDir::new("snapshots-churn");
    let dir = snaps.join("churning");
    let mut a = Guest::start("snap-churn-a", &["--guest", "counter", "--memory", "64M", "--cpus", "2", "--name", "churn"]);
    let first = seed(&a.line("counter: up seed="));
    a.type_and_wait("cc", &format!("counter: 2 seed={first} errors=0"));
    a.type_keys("d");
    a.line("counter: churning");
    let reply = a.snapshot(&dir, true);
    assert_eq!(reply["state"], "running", "{reply}");
    eprintln!("snapshot of a churning guest: {reply}");
    // The source guest itself never saw a stale word either.
    a.type_keys("c");
    let churned = a.line("counter: churned ");
    assert!(churned.contains(" errors=0"), "the source's pattern broke during the snapshot: {churned}");
    a.quit();

    let mut b = Guest::start("snap-churn-b", &["--restore", dir.to_str().unwrap()]);
    b.type_keys("c");
    let churned = b.line("counter: churned ");
    assert!(churned.contains(" errors=0"), "a page of the snapshot was stale: {churned}");
    assert_eq!(b.line("counter: 3 "), format!("counter: 3 seed={first} errors=0"));
    b.quit();
}

/// Copies a snapshot's state file into a new directory (with the memory file unless
/// `memory` is false), changed by `damage`.
fn damaged(snaps: &TempDir, from: &Path, name: &str, memory: bool, damage: impl FnOnce(&mut Vec<u8>)) -> String {
    let dir = snaps.join(name);
    std::fs::create_dir(&dir).unwrap();
    let mut state = std::fs::read(from.join("state")).unwrap();
    damage(&mut state);
    std::fs::write(dir.join("state"), state).unwrap();
    if memory {
        std::fs::copy(from.join("memory"), dir.join("memory")).unwrap();
    }
    dir.to_str().unwrap().to_owned()
}

/// The state file header's length (docs/snapshot-format.md).
const HEADER: usize = 56;

/// Replaces a state file's body with `body`, with a header that matches it (length, SHA-256).
fn resealed_raw(state: &mut Vec<u8>, body: Vec<u8>) {
    use sha2::Digest;
    state.truncate(16);
    state.extend_from_slice(&(body.len() as u64).to_le_bytes());
    state.extend_from_slice(&sha2::Sha256::digest(&body));
    state.extend_from_slice(&body);
}

/// Changes a state file's JSON body with `change` and reseals it, so only the change is wrong.
fn resealed(state: &mut Vec<u8>, change: impl FnOnce(&mut serde_json::Value)) {
    let mut body: serde_json::Value = serde_json::from_slice(&state[HEADER..]).unwrap();
    change(&mut body);
    resealed_raw(state, serde_json::to_vec(&body).unwrap());
}

#[test]
fn damaged_snapshots_are_refused_with_the_reason() {
    let snaps = TempDir::new("snapshots-bad");
    let good = snaps.join("good");
    let mut a = Guest::start("snap-bad", &["--guest", "counter", "--memory", "64M"]);
    a.wait("counter: up");
    a.snapshot(&good, false);
    a.quit();

    let cases: Vec<(String, &str)> = vec![
        (damaged(&snaps, &good, "flipped", true, |s| *s.last_mut().unwrap() ^= 1), "checksum mismatch"),
        (damaged(&snaps, &good, "truncated", true, |s| s.truncate(s.len() / 2)), "truncated"),
        (damaged(&snaps, &good, "short", true, |s| s.truncate(20)), "truncated (20 bytes"),
        (damaged(&snaps, &good, "version", true, |s| s[8] = 99), "format version 99, this build reads version 1"),
        (damaged(&snaps, &good, "magic", true, |s| s[0] = b'X'), "not a Ferrovisor snapshot state file"),
        (damaged(&snaps, &good, "no-memory", false, |_| {}), "memory file"),
        (snaps.join("nowhere").to_str().unwrap().to_owned(), "No such file"),
        (
            damaged(&snaps, &good, "cpu", true, |s| {
                resealed(s, |body| {
                    // Every bit of CPUID 7.0 EBX: no host has them all (some are reserved).
                    for r in body["cpu_features"]["registers"].as_array_mut().unwrap() {
                        if r["leaf"] == 7 && r["register"] == "ebx" {
                            r["bits"] = u32::MAX.into();
                        }
                    }
                })
            }),
            "this host's CPU lacks features the saved guest was given: ",
        ),
        (damaged(&snaps, &good, "vm-version", true, |s| resealed(s, |body| body["vm"]["version"] = 99.into())), "VM state version 99"),
        (damaged(&snaps, &good, "not-json", true, |s| resealed_raw(s, b"{not json".to_vec())), "key must be a string"),
    ];
    for (dir, reason) in &cases {
        for verb in ["run", "vmm"] {
            let o = ferro(&[verb, "--restore", dir]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "ferro {verb} --restore {dir}: {err}");
            assert!(err.contains(reason), "ferro {verb} --restore {dir}: expected {reason:?} in {err:?}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let o = ferro(&["run", "--restore", good.to_str().unwrap(), "--memory", "128M"]);
    assert_eq!(o.status.code(), Some(2), "a snapshot brings its own configuration");
    // A configuration given to wire the restored VM must describe the saved machine.
    let state = std::fs::read(good.join("state")).unwrap();
    let mut config = serde_json::from_slice::<serde_json::Value>(&state[HEADER..]).unwrap()["config"].clone();
    config["memory"]["size"] = (128u64 << 20).into();
    let wiring = snaps.join("bigger.json");
    std::fs::write(&wiring, config.to_string()).unwrap();
    let o = ferro(&["vmm", "--restore", good.to_str().unwrap(), "--config", wiring.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("memory: the configuration differs from the snapshot's"), "{err}");
}

/// The "<md5>  /pattern" line md5sum printed, if any.
fn md5_of_pattern(out: &str) -> Option<String> {
    out.lines().map(str::trim).find(|l| l.ends_with("  /pattern") && l.len() == 32 + 10).map(str::to_owned)
}

/// One Linux boot: the guest mounts ext4 on a virtio disk (PCI, MSI-X), writes a file there and
/// another in its RAM (tmpfs), and is snapshotted; a new VMM restored from the snapshot finds
/// the same bytes in RAM, the disk still mounted, and writes another file the test then reads
/// from the image. The guest's shell reads its commands from COM1.
#[test]
fn linux_guest_continues_after_restore_with_its_memory_and_disk() {
    let scratch = TempDir::new("snapshot-linux");
    let disk = scratch.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", disk.to_str().unwrap()]);
    let dir = linux_dir();
    let cmdline = format!("{} ferro.cmd=while+read+-r+line;do+eval+$line;done</dev/ttyS0", linux_cmdline());
    let args = [
        "--kernel",
        dir.join("vmlinux").to_str().unwrap(),
        "--initrd",
        dir.join("initramfs.cpio").to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory",
        "192M",
        "--disk",
        &format!("path={}", disk.display()),
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut a = Guest::start("snap-linux-a", &args);
    a.console.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    a.wait_within("FERRO-CMD while", Duration::from_secs(300));
    // The guest kernel's ring 0 is interpreted here (docs/kvm-pvm.md), so the file in RAM is made
    // in user space: a random number, then 1.3 MB of numbers.
    let step1 = "mount -t ext4 /dev/vda /mnt && echo before-snapshot > /mnt/before && sync && \
                 echo $RANDOM$RANDOM > /pattern && seq 1 200000 >> /pattern && md5sum /pattern && echo STEP1-$((40+2))\n";
    a.type_keys(step1);
    let out = a.wait_within("STEP1-42", Duration::from_secs(120));
    let md5 = md5_of_pattern(&out).unwrap_or_else(|| panic!("no md5sum line: {out}"));
    let snap = scratch.join("snap");
    let reply = a.snapshot(&snap, false);
    eprintln!("Linux snapshot: paused {} us, {} bytes of memory written", reply["pause_us"], reply["memory_bytes_written"]);
    a.quit();

    let mut b = Guest::start("snap-linux-b", &["--restore", snap.to_str().unwrap()]);
    b.console.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let step2 = "md5sum /pattern; cat /mnt/before; echo after-restore > /mnt/after && sync && umount /mnt && echo STEP2-$((40+2))\n";
    b.type_keys(step2);
    let out = b.wait_within("STEP2-42", Duration::from_secs(120));
    assert!(!out.contains("FERRO-GUEST-UP"), "the restored guest rebooted: {out}");
    assert_eq!(md5_of_pattern(&out).as_deref(), Some(md5.as_str()), "the guest's RAM changed across the restore: {out}");
    assert!(out.lines().any(|l| l.trim() == "before-snapshot"), "the file written before the snapshot: {out}");
    b.quit();
    let after = run_ok("debugfs", &["-R", "cat /after", disk.to_str().unwrap()]);
    assert_eq!(after.trim(), "after-restore", "the restored guest's write is not in the image");
}

/// `qemu-img snapshot -l IMAGE`'s output.
fn qemu_snapshot_list(image: &Path) -> String {
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-l", image.to_str().unwrap()]).output();
    let out = out.expect("qemu-img (qemu-utils) runs");
    assert!(out.status.success(), "qemu-img snapshot -l: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `snapshot` op with `disk_snapshot` takes a qcow2 internal snapshot of every writable disk
/// while the VM is paused (qemu-img lists it after the VMM exits, and reverting it with qemu-img
/// gives back the bytes of that moment); a writable raw disk or a name taken fails the op before
/// anything changes: no snapshot directory, no disk snapshot.
#[test]
fn the_snapshot_op_snapshots_qcow2_disks_and_refuses_raw_ones() {
    let scratch = TempDir::new("snapshot-disks");
    let qcow2 = scratch.join("disk.qcow2");
    let raw = scratch.join("data.raw");
    let create = |path: &Path, format: &str| {
        let out = ferro(&["img", "create", "-q", "-f", format, path.to_str().unwrap(), "4M"]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    create(&qcow2, "qcow2");
    create(&raw, "raw");
    let fill = |byte: u8| {
        let mut d = ferro_block::open(&qcow2, None, false).expect("open the disk");
        d.write_at(&[byte; 65_536], 0).expect("write");
        d.flush().expect("flush");
    };
    fill(0xaa);
    let counter = ["--guest", "counter", "--memory", "64M"];
    let with_disks = |disks: &[String]| -> Vec<String> {
        let mut args: Vec<String> = counter.iter().map(|s| s.to_string()).collect();
        for d in disks {
            args.extend(["--disk".to_string(), d.clone()]);
        }
        args
    };
    let request = |dir: &Path, name: &str| serde_json::json!({"op": "snapshot", "dir": dir, "resume": true, "disk_snapshot": name}).to_string();

    // A writable raw disk: refused naming it, and nothing changed on the qcow2 disk.
    let args = with_disks(&[format!("path={}", qcow2.display()), format!("path={}", raw.display())]);
    let mut a = Guest::start("snap-disks-a", &args.iter().map(String::as_str).collect::<Vec<_>>());
    a.line("counter: up seed=");
    let dir = scratch.join("refused");
    let err = a.vmm.request(&request(&dir, "before"));
    let msg = err["error"].as_str().unwrap_or_else(|| panic!("raw disk accepted: {err}"));
    assert!(msg.contains("data.raw") && msg.contains("raw image cannot hold internal snapshots") && msg.contains("qcow2"), "{msg}");
    assert!(!dir.exists(), "the refused op created {}", dir.display());
    assert_eq!(a.vmm.request(r#"{"op":"info"}"#)["state"], "running");
    a.quit();
    assert!(!qemu_snapshot_list(&qcow2).contains("before"), "the refused op snapshotted the qcow2 disk");

    // The qcow2 disk and a read-only raw one (left alone): the op snapshots the qcow2 disk.
    let args = with_disks(&[format!("path={}", qcow2.display()), format!("path={},readonly=on", raw.display())]);
    let mut b = Guest::start("snap-disks-b", &args.iter().map(String::as_str).collect::<Vec<_>>());
    b.line("counter: up seed=");
    let dir = scratch.join("with-disk");
    let reply = b.vmm.request(&request(&dir, "before"));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "running", "{reply}");
    assert_eq!(reply["disks"], serde_json::json!([qcow2]), "{reply}");
    assert!(dir.join("state").exists() && dir.join("memory").exists());
    let again = b.vmm.request(&request(&scratch.join("again"), "before"));
    let msg = again["error"].as_str().unwrap_or_else(|| panic!("a taken name was accepted: {again}"));
    assert!(msg.contains("disk.qcow2") && msg.contains("has a snapshot named \"before\" already"), "{msg}");
    assert!(!scratch.join("again").exists());
    b.quit();

    let list = qemu_snapshot_list(&qcow2);
    assert!(list.lines().filter(|l| l.contains(" before ")).count() == 1, "qemu-img snapshot -l: {list}");
    let check = std::process::Command::new("qemu-img").args(["check", qcow2.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"), "{}", String::from_utf8_lossy(&check.stdout));
    // The disk snapshot holds the disk of that moment: written over afterwards, qemu-img's
    // revert brings the old bytes back.
    fill(0xbb);
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-a", "before", qcow2.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut d = ferro_block::open(&qcow2, None, true).expect("open");
    let mut back = vec![0u8; 65_536];
    d.read_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|&b| b == 0xaa), "qemu-img's revert of our VM's disk snapshot");
}
