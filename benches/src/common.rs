//! What every benchmark section shares: medians, and where the binaries under test and the
//! peers are.

use std::path::PathBuf;
use std::process::Command;

/// The median of the samples (the upper one of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `ferro` binary under test: $FERRO_BIN, else the one built beside this benchmark binary.
pub fn ferro_bin() -> PathBuf {
    let ferro = std::env::var_os("FERRO_BIN").map(PathBuf::from).unwrap_or_else(ferro_test_support::ferro_bin);
    assert!(ferro.exists(), "{} not found: cargo build --release -p ferro-cli", ferro.display());
    ferro
}

/// Debian's QEMU system emulator, the peer: $FERRO_QEMU, else qemu-system-x86_64 on PATH, else
/// the private copy scripts/qemu-peer.sh unpacks (Debian's package would replace the newer
/// qemu-img the interop tests use). None when none of those works.
pub fn qemu_bin() -> Option<PathBuf> {
    if let Some(q) = std::env::var_os("FERRO_QEMU") {
        return Some(PathBuf::from(q));
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from("qemu-system-x86_64"));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/qemu-peer.sh");
    let out = Command::new(script).output().ok()?;
    if !out.status.success() {
        eprintln!("ferro-bench: {script} failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().last().map(PathBuf::from)
}

/// QEMU's `-cpu` for every peer run: the host's CPU, except IA32_ARCH_CAPABILITIES, which QEMU
/// 7.2 fails to set on this host's KVM (it aborts in kvm_buf_set_msrs before the guest runs).
pub const QEMU_CPU: &str = "host,-arch-capabilities";

/// A scratch directory for one run, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("ferro-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes, unlike `Instant`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
