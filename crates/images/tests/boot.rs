//! Finding a disk's own kernel on disks made by the real tools (sfdisk, mkfs.ext4 -d, qemu-img),
//! with each boot loader layout, and refusing hostile disks with an error instead of a panic.

use ferro_block::Format;
use ferro_images::boot;
use ferro_images::partitions::{self, Layout};
use ferro_test_support::{TempDir, run_ok};
use std::os::unix::fs::symlink;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A staging tree for `mkfs.ext4 -d`, with a fake kernel and initrd whose bytes we can check.
fn stage(s: &TempDir, name: &str, files: &[(&str, &[u8])], links: &[(&str, &str)]) -> std::path::PathBuf {
    let root = s.join(name);
    for (path, data) in files {
        let f = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, data).expect("write staged file");
    }
    for (link, target) in links {
        let l = root.join(link.trim_start_matches('/'));
        std::fs::create_dir_all(l.parent().expect("parent")).expect("mkdir");
        symlink(target, &l).expect("symlink");
    }
    root
}

/// An ext4 filesystem image of `mib` MiB made from a staging tree.
fn ext4(s: &TempDir, tree: &Path, mib: u64) -> std::path::PathBuf {
    let img = tree.with_extension("ext4");
    std::fs::File::create(&img).and_then(|f| f.set_len(mib * MIB)).expect("fs image");
    run_ok("mkfs.ext4", &["-q", "-F", "-d", p(tree), p(&img)]);
    let _ = s;
    img
}

/// A disk with `label` (gpt or dos) whose partitions (sfdisk lines) are filled from `fills`.
fn disk(s: &TempDir, name: &str, label: &str, size_mib: u64, parts: &[&str], fills: &[(u64, &Path)]) -> std::path::PathBuf {
    let img = s.join(name);
    std::fs::File::create(&img).and_then(|f| f.set_len(size_mib * MIB)).expect("disk image");
    let script = format!("label: {label}\n{}\n", parts.join("\n"));
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", p(&img)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run sfdisk (fdisk package; scripts/setup.sh installs it)");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes()).expect("sfdisk script");
    assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
    for (start_mib, fs) in fills {
        run_ok("dd", &[&format!("if={}", p(fs)), &format!("of={}", p(&img)), "bs=1M", &format!("seek={start_mib}"), "conv=notrunc,sparse", "status=none"]);
    }
    img
}

const KERNEL: &[u8] = b"not really a kernel, but its bytes are checked";
const INITRD: &[u8] = b"an initrd";

#[test]
fn debian_links_on_a_gpt_root_partition_also_through_qcow2() {
    let s = TempDir::new("img-boot-links");
    let tree = stage(
        &s,
        "root",
        &[("/boot/vmlinuz-6.1.0-9-amd64", KERNEL), ("/boot/initrd.img-6.1.0-9-amd64", INITRD), ("/etc/hostname", b"x\n")],
        &[("/vmlinuz", "boot/vmlinuz-6.1.0-9-amd64"), ("/initrd.img", "boot/initrd.img-6.1.0-9-amd64")],
    );
    let fs = ext4(&s, &tree, 16);
    let img = disk(&s, "disk.raw", "gpt", 20, &["start=1MiB, size=1MiB, type=21686148-6449-6E6F-744E-656564454649", "start=2MiB, size=16MiB, type=linux"], &[(2, &fs)]);
    let mut d = ferro_block::open(&img, Some(Format::Raw), true).expect("open");
    let Layout::Gpt(parts) = partitions::read_layout(d.as_mut()).expect("layout") else { panic!("not GPT") };
    assert_eq!(parts.iter().map(|p| (p.number, p.start, p.size)).collect::<Vec<_>>(), [(1, MIB, MIB), (2, 2 * MIB, 16 * MIB)]);
    let sfdisk = run_ok("sfdisk", &["--json", p(&img)]);
    let guid = parts[1].guid.clone().expect("guid");
    assert!(sfdisk.to_lowercase().contains(&guid), "sfdisk names partition 2 {guid}: {sfdisk}");

    // Through qcow2: the block layer reads the partition table and the filesystem.
    let qcow2 = s.join("disk.qcow2");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", p(&img), p(&qcow2)]);
    let out = s.join("out");
    std::fs::create_dir(&out).expect("out dir");
    let e = boot::extract(&qcow2, None, &out).expect("kernel found");
    assert_eq!(std::fs::read(&e.kernel).expect("kernel"), KERNEL);
    assert_eq!(std::fs::read(e.initrd.as_ref().expect("initrd")).expect("initrd"), INITRD);
    assert_eq!(e.cmdline, format!("root=PARTUUID={guid} ro console=ttyS0"));
    assert_eq!(e.source, "link /vmlinuz on partition 2");
}

