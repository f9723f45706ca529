//! What the Linux-guest tests share: where the cached build of guests/linux is, and the kernel
//! command line it needs.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The cached build of the Linux test guest: $FERRO_LINUX_DIR, or whatever build.sh prints
/// (instant when the recipe has not changed; a full kernel build otherwise).
pub fn linux_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERRO_LINUX_DIR") {
        return PathBuf::from(d);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guests/linux/build.sh");
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("run guests/linux/build.sh");
    assert!(out.status.success(), "guests/linux/build.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().expect("build.sh printed no directory"))
}

/// guests/linux/cmdline.txt: the switches the guest kernel needs on kvm-pvm.
pub fn linux_cmdline() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../guests/linux/cmdline.txt"))
        .expect("guests/linux/cmdline.txt")
        .trim()
        .to_owned()
}
