//! ferro-net against the real kernel, nft and dnsmasq, inside network namespaces each test
//! creates (and deletes): never the host's own interfaces or ruleset.
//!
//! The "host" namespace is where ferro-net runs (a thread entered into it); "outside" sits
//! behind a veth and has no route back to any guest subnet, so only NAT can answer it; each
//! "guest" is a namespace on a veth whose other end is a port of a network's bridge, getting its
//! address from dnsmasq with busybox udhcpc.

use ferro_net::dnsmasq::GuestName;
use ferro_net::host::{self, Adoption};
use ferro_net::{HostNetworks, NetError, NetworkConfig};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BUSYBOX: &str = "/bin/busybox";
const OUTSIDE_HOST: &str = "203.0.113.1";
const OUTSIDE: &str = "203.0.113.2";

/// A network namespace, deleted with every interface in it when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("fnet-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace; the output whatever the status.
    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.0]).args(args).output().expect("run ip netns exec")
    }

    fn nft_ruleset(&self) -> String {
        let out = self.exec(&["nft", "list", "ruleset"]);
        assert!(out.status.success(), "nft list ruleset: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", name]).status.success()
    }

    fn ip_forward(&self) -> String {
        let out = self.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `f` on a thread inside this namespace (ferro-net acts in its caller's namespace).
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open the namespace");
                // SAFETY: setns on an fd we own; it changes only this thread's namespace.
                assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferro-net-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The host namespace with an uplink to the outside namespace.
fn host_and_outside() -> (Netns, Netns) {
    let host = Netns::new("host");
    let outside = Netns::new("out");
    host.ip(&["link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &outside.0]);
    host.ip(&["addr", "add", &format!("{OUTSIDE_HOST}/24"), "dev", "uplink"]);
    host.ip(&["link", "set", "uplink", "up"]);
    outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);
    (host, outside)
}

/// A guest stand-in: a namespace whose eth0 (with `mac`) is plugged into `bridge` of `host`.
fn guest(host: &Netns, bridge: &str, port: &str, mac: &str) -> Netns {
    let g = Netns::new("guest");
    host.ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &g.0]);
    host.ip(&["link", "set", port, "master", bridge, "up"]);
    g.ip(&["link", "set", "eth0", "address", mac, "up"]);
    g
}

/// What udhcpc got: the address, and the router it was told (empty when none).
struct DhcpResult {
    ip: String,
    router: String,
}

/// Runs busybox udhcpc in each guest at once; the script configures the address and default route.
fn dhcp(guests: &[&Netns], dir: &Path) -> Vec<DhcpResult> {
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} is missing: apt-get install busybox-static");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\necho \"LEASE ip=$ip router=$router\"\n\
         ip addr add \"$ip/$mask\" dev \"$interface\"\n[ -z \"$router\" ] || ip route add default via \"$router\"\n",
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    let children: Vec<_> = guests
        .iter()
        .map(|g| {
            Command::new("ip")
                .args(["netns", "exec", &g.0, BUSYBOX, "udhcpc", "-i", "eth0", "-n", "-q", "-t", "15", "-T", "1", "-s"])
                .arg(&script)
                .output()
        })
        .collect();
    children
        .into_iter()
        .map(|out| {
            let out = out.expect("run udhcpc");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "udhcpc got no lease: {text}{}", String::from_utf8_lossy(&out.stderr));
            let line = text.lines().find(|l| l.starts_with("LEASE ")).expect("the script's LEASE line");
            let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("").to_owned();
            DhcpResult { ip: field("ip="), router: field("router=") }
        })
        .collect()
}

fn pings(from: &Netns, to: &str) -> bool {
    from.exec(&[BUSYBOX, "ping", "-c", "1", "-W", "2", to]).status.success()
}

/// The address `name` resolves to through the DNS server `server`, as busybox nslookup says.
fn resolve(from: &Netns, name: &str, server: &str) -> Option<String> {
    let out = from.exec(&[BUSYBOX, "nslookup", name, server]);
    let text = String::from_utf8_lossy(&out.stdout);
    let after_name = text.split_once(&format!("Name:\t{name}"))?.1;
    after_name.lines().find_map(|l| l.trim().strip_prefix("Address: ")).map(|a| a.split(':').next().unwrap_or(a).to_owned())
}

/// Live (not zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

fn net(text: &str) -> NetworkConfig {
    NetworkConfig::parse(text).unwrap()
}

