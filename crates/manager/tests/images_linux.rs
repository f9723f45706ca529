//! VMs from a real distribution disk: a Debian root filesystem made by debootstrap with
//! linux-image-amd64 (guests/debian/build.sh, cached) in an ext4 partition of a GPT disk.
//!
//! - The disk's own boot files are found (Debian's /vmlinuz and /initrd.img links) and are the
//!   bytes of the installed kernel package.
//! - The same disk with our Linux test kernel installed in /boot and named by a grub.cfg (a stock
//!   Debian kernel does not boot on kvm-pvm, docs/kvm-pvm.md) boots to userspace under ferrod with
//!   `[boot] from = "disk"` from a qcow2 volume, and in that one boot the guest reads the
//!   cloud-init seed's meta-data and the Debian root filesystem.

use ferro_test_support::daemon::{Daemon, Home, read_console};
use ferro_test_support::vm::{linux_cmdline, linux_dir};
use ferro_test_support::{TempDir, run_ok, wait_for};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Far above the ~30-60 s a boot takes here, so only a hang reaches it.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The cached debootstrap root filesystem (built on first use: a few minutes).
fn debian_rootfs() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/debian/build.sh");
    let out = std::process::Command::new(&script).output().expect("run guests/debian/build.sh");
    assert!(out.status.success(), "guests/debian/build.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let dir = String::from_utf8_lossy(&out.stdout).lines().last().expect("build.sh prints its directory").to_string();
    PathBuf::from(dir).join("rootfs.ext4")
}

/// A GPT disk with a 1 MiB BIOS boot partition and `fs` as partition 2 (Debian's layout).
fn gpt_disk(fs: &Path, disk: &Path) {
    let fs_len = std::fs::metadata(fs).expect("fs").len();
    std::fs::File::create(disk).and_then(|f| f.set_len(fs_len + 3 * MIB)).expect("disk");
    let script = format!(
        "label: gpt\nstart=1MiB, size=1MiB, type=21686148-6449-6E6F-744E-656564454649\nstart=2MiB, size={}KiB, type=linux\n",
        fs_len / 1024
    );
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", p(disk)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run sfdisk (scripts/setup.sh installs fdisk)");
    child.stdin.as_mut().expect("stdin").write_all(script.as_bytes()).expect("sfdisk script");
    assert!(child.wait().expect("sfdisk").success());
    run_ok("dd", &[&format!("if={}", p(fs)), &format!("of={}", p(disk)), "bs=4M", "seek=2097152", "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"]);
}

fn debugfs(fs: &Path, commands: &str) -> String {
    let cmds = fs.with_extension("debugfs");
    std::fs::write(&cmds, commands).expect("debugfs commands");
    run_ok("debugfs", &["-w", "-f", p(&cmds), p(fs)])
}

/// The installed kernel package's version, from the names in /boot.
fn debian_kernel_version(fs: &Path) -> String {
    let listing = run_ok("debugfs", &["-R", "ls /boot", p(fs)]);
    listing
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vmlinuz-"))
        .unwrap_or_else(|| panic!("no vmlinuz-* in /boot: {listing}"))
        .to_string()
}

