//! ferrod's virtual networks through its API and the `ferro net-*` verbs, with ferrod running in
//! a network namespace the test creates (never the host's own interfaces or ruleset): definitions,
//! start and destroy on the real kernel, nft and dnsmasq, DHCP leases handed to a guest stand-in,
//! NAT to an "outside" namespace, conflicts refused naming what is in the way, and a SIGKILLed
//! ferrod adopting its running network without doubling rules or dnsmasq instances.

use ferro_test_support::daemon::{Daemon, Home};
use ferro_test_support::net::{OUTSIDE, dhcp, exec, guest, host_and_outside, ip_forward, namespace, nft_ruleset, pings};
use ferro_test_support::{TempDir, alive};
use serde_json::Value;

const NAT: &str = "# the lab network (dumpconfig keeps this comment)
name = \"lab\"
mode = \"nat\"
bridge = \"fvlab\"
ip = \"10.77.0.1/24\"
[dhcp]
start = \"10.77.0.100\"
end = \"10.77.0.150\"
[[dhcp.host]]
mac = \"52:54:00:77:00:05\"
ip = \"10.77.0.5\"
name = \"fixed\"
";

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

/// `ferro ARGS`, expecting failure; its stderr.
fn ferro_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.ferro(args);
    assert!(!out.status.success(), "ferro {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The processes whose command line names this home's network state (dnsmasq).
fn dnsmasq_of(home: &Home) -> Vec<i32> {
    let needle = home.path().join("networks").display().to_string();
    home.processes().into_iter().filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))).collect()
}

