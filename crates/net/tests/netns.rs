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
use ferro_test_support::net::{KillLeftovers, OUTSIDE, dhcp, exec, guest, host_and_outside, ip_forward, namespace, nft_ruleset, pings, processes_mentioning, resolve};
use ferro_test_support::{TempDir, alive, run_ok, wait_for};
use std::io::Read;
use std::time::Duration;

fn net(text: &str) -> NetworkConfig {
    NetworkConfig::parse(text).unwrap()
}

#[test]
fn nat_and_isolated_networks_end_to_end() {
    let dir = TempDir::new("net-e2e");
    let state = dir.join("networks");
    let _leftovers = KillLeftovers(state.to_string_lossy().into_owned());
    let (host, _outside) = host_and_outside();
    // A table of someone else's, which must come through untouched.
    exec(&host, &["nft", "add table inet other"]);
    exec(&host, &["nft", "add chain inet other input { type filter hook input priority 0; }"]);
    exec(&host, &["nft", "add rule inet other input udp dport 9 counter"]);
    let other_before = exec(&host, &["nft", "list", "table", "inet", "other"]).stdout;
    assert!(String::from_utf8_lossy(&other_before).contains("dport 9"), "the other table was not made");

    let nat_a = net(
        "name = \"nat-a\"\nmode = \"nat\"\nbridge = \"fva\"\nip = \"10.10.1.1/24\"\n[dhcp]\nstart = \"10.10.1.100\"\nend = \"10.10.1.199\"\n\
         [[dhcp.host]]\nmac = \"52:54:00:0a:00:01\"\nip = \"10.10.1.50\"\nname = \"alpha\"\n",
    );
    let isolated = net("name = \"iso-b\"\nmode = \"isolated\"\nbridge = \"fvb\"\nip = \"10.10.2.1/24\"\n[dhcp]\nstart = \"10.10.2.100\"\nend = \"10.10.2.199\"\n");
    let nat_c = net("name = \"nat-c\"\nmode = \"nat\"\nbridge = \"fvc\"\nip = \"10.10.3.1/24\"\n[dhcp]\nstart = \"10.10.3.100\"\nend = \"10.10.3.199\"\n");

    assert_eq!(ip_forward(&host), "0", "a new namespace starts with forwarding off");
    let state_dir = state.clone();
    let (mut networks, tap_fd) = host.enter(move || {
        let mut n = HostNetworks::new(&state_dir);
        n.start(&nat_a).unwrap();
        n.start(&isolated).unwrap();
        n.start(&nat_c).unwrap();
        // A tap for a VMM on nat-a: it will see the guests' broadcasts through the bridge.
        let tap = host::plug_tap("fvtap0", n.bridge_of("nat-a").unwrap()).unwrap();
        let busy = host::plug_tap("fvtap0", "fva").unwrap_err();
        assert!(matches!(busy, NetError::Conflict(_)), "{busy}");
        n.set_guest_names("nat-a", vec![GuestName { mac: "52:54:00:0a:00:02".parse().unwrap(), name: "beta".into() }]).unwrap();
        (n, tap)
    });
    assert_eq!(ip_forward(&host), "1", "a NAT network runs");
    let ruleset = nft_ruleset(&host);
    for chain in ["net-nat-a-forward", "net-nat-a-nat", "net-iso-b-forward", "net-nat-c-forward", "net-nat-c-nat"] {
        assert!(ruleset.contains(&format!("chain {chain} ")), "{chain} missing from\n{ruleset}");
    }
    assert!(!ruleset.contains("net-iso-b-nat"), "an isolated network masquerades nothing");
    let tap = host.ip(&["-d", "link", "show", "fvtap0"]);
    assert!(tap.contains("master fva") && tap.contains("tun type tap"), "{tap}");

    // Guests: alpha (fixed lease) and beta (dynamic, named by ferrod) on nat-a, one on each other.
    let alpha = guest(&host, "fva", "pa1", "52:54:00:0a:00:01");
    let beta = guest(&host, "fva", "pa2", "52:54:00:0a:00:02");
    let iso = guest(&host, "fvb", "pb1", "52:54:00:0b:00:01");
    let gamma = guest(&host, "fvc", "pc1", "52:54:00:0c:00:01");
    let leases = dhcp(&[&alpha, &beta, &iso, &gamma], dir.path());
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

    let mut frames = 0;
    let mut from_alpha = 0;
    let mut buf = [0u8; 2048];
    let mut tap_file = std::fs::File::from(tap_fd);
    while let Ok(n) = tap_file.read(&mut buf) {
        frames += 1;
        // A 10-byte virtio-net header, then the Ethernet source address at bytes 6..12.
        if n > 22 && buf[16..22] == [0x52, 0x54, 0, 0x0a, 0, 1] {
            from_alpha += 1;
        }
    }
    assert!(from_alpha > 0, "the tap saw none of alpha's broadcasts among its {frames} frames");

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
    let pids: Vec<u32> = ["nat-a", "iso-b", "nat-c"].iter().map(|n| networks.dnsmasq_pid(n).expect("dnsmasq runs")).collect();
    networks = host.enter(move || {
        host::unplug_tap("fvtap0").unwrap();
        for name in ["nat-a", "iso-b", "nat-c"] {
            networks.destroy(name).unwrap();
        }
        networks
    });
    for link in ["fva", "fvb", "fvc", "fvtap0"] {
        assert!(!host.link_exists(link), "{link} is still there");
    }
    let ruleset = nft_ruleset(&host);
    assert!(!ruleset.contains("ferrovisor"), "ferrod's table is still there:\n{ruleset}");
    assert_eq!(exec(&host, &["nft", "list", "table", "inet", "other"]).stdout, other_before, "another table was changed");
    for pid in pids {
        assert!(!alive(i64::from(pid)), "dnsmasq {pid} lives");
    }
    assert!(processes_mentioning(state.to_str().unwrap()).is_empty(), "a dnsmasq of ours still runs");
    assert_eq!(ip_forward(&host), "0", "forwarding switched off with the last NAT network");
    drop(networks);
}

