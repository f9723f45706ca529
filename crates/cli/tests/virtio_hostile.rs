//! The `virtio_hostile` test guest (guests/src/virtio_hostile.c) breaks the virtio rules on
//! purpose against a virtio-blk disk and a virtio-rng: buffers outside RAM, descriptor loops,
//! absurd lengths, wrong directions, bad indirect tables, broken rings, bad queue sizes, early
//! kicks. For each the device must answer with an error or a zero length, or set NEEDS_RESET,
//! and work again after a reset; the rng (another device) must keep working; and the VMM must
//! stay up: the guest finishes and exits 0, and the control socket still answers.

use ferro_test_support::TempDir;
use ferro_test_support::vm::{Vmm, ferro_command};
use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A scratch directory holding a 1 MiB raw disk; the `--disk` value for it.
fn scratch_with_disk(name: &str) -> (TempDir, String) {
    let dir = TempDir::new(&format!("hostile-{name}"));
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let arg = format!("path={}", disk.display());
    (dir, arg)
}

fn guest_args<'a>(disk: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec!["--guest", "virtio_hostile", "--memory", "64M", "--transport", "mmio", "--disk", disk, "--rng", "--cmdline", cmdline]
}

/// Runs the attacks `flags` selects; returns the guest's report (stdout) and the VMM's stderr.
fn attack(name: &str, flags: &str) -> (String, String) {
    let (_scratch, disk) = scratch_with_disk(name);
    let mut args = vec!["run"];
    args.extend(guest_args(&disk, flags));
    let o = ferro_command().args(&args).output().expect("run ferro");
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert_eq!(o.status.code(), Some(0), "{flags}: the guest failed or the VMM died:\n{out}{err}");
    assert!(out.contains("hostile: all checks passed"), "{out}");
    assert!(out.contains("hostile: rng still answers: ok"), "{out}");
    assert!(!out.contains("FAILED") && !out.contains("NO ANSWER"), "{out}");
    (out, err)
}

fn assert_lines(out: &str, lines: &[&str]) {
    for l in lines {
        assert!(out.contains(l), "missing {l:?} in:\n{out}");
    }
}

#[test]
fn buffers_outside_ram_absurd_lengths_and_wrong_directions_get_errors() {
    let (out, _) = attack("buffers", "hostile.oob=1 hostile.len=1 hostile.dir=1");
    assert_lines(&out, &[
        "hostile: oob: data buffer outside RAM: answered, used length 1, status byte 1",
        "hostile: oob: data buffer on the device's own registers: answered, used length 1, status byte 1",
        "hostile: oob: header outside RAM: answered, used length 1, status byte 1",
        "hostile: oob: status byte outside RAM: answered, used length 0",
        "hostile: len: zero-length header: answered, used length 1, status byte 1",
        "hostile: len: 4 GiB - 1 data buffer: answered, used length 0",
        "hostile: len: zero-length status: answered, used length 0",
        "hostile: dir: read into a read-only buffer: answered, used length 1, status byte 1",
        "hostile: dir: read-only status byte: answered, used length 1, status byte 1",
        "hostile: oob: ok",
        "hostile: len: ok",
        "hostile: dir: ok",
    ]);
    assert_eq!(out.matches("hostile:   device works again after a reset: ok").count(), 3, "{out}");
    assert!(!out.contains("hostile: loop"), "only the selected attacks run: {out}");
}

#[test]
fn descriptor_loops_and_bad_indirect_tables_end_the_chain_not_the_vmm() {
    let (out, _) = attack("chains", "hostile.loop=1 hostile.indirect=1");
    assert_lines(&out, &[
        "hostile: loop: 0 -> 1 -> 0: answered",
        "hostile: loop: 0 -> 0: answered",
        "hostile: loop: next past the table: answered",
        "hostile: indirect: table of 65536 descriptors: answered, used length 0",
        "hostile: indirect: table length not a multiple of 16: answered, used length 0",
        "hostile: indirect: nested table: answered, used length 0",
        "hostile: indirect: a chain of 2000 descriptors: answered, used length 1, status byte 1",
        "hostile: indirect: table outside RAM: answered, used length 0",
        "hostile: loop: ok",
        "hostile: indirect: ok",
    ]);
}

#[test]
fn broken_rings_set_needs_reset_and_the_device_recovers() {
    let (out, err) = attack("rings", "hostile.head=1 hostile.avail=1 hostile.ring=1");
    assert_lines(&out, &[
        "hostile: head: available head 200 of 16: needs reset",
        "hostile: avail: index 101 ahead on a 16-entry ring: needs reset",
        "hostile: ring: descriptor table outside RAM: status 4f",
    ]);
    assert_eq!(out.matches("hostile:   device works again after a reset: ok").count(), 3, "{out}");
    assert_lines(&err, &["virtio-blk: descriptor head 200", "virtio-blk: available ring", "queue 0 is not valid"]);
}

#[test]
fn bad_queue_sizes_fail_driver_ok_and_early_kicks_wait_for_it() {
    let (out, err) = attack("setup", "hostile.qsize=1 hostile.early=1");
    assert_lines(&out, &[
        "hostile: qsize: queue size 15: status 4f",
        "hostile: qsize: queue size 0: status 4f",
        "hostile: qsize: queue size 512: status 4f",
        "hostile: early: kick before DRIVER_OK: served before 0, status f, then answered, status byte 0",
    ]);
    assert_lines(&err, &["queue size 15 is zero, above 256 or not a power of two"]);
}

#[test]
fn rng_ignores_bad_buffers_and_keeps_serving() {
    let (out, _) = attack("rng", "hostile.rng=1");
    assert_lines(&out, &["hostile: rng: outside RAM 1, read-only 1, 4 GiB - 1 1", "hostile: rng: ok"]);
}

/// Every attack in one VM, which then stays up: its control socket must still answer.
#[test]
fn after_every_attack_the_vmm_still_answers_its_control_socket() {
    let (scratch, disk) = scratch_with_disk("all");
    let mut vmm = Vmm::start_with(scratch, &guest_args(&disk, "hostile.all=1 hostile.linger=1"), |c| {
        c.stderr(Stdio::null());
    });
    let (tx, rx) = mpsc::channel();
    let stdout = vmm.stdout();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut report = String::new();
    let verdict = loop {
        let left = Duration::from_secs(60).saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("hostile: all checks passed") || line.starts_with("hostile: FAILED") => break line,
            Ok(line) => report.push_str(&(line + "\n")),
            Err(_) => panic!("no verdict from the guest: {report}"),
        }
    };
    assert_eq!(verdict, "hostile: all checks passed", "{report}");
    assert_eq!(report.matches("hostile:   device works again after a reset: ok").count(), 10, "{report}");
    assert!(vmm.child.try_wait().unwrap().is_none(), "the VMM is still running");

    let info = vmm.request(r#"{"op":"info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(vmm.request(r#"{"op":"quit"}"#)["ok"], true);
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
