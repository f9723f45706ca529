//! virtio-net through a real tap inside a network namespace the test creates (and always
//! deletes): the `virtio` test guest ARPs for the host side of the tap and pings it, the host
//! kernel answers, and a raw AF_PACKET socket in the namespace sees the frames cross the tap.

use ferro_test_support::net::{ETH_P_ALL, Netns, read_frames};
use ferro_vmm_api::MacAddr;
use ferro_test_support::wait_for;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";

/// `ferro run` of the `virtio` guest with one NIC, inside the namespace so its tap lives there.
fn ferro_in(ns: &Netns, transport: &str, tap_opts: &str) -> Command {
    let mut c = ns.command(ferro_test_support::ferro_bin());
    c.args(["run", "--guest", "virtio", "--memory", "64M", "--transport", transport, "--net", tap_opts]);
    c.args(["--cmdline", &format!("net.ip={HOST_IP} net.me={GUEST_IP}")]);
    c.stdin(Stdio::null());
    c
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
    let ns = Netns::with_tap("net", "ftap0", Some(&format!("{HOST_IP}/24")));
    let host_mac = ns.mac_of("ftap0");
    let sock = ns.packet_socket("ftap0", ETH_P_ALL);

    let o = ferro_in(&ns, transport, "tap=ftap0").output().expect("run ferro");
    let out = assert_guest_talked_to_host(&o, &host_mac);
    let mac = guest_mac(&out).parse::<MacAddr>().expect("the guest's MAC").0;
    assert_eq!(mac[0] & 3, 2, "generated MACs are local unicast: {out}");

    // On the host side of the tap: the guest's ARP request for the host address, and the
    // guest's ICMP echo request, both from the guest's MAC.
    let frames = read_frames(&sock);
    let from_guest = |f: &&Vec<u8>| f.len() >= 42 && f[6..12] == mac[..];
    let arp = frames.iter().filter(from_guest).any(|f| f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == [10, 0, 0, 1]);
    let echo = frames.iter().filter(from_guest).any(|f| f[12..14] == [8, 0] && f[23] == 1 && f[34] == 8 && f[30..34] == [10, 0, 0, 1]);
    let to_guest = frames.iter().filter(|f| f.len() >= 14 && f[0..6] == mac[..]).count();
    assert!(arp && echo && to_guest >= 2, "{} frames captured, arp {arp} echo {echo} to guest {to_guest}", frames.len());
}

#[test]
fn ferro_creates_the_tap_brings_it_up_and_uses_the_given_mac() {
    let ns = Netns::new("net");
    let child = ferro_in(&ns, "mmio", "tap=ftap1,mac=52:54:00:12:34:56").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The guest retries its ARP request while the host side gets its address.
    wait_for("ferro to create the tap", Duration::from_secs(10), || ns.link_exists("ftap1"));
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "ftap1"]);
    let host_mac = ns.mac_of("ftap1");
    let o = child.wait_with_output().unwrap();
    let out = assert_guest_talked_to_host(&o, &host_mac);
    assert_eq!(guest_mac(&out), "52:54:00:12:34:56", "{out}");
    assert!(!ns.link_exists("ftap1"), "the tap ferro created outlives it");
}

#[test]
fn a_tun_device_is_refused_as_a_tap() {
    let ns = Netns::new("net");
    ns.ip(&["tuntap", "add", "dev", "ftun0", "mode", "tun"]);
    let o = ferro_in(&ns, "mmio", "tap=ftun0").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("--net tap=ftun0") && err.contains("TUNSETIFF"), "{err}");
}
