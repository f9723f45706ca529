//! virtio-blk driven by the `virtio` test guest (guests/kit/virtio_blk.c): the guest writes a
//! pattern the test recomputes, and the test finds it in the image files on the host (raw read
//! directly, qcow2 through `qemu-img convert`), with `qemu-img check` clean after the run.

use ferro_test_support::vm::ferro_command;
use ferro_test_support::{TempDir, run_ok};
use std::path::Path;

const SEED: u64 = 77;
const FIRST: u64 = 5;
const SECTORS: u64 = 9;

/// The byte the guest writes at disk offset `pos` (guests/kit/virtio_blk.c).
fn pattern(pos: u64) -> u8 {
    (SEED + pos * 7 + (pos >> 9) * 13) as u8
}

/// A 1 MiB raw image that already holds the guest's pattern where the guest writes it.
fn patterned_image() -> Vec<u8> {
    let mut bytes = vec![0u8; 1 << 20];
    for pos in FIRST * 512..(FIRST + SECTORS) * 512 {
        bytes[pos as usize] = pattern(pos);
    }
    bytes
}

fn run_guest(disks: &[String]) -> (Option<i32>, String) {
    run_guest_on("mmio", disks)
}

fn run_guest_on(transport: &str, disks: &[String]) -> (Option<i32>, String) {
    let cmdline = format!("blk.seed={SEED} blk.sector={FIRST}");
    let mut args = vec!["run", "--guest", "virtio", "--memory", "64M", "--transport", transport, "--cmdline", &cmdline];
    for d in disks {
        args.extend_from_slice(&["--disk", d]);
    }
    let o = ferro_command().args(&args).output().expect("run ferro");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.code(), out)
}

/// Checks the written sectors hold the pattern and the zeroed one zeroes, in a raw view.
fn assert_written(raw: &[u8], what: &str) {
    for pos in FIRST * 512..(FIRST + SECTORS - 1) * 512 {
        assert_eq!(raw[pos as usize], pattern(pos), "{what}: byte {pos}");
    }
    let zeroed = ((FIRST + SECTORS - 1) * 512) as usize;
    assert!(raw[zeroed..zeroed + 512].iter().all(|&b| b == 0), "{what}: the write-zeroes sector");
}

fn qcow2_as_raw(dir: &TempDir, image: &Path) -> Vec<u8> {
    let out = dir.join("converted.raw");
    run_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

#[test]
fn raw_and_qcow2_disks_hold_what_the_guest_wrote_on_mmio() {
    raw_and_qcow2_disks_hold_what_the_guest_wrote("mmio");
}

#[test]
fn raw_and_qcow2_disks_hold_what_the_guest_wrote_on_pci() {
    raw_and_qcow2_disks_hold_what_the_guest_wrote("pci");
}

fn raw_and_qcow2_disks_hold_what_the_guest_wrote(transport: &str) {
    let dir = TempDir::new(&format!("blk-rw-{transport}"));
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    let qcow2 = dir.join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", qcow2.to_str().unwrap(), "2M"]);
    run_ok("qemu-img", &["bitmap", "--add", "-g", "512", qcow2.to_str().unwrap(), "guest"]);

    let (status, out) = run_guest_on(transport, &[format!("path={}", raw.display()), format!("path={},format=qcow2", qcow2.display())]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("virtio: all devices passed"), "{out}");
    for (name, sectors) in [("disk.raw", 2048), ("disk.qcow2", 4096)] {
        for line in [
            format!("virtio-blk[{name}]: capacity {sectors} sectors, blk_size 512, read-only 0, get-id status 0"),
            format!("virtio-blk[{name}]: write 9 sectors at {FIRST}: status 0"),
            format!("virtio-blk[{name}]: read back: status 0, 4608 of 4608 bytes match the pattern"),
            format!("virtio-blk[{name}]: read past the end: status 1, straddling the end: status 1"),
            format!("virtio-blk[{name}]: unknown request type: status 2"),
        ] {
            assert!(out.contains(&line), "missing '{line}' in:\n{out}");
        }
    }
    assert_written(&std::fs::read(&raw).unwrap(), "raw image");
    assert_written(&qcow2_as_raw(&dir, &qcow2), "qcow2 image");
    run_ok("qemu-img", &["check", "-q", qcow2.to_str().unwrap()]);
    // The VMM closed the image cleanly: the bitmap QEMU made is consistent and marks exactly
    // the sectors the guest wrote and zeroed.
    let info = run_ok("qemu-img", &["info", qcow2.to_str().unwrap()]);
    assert!(info.contains("flags:\n                [0]: auto\n            name: guest"), "{info}");
    let img = ferro_block::qcow2::Qcow2::open(&qcow2, ferro_block::Access::Read).unwrap();
    assert_eq!(img.dirty_bitmap("guest").unwrap().ranges(), vec![(FIRST * 512, SECTORS * 512)]);
}

#[test]
fn qcow2_format_is_detected_and_backing_files_are_read() {
    // The guest's pattern goes into a backing file; the overlay (format detected) must show it,
    // and the guest's own writes land in the overlay only.
    let dir = TempDir::new("blk-backing");
    let base = dir.join("base.raw");
    let bytes = patterned_image();
    std::fs::write(&base, &bytes).unwrap();
    let overlay = dir.join("overlay.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.to_str().unwrap(), overlay.to_str().unwrap()]);

    let (status, out) = run_guest(&[format!("path={}", overlay.display())]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("virtio-blk[overlay.qcow2]: read back: status 0, 4608 of 4608 bytes match"), "{out}");
    assert_written(&qcow2_as_raw(&dir, &overlay), "overlay");
    assert_eq!(std::fs::read(&base).unwrap(), bytes, "the backing file is never written");
    run_ok("qemu-img", &["check", "-q", overlay.to_str().unwrap()]);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_bytes() {
    let dir = TempDir::new("blk-ro");
    let raw = dir.join("ro.raw");
    let bytes = patterned_image();
    // The guest writes these same bytes; the modification time shows whether anything was written.
    std::fs::write(&raw, &bytes).unwrap();
    let mtime = std::fs::metadata(&raw).unwrap().modified().unwrap();

    let (status, out) = run_guest(&[format!("path={},readonly=on", raw.display())]);
    assert_eq!(status, Some(0), "{out}");
    for line in [
        "virtio-blk[ro.raw]: capacity 2048 sectors, blk_size 512, read-only 1, get-id status 0",
        "virtio-blk[ro.raw]: write 9 sectors at 5: status 1",
        "virtio-blk[ro.raw]: read back: status 0, 4608 of 4608 bytes match the pattern",
        "virtio-blk[ro.raw]: flush: status 0",
    ] {
        assert!(out.contains(line), "missing '{line}' in:\n{out}");
    }
    assert_eq!(std::fs::read(&raw).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&raw).unwrap().modified().unwrap(), mtime);
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let (status, out) = run_guest(&["path=/nonexistent/ferro-disk.raw".to_owned()]);
    assert_eq!(status, Some(2), "{out}");
    assert!(out.contains("/nonexistent/ferro-disk.raw"), "{out}");
}
