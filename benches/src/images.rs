//! `ferro-bench images`: disk conversion for OVF/OVA work against qemu-img on the same files:
//! a streamOptimized VMDK (made by qemu-img, as VMware and VirtualBox ship them) converted to
//! qcow2, which is what an OVA import does to each disk, and a raw disk converted to a
//! streamOptimized VMDK, which is what an export does. The disk holds incompressible data,
//! compressible text and zeroes.

use crate::common::{Scratch, ferro_bin, median};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MIB: usize = 1 << 20;

/// A 256 MiB disk: 64 MiB of pseudo-random bytes, 64 MiB of repeated text, 128 MiB of zeroes.
fn disk(path: &Path) {
    let mut d = vec![0u8; 256 * MIB];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut d[..64 * MIB] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let text = b"The quick brown fox jumps over the lazy dog; Ferrovisor disk image line. ";
    for (i, b) in d[64 * MIB..128 * MIB].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    std::fs::write(path, d).expect("write the disk");
}

/// Median seconds of `runs` runs of `cmd ARGS... OUT` (OUT removed before each run).
fn time(program: &Path, args: &[&str], out: &Path, runs: usize) -> f64 {
    let samples = (0..runs)
        .map(|_| {
            let _ = std::fs::remove_file(out);
            let start = Instant::now();
            let status = Command::new(program).args(args).arg(out).status().expect("spawn");
            assert!(status.success(), "{} {args:?} failed", program.display());
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let raw = scratch.0.join("disk.raw");
    disk(&raw);
    let vmdk = scratch.0.join("peer.vmdk");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"])
        .arg(&raw)
        .arg(&vmdk)
        .status()
        .expect("qemu-img (scripts/setup.sh installs qemu-utils)");
    assert!(status.success(), "qemu-img could not make the VMDK");
    let (ferro, qemu) = (ferro_bin(), Path::new("qemu-img").to_path_buf());
    let mib = 256.0;
    let out = scratch.0.join("out");
    let (vmdk_s, raw_s) = (vmdk.to_str().expect("utf-8"), raw.to_str().expect("utf-8"));
    println!("== disk conversion, 256 MiB disk (64 MiB random, 64 MiB text, 128 MiB zeroes), {runs} runs, medians, MiB/s of virtual disk");
    let rows: [(&str, Vec<&str>, Vec<&str>); 2] = [
        (
            "streamOptimized VMDK -> qcow2 (import)",
            vec!["img", "convert", "-f", "vmdk", "-O", "qcow2", vmdk_s],
            vec!["convert", "-f", "vmdk", "-O", "qcow2", vmdk_s],
        ),
        (
            "raw -> streamOptimized VMDK (export)",
            vec!["img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw_s],
            vec!["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw_s],
        ),
    ];
    for (name, ours, peer) in rows {
        let t_ours = time(&ferro, &ours, &out, runs);
        let t_peer = time(&qemu, &peer, &out, runs);
        println!(
            "  {name:<40} ferro {:7.1} MiB/s ({t_ours:.2} s)   qemu-img {:7.1} MiB/s ({t_peer:.2} s)   time ratio ferro/qemu-img {:.2}",
            mib / t_ours,
            mib / t_peer,
            t_ours / t_peer
        );
    }
}
