//! QEMU's image tools as the peers of image tests: `qemu-img` and `qemu-io` (Debian's
//! qemu-utils, which scripts/setup.sh installs), each call checked.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `qemu-img ARGS`.
pub fn img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img is installed (scripts/setup.sh)")
}

/// Runs `qemu-img ARGS`, asserting success; its stdout.
pub fn img_ok(args: &[&str]) -> String {
    let out = img(args);
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs one `qemu-io` command on a qcow2 image (writes there mark the image's bitmaps, as a
/// guest's would), asserting it succeeded.
pub fn io(image: &Path, command: &str) {
    let out =
        Command::new("qemu-io").args(["-f", "qcow2", "-c", command]).arg(image).output().expect("qemu-io is installed (scripts/setup.sh)");
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"), "qemu-io {command}: {out:?}");
}

/// `qemu-img compare`: whether the two images read the same.
pub fn identical(a: &Path, b: &Path) -> bool {
    let out = img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.code().is_some_and(|c| c <= 1), "qemu-img compare: {out:?}");
    out.status.success()
}