#[test]
fn clashes_are_refused_and_leave_nothing() {
    let dir = TempDir::new("net-clash");
    let state = dir.join("networks");
    let _leftovers = KillLeftovers(state.to_string_lossy().into_owned());
    let host = namespace("clash");
    host.ip(&["link", "add", "taken0", "type", "bridge"]);
    host.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"]);
    host.ip(&["addr", "add", "10.20.0.1/16", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    let link_names = || host.ip(&["-o", "link", "show"]).lines().map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()).collect::<Vec<_>>();
    let links_before = link_names();

    host.enter(move || {
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
        let tap = host::free_ifname("fvtap").unwrap();
        drop(host::plug_tap(&tap, n.bridge_of("lan").unwrap()).unwrap());
        assert_eq!(n.dnsmasq_pid("lan"), None);
        n.destroy("lan").unwrap();
        host::unplug_tap(&tap).unwrap();
        n.destroy("a").unwrap();
        let e = n.destroy("a").unwrap_err();
        assert!(matches!(e, NetError::Conflict(_)), "{e}");
    });
    assert_eq!(link_names(), links_before, "links changed");
    assert_eq!(nft_ruleset(&host), "", "rules left behind");
}

#[test]
fn a_restarted_ferrod_adopts_and_dnsmasq_is_supervised() {
    let dir = TempDir::new("net-adopt");
    let state = dir.join("networks");
    let _leftovers = KillLeftovers(state.to_string_lossy().into_owned());
    let host = namespace("adopt");
    let config = net("name = \"n\"\nmode = \"nat\"\nbridge = \"fvn\"\nip = \"10.50.0.1/24\"\n[dhcp]\nstart = \"10.50.0.10\"\nend = \"10.50.0.20\"\n");
    let ours = || processes_mentioning(state.to_str().unwrap());
    let (s, c) = (state.clone(), config.clone());
    let first_pid = host.enter(move || {
        let mut n = HostNetworks::new(&s);
        n.start(&c).unwrap();
        n.dnsmasq_pid("n").unwrap()
        // n is dropped here, as when ferrod exits: the network keeps running.
    });
    let rules = nft_ruleset(&host);
    assert!(rules.contains("net-n-forward"));
    assert!(host.link_exists("fvn"));
    assert_eq!(ours(), vec![first_pid], "dnsmasq outlives the handle");

    let adopt = |expected: Adoption| {
        let (s, c) = (state.clone(), config.clone());
        host.enter(move || {
            let mut n = HostNetworks::new(&s);
            assert_eq!(n.adopt(&c, Vec::new()).unwrap(), expected);
            n
        })
    };
    let networks = adopt(Adoption::Adopted);
    assert_eq!(networks.dnsmasq_pid("n"), Some(first_pid), "the running dnsmasq is adopted");
    assert_eq!(nft_ruleset(&host), rules, "adoption neither doubles nor drops rules");
    assert_eq!(ours(), vec![first_pid], "no second dnsmasq");

    // dnsmasq killed: the supervisor starts another, which serves DHCP.
    run_ok("kill", &["-KILL", &first_pid.to_string()]);
    wait_for("the supervisor to restart dnsmasq", Duration::from_secs(30), || networks.dnsmasq_pid("n").is_some_and(|p| p != first_pid));
    let second_pid = networks.dnsmasq_pid("n").unwrap();
    let g = guest(&host, "fvn", "pn1", "52:54:00:05:00:01");
    let lease = dhcp(&[&g], dir.path());
    assert!(lease[0].ip.starts_with("10.50.0."), "{}", lease[0].ip);
    assert_eq!(ours(), vec![second_pid]);
    drop(g);

    // The host "rebooted": bridge and dnsmasq gone. Adoption starts the network again.
    drop(networks);
    host.ip(&["link", "del", "fvn"]);
    run_ok("kill", &["-KILL", &second_pid.to_string()]);
    wait_for("dnsmasq to die", Duration::from_secs(10), || !alive(i64::from(second_pid)));
    let mut networks = adopt(Adoption::Restarted);
    assert!(host.link_exists("fvn"));
    assert_eq!(nft_ruleset(&host), rules, "the same rules, once");
    assert_eq!(ours().len(), 1);
    host.enter(move || networks.destroy("n")).unwrap();
    assert!(!host.link_exists("fvn"));
    assert_eq!(nft_ruleset(&host), "");
    assert!(ours().is_empty());
}
