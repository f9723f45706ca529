//! Helpers shared by the block layer's integration tests: qemu-img/qemu-io runners, deterministic
//! data (scratch directories are ferro-test-support's `TempDir`).
#![allow(dead_code)]
pub use ferro_test_support::TempDir;
pub mod powerloss;
use std::path::Path;
use std::process::{Command, Output};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e} (is qemu-utils installed?)"))
}

/// Runs qemu-img and returns its output (any exit status).
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs qemu-img and panics with its stderr if it fails.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(out.status.success(), "qemu-img {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands on an image (format given explicitly) and panics on failure.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let img = img.to_str().expect("utf-8 path");
    args.push(img);
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("failed") && !text.contains("error"), "qemu-io {cmds:?} on {img}: {text}");
}

/// `qemu-img check` must report no errors and no leaks.
pub fn assert_qemu_check_clean(img: &Path) {
    let out = qemu_img(&["check", img.to_str().expect("utf-8 path")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img check {} failed ({:?}): {text}", img.display(), out.status.code());
    assert!(text.contains("No errors were found"), "qemu-img check {}: {text}", img.display());
}

/// `qemu-img compare` of two images must say identical.
pub fn assert_qemu_identical(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", a.to_str().expect("utf-8"), b.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img compare {} {}: {text}", a.display(), b.display());
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads a whole image through the block layer.
pub fn read_all(img: &Path) -> Vec<u8> {
    let mut d = ferro_block::open(img, None, true).expect("open image");
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).expect("read image");
    buf
}

/// Converts any image to raw bytes with qemu-img (the reference reader).
pub fn qemu_read_all(img: &Path, scratch: &TempDir) -> Vec<u8> {
    let out = scratch.join("qemu-reference.raw");
    qemu_img_ok(&["convert", "-O", "raw", img.to_str().expect("utf-8"), out.to_str().expect("utf-8")]);
    let v = std::fs::read(&out).expect("read converted");
    let _ = std::fs::remove_file(&out);
    v
}
