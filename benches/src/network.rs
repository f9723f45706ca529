//! `ferro-bench network`: TCP throughput of Linux test guests through a Linux bridge, guest to
//! guest and guest to an "outside" host, under `ferro run` and under QEMU in the same run.
//!
//! - The network: a namespace the bench creates holds the bridge (10.88.0.1/24) with two taps,
//!   and routes (IP forwarding on in that namespace only) to an "outside" namespace behind a veth
//!   (203.0.113.2), which has a route back: the path a NAT network's packets take, without the
//!   address rewriting. Nothing touches the host's own interfaces.
//! - The guests: the Linux test guest (guests/linux), 128 MiB, one vCPU, virtio-net over
//!   virtio-mmio for both VMMs (`ferro run --transport mmio`; QEMU `-M microvm,acpi=on` with
//!   `virtio-net-device`, its tap backend without vhost: there is no /dev/vhost-net here).
//!   Guest `b` listens with busybox `nc`; guest `a` sends 256 KiB of zeros to `b` and then to a
//!   TCP receiver the bench runs in the outside namespace (`dd ... | nc`).
//! - Figures: guest to guest from the sender's clock (/proc/uptime before and after `dd | nc`,
//!   which ends once TCP has taken every byte); guest to outside from the receiver's own clock,
//!   first byte to end of stream. Both in KB/s (10^3 bytes), with ours / QEMU's.
//!
//! On kvm-pvm every guest kernel instruction is interpreted (docs/kvm-pvm.md), so these figures
//! measure the guest's network stack far more than the VMM's device; the ratio is what compares.

use crate::common::{QEMU_CPU, median, qemu_bin};
use ferro_test_support::net::{Netns, namespace};
use ferro_test_support::vm::{linux_cmdline, linux_dir};
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OUTSIDE: &str = "203.0.113.2";
const PORT: u16 = 7777;
/// 64 KiB blocks: 256 KiB per transfer (the interpreted guest kernel moves a few KB/s).
const BLOCKS: u32 = 4;
const BOOT_LIMIT_SECS: u32 = 600;

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Ferro,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferro => "ferro run",
            Vmm::Qemu => "qemu microvm",
        }
    }
}

/// The guests' shell (the guest's /init runs `ferro.cmd=` with '+' for spaces).
fn guest_cmd(script: &str) -> String {
    script.split_whitespace().collect::<Vec<_>>().join("+")
}

fn sender_script() -> String {
    guest_cmd(&format!(
        "ip link set eth0 up ; ip addr add 10.88.0.2/24 dev eth0 ; ip route add default via 10.88.0.1 ;
         for i in $(seq 120) ; do ping -c 1 -W 1 10.88.0.3 > /dev/null && break ; done ; sleep 2 ;
         read T0 X < /proc/uptime ; dd if=/dev/zero bs=65536 count={BLOCKS} 2> /dev/null | nc 10.88.0.3 {PORT} ;
         read T1 X < /proc/uptime ; echo G2G $T0 $T1 ;
         dd if=/dev/zero bs=65536 count={BLOCKS} 2> /dev/null | nc {OUTSIDE} {PORT} ; echo G2O done"
    ))
}

fn receiver_script() -> String {
    guest_cmd(&format!("ip link set eth0 up ; ip addr add 10.88.0.3/24 dev eth0 ; nc -l -p {PORT} > /dev/null ; sleep 600"))
}

/// One guest on `tap` under `vmm`, in the namespace `ns`, its console on stdout.
fn spawn_guest(vmm: Vmm, ns: &Netns, qemu: &Path, tap: &str, mac: &str, script: &str) -> Child {
    let dir = linux_dir();
    let cmdline = format!("{} ferro.cmd={script}", linux_cmdline());
    let mut c = Command::new("timeout");
    c.arg(BOOT_LIMIT_SECS.to_string()).args(["ip", "netns", "exec", ns.name()]);
    match vmm {
        Vmm::Ferro => {
            c.arg(crate::common::ferro_bin()).args(["run", "--memory", "128M", "--transport", "mmio", "--net", &format!("tap={tap},mac={mac}"), "--kernel"]);
            c.arg(dir.join("vmlinux")).arg("--initrd").arg(dir.join("initramfs.cpio")).arg("--cmdline").arg(cmdline);
        }
        Vmm::Qemu => {
            c.arg(qemu).args(["-accel", "kvm", "-M", "microvm,acpi=on", "-cpu", QEMU_CPU, "-m", "128", "-smp", "1"]);
            c.args(["-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none", "-nodefaults"]);
            c.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"), "-device", &format!("virtio-net-device,netdev=n0,mac={mac}")]);
            c.arg("-kernel").arg(dir.join("vmlinux")).arg("-initrd").arg(dir.join("initramfs.cpio")).arg("-append").arg(cmdline);
        }
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn the guest")
}

/// Bytes per second of one transfer from the guest's "G2G <uptime before> <uptime after>" line
/// (/proc/uptime: 10 ms steps, far below the transfer's seconds).
fn guest_rate(line: &str) -> Option<f64> {
    let mut t = line.split_whitespace().map(|w| w.parse::<f64>());
    let (start, end) = (t.next()?.ok()?, t.next()?.ok()?);
    (end > start).then_some(f64::from(BLOCKS) * 65536.0 / (end - start))
}

/// Accepts one connection in `outside` and reads it to the end: bytes per second from the first
/// byte to the end of the stream.
fn outside_receiver(outside: &Netns) -> std::thread::JoinHandle<Option<f64>> {
    let listener = outside.enter(|| TcpListener::bind((OUTSIDE, PORT)).expect("listen in the outside namespace"));
    std::thread::spawn(move || {
        listener.set_nonblocking(false).ok()?;
        let (mut s, _) = listener.accept().ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        let mut buf = vec![0u8; 1 << 16];
        let n = s.read(&mut buf).ok()?;
        let first = Instant::now();
        let mut total = n as u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return None,
            }
        }
        Some((total - n as u64) as f64 / first.elapsed().as_secs_f64())
    })
}