#[test]
fn nat_and_isolated_networks_end_to_end() {
    let dir = scratch("e2e");
    let state = dir.join("networks");
    let (host, _outside) = host_and_outside();
    // A table of someone else's, which must come through untouched.
    host.exec(&["nft", "add", "table", "inet", "other"]);
    run("ip", &["netns", "exec", &host.0, "nft", "add chain inet other input { type filter hook input priority 0; }"]);
    run("ip", &["netns", "exec", &host.0, "nft", "add rule inet other input udp dport 9 counter"]);
    let other_before = host.exec(&["nft", "list", "table", "inet", "other"]).stdout;

    let nat_a = net(
        "name = \"nat-a\"\nmode = \"nat\"\nbridge = \"fva\"\nip = \"10.10.1.1/24\"\n[dhcp]\nstart = \"10.10.1.100\"\nend = \"10.10.1.199\"\n\
         [[dhcp.host]]\nmac = \"52:54:00:0a:00:01\"\nip = \"10.10.1.50\"\nname = \"alpha\"\n",
    );
    let isolated = net("name = \"iso-b\"\nmode = \"isolated\"\nbridge = \"fvb\"\nip = \"10.10.2.1/24\"\n[dhcp]\nstart = \"10.10.2.100\"\nend = \"10.10.2.199\"\n");
    let nat_c = net("name = \"nat-c\"\nmode = \"nat\"\nbridge = \"fvc\"\nip = \"10.10.3.1/24\"\n[dhcp]\nstart = \"10.10.3.100\"\nend = \"10.10.3.199\"\n");

    assert_eq!(host.ip_forward(), "0", "a new namespace starts with forwarding off");
    let mut networks = host.enter(|| {
        let mut n = HostNetworks::new(&state);
        n.start(&nat_a).unwrap();
        n.start(&isolated).unwrap();
        n.start(&nat_c).unwrap();
        n
    });
    assert_eq!(host.ip_forward(), "1", "a NAT network runs");
    let ruleset = host.nft_ruleset();
    for chain in ["net-nat-a-forward", "net-nat-a-nat", "net-iso-b-forward", "net-nat-c-forward", "net-nat-c-nat"] {
        assert!(ruleset.contains(&format!("chain {chain} ")), "{chain} missing from\n{ruleset}");
    }
    assert!(!ruleset.contains("net-iso-b-nat"), "an isolated network masquerades nothing");

    // A tap for a VMM on nat-a: it sees the guests' broadcasts through the bridge.
    let tap_fd = host.enter(|| host::plug_tap("fvtap0", networks.bridge_of("nat-a").unwrap())).unwrap();
    let tap = host.ip(&["-d", "link", "show", "fvtap0"]);
    assert!(tap.contains("master fva") && tap.contains("tun type tap"), "{tap}");
    let busy = host.enter(|| host::plug_tap("fvtap0", "fva")).unwrap_err();
    assert!(matches!(busy, NetError::Conflict(_)), "{busy}");

    // Guests: alpha (fixed lease) and beta (dynamic, named by ferrod) on nat-a, one on each other.
    let alpha = guest(&host, "fva", "pa1", "52:54:00:0a:00:01");
    let beta = guest(&host, "fva", "pa2", "52:54:00:0a:00:02");
    let iso = guest(&host, "fvb", "pb1", "52:54:00:0b:00:01");
    let gamma = guest(&host, "fvc", "pc1", "52:54:00:0c:00:01");
    host.enter(|| networks.set_guest_names("nat-a", vec![GuestName { mac: "52:54:00:0a:00:02".parse().unwrap(), name: "beta".into() }])).unwrap();
    let leases = dhcp(&[&alpha, &beta, &iso, &gamma], &dir);
    assert_eq!(leases[0].ip, "10.10.1.50", "the fixed lease");
    assert_eq!(leases[0].router, "10.10.1.1");
    let beta_ip: std::net::Ipv4Addr = leases[1].ip.parse().unwrap();
    assert!((std::net::Ipv4Addr::new(10, 10, 1, 100)..=std::net::Ipv4Addr::new(10, 10, 1, 199)).contains(&beta_ip), "{beta_ip} outside the range");
    assert!(leases[2].ip.starts_with("10.10.2.1"), "{}", leases[2].ip);
    assert_eq!(leases[2].router, "", "an isolated network hands out no default route");
    assert!(leases[3].ip.starts_with("10.10.3.1"), "{}", leases[3].ip);

    let recorded = networks.leases("nat-a");
    let find = |mac: &str| recorded.iter().find(|l| l.mac.to_string() == mac).unwrap_or_else(|| panic!("no lease for {mac} in {recorded:?}"));
    assert_eq!(find("52:54:00:0a:00:01").ip.to_string(), "10.10.1.50");
    assert_eq!(find("52:54:00:0a:00:01").hostname.as_deref(), Some("alpha"));
    assert_eq!(find("52:54:00:0a:00:02").ip, beta_ip);
    assert_eq!(find("52:54:00:0a:00:02").hostname.as_deref(), Some("beta"));
    assert_eq!(resolve(&beta, "alpha", "10.10.1.1").as_deref(), Some("10.10.1.50"));
    assert_eq!(resolve(&alpha, "beta", "10.10.1.1"), Some(beta_ip.to_string()));

    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    let mut tap_file = std::fs::File::from(tap_fd);
    while let Ok(n) = tap_file.read(&mut buf) {
        frames.push(buf[..n].to_vec());
    }
    // 10-byte virtio-net header, then the Ethernet source address at bytes 6..12.
    let from_alpha = frames.iter().filter(|f| f.len() > 22 && f[16..22] == [0x52, 0x54, 0, 0x0a, 0, 1]).count();
    assert!(from_alpha > 0, "the tap saw none of alpha's {} broadcast frames", frames.len());

    assert!(pings(&alpha, "10.10.1.1"), "alpha -> its gateway");
    assert!(pings(&alpha, &leases[1].ip), "alpha -> beta on the same bridge");
    assert!(pings(&alpha, OUTSIDE), "alpha -> outside through NAT (outside has no route back)");
    assert!(pings(&gamma, OUTSIDE), "gamma -> outside through NAT");
    assert!(pings(&iso, "10.10.2.1"), "the isolated guest -> its gateway");
    iso.ip(&["route", "add", "default", "via", "10.10.2.1"]);
    assert!(!pings(&iso, OUTSIDE), "the isolated guest reached the outside");
    assert!(!pings(&iso, &leases[0].ip), "the isolated guest reached the NAT network");
    assert!(!pings(&alpha, &leases[2].ip), "the NAT network reached the isolated guest");
    assert!(!pings(&alpha, &leases[3].ip), "nat-a reached nat-c");
    assert!(!pings(&gamma, &leases[0].ip), "nat-c reached nat-a");

    // Destroy leaves nothing: no bridge or tap, no rule, no dnsmasq, forwarding off again.
    drop(tap_file);
    host.enter(|| host::unplug_tap("fvtap0")).unwrap();
    let pids: Vec<u32> = ["nat-a", "iso-b", "nat-c"].iter().map(|n| networks.dnsmasq_pid(n).expect("dnsmasq runs")).collect();
    host.enter(|| {
        for name in ["nat-a", "iso-b", "nat-c"] {
            networks.destroy(name).unwrap();
        }
    });
    for link in ["fva", "fvb", "fvc", "fvtap0"] {
        assert!(!host.has_link(link), "{link} is still there");
    }
    let ruleset = host.nft_ruleset();
    assert!(!ruleset.contains("ferrovisor"), "ferrod's table is still there:\n{ruleset}");
    assert_eq!(host.exec(&["nft", "list", "table", "inet", "other"]).stdout, other_before, "another table was changed");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}/cmdline")).exists() || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty(), "dnsmasq {pid} lives");
    }
    assert!(processes_mentioning(state.to_str().unwrap()).is_empty(), "a dnsmasq of ours still runs");
    assert_eq!(host.ip_forward(), "0", "forwarding switched off with the last NAT network");
    drop(networks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn clashes_are_refused_and_leave_nothing() {
    let dir = scratch("clash");
    let state = dir.join("networks");
    let host = Netns::new("clash");
    host.ip(&["link", "add", "taken0", "type", "bridge"]);
    host.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"]);
    host.ip(&["addr", "add", "10.20.0.1/16", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    let link_names = || host.ip(&["-o", "link", "show"]).lines().map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()).collect::<Vec<_>>();
    let links_before = link_names();

    host.enter(|| {
        let mut n = HostNetworks::new(&state);
        let e = n.start(&net("name = \"a\"\nmode = \"nat\"\nbridge = \"taken0\"\nip = \"10.30.0.1/24\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.starts_with("bridge: taken0 already exists")), "{e}");
        let e = n.start(&net("name = \"a\"\nmode = \"nat\"\nbridge = \"fv0\"\nip = \"10.20.5.1/24\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.contains("overlaps the host route to 10.20.0.0/16 on lan0")), "{e}");
        n.start(&net("name = \"a\"\nmode = \"isolated\"\nbridge = \"fv0\"\nip = \"10.30.0.1/24\"\n")).unwrap();
        let e = n.start(&net("name = \"b\"\nmode = \"isolated\"\nbridge = \"fv1\"\nip = \"10.30.0.1/16\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.contains("overlaps network a")), "{e}");
        let e = n.start(&net("name = \"a\"\nmode = \"isolated\"\nbridge = \"fv2\"\nip = \"10.40.0.1/24\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.contains("already running")), "{e}");
        let e = n.start(&net("name = \"lan\"\nmode = \"bridge\"\nbridge = \"nosuchbr\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.contains("nosuchbr does not exist")), "{e}");
        let e = n.start(&net("name = \"lan\"\nmode = \"bridge\"\nbridge = \"lan0\"\n")).unwrap_err();
        assert!(matches!(&e, NetError::Conflict(m) if m.contains("not a bridge")), "{e}");

        // A bridge network attaches taps to the host's bridge and creates nothing itself.
        n.start(&net("name = \"lan\"\nmode = \"bridge\"\nbridge = \"taken0\"\n")).unwrap();
        let fd = host::plug_tap(&host::free_ifname("fvtap").unwrap(), n.bridge_of("lan").unwrap()).unwrap();
        drop(fd);
        assert_eq!(n.dnsmasq_pid("lan"), None);
        n.destroy("lan").unwrap();
        host::unplug_tap("fvtap0").unwrap();
        n.destroy("a").unwrap();
        let e = n.destroy("a").unwrap_err();
        assert!(matches!(e, NetError::Conflict(_)), "{e}");
    });
    assert_eq!(link_names(), links_before, "links changed");
    assert_eq!(host.nft_ruleset(), "", "rules left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_restarted_ferrod_adopts_and_dnsmasq_is_supervised() {
    let dir = scratch("adopt");
    let state = dir.join("networks");
    let host = Netns::new("adopt");
    let config = net("name = \"n\"\nmode = \"nat\"\nbridge = \"fvn\"\nip = \"10.50.0.1/24\"\n[dhcp]\nstart = \"10.50.0.10\"\nend = \"10.50.0.20\"\n");
    let first_pid = host.enter(|| {
        let mut n = HostNetworks::new(&state);
        n.start(&config).unwrap();
        n.dnsmasq_pid("n").unwrap()
        // n dropped here, as when ferrod exits: the network keeps running.
    });
    let rules = host.nft_ruleset();
    assert!(rules.contains("net-n-forward"));
    assert!(host.has_link("fvn"));
    assert_eq!(processes_mentioning(state.to_str().unwrap()), vec![first_pid], "dnsmasq outlives the handle");

    let mut networks = host.enter(|| {
        let mut n = HostNetworks::new(&state);
        assert_eq!(n.adopt(&config, Vec::new()).unwrap(), Adoption::Adopted);
        n
    });
    assert_eq!(networks.dnsmasq_pid("n"), Some(first_pid), "the running dnsmasq is adopted");
    assert_eq!(host.nft_ruleset(), rules, "adoption neither doubles nor drops rules");
    assert_eq!(processes_mentioning(state.to_str().unwrap()), vec![first_pid], "no second dnsmasq");

    // dnsmasq killed: the supervisor starts another, which serves DHCP.
    run("kill", &["-KILL", &first_pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let second_pid = loop {
        match networks.dnsmasq_pid("n") {
            Some(pid) if pid != first_pid => break pid,
            _ => assert!(Instant::now() < deadline, "dnsmasq was not restarted"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let g = guest(&host, "fvn", "pn1", "52:54:00:05:00:01");
    let lease = dhcp(&[&g], &dir);
    assert!(lease[0].ip.starts_with("10.50.0."), "{}", lease[0].ip);
    assert_eq!(processes_mentioning(state.to_str().unwrap()), vec![second_pid]);
    drop(g);

    // The host "rebooted": bridge and dnsmasq gone. Adoption starts the network again.
    drop(networks);
    host.ip(&["link", "del", "fvn"]);
    run("kill", &["-KILL", &second_pid.to_string()]);
    networks = host.enter(|| {
        let mut n = HostNetworks::new(&state);
        assert_eq!(n.adopt(&config, Vec::new()).unwrap(), Adoption::Restarted);
        n
    });
    assert!(host.has_link("fvn"));
    assert_eq!(host.nft_ruleset(), rules, "the same rules, once");
    host.enter(|| networks.destroy("n")).unwrap();
    assert!(!host.has_link("fvn"));
    assert_eq!(host.nft_ruleset(), "");
    assert!(processes_mentioning(state.to_str().unwrap()).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
