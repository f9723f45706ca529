//! Linux guests on ferrod's virtual networks, in namespaces the test creates (never the host's
//! own interfaces or ruleset): ferrod runs in a "host" namespace with an uplink to an "outside"
//! namespace that has no route back to any guest subnet, so only NAT can answer a guest there.
//!
//! Three Linux test guests boot at once (one boot each, their checks packed into the guest
//! command): `a` (fixed lease) and `b` on the NAT network `lab`, `c` on the isolated network
//! `iso`. Each asks busybox udhcpc for a lease; `a` and `b` ping their gateway and the outside
//! host, find each other by name through the network's dnsmasq and exchange a message over TCP
//! (`a` also pings `b`); `c` reaches its gateway but neither the outside host nor the NAT network
//! (with a default route pointing at its gateway, so only the ruleset stops it). ferrod's
//! `domifaddr` and `net-dhcp-leases` then show the leases the guests reported.
//!
//! `c` also carries a qcow2 disk through a domain snapshot (issue: snapshots of a Linux guest with
//! a disk and a NIC): it makes a file system on the disk, writes a file and waits on its console;
//! ferrod snapshots it there (memory, devices and the disk's internal snapshot), the guest writes
//! a second file and waits again, ferrod reverts, and the guest, back at the first wait, finds the
//! second file gone, the first one intact, writes and reads a new file, and pings its gateway
//! through the NIC the revert wired afresh.

use ferro_test_support::daemon::{Daemon, Home, read_console};
use ferro_test_support::net::{OUTSIDE, host_and_outside};
use ferro_test_support::vm::{linux_cmdline, linux_dir};
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

/// Far above the few minutes three parallel boots take here, so only a hang reaches it.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

const LAB: &str = "name = \"lab\"\nmode = \"nat\"\nbridge = \"fvlab\"\nip = \"10.77.0.1/24\"\n\
[dhcp]\nstart = \"10.77.0.100\"\nend = \"10.77.0.150\"\n\
[[dhcp.host]]\nmac = \"52:54:00:77:00:05\"\nip = \"10.77.0.5\"\nname = \"a\"\n";
const ISO: &str = "name = \"iso\"\nmode = \"isolated\"\nbridge = \"fviso\"\nip = \"10.78.0.1/24\"\n\
[dhcp]\nstart = \"10.78.0.10\"\nend = \"10.78.0.20\"\n";

/// Shell for the guest's `ferro.cmd=`, written readably: the guest's /init turns '+' into
/// spaces, so the script may not contain '+' itself (nor '"', which the kernel's parser eats).
fn guest_cmd(script: &str) -> String {
    assert!(!script.contains('+') && !script.contains('"'), "not expressible in ferro.cmd=: {script}");
    script.split_whitespace().collect::<Vec<_>>().join("+")
}

/// udhcpc on eth0 with a script that configures what it was given, then the lease as a line
/// `LEASE <address/prefix>` and a `LEASE-END` line for the test.
const DHCP: &str = "echo '#!/bin/sh' > /s ;
    echo '[ $1 = bound ] && ip addr add $ip/$mask dev $interface && [ -n $router ] && ip route add default via $router ; true' >> /s ;
    chmod 755 /s ; ip link set eth0 up ;
    udhcpc -i eth0 -n -q -t 20 -T 3 -s /s ;
    echo LEASE $(ip -4 -o addr show dev eth0 | awk '{print $4}') ; echo LEASE-END ;";

/// Waits (up to 120 s) until the lab's DNS knows `name`, then sets $P to its address.
fn resolve(name: &str) -> String {
    format!(
        "for i in $(seq 120) ; do nslookup {name} 10.77.0.1 > /n 2>&1 && grep -q '^Name:' /n && break ; sleep 1 ; done ;
         P=$(sed -n '/^Name:/,$s/^Address: *//p' /n | head -n 1) ; echo RESOLVED {name} $P ;"
    )
}

/// A Linux guest on `network` running `script`; `extra` is appended to the definition (a MAC,
/// a disk).
fn linux_domain(name: &str, network: &str, extra: &str, script: &str) -> String {
    let dir = linux_dir();
    let cmdline = format!("{} ferro.cmd={}", linux_cmdline(), guest_cmd(script));
    assert!(cmdline.len() < 2000, "{name}'s command line is {} bytes; the kernel keeps 2048", cmdline.len());
    format!(
        "name = \"{name}\"\nmemory = \"128M\"\n[boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{cmdline}\"\n\
         [[nic]]\nnetwork = \"{network}\"\n{extra}",
        dir.join("vmlinux").display(),
        dir.join("initramfs.cpio").display(),
    )
}

/// What the guest's command printed: the console without the `FERRO-CMD` line, which echoes the
/// command itself (and so every marker the command can print).
fn command_output(console: &str) -> String {
    console.lines().filter(|l| !l.contains("FERRO-CMD ")).collect::<Vec<_>>().join("\n")
}