#[test]
fn networks_are_defined_started_adopted_and_destroyed_by_ferrod() {
    let dir = TempDir::new("ferrod-net");
    let (host, _outside) = host_and_outside();
    let home = Home::new("net");
    let mut d = Daemon::start_in(&home, &host, &["--no-default-network"]);
    let api = d.api();

    // Definitions are validated naming the key; nothing is started by defining.
    let bad = api.expect("POST", "/v1/networks", Some(&NAT.replace("start = \"10.77.0.100\"", "start = \"10.78.0.100\"")), 400);
    assert!(message(&bad).starts_with("dhcp.start: 10.78.0.100 is outside the subnet 10.77.0.0/24"), "{bad}");
    let bad = api.expect("POST", "/v1/networks", Some(&NAT.replace("[dhcp]", "colour = 1\n[dhcp]")), 400);
    assert!(message(&bad).starts_with("colour: unknown field"), "{bad}");
    let file = dir.join("lab.toml");
    std::fs::write(&file, NAT).unwrap();
    let out = d.ferro_ok(&["net-define", file.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("Network lab defined from {}", file.display()));
    let isolated = "name = \"iso\"\nmode = \"isolated\"\nbridge = \"fviso\"\nip = \"10.78.0.1/24\"\n[dhcp]\nstart = \"10.78.0.10\"\nend = \"10.78.0.20\"\n";
    let created = api.expect("POST", "/v1/networks", Some(isolated), 201);
    assert_eq!((created["mode"].as_str(), created["active"].as_bool(), created["bridge"].as_str()), (Some("isolated"), Some(false), Some("fviso")));
    assert!(!host.link_exists("fvlab"), "defining built the bridge");
    assert_eq!(d.ferro_ok(&["net-list", "--json"]).trim(), "[]", "nothing is active yet");
    let all: Value = serde_json::from_str(&d.ferro_ok(&["net-list", "--all", "--json"])).unwrap();
    assert_eq!(all.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect::<Vec<_>>(), ["iso", "lab"]);
    let dumped = d.ferro_ok(&["net-dumpconfig", "lab"]);
    assert_eq!(dumped, NAT, "dumpconfig gives the text as defined");
    assert_eq!(d.ferro_ok(&["net-dumpxml", "lab"]), NAT, "the virsh name works too");

    // Start: bridge, ferrod's chains, dnsmasq, forwarding on; a second start is refused.
    assert_eq!(ip_forward(&host), "0");
    assert_eq!(d.ferro_ok(&["net-start", "lab"]).trim(), "Network lab started");
    let info: Value = serde_json::from_str(&d.ferro_ok(&["net-info", "lab", "--json"])).unwrap();
    assert_eq!(info["active"], true);
    let dnsmasq = info["dnsmasq_pid"].as_i64().expect("dnsmasq runs");
    assert!(alive(dnsmasq), "dnsmasq {dnsmasq} is not alive");
    assert!(host.ip(&["-d", "link", "show", "fvlab"]).contains("bridge"), "no bridge fvlab");
    let rules = nft_ruleset(&host);
    assert!(rules.contains("chain net-lab-forward") && rules.contains("chain net-lab-nat"), "{rules}");
    assert_eq!(ip_forward(&host), "1", "a NAT network runs");
    let human = d.ferro_ok(&["net-info", "lab"]);
    assert!(human.contains("10.77.0.1/24") && human.contains("10.77.0.100 - 10.77.0.150"), "{human}");
    let again = api.expect("POST", "/v1/networks/lab/start", None, 409);
    assert!(message(&again).contains("already running"), "{again}");
    let busy = api.expect("POST", "/v1/networks", Some(&NAT.replace("10.77.0.150", "10.77.0.160")), 409);
    assert!(message(&busy).contains("destroy it"), "{busy}");
    assert!(ferro_err(&d, &["net-undefine", "lab"]).contains("net-destroy lab"));

    // Conflicts with the host are refused at start, naming what is in the way.
    let taken = "name = \"taken\"\nmode = \"nat\"\nbridge = \"uplink\"\nip = \"10.79.0.1/24\"\n";
    api.expect("POST", "/v1/networks", Some(taken), 201);
    let e = api.expect("POST", "/v1/networks/taken/start", None, 409);
    assert!(message(&e).contains("bridge: uplink already exists"), "{e}");
    let overlap = "name = \"taken\"\nmode = \"nat\"\nbridge = \"fvt\"\nip = \"203.0.113.129/25\"\n";
    api.expect("POST", "/v1/networks", Some(overlap), 200);
    let e = api.expect("POST", "/v1/networks/taken/start", None, 409);
    assert!(message(&e).contains("overlaps the host route to 203.0.113.0/24 on uplink"), "{e}");
    let same = "name = \"taken\"\nmode = \"nat\"\nbridge = \"fvt\"\nip = \"10.77.0.1/16\"\n";
    api.expect("POST", "/v1/networks", Some(same), 200);
    let e = api.expect("POST", "/v1/networks/taken/start", None, 409);
    assert!(message(&e).contains("overlaps network lab"), "{e}");
    assert!(!host.link_exists("fvt"), "a refused start left its bridge");
    api.expect("DELETE", "/v1/networks/taken", None, 204);

    // A guest stand-in on the bridge gets its fixed lease and reaches the outside through NAT.
    let g = guest(&host, "fvlab", "fvp0", "52:54:00:77:00:05");
    let dynamic = guest(&host, "fvlab", "fvp1", "52:54:00:77:00:06");
    let got = dhcp(&[&g, &dynamic], dir.path());
    assert_eq!((got[0].ip.as_str(), got[0].router.as_str()), ("10.77.0.5", "10.77.0.1"));
    let dynamic_ip: std::net::Ipv4Addr = got[1].ip.parse().unwrap();
    assert!((std::net::Ipv4Addr::new(10, 77, 0, 100)..=std::net::Ipv4Addr::new(10, 77, 0, 150)).contains(&dynamic_ip), "{dynamic_ip}");
    assert!(pings(&g, OUTSIDE), "the guest cannot reach the outside through NAT");
    let leases: Value = serde_json::from_str(&d.ferro_ok(&["net-dhcp-leases", "lab", "--json"])).unwrap();
    let lease = |mac: &str| leases.as_array().unwrap().iter().find(|l| l["mac"] == mac).cloned().unwrap_or_else(|| panic!("no lease for {mac}: {leases}"));
    assert_eq!((lease("52:54:00:77:00:05")["ip"].as_str(), lease("52:54:00:77:00:05")["hostname"].as_str()), (Some("10.77.0.5"), Some("fixed")));
    assert_eq!(lease("52:54:00:77:00:06")["ip"], dynamic_ip.to_string());
    assert!(lease("52:54:00:77:00:06")["expiry"].as_u64().is_some_and(|t| t > 1_700_000_000), "{leases}");
    let table = d.ferro_ok(&["net-dhcp-leases", "lab"]);
    assert!(table.contains("52:54:00:77:00:05") && table.contains("10.77.0.5") && table.contains("fixed"), "{table}");
    let e = api.expect("GET", "/v1/networks/iso/leases", None, 409);
    assert!(message(&e).contains("not running"), "{e}");

    // ferrod killed outright: the network keeps running, and the next ferrod adopts it with the
    // same dnsmasq and the same rules, not a second copy of either.
    let on = api.expect("POST", "/v1/networks/lab/autostart", Some(r#"{"enabled": true}"#), 200);
    assert_eq!(on["autostart"], true);
    let table_before = String::from_utf8(exec(&host, &["nft", "list", "table", "inet", "ferrovisor"]).stdout).unwrap();
    d.kill9();
    assert!(pings(&g, OUTSIDE), "the network went down with ferrod");
    d = Daemon::start_in(&home, &host, &["--no-default-network"]);
    let api = d.api();
    let info = api.expect("GET", "/v1/networks/lab", None, 200);
    assert_eq!((info["active"].as_bool(), info["autostart"].as_bool()), (Some(true), Some(true)), "{info}");
    assert_eq!(info["dnsmasq_pid"].as_i64(), Some(dnsmasq), "a new dnsmasq replaced the running one");
    assert_eq!(dnsmasq_of(&home), vec![dnsmasq as i32], "one dnsmasq for the network");
    let table_after = String::from_utf8(exec(&host, &["nft", "list", "table", "inet", "ferrovisor"]).stdout).unwrap();
    assert_eq!(table_after, table_before, "adoption changed the rules");
    assert_eq!(api.expect("GET", "/v1/networks/iso", None, 200)["active"], false, "iso was never started");
    assert!(pings(&g, OUTSIDE), "NAT after adoption");

    // Destroy leaves nothing: no bridge, no rule, no dnsmasq, forwarding off again.
    assert_eq!(d.ferro_ok(&["net-destroy", "lab"]).trim(), "Network lab destroyed");
    assert!(!host.link_exists("fvlab"), "the bridge is still there");
    let rules = nft_ruleset(&host);
    assert!(!rules.contains("ferrovisor"), "rules left behind:\n{rules}");
    assert!(!alive(dnsmasq) && dnsmasq_of(&home).is_empty(), "dnsmasq still runs");
    assert_eq!(ip_forward(&host), "0", "forwarding switched off with the last NAT network");
    assert!(ferro_err(&d, &["net-destroy", "lab"]).contains("not running"));
    assert_eq!(api.expect("GET", "/v1/networks/lab", None, 200)["active"], false);

    // Undefine removes the definition and its lease database.
    assert!(home.path().join("networks/lab/leases").exists());
    assert_eq!(d.ferro_ok(&["net-undefine", "lab"]).trim(), "Network lab has been undefined");
    assert!(!home.path().join("networks/lab").exists(), "the lease database is still there");
    let e = api.expect("GET", "/v1/networks/lab", None, 404);
    assert!(message(&e).contains("not defined"), "{e}");
    api.expect("GET", "/v1/networks/bad%2Fname", None, 400);
    api.expect("POST", "/v1/networks/iso/frobnicate", None, 404);
    let events = api.expect("GET", "/v1/events", None, 200);
    assert!(events.as_array().unwrap().iter().any(|e| e["object"] == "network" && e["name"] == "lab" && e["kind"] == "destroyed"), "{events}");
}

/// The taps a process has open (links of its descriptors to /dev/net/tun).
fn tun_files(pid: i64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == std::path::Path::new("/dev/net/tun"))).count())
        .unwrap_or(0)
}