#[test]
fn bls_entries_win_and_the_newest_is_taken() {
    let s = TempDir::new("img-boot-bls");
    let entry = |v: &str| format!("title Fedora ({v})\nversion {v}\nlinux /vmlinuz-{v}\ninitrd /initramfs-{v}.img\noptions root=UUID=f00d ro $tuned\n");
    let (a, b) = (entry("6.5.6-300.fc39.x86_64"), entry("6.10.2-100.fc39.x86_64"));
    // A separate /boot partition: paths at its root, as Fedora writes them.
    let tree = stage(
        &s,
        "boot",
        &[
            ("/loader/entries/aaa-6.5.6.conf", a.as_bytes()),
            ("/loader/entries/aaa-6.10.2.conf", b.as_bytes()),
            ("/vmlinuz-6.5.6-300.fc39.x86_64", b"old"),
            ("/initramfs-6.5.6-300.fc39.x86_64.img", b"old"),
            ("/vmlinuz-6.10.2-100.fc39.x86_64", KERNEL),
            ("/initramfs-6.10.2-100.fc39.x86_64.img", INITRD),
            ("/grub2/grubenv", b"# GRUB Environment Block\ntuned=skew_tick=1\n"),
            ("/grub2/grub.cfg", b"menuentry 'never' {\nlinux /vmlinuz-6.5.6-300.fc39.x86_64\n}\n"),
        ],
        &[],
    );
    let fs = ext4(&s, &tree, 8);
    let img = disk(&s, "disk.raw", "dos", 12, &["start=1MiB, size=8MiB, type=83, bootable"], &[(1, &fs)]);
    let found = boot::find(&img, Some(Format::Raw)).expect("found");
    assert_eq!(found.kernel, "/vmlinuz-6.10.2-100.fc39.x86_64");
    assert_eq!(found.cmdline, "root=UUID=f00d ro skew_tick=1 console=ttyS0");
    assert_eq!(found.source, "BLS entry /loader/entries/aaa-6.10.2.conf on partition 1");
}

#[test]
fn grub_default_entry_on_a_root_filesystem_without_a_table() {
    let s = TempDir::new("img-boot-grub");
    let cfg = "set default=\"1\"\nmenuentry 'Debian' {\n\tlinux /boot/vmlinuz-a root=/dev/vda ro quiet\n\tinitrd /boot/initrd-a\n}\n\
               menuentry 'Debian rescue' {\n\tlinux /boot/vmlinuz-b root=/dev/vda ro single console=hvc0\n\tinitrd /boot/ucode /boot/initrd-b\n}\n";
    let tree = stage(
        &s,
        "root",
        &[("/boot/grub/grub.cfg", cfg.as_bytes()), ("/boot/vmlinuz-b", KERNEL), ("/boot/ucode", b"UCODE"), ("/boot/initrd-b", INITRD)],
        &[],
    );
    let img = ext4(&s, &tree, 8);
    let out = s.join("out");
    std::fs::create_dir(&out).expect("out");
    let e = boot::extract(&img, Some(Format::Raw), &out).expect("found");
    assert_eq!(e.source, "default entry of /boot/grub/grub.cfg on the whole disk");
    assert_eq!(e.cmdline, "root=/dev/vda ro single console=hvc0");
    assert_eq!(std::fs::read(e.initrd.expect("initrd")).expect("initrd"), [b"UCODE".as_slice(), INITRD].concat(), "initrds are concatenated");
}

#[test]
fn no_kernel_says_what_was_looked_at() {
    let s = TempDir::new("img-boot-none");
    let tree = stage(&s, "root", &[("/boot/grub/grub.cfg", b"menuentry 'x' {\n linux /boot/gone\n}\n"), ("/etc/os-release", b"ID=x\n")], &[]);
    let fs = ext4(&s, &tree, 8);
    let blank = s.join("blank");
    std::fs::write(&blank, vec![0u8; MIB as usize]).expect("blank");
    let img = disk(&s, "disk.raw", "gpt", 12, &["start=1MiB, size=1MiB", "start=2MiB, size=8MiB"], &[(2, &fs)]);
    let e = boot::find(&img, None).unwrap_err().to_string();
    assert!(e.contains("no kernel found (GPT"), "{e}");
    assert!(e.contains("partition 1: not ext2/3/4"), "{e}");
    assert!(e.contains("names kernel /boot/gone, which does not exist"), "{e}");
    let e = boot::find(&blank, None).unwrap_err().to_string();
    assert!(e.contains("no partition table") && e.contains("the whole disk: not ext2/3/4"), "{e}");
}