/// One measurement under `vmm`: (guest to guest, guest to outside) in bytes per second.
fn measure(vmm: Vmm, host: &Netns, outside: &Netns, qemu: &Path) -> (f64, f64) {
    let receiver = outside_receiver(outside);
    let mut b = spawn_guest(vmm, host, qemu, "fbtb", "52:54:00:88:00:03", &receiver_script());
    let a = spawn_guest(vmm, host, qemu, "fbta", "52:54:00:88:00:02", &sender_script());
    eprintln!("network: {} guests started", vmm.name());
    let out = a.wait_with_output().expect("wait for the sender");
    let text = String::from_utf8_lossy(&out.stdout);
    // SIGTERM to `timeout`, which passes it on to the VMM (a SIGKILL would stop only `timeout`).
    // SAFETY: kill(2) on our own child's pid with a signal number.
    unsafe { libc::kill(b.id() as libc::pid_t, libc::SIGTERM) };
    let _ = b.wait();
    let line = |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key).map(str::to_owned));
    let g2g = line("G2G ").and_then(|l| guest_rate(&l)).unwrap_or_else(|| panic!("{}: no guest-to-guest figure from the sender:\n{text}", vmm.name()));
    line("G2O ").unwrap_or_else(|| panic!("{}: the sender never sent to the outside:\n{text}", vmm.name()));
    let g2o = receiver.join().expect("receiver thread").unwrap_or_else(|| panic!("{}: the outside receiver got no stream", vmm.name()));
    (g2g, g2o)
}

/// host: bridge br0 with taps fbta and fbtb, uplink to outside; outside routes back to the bridge.
fn network() -> (Netns, Netns) {
    let host = namespace("bnhost");
    let outside = namespace("bnout");
    host.ip(&["link", "add", "br0", "type", "bridge"]);
    host.ip(&["addr", "add", "10.88.0.1/24", "dev", "br0"]);
    host.ip(&["link", "set", "br0", "up"]);
    for tap in ["fbta", "fbtb"] {
        host.ip(&["tuntap", "add", "mode", "tap", "name", tap]);
        host.ip(&["link", "set", tap, "master", "br0", "up"]);
    }
    host.ip(&["link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", outside.name()]);
    host.ip(&["addr", "add", "203.0.113.1/24", "dev", "uplink"]);
    host.ip(&["link", "set", "uplink", "up"]);
    outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);
    outside.ip(&["route", "add", "10.88.0.0/24", "via", "203.0.113.1"]);
    let fwd = host.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]).status().expect("sysctl");
    assert!(fwd.success(), "could not enable forwarding in the bench's namespace");
    (host, outside)
}

pub fn run(runs: usize) {
    let Some(qemu) = qemu_bin() else {
        println!("network: no QEMU peer (scripts/qemu-peer.sh failed); nothing to compare against");
        return;
    };
    let (host, outside) = network();
    println!("network: TCP through a Linux bridge, Linux test guests (128 MiB, 1 vCPU, virtio-mmio), 256 KiB per transfer, median of {runs}");
    let mut results = Vec::new();
    for vmm in [Vmm::Ferro, Vmm::Qemu] {
        let samples: Vec<(f64, f64)> = (0..runs).map(|_| measure(vmm, &host, &outside, &qemu)).collect();
        let g2g = median(samples.iter().map(|s| s.0).collect());
        let g2o = median(samples.iter().map(|s| s.1).collect());
        println!("  {:<14} guest->guest {:8.1} KB/s   guest->outside {:8.1} KB/s", vmm.name(), g2g / 1e3, g2o / 1e3);
        results.push((g2g, g2o));
    }
    println!("  ratio ferro/qemu: guest->guest {:.2}, guest->outside {:.2} (above 1: ours is faster)", results[0].0 / results[1].0, results[0].1 / results[1].1);
}