fn line_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines().find_map(|l| l.trim().strip_prefix(key).map(str::trim)).unwrap_or_else(|| panic!("no {key:?} line in\n{text}"))
}

#[test]
fn linux_guests_get_leases_names_nat_and_isolation_from_ferrods_networks() {
    let (host, _outside) = host_and_outside();
    let home = Home::new("net-linux");
    let d = Daemon::start_in(&home, &host, &["--no-default-network"]);
    let api = d.api();
    for net in [LAB, ISO] {
        api.expect("POST", "/v1/networks", Some(net), 201);
    }
    d.ferro_ok(&["net-start", "lab"]);
    d.ferro_ok(&["net-start", "iso"]);

    // b may boot later than a: a retries its TCP message until b's listener is up.
    let a = format!(
        "{DHCP} ping -c 1 -W 5 10.77.0.1 && echo GATEWAY-OK ; ping -c 1 -W 5 {OUTSIDE} && echo OUTSIDE-OK ;
         {} ping -c 1 -W 5 $P && echo PEER-OK ; for i in $(seq 120) ; do echo hello-from-a | nc $P 7777 && echo SENT-OK && break ; sleep 1 ; done ; sleep 20",
        resolve("b")
    );
    let b = format!(
        "{DHCP} ping -c 1 -W 5 10.77.0.1 && echo GATEWAY-OK ; ping -c 1 -W 5 {OUTSIDE} && echo OUTSIDE-OK ;
         {} timeout 300 nc -l -p 7777",
        resolve("a")
    );
    // After its checks `c` waits on the console twice (`read`): the snapshot is taken at the
    // first wait; "w" writes file b and waits again; after the revert it is at the first wait,
    // where "v" goes on to the checks.
    let c = format!(
        "{DHCP} ip route add default via 10.78.0.1 ; ping -c 1 -W 5 10.78.0.1 && echo GATEWAY-OK ;
         ping -c 1 -W 3 {OUTSIDE} || echo OUTSIDE-BLOCKED ; ping -c 1 -W 3 10.77.0.5 || echo LAB-BLOCKED ;
         mke2fs -q /dev/vda && mount /dev/vda /mnt && echo before > /mnt/a && sync && echo SNAP-READY ;
         read x ; [ $x = w ] && echo after > /mnt/b && sync && echo B-WRITTEN && read x ;
         [ -e /mnt/b ] || echo B-GONE ; echo A-$(cat /mnt/a) ; echo again > /mnt/c && sync && echo C-$(cat /mnt/c) ;
         ping -c 1 -W 5 10.78.0.1 && echo GATEWAY-AGAIN"
    );
    let disk = home.path().join("c.qcow2");
    ferro_test_support::run_ok("qemu-img", &["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);
    let c_disk = format!("[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n", disk.display());
    for (name, net, extra, script) in [("a", "lab", "mac = \"52:54:00:77:00:05\"\n", a.as_str()), ("b", "lab", "", &b), ("c", "iso", &c_disk, &c)] {
        api.expect("POST", "/v1/domains", Some(&linux_domain(name, net, extra, script)), 201);
    }
    let mut consoles = Vec::new();
    for name in ["a", "b", "c"] {
        d.ferro_ok(&["start", name]);
        consoles.push((name, d.console(name)));
    }

    // Leases while the guests still run (they power off when their command ends).
    let mut out = std::collections::HashMap::new();
    for (name, con) in &mut consoles {
        let text = command_output(&read_console(con, "\nLEASE-END", BOOT_LIMIT));
        let lease = line_value(&text, "LEASE ").to_string();
        let ifaddr: Value = serde_json::from_str(&d.ferro_ok(&["domifaddr", name, "--json"])).unwrap();
        let want_ip = lease.split('/').next().unwrap().to_string();
        ferro_test_support::wait_for(&format!("domifaddr {name} to show {want_ip}"), Duration::from_secs(30), || {
            let ifaddr: Value = serde_json::from_str(&d.ferro_ok(&["domifaddr", name, "--json"])).unwrap();
            ifaddr[0]["address"].as_str().is_some_and(|a| a.starts_with(&want_ip))
        });
        assert_eq!(ifaddr.as_array().map(Vec::len), Some(1), "{ifaddr}");
        out.insert(*name, (lease, text));
    }
    let (_, mut con_c) = consoles.pop().expect("c's console");
    for (name, con) in &mut consoles {
        let text = read_console(con, "FERRO-POWEROFF", BOOT_LIMIT);
        eprintln!("--- {name}:\n{}{text}", out[name].1);
        let all = format!("{}\n{}", out[name].1, command_output(&text));
        out.get_mut(name).unwrap().1 = all;
    }

    // c: snapshot at its first wait, write b, revert, check. Markers are matched by their line
    // end: the read that found LEASE-END may already have taken the newline before SNAP-READY.
    let ready = read_console(&mut con_c, "SNAP-READY\r", BOOT_LIMIT);
    let created = d.ferro_ok(&["snapshot-create-as", "c", "s1"]);
    assert!(created.contains("Domain snapshot s1 created"), "{created}");
    let s1: Value = serde_json::from_str(&d.ferro_ok(&["snapshot-info", "c", "s1", "--json"])).unwrap();
    assert_eq!((s1["state"].as_str(), &s1["disks"]), (Some("running"), &serde_json::json!([disk.display().to_string()])), "{s1}");
    con_c.write_all(b"w\n").expect("type into c's console");
    let written = read_console(&mut con_c, "B-WRITTEN\r", BOOT_LIMIT);
    drop(con_c);
    d.ferro_ok(&["snapshot-revert", "c", "s1"]);
    assert_eq!(d.ferro_ok(&["domstate", "c"]).trim(), "running");
    let mut con_c = d.console("c");
    con_c.write_all(b"v\n").expect("type into c's console");
    let after = command_output(&read_console(&mut con_c, "FERRO-POWEROFF", BOOT_LIMIT));
    eprintln!("--- c after the snapshot:\n{ready}{written}\n--- after the revert:\n{after}");
    assert!(after.contains("B-GONE"), "the file written after the snapshot survived the revert");
    assert!(after.contains("A-before"), "the file written before the snapshot is not intact");
    assert!(after.contains("C-again"), "the disk does not take writes after the revert");
    assert!(after.contains("GATEWAY-AGAIN"), "the network does not work after the revert");
    assert!(after.contains("FERRO-CMD-RC 0"), "c's command failed after the revert");
    ferro_test_support::wait_for("c to shut off", Duration::from_secs(30), || api.expect("GET", "/v1/domains/c", None, 200)["state"] == "shutoff");
    let listed = ferro_test_support::run_ok("qemu-img", &["snapshot", "-l", disk.to_str().unwrap()]);
    assert!(listed.contains("s1"), "qemu-img does not list the disk snapshot: {listed}");
    ferro_test_support::run_ok("qemu-img", &["check", "-q", disk.to_str().unwrap()]);
    d.ferro_ok(&["snapshot-delete", "c", "s1"]);
    let listed = ferro_test_support::run_ok("qemu-img", &["snapshot", "-l", disk.to_str().unwrap()]);
    assert!(!listed.contains("s1"), "the disk snapshot outlived its domain snapshot: {listed}");
    out.get_mut("c").unwrap().1.push_str(&format!("\n{}", command_output(&ready)));

    let (lease_a, text_a) = &out["a"];
    let (lease_b, text_b) = &out["b"];
    let (lease_c, text_c) = &out["c"];
    assert_eq!(lease_a, "10.77.0.5/24", "a's fixed lease");
    let b_ip: std::net::Ipv4Addr = lease_b.trim_end_matches("/24").parse().unwrap_or_else(|_| panic!("b's lease {lease_b}"));
    assert!((100..=150).contains(&b_ip.octets()[3]) && lease_b.starts_with("10.77.0.") && lease_b.ends_with("/24"), "b's lease {lease_b} is outside the range");
    let c_ip: std::net::Ipv4Addr = lease_c.trim_end_matches("/24").parse().unwrap_or_else(|_| panic!("c's lease {lease_c}"));
    assert!((10..=20).contains(&c_ip.octets()[3]) && lease_c.starts_with("10.78.0.") && lease_c.ends_with("/24"), "c's lease {lease_c} is outside the range");
    for (name, text) in [("a", text_a), ("b", text_b)] {
        assert!(text.contains("GATEWAY-OK"), "{name} could not ping its gateway");
        assert!(text.contains("OUTSIDE-OK"), "{name} did not reach the outside host through NAT");
    }
    assert_eq!(line_value(text_a, "RESOLVED b"), b_ip.to_string(), "a resolved b by name to b's lease");
    assert_eq!(line_value(text_b, "RESOLVED a"), "10.77.0.5", "b resolved a by name to a's lease");
    assert!(text_a.contains("PEER-OK") && text_a.contains("SENT-OK"), "a did not reach b");
    assert!(text_b.contains("hello-from-a"), "b never got a's message over TCP");
    assert!(text_c.contains("GATEWAY-OK"), "c could not ping its gateway");
    assert!(text_c.contains("OUTSIDE-BLOCKED"), "the isolated guest reached the outside host");
    assert!(text_c.contains("LAB-BLOCKED"), "the isolated guest reached the NAT network");

    // ferrod's view of the leases matches what the guests were given.
    let leases: Value = serde_json::from_str(&d.ferro_ok(&["net-dhcp-leases", "lab", "--json"])).unwrap();
    let ips: Vec<&str> = leases.as_array().unwrap().iter().filter_map(|l| l["ip"].as_str()).collect();
    assert!(ips.contains(&"10.77.0.5") && ips.contains(&b_ip.to_string().as_str()), "{leases}");
    d.cleanup();
}
