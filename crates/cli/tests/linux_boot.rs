//! Tier 2: the Linux test guest built by guests/linux/build.sh (cached) boots under `ferro run`
//! to its busybox userspace and powers off. On kvm-pvm every boot takes tens of seconds (guest
//! ring 0 is interpreted), so each boot checks several things from one command line.
//!
//! Tier 3 (stock Debian kernel) runs only on hardware KVM and says why it skips elsewhere.

use ferro_hypervisor::probe_host_kind;
use ferro_test_support::vm::{ferro_command, linux_dir, linux_run};
use std::time::Instant;

/// Far above the ~30 s a boot takes here, so only a hang reaches it.
const BOOT_LIMIT_SECS: u32 = 300;

struct Boot {
    stdout: String,
    status: Option<i32>,
    seconds: f64,
}

fn boot(kernel: &str, cpus: u32, memory: &str, guest_cmd: &str) -> Boot {
    let start = Instant::now();
    let out = linux_run(BOOT_LIMIT_SECS, &[], kernel, guest_cmd).args(["--cpus", &cpus.to_string(), "--memory", memory]).output().expect("run ferro");
    let b = Boot {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        status: out.status.code(),
        seconds: start.elapsed().as_secs_f64(),
    };
    eprintln!("{kernel} {cpus} vCPU: {:.1} s, status {:?}\n{}\n{}", b.seconds, b.status, b.stdout, String::from_utf8_lossy(&out.stderr));
    b
}

fn assert_booted(b: &Boot, cpus: u32, mem_mib: u64) {
    assert!(b.stdout.contains("FERRO-GUEST-UP"), "never reached userspace");
    assert!(b.stdout.contains(&format!("FERRO-CPUS {cpus}")), "wrong CPU count");
    let kb: u64 = b
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("FERRO-MEM-KB "))
        .and_then(|v| v.trim().parse().ok())
        .expect("no FERRO-MEM-KB line");
    // MemTotal excludes the kernel image and reserved areas: expect most of the RAM we gave.
    assert!(kb > mem_mib * 1024 * 3 / 4 && kb <= mem_mib * 1024, "MemTotal {kb} kB for {mem_mib} MiB");
    assert!(b.stdout.contains("FERRO-CMD-RC 0"), "the guest command failed");
    assert!(b.stdout.contains("FERRO-POWEROFF"));
    assert_eq!(b.status, Some(0), "poweroff must end ferro run with status 0");
}

#[test]
fn linux_pvh_vmlinux_one_vcpu() {
    let b = boot("vmlinux", 1, "256M", "cat+/proc/cmdline;echo+marker-$((6*7))");
    assert_booted(&b, 1, 256);
    assert!(b.stdout.contains("marker-42"), "the command's output is missing");
    assert!(b.stdout.contains("ferro.cmd="), "/proc/cmdline did not show our command line");
}

#[test]
fn linux_pvh_vmlinux_two_vcpus() {
    let b = boot("vmlinux", 2, "192M", "grep+-c+processor+/proc/cpuinfo");
    assert_booted(&b, 2, 192);
}

#[test]
fn linux_bzimage_64bit_boot_protocol() {
    let b = boot("bzImage", 1, "128M", "uname+-m");
    assert_booted(&b, 1, 128);
    assert!(b.stdout.contains("x86_64"));
}

#[test]
fn stock_debian_kernel_needs_hardware_kvm() {
    let kind = probe_host_kind();
    if !kind.is_hardware() {
        eprintln!(
            "skipped: /dev/kvm is backed by {} here; stock distro kernels need hardware KVM (kvm_intel/kvm_amd) because kvm-pvm interprets guest ring 0 and lacks cmpxchg16b/xsave/int3 (docs/kvm-pvm.md)",
            kind.module()
        );
        return;
    }
    let kernel = std::fs::read_dir("/boot")
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().contains("vmlinuz-") && p.to_string_lossy().contains("cloud")));
    let Some(kernel) = kernel else {
        panic!("hardware KVM present but no /boot/vmlinuz-*cloud*: apt-get install linux-image-cloud-amd64");
    };
    let dir = linux_dir();
    let out = ferro_command()
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["--memory", "512M", "--cmdline", "console=ttyS0 panic=-1 ferro.cmd=true"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FERRO-GUEST-UP"), "{stdout}");
    assert_eq!(out.status.code(), Some(0));
}
