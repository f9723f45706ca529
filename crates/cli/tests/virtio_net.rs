//! virtio-net through a real tap inside a network namespace the test creates (and always
//! deletes): the `virtio` test guest ARPs for the host side of the tap and pings it, the host
//! kernel answers, and a raw AF_PACKET socket in the namespace sees the frames cross the tap.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";

/// A network namespace, deleted (with every interface in it) when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("ferro-net-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    /// Runs `ip -n <ns> args`, asserting success.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn link_exists(&self, dev: &str) -> bool {
        Command::new("ip").args(["-n", &self.0, "link", "show", dev]).output().is_ok_and(|o| o.status.success())
    }

    fn mac_of(&self, dev: &str) -> String {
        let out = self.ip(&["-o", "link", "show", dev]);
        let at = out.find("link/ether ").expect("an ethernet link") + "link/ether ".len();
        out[at..at + 17].to_owned()
    }

    /// The ferro command line, run inside the namespace so its tap lives there.
    fn ferro(&self, transport: &str, tap_opts: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_ferro")]);
        c.args(["run", "--guest", "virtio", "--memory", "64M", "--transport", transport, "--net", tap_opts]);
        c.args(["--cmdline", &format!("net.ip={HOST_IP} net.me={GUEST_IP}")]);
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A raw socket that sees every frame crossing `dev` (both directions) in namespace `ns`.
fn capture(ns: &Netns, dev: &str) -> OwnedFd {
    let (ns_path, dev) = (format!("/run/netns/{}", ns.0), CString::new(dev).unwrap());
    // setns changes only the calling thread; the socket stays in the namespace it was made in.
    std::thread::spawn(move || {
        let ns_file = std::fs::File::open(&ns_path).expect("open the namespace");
        // SAFETY: plain syscalls on fds we own and a NUL-terminated name; every result is checked.
        unsafe {
            assert_eq!(libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, (libc::ETH_P_ALL as u16).to_be() as i32);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let sock = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
            assert!(addr.sll_ifindex > 0, "no interface {dev:?}");
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0, "bind: {}", std::io::Error::last_os_error());
            sock
        }
    })
    .join()
    .expect("capture thread")
}

/// Every frame the capture socket holds.
fn captured(sock: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut file = std::fs::File::from(sock.try_clone().unwrap());
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = file.read(&mut buf) {
        frames.push(buf[..n].to_vec());
    }
    frames
}

fn parse_mac(s: &str) -> Vec<u8> {
    s.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

/// The guest MAC the `virtio` guest printed.
fn guest_mac(out: &str) -> String {
    let at = out.find("virtio-net: mac ").expect("the guest printed its MAC") + "virtio-net: mac ".len();
    out[at..at + 17].to_owned()
}

fn assert_guest_talked_to_host(o: &Output, host_mac: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("link up"), "{out}");
    assert!(out.contains(&format!("virtio-net: arp reply: {HOST_IP} is at {host_mac}")), "{out}");
    assert!(out.contains(&format!("virtio-net: icmp echo reply from {HOST_IP}, 32 bytes payload intact")), "{out}");
    assert!(out.contains("virtio: all devices passed"), "{out}");
    out
}

#[test]
fn guest_arps_and_pings_the_host_through_an_existing_tap_on_mmio() {
    arp_and_ping_through_an_existing_tap("mmio");
}

#[test]
fn guest_arps_and_pings_the_host_through_an_existing_tap_on_pci() {
    arp_and_ping_through_an_existing_tap("pci");
}

fn arp_and_ping_through_an_existing_tap(transport: &str) {
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", "ftap0", "mode", "tap"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "ftap0"]);
    ns.ip(&["link", "set", "ftap0", "up"]);
    let host_mac = ns.mac_of("ftap0");
    let sock = capture(&ns, "ftap0");

    let o = ns.ferro(transport, "tap=ftap0").output().expect("run ferro");
    let out = assert_guest_talked_to_host(&o, &host_mac);
    let mac = parse_mac(&guest_mac(&out));
    assert_eq!(mac[0] & 3, 2, "generated MACs are local unicast: {out}");

    // On the host side of the tap: the guest's ARP request for the host address, and the
    // guest's ICMP echo request, both from the guest's MAC.
    let frames = captured(&sock);
    let from_guest = |f: &&Vec<u8>| f.len() >= 42 && f[6..12] == mac[..];
    let arp = frames.iter().filter(from_guest).any(|f| f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == [10, 0, 0, 1]);
    let echo = frames.iter().filter(from_guest).any(|f| f[12..14] == [8, 0] && f[23] == 1 && f[34] == 8 && f[30..34] == [10, 0, 0, 1]);
    let to_guest = frames.iter().filter(|f| f.len() >= 14 && f[0..6] == mac[..]).count();
    assert!(arp && echo && to_guest >= 2, "{} frames captured, arp {arp} echo {echo} to guest {to_guest}", frames.len());
}

#[test]
fn ferro_creates_the_tap_brings_it_up_and_uses_the_given_mac() {
    let ns = Netns::new();
    let child = ns.ferro("mmio", "tap=ftap1,mac=52:54:00:12:34:56").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The guest retries its ARP request while the host side gets its address.
    let start = Instant::now();
    while !ns.link_exists("ftap1") {
        assert!(start.elapsed() < Duration::from_secs(10), "ferro did not create the tap");
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "ftap1"]);
    let host_mac = ns.mac_of("ftap1");
    let o = child.wait_with_output().unwrap();
    let out = assert_guest_talked_to_host(&o, &host_mac);
    assert_eq!(guest_mac(&out), "52:54:00:12:34:56", "{out}");
    assert!(!ns.link_exists("ftap1"), "the tap ferro created outlives it");
}

#[test]
fn a_tun_device_is_refused_as_a_tap() {
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", "ftun0", "mode", "tun"]);
    let o = ns.ferro("mmio", "tap=ftun0").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("--net tap=ftun0") && err.contains("TUNSETIFF"), "{err}");
}
