//! Tier 2 with devices: the Linux test guest uses its real virtio drivers on our devices, one
//! boot per transport (each boot takes tens of seconds on kvm-pvm, so one boot checks many
//! things): it mounts an ext4 filesystem on the virtio disk and writes a file the test then
//! finds in the image; pings the host side of a tap in a network namespace the test creates;
//! reads /dev/hwrng; writes to the virtio console, which the test reads on its socket; and its
//! balloon driver takes memory as the balloon's initial size asks.

mod common;

use common::{linux_cmdline, linux_dir};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT_LIMIT_SECS: u32 = 400;

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A network namespace holding a tap with the host address; deleted with the tap on drop.
struct Netns(String);

impl Netns {
    fn with_tap(tag: &str) -> Netns {
        let ns = Netns(format!("ferro-lx-{tag}-{}", std::process::id()));
        run("ip", &["netns", "add", &ns.0]);
        run("ip", &["-n", &ns.0, "tuntap", "add", "tap0", "mode", "tap"]);
        run("ip", &["-n", &ns.0, "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
        run("ip", &["-n", &ns.0, "link", "set", "tap0", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Collects what the guest writes to its virtio console, from the VMM's console socket.
fn read_console(path: PathBuf) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut stream = loop {
            if let Ok(s) = UnixStream::connect(&path) {
                break s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return String::new();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut text = Vec::new();
        let _ = stream.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    })
}

fn mem_kb(line_prefix: &str, out: &str) -> Option<u64> {
    out.lines().filter_map(|l| l.strip_prefix(line_prefix)).filter_map(|v| v.split_whitespace().next()?.parse().ok()).next_back()
}

fn boot_with_devices(transport: &str) {
    let dir = linux_dir();
    let scratch = std::env::temp_dir().join(format!("ferro-lxv-{transport}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let disk = scratch.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    run("mkfs.ext4", &["-q", "-F", disk.to_str().unwrap()]);
    let console_sock = scratch.join("console.sock");
    let ns = Netns::with_tap(transport);
    let guest_cmd = [
        "mount+-t+ext4+/dev/vda+/mnt&&echo+linux-wrote-this>/mnt/ferro.txt&&umount+/mnt&&echo+DISK-OK",
        "ip+link+set+eth0+up",
        "ip+addr+add+10.0.0.2/24+dev+eth0",
        "ping+-c+2+-W+10+10.0.0.1",
        "echo+RNG:$(timeout+30+head+-c+16+/dev/hwrng|od+-An+-tx1)",
        "echo+hvc-hello>/dev/hvc0",
        "ls+/sys/bus/virtio/devices",
        "sleep+4",
        "grep+MemTotal+/proc/meminfo",
    ]
    .join(";");
    let cmdline = format!("{} ferro.cmd={guest_cmd}", linux_cmdline());
    let console = read_console(console_sock.clone());
    let start = Instant::now();
    let out = Command::new("timeout")
        .arg(BOOT_LIMIT_SECS.to_string())
        .args(["ip", "netns", "exec", &ns.0, env!("CARGO_BIN_EXE_ferro"), "run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["--memory", "192M", "--transport", transport, "--rng", "--net", "tap=tap0", "--balloon", "size=32"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--console")
        .arg(format!("socket={}", console_sock.display()))
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{transport}: {:.1} s, status {:?}\n{stdout}\n{}", start.elapsed().as_secs_f64(), out.status.code(), String::from_utf8_lossy(&out.stderr));

    assert!(stdout.contains("FERRO-GUEST-UP"), "never reached userspace");
    assert!(stdout.contains("DISK-OK"), "ext4 on the virtio disk failed");
    let file = run("debugfs", &["-R", "cat /ferro.txt", disk.to_str().unwrap()]);
    assert_eq!(file.trim(), "linux-wrote-this", "the file the guest wrote is not in the image");
    assert!(stdout.contains("2 packets received"), "ping through the tap failed");
    let rng_line = stdout.lines().find(|l| l.starts_with("RNG:")).expect("no RNG line");
    assert_eq!(rng_line.split_whitespace().count(), 17, "16 bytes from /dev/hwrng: {rng_line}");
    let devices = stdout.lines().filter(|l| l.contains("virtio")).flat_map(|l| l.split_whitespace()).filter(|w| w.starts_with("virtio")).count();
    assert!(devices >= 5, "expected 5 virtio devices in /sys/bus/virtio/devices");
    // The driver inflates to the initial size right after it probes, taking the pages out of
    // MemTotal. Without a balloon MemTotal is RAM minus ~14 MiB (the kernel) here, so a value
    // below RAM - 32 MiB + 2 MiB means the balloon holds its 32 MiB.
    let mem_total = mem_kb("MemTotal:", &stdout).expect("MemTotal");
    assert!(mem_total < (192 - 32 + 2) * 1024, "the balloon took no memory: MemTotal {mem_total} kB of 192 MiB");
    assert!(stdout.contains("FERRO-POWEROFF"));
    assert_eq!(out.status.code(), Some(0));
    assert!(console.join().unwrap().contains("hvc-hello"), "nothing arrived on the virtio console socket");
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn linux_drivers_on_virtio_mmio() {
    boot_with_devices("mmio");
}

#[test]
fn linux_drivers_on_virtio_pci() {
    boot_with_devices("pci");
}

