//! Tier 2 with devices: the Linux test guest uses its real virtio drivers on our devices, one
//! boot per transport (each boot takes tens of seconds on kvm-pvm, so one boot checks many
//! things): it mounts an ext4 filesystem on the virtio disk and writes a file the test then
//! finds in the image; pings the host side of a tap in a network namespace the test creates;
//! reads /dev/hwrng; writes to the virtio console, which the test reads on its socket; and its
//! balloon driver takes memory as the balloon's initial size asks.

use ferro_test_support::net::Netns;
use ferro_test_support::vm::linux_run;
use ferro_test_support::{TempDir, run_ok};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BOOT_LIMIT_SECS: u32 = 400;

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
    let scratch = TempDir::new(&format!("linux-virtio-{transport}"));
    let disk = scratch.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", disk.to_str().unwrap()]);
    let console_sock = scratch.join("console.sock");
    let ns = Netns::with_tap(&format!("lx-{transport}"), "tap0", Some("10.0.0.1/24"));
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
    let console = read_console(console_sock.clone());
    let start = Instant::now();
    let out = linux_run(BOOT_LIMIT_SECS, &["ip", "netns", "exec", ns.name()], "vmlinux", &guest_cmd)
        .args(["--memory", "192M", "--transport", transport, "--rng", "--net", "tap=tap0", "--balloon", "size=32"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--console")
        .arg(format!("socket={}", console_sock.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{transport}: {:.1} s, status {:?}\n{stdout}\n{}", start.elapsed().as_secs_f64(), out.status.code(), String::from_utf8_lossy(&out.stderr));

    assert!(stdout.contains("FERRO-GUEST-UP"), "never reached userspace");
    assert!(stdout.contains("DISK-OK"), "ext4 on the virtio disk failed");
    let file = run_ok("debugfs", &["-R", "cat /ferro.txt", disk.to_str().unwrap()]);
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
}

#[test]
fn linux_drivers_on_virtio_mmio() {
    boot_with_devices("mmio");
}

#[test]
fn linux_drivers_on_virtio_pci() {
    boot_with_devices("pci");
}