#[test]
fn debian_disk_kernel_is_found_and_our_kernel_boots_from_it_with_a_cloud_init_seed() {
    let rootfs = debian_rootfs();
    let s = TempDir::new("images-linux");

    // 1. Debian as debootstrap left it: the links name the kernel package's files.
    let disk = s.join("debian.raw");
    gpt_disk(&rootfs, &disk);
    let version = debian_kernel_version(&rootfs);
    let out = s.join("found");
    std::fs::create_dir(&out).expect("dir");
    let found = ferro_images::boot::extract(&disk, None, &out).expect("the Debian kernel is found");
    assert_eq!(found.source, "link /vmlinuz on partition 2");
    let want = s.join("want-vmlinuz");
    run_ok("debugfs", &["-R", &format!("dump /boot/vmlinuz-{version} {}", p(&want)), p(&rootfs)]);
    assert!(std::fs::read(&found.kernel).expect("kernel") == std::fs::read(&want).expect("dumped"), "kernel bytes");
    run_ok("debugfs", &["-R", &format!("dump /boot/initrd.img-{version} {}", p(&want)), p(&rootfs)]);
    assert!(std::fs::read(found.initrd.as_ref().expect("initrd")).expect("initrd") == std::fs::read(&want).expect("dumped"), "initrd bytes");
    assert!(found.cmdline.starts_with("root=PARTUUID=") && found.cmdline.ends_with(" ro console=ttyS0"), "{}", found.cmdline);
    std::fs::remove_file(&disk).expect("rm");

    // 2. The same filesystem with our test kernel installed and a grub.cfg naming it.
    let ours = s.join("ours.ext4");
    run_ok("cp", &["--sparse=always", p(&rootfs), p(&ours)]);
    let linux = linux_dir();
    let grub = format!(
        "set default=\"0\"\nmenuentry 'Debian with the Ferrovisor test kernel' {{\n\tlinux /boot/vmlinuz-ferro-test root=/dev/vda2 ro {}\n\tinitrd /boot/initrd.img-ferro-test\n}}\n\
         menuentry 'Debian GNU/Linux' {{\n\tlinux /boot/vmlinuz-{version} root=/dev/vda2 ro quiet\n\tinitrd /boot/initrd.img-{version}\n}}\n",
        linux_cmdline()
    );
    let grub_file = s.join("grub.cfg");
    std::fs::write(&grub_file, grub).expect("grub.cfg");
    debugfs(
        &ours,
        &format!(
            "write {} /boot/vmlinuz-ferro-test\nwrite {} /boot/initrd.img-ferro-test\nmkdir /boot/grub\nwrite {} /boot/grub/grub.cfg\n",
            p(&linux.join("bzImage")),
            p(&linux.join("initramfs.cpio")),
            p(&grub_file)
        ),
    );
    let raw = s.join("ours.raw");
    gpt_disk(&ours, &raw);
    std::fs::remove_file(&ours).expect("rm");
    let qcow2 = s.join("ours.qcow2");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", p(&raw), p(&qcow2)]);
    std::fs::remove_file(&raw).expect("rm");

    let home = Home::new("images-linux");
    let d = Daemon::start(&home);
    let api = d.api();
    let guest_cmd = "mount+-t+vfat+-o+ro+/dev/vdb+/mnt&&cat+/mnt/meta-data&&cat+/mnt/user-data&&mount+-t+ext4+-o+ro+/dev/vda2+/root&&echo+DEBIAN-$(cat+/root/etc/debian_version)";
    let toml = format!(
        "name = \"deb\"\nmemory = \"256M\"\n[boot]\nfrom = \"disk\"\ncmdline = \"ferro.cmd={guest_cmd}\"\n\
         [[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n[cloud_init]\nuser_data = \"#cloud-config\\nhostname: deb\\n\"\n",
        p(&qcow2)
    );
    api.expect("POST", "/v1/domains", Some(&toml), 201);
    let started = api.expect("POST", "/v1/domains/deb/start", None, 200);
    let run_dir = PathBuf::from(started["log"].as_str().expect("log path")).parent().expect("run dir").to_path_buf();
    let uuid = started["uuid"].as_str().expect("uuid").to_string();
    let mut console = d.console("deb");
    let text = read_console(&mut console, "FERRO-POWEROFF", BOOT_LIMIT);
    eprintln!("{text}");
    assert!(text.contains("FERRO-GUEST-UP"), "never reached userspace");
    assert!(text.contains(&format!("instance-id: {uuid}")) && text.contains("local-hostname: deb"), "meta-data read in the guest");
    assert!(text.contains("hostname: deb"), "user-data read in the guest");
    assert!(text.lines().any(|l| l.starts_with("DEBIAN-12.")), "the guest mounted Debian's root partition from the qcow2 volume");
    assert!(text.contains("FERRO-CMD-RC 0"), "the guest command failed");
    wait_for("the domain to shut off", Duration::from_secs(30), || api.expect("GET", "/v1/domains/deb", None, 200)["state"] == "shutoff");

    // The kernel ferrod booted is the one grub.cfg names, copied out of the qcow2 volume.
    assert!(std::fs::read(run_dir.join("kernel")).expect("kernel") == std::fs::read(linux.join("bzImage")).expect("bzImage"));
    assert!(run_dir.join("cidata.img").is_file(), "the seed lives in the run directory");
    api.expect("DELETE", "/v1/domains/deb", None, 204);
    assert!(!run_dir.join("cidata.img").exists(), "the seed is removed with the domain");
}