#[test]
fn domains_get_stable_macs_and_ferrods_taps_on_networks_and_bridges() {
    let dir = TempDir::new("ferrod-nic");
    let (host, _outside) = host_and_outside();
    host.ip(&["link", "add", "hostbr", "type", "bridge"]);
    host.ip(&["link", "set", "hostbr", "up"]);
    let home = Home::new("nic");
    let mut d = Daemon::start_in(&home, &host, &["--no-default-network"]);
    let api = d.api();
    api.expect("POST", "/v1/networks", Some(NAT), 201);
    let auto = "name = \"auto\"\nmode = \"isolated\"\nbridge = \"fvauto\"\nip = \"10.78.0.1/24\"\n";
    api.expect("POST", "/v1/networks", Some(auto), 201);
    api.expect("POST", "/v1/networks/auto/autostart", None, 200);
    let disk = dir.join("vm1.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    // MACs are given at define time, written into the stored text, and kept on redefinition.
    let vm = format!(
        "# vm1 keeps this comment\nname = \"vm1\"\nmemory = \"64M\"\n[boot]\nguest = \"idle\"\n[[disk]]\npath = \"{}\"\n\
         [[nic]]\nnetwork = \"auto\"\n[[nic]]\nnetwork = \"lab\"\n[[nic]]\nbridge = \"hostbr\"\n[[nic]]\nnetwork = \"lab\"\nmac = \"52:54:00:77:00:99\"\n",
        disk.display()
    );
    let bad = api.expect("POST", "/v1/domains", Some(&vm.replace("bridge = \"hostbr\"", "bridge = \"hostbr\"\ntap = \"t0\"")), 400);
    assert!(message(&bad).starts_with("nic[2].tap: cannot be combined with bridge"), "{bad}");
    api.expect("POST", "/v1/domains", Some(&vm), 201);
    let stored = d.ferro_ok(&["dumpconfig", "vm1"]);
    assert!(stored.starts_with("# vm1 keeps this comment\n"), "{stored}");
    let macs: Vec<String> = api.expect("GET", "/v1/domains/vm1", None, 200)["config"]["nic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].as_str().expect("every NIC has a MAC").to_string())
        .collect();
    assert_eq!(macs.len(), 4);
    assert_eq!(macs[3], "52:54:00:77:00:99");
    assert!(macs.iter().all(|m| m.starts_with("52:54:00:")), "{macs:?}");
    for mac in &macs[..3] {
        assert!(stored.contains(&format!("mac = \"{mac}\"")), "{mac} not in\n{stored}");
    }
    api.expect("POST", "/v1/domains", Some(&vm), 200);
    let again: Vec<String> = api.expect("GET", "/v1/domains/vm1", None, 200)["config"]["nic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(again, macs, "redefining changed the MACs");

    // A stopped network refuses the start, naming it; the autostart one was started for it, and
    // the taps made before the refusal are gone again.
    let e = api.expect("POST", "/v1/domains/vm1/start", None, 409);
    assert!(message(&e).contains("nic[1].network: network lab is not running"), "{e}");
    assert_eq!(api.expect("GET", "/v1/networks/auto", None, 200)["active"], true, "the autostart network was not started");
    let uuid = api.expect("GET", "/v1/domains/vm1", None, 200)["uuid"].as_str().unwrap().to_string();
    let tap = |i: usize| format!("fv{}-{i}", &uuid[..8]);
    assert!(!host.link_exists(&tap(0)), "a refused start left its tap");

    d.ferro_ok(&["net-start", "lab"]);
    assert_eq!(d.ferro_ok(&["start", "vm1"]).trim(), "Domain 'vm1' started");
    let nics: Value = serde_json::from_str(&d.ferro_ok(&["domiflist", "vm1", "--json"])).unwrap();
    let nics = nics.as_array().unwrap();
    for (i, (kind, source, bridge)) in [("network", "auto", "fvauto"), ("network", "lab", "fvlab"), ("bridge", "hostbr", "hostbr"), ("network", "lab", "fvlab")].into_iter().enumerate() {
        assert_eq!((nics[i]["type"].as_str(), nics[i]["source"].as_str()), (Some(kind), Some(source)), "{nics:?}");
        assert_eq!(nics[i]["tap"], tap(i), "{nics:?}");
        assert_eq!(nics[i]["mac"], macs[i]);
        let link = host.ip(&["-d", "link", "show", &tap(i)]);
        assert!(link.contains(&format!("master {bridge}")) && link.contains("tun type tap"), "{link}");
    }
    let table = d.ferro_ok(&["domiflist", "vm1"]);
    assert!(table.contains(&tap(2)) && table.contains("hostbr") && table.contains(&macs[2]), "{table}");
    let vmm = api.expect("GET", "/v1/domains/vm1", None, 200)["pid"].as_i64().unwrap();
    assert_eq!(tun_files(vmm), 4, "the VMM holds the four taps ferrod opened for it");
    let addresses: Value = serde_json::from_str(&d.ferro_ok(&["domifaddr", "vm1", "--json"])).unwrap();
    assert_eq!(addresses.as_array().unwrap().len(), 3, "only the NICs on networks: {addresses}");
    assert!(addresses.as_array().unwrap().iter().all(|a| a["address"].is_null()), "the idle guest asked for no lease: {addresses}");
    let blk = d.ferro_ok(&["domblklist", "vm1"]);
    assert!(blk.contains("vda") && blk.contains(&disk.display().to_string()), "{blk}");
    let hosts = std::fs::read_to_string(home.path().join("networks/lab/hosts")).unwrap();
    assert!(hosts.contains(&format!("{},vm1", macs[1])) && hosts.contains("52:54:00:77:00:99,vm1"), "DNS does not know vm1: {hosts}");

    // A network in use stays, even after ferrod restarts (SIGKILL) and finds the domain running.
    d.kill9();
    d = Daemon::start_in(&home, &host, &["--no-default-network"]);
    let api = d.api();
    assert_eq!(api.expect("GET", "/v1/domains/vm1", None, 200)["state"], "running");
    for (verb, method, path) in [("destroy", "POST", "/v1/networks/lab/destroy"), ("undefine", "DELETE", "/v1/networks/lab")] {
        let e = api.expect(method, path, None, 409);
        assert!(message(&e).contains("in use by domain vm1"), "{verb}: {e}");
    }

    // Stopping the domain deletes its taps and takes its name out of DNS; then the network goes.
    d.ferro_ok(&["destroy", "vm1"]);
    for i in 0..4 {
        assert!(!host.link_exists(&tap(i)), "{} is still there", tap(i));
    }
    assert!(host.link_exists("hostbr"), "the host's bridge went with the domain");
    let hosts = std::fs::read_to_string(home.path().join("networks/lab/hosts")).unwrap();
    assert!(!hosts.contains("vm1"), "{hosts}");
    d.ferro_ok(&["net-destroy", "lab"]);
    d.ferro_ok(&["net-destroy", "auto"]);
    assert!(dnsmasq_of(&home).is_empty(), "dnsmasq still runs");
}

#[test]
fn the_first_start_defines_a_default_network_clear_of_host_routes() {
    let host = namespace("default");
    // 192.168.122.0/24 is a route of the host's: the default network takes the next /24.
    host.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"]);
    host.ip(&["addr", "add", "192.168.122.5/24", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    let home = Home::new("default");
    let mut d = Daemon::start_in(&home, &host, &[]);
    let api = d.api();
    let info = api.expect("GET", "/v1/networks/default", None, 200);
    assert_eq!((info["active"].as_bool(), info["autostart"].as_bool(), info["mode"].as_str()), (Some(true), Some(true), Some("nat")), "{info}");
    assert_eq!((info["bridge"].as_str(), info["config"]["ip"].as_str()), (Some("ferbr0"), Some("192.168.123.1/24")), "{info}");
    assert_eq!((info["config"]["dhcp"]["start"].as_str(), info["config"]["dhcp"]["end"].as_str()), (Some("192.168.123.2"), Some("192.168.123.254")));
    assert!(host.ip(&["-d", "link", "show", "ferbr0"]).contains("192.168.123.1") || host.ip(&["addr", "show", "ferbr0"]).contains("192.168.123.1/24"));
    assert_eq!(ip_forward(&host), "1");

    // Restarted, ferrod adopts it; undefined, it is not made again.
    d.kill9();
    d = Daemon::start_in(&home, &host, &[]);
    let api = d.api();
    assert_eq!(api.expect("GET", "/v1/networks", None, 200).as_array().map(Vec::len), Some(1), "a second default network");
    d.ferro_ok(&["net-destroy", "default"]);
    d.ferro_ok(&["net-undefine", "default"]);
    d.kill9();
    d = Daemon::start_in(&home, &host, &[]);
    assert_eq!(d.api().expect("GET", "/v1/networks", None, 200), Value::Array(vec![]), "the default network came back");
    assert!(!host.link_exists("ferbr0"));
}