/// Rewrites the GPT header's CRC after a change, so only the change itself is wrong.
fn fix_header_crc(img: &mut [u8]) {
    let h = &mut img[512..1024];
    let size = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
    h[16..20].fill(0);
    let crc = crc32(&h[..size]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A change that makes a good disk hostile.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn hostile_disks_are_refused() {
    let s = TempDir::new("img-boot-hostile");
    let tree = stage(&s, "root", &[("/boot/x", b"x")], &[("/vmlinuz", "vmlinuz"), ("/boot/vmlinuz", "../boot/vmlinuz")]);
    let fs = ext4(&s, &tree, 8);
    let img = disk(&s, "disk.raw", "gpt", 12, &["start=1MiB, size=8MiB"], &[(1, &fs)]);
    // Symlinks that loop: no kernel, no hang, and the loops are named.
    let e = boot::find(&img, None).unwrap_err().to_string();
    assert!(e.contains("/boot/vmlinuz: more than 40 symbolic links") && e.contains(", /vmlinuz: more than 40 symbolic links"), "{e}");

    let good = std::fs::read(&img).expect("disk");
    let cases: Vec<(&str, Corruption, &str)> = vec![
        ("header crc", Box::new(|d| d[512 + 40] ^= 1), "GPT header checksum does not match"),
        ("entry crc", Box::new(|d| d[1024 + 40] ^= 1), "GPT entry array checksum does not match"),
        (
            "huge entry count",
            Box::new(|d| {
                d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
                fix_header_crc(d);
            }),
            "partition entries",
        ),
        (
            "entries past the end",
            Box::new(|d| {
                d[512 + 72..512 + 80].copy_from_slice(&(u64::MAX / 256).to_le_bytes());
                fix_header_crc(d);
            }),
            "GPT entry array",
        ),
        (
            "partition past the end",
            Box::new(|d| {
                d[1024 + 40..1024 + 48].copy_from_slice(&1_000_000u64.to_le_bytes());
                let crc = crc32(&d[1024..1024 + 128 * 128]);
                d[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
                fix_header_crc(d);
            }),
            "spans sectors",
        ),
        (
            "header size",
            Box::new(|d| {
                d[512 + 12..512 + 16].copy_from_slice(&4096u32.to_le_bytes());
            }),
            "GPT header size 4096",
        ),
    ];
    for (what, corrupt, expect) in cases {
        let mut d = good.clone();
        corrupt(&mut d);
        let bad = s.join("bad.raw");
        std::fs::write(&bad, &d).expect("write");
        let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
        assert!(e.contains(expect), "{what}: {e}");
    }

    // An MBR whose extended partition chain loops back on itself.
    let mut d = vec![0u8; 4 * MIB as usize];
    let entry = |d: &mut [u8], at: usize, kind: u8, start: u32, len: u32| {
        d[at + 4] = kind;
        d[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        d[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    };
    entry(&mut d, 446, 0x05, 2048, 4096);
    d[510..512].copy_from_slice(&[0x55, 0xaa]);
    // EBRs at sectors 2048+100 and 2048+200 (links are relative to the extended partition),
    // the second linking back to the first.
    entry(&mut d, 446 + 16, 0x00, 0, 0);
    let first = 2048 * 512;
    entry(&mut d, first + 446, 0x83, 64, 8);
    entry(&mut d, first + 446 + 16, 0x05, 100, 8);
    d[first + 510..first + 512].copy_from_slice(&[0x55, 0xaa]);
    for (at, link) in [(2148 * 512, 200), (2248 * 512, 100)] {
        entry(&mut d, at + 446, 0x83, 16, 8);
        entry(&mut d, at + 446 + 16, 0x05, link, 8);
        d[at + 510..at + 512].copy_from_slice(&[0x55, 0xaa]);
    }
    let bad = s.join("loop.raw");
    std::fs::write(&bad, &d).expect("write");
    let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains("extended partition chain loops back to sector 2148"), "{e}");
}

/// An ext4 superblock is whatever the guest wrote: one that claims more blocks than the disk
/// holds, or so many block groups that a descriptor for each would take gigabytes of ferrod's
/// memory, is refused by name before any group is read (the `disk_boot` fuzz target found the
/// allocation). The disks are sparse: the large one holds a few KiB.
#[test]
fn superblocks_claiming_more_than_the_disk_are_refused_before_reading_groups() {
    let s = TempDir::new("img-boot-groups");
    let tree = stage(&s, "root", &[("/boot/vmlinuz", KERNEL)], &[]);
    let img = ext4(&s, &tree, 8);
    let good = std::fs::read(&img).expect("fs image");
    assert!(boot::find(&img, Some(Format::Raw)).is_ok(), "the untouched file system boots");
    let set_u32 = |d: &mut Vec<u8>, at: usize, v: u32| d[1024 + at..1024 + at + 4].copy_from_slice(&v.to_le_bytes());

    // 2^40 blocks on an 8 MiB disk (the high half counts on a 64bit file system).
    let mut d = good.clone();
    let incompat = u32::from_le_bytes(d[1024 + 0x60..1024 + 0x64].try_into().expect("4 bytes"));
    set_u32(&mut d, 0x60, incompat | 0x80);
    set_u32(&mut d, 0x4, 0);
    set_u32(&mut d, 0x150, 1 << 8);
    let bad = s.join("too-many-blocks.raw");
    std::fs::write(&bad, &d).expect("write");
    let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains("superblock claims 1099511627776 blocks"), "{e}");

    // The same count without the 64bit feature: Linux would ignore the high half, ext4-view does
    // not, so it counts.
    set_u32(&mut d, 0x60, incompat & !0x80);
    let bad = s.join("high-half-without-64bit.raw");
    std::fs::write(&bad, &d).expect("write");
    let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains("superblock claims 1099511627776 blocks"), "{e}");

    // Blocks of 4 MiB (log 12): Linux stops at 64 KiB, ext4-view does not (a disk claiming 2^43
    // such blocks made it allocate 16 GiB for their groups: the fuzzer's find).
    let mut d = good.clone();
    set_u32(&mut d, 0x18, 12);
    let bad = s.join("huge-blocks.raw");
    std::fs::write(&bad, &d).expect("write");
    let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains("superblock claims blocks of 2^22 bytes"), "{e}");

    // 2^21 blocks that fit the (sparse) disk, one per group: 2^21 groups.
    let mut d = good;
    let block_size = 1024u64 << u32::from_le_bytes(d[1024 + 0x18..1024 + 0x1c].try_into().expect("4 bytes"));
    let blocks = 1u64 << 21;
    set_u32(&mut d, 0x4, 1 << 21);
    set_u32(&mut d, 0x150, 0);
    set_u32(&mut d, 0x20, 1);
    let bad = s.join("too-many-groups.raw");
    std::fs::write(&bad, &d).expect("write");
    std::fs::File::options().write(true).open(&bad).and_then(|f| f.set_len(blocks * block_size)).expect("sparse disk");
    let e = boot::find(&bad, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains(&format!("superblock claims {blocks} block groups")), "{e}");
}

/// A symbolic link's inode claims the size of its target, and ext4-view reads that much into
/// memory when it follows the link: a disk whose /boot/vmlinuz link claims a terabyte made
/// ferrod ask for a terabyte (found by the `disk_boot` fuzz target). Links are followed by
/// ferrod with their size checked: the same disk with the link's true size boots through it,
/// and the forged one is refused naming the link.
#[test]
fn a_link_claiming_a_huge_target_is_refused_before_it_is_read() {
    let s = TempDir::new("img-boot-link-size");
    // Longer than 59 bytes, so the target is kept in a data block, not in the inode.
    let target = "vmlinuz-6.1.0-9-amd64-with-a-name-long-enough-for-a-block-of-its-own";
    let tree = stage(&s, "root", &[(&format!("/boot/{target}"), KERNEL)], &[("/boot/vmlinuz", target)]);
    let img = ext4(&s, &tree, 8);
    let out = s.join("out");
    std::fs::create_dir(&out).expect("out dir");
    let e = boot::extract(&img, Some(Format::Raw), &out).expect("the kernel is found through its link");
    assert_eq!(std::fs::read(&e.kernel).expect("kernel"), KERNEL);
    assert_eq!(e.source, "link /boot/vmlinuz on the whole disk");

    run_ok("debugfs", &["-w", "-R", "sif /boot/vmlinuz size 0x10000000000", p(&img)]);
    let e = boot::find(&img, Some(Format::Raw)).unwrap_err().to_string();
    assert!(e.contains("/boot/vmlinuz: a symbolic link whose target claims 1099511627776 bytes"), "{e}");
}
