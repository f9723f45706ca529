//! Network namespaces for tests and benchmarks: taps and sockets live in a namespace made for the
//! test and deleted with it, so nothing touches the host's own interfaces. Creating one needs
//! root (CAP_SYS_ADMIN) and iproute2; without them the test fails saying so.
//!
//! For virtual network tests: a "host" namespace (where ferro-net or ferrod runs) with an
//! "outside" namespace behind a veth that has no route back to any guest subnet (so only NAT can
//! answer it), and guest stand-ins (namespaces on veths plugged into a bridge) that take DHCP
//! leases with busybox udhcpc, resolve names with nslookup and ping.

use std::ffi::{CString, OsStr};
use crate::run_ok;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Every protocol, for [`packet_socket`].
pub const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;

/// A named network namespace (`ip netns add`), deleted with every interface in it when dropped.
pub struct Netns(String);

impl Netns {
    /// `ferro-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Netns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("ferro-{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("run ip (iproute2; scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "cannot make network namespace {name} (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Netns(name)
    }

    /// A namespace holding tap `dev`, up, with `host_addr` (such as `10.0.0.1/24`) if given.
    pub fn with_tap(tag: &str, dev: &str, host_addr: Option<&str>) -> Netns {
        let ns = Netns::new(tag);
        ns.ip(&["tuntap", "add", "dev", dev, "mode", "tap"]);
        if let Some(addr) = host_addr {
            ns.ip(&["addr", "add", addr, "dev", dev]);
        }
        ns.ip(&["link", "set", dev, "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `ip -n <ns> ARGS`, asserting success; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        crate::run_ok("ip", &full)
    }

    pub fn link_exists(&self, dev: &str) -> bool {
        Command::new("ip").args(["-n", &self.0, "link", "show", dev]).output().is_ok_and(|o| o.status.success())
    }

    /// The MAC address of `dev`, as `ip` prints it.
    pub fn mac_of(&self, dev: &str) -> String {
        let out = self.ip(&["-o", "link", "show", dev]);
        let at = out.find("link/ether ").unwrap_or_else(|| panic!("{dev} is not an ethernet link: {out}")) + "link/ether ".len();
        out[at..at + 17].to_owned()
    }

    /// `program` run inside the namespace (`ip netns exec`), so the taps it opens live there.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace; sockets and taps it opens stay there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on an fd we own; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// A [`packet_socket`] on `dev` inside the namespace.
    pub fn packet_socket(&self, dev: &str, protocol: u16) -> OwnedFd {
        let dev = dev.to_owned();
        self.enter(move || packet_socket(&dev, protocol))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread in a new network namespace of its own (gone when the thread ends), so
/// taps made there never touch the host's interfaces. Panics, saying why, when the namespace
/// cannot be made.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with a flag; it changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("cannot make a network namespace (the test needs root): {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A raw AF_PACKET socket bound to `dev` for ethertype `protocol` ([`ETH_P_ALL`] for every
/// frame, both directions), non-blocking, in the calling thread's namespace. Reading it yields
/// whole frames; writing to it sends a frame out of `dev`.
pub fn packet_socket(dev: &str, protocol: u16) -> OwnedFd {
    let name = CString::new(dev).expect("an interface name without NUL");
    // SAFETY: plain socket/bind syscalls on an fd we own, with a NUL-terminated name and an
    // address struct that lives across the call; every result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(protocol.to_be()));
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let sock = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol.to_be();
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(addr.sll_ifindex > 0, "no interface {dev:?}");
        let len = size_of::<libc::sockaddr_ll>() as u32;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0, "bind to {dev}: {}", std::io::Error::last_os_error());
        sock
    }
}

/// Every frame a non-blocking [`packet_socket`] holds now.
pub fn read_frames(sock: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut file = std::fs::File::from(sock.try_clone().expect("dup the packet socket"));
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = file.read(&mut buf) {
        frames.push(buf[..n].to_vec());
    }
    frames
}

pub const BUSYBOX: &str = "/bin/busybox";
pub const OUTSIDE_HOST: &str = "203.0.113.1";
pub const OUTSIDE: &str = "203.0.113.2";

/// Runs a command inside `ns`; its output whatever the status.
pub fn exec(ns: &Netns, args: &[&str]) -> Output {
    ns.command(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn nft_ruleset(ns: &Netns) -> String {
    let out = exec(ns, &["nft", "list", "ruleset"]);
    assert!(out.status.success(), "nft list ruleset (apt-get install nftables): {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip_forward(ns: &Netns) -> String {
    String::from_utf8_lossy(&exec(ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout).trim().to_owned()
}

/// A namespace with its loopback up.
pub fn namespace(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.ip(&["link", "set", "lo", "up"]);
    ns
}

/// The host namespace with an uplink to the outside namespace.
pub fn host_and_outside() -> (Netns, Netns) {
    let host = namespace("host");
    let outside = namespace("out");
    host.ip(&["link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", outside.name()]);
    host.ip(&["addr", "add", &format!("{OUTSIDE_HOST}/24"), "dev", "uplink"]);
    host.ip(&["link", "set", "uplink", "up"]);
    outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);
    (host, outside)
}

/// A guest stand-in: a namespace whose eth0 (with `mac`) is plugged into `bridge` of `host`.
pub fn guest(host: &Netns, bridge: &str, port: &str, mac: &str) -> Netns {
    let g = namespace("guest");
    host.ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", g.name()]);
    host.ip(&["link", "set", port, "master", bridge, "up"]);
    g.ip(&["link", "set", "eth0", "address", mac, "up"]);
    g
}

/// What udhcpc got: the address, and the router it was told (empty when none).
pub struct DhcpResult {
    pub ip: String,
    pub router: String,
}

/// Runs busybox udhcpc in each guest at once; the script configures the address and default route.
/// udhcpc's 3 s timeout (its default) matters: dnsmasq pings an address before offering it and
/// answers nothing else meanwhile, so with shorter timeouts concurrent clients give up.
pub fn dhcp(guests: &[&Netns], dir: &Path) -> Vec<DhcpResult> {
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} is missing: apt-get install busybox-static");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\necho \"LEASE ip=$ip router=$router\"\n\
         ip addr add \"$ip/$mask\" dev \"$interface\"\n[ -z \"$router\" ] || ip route add default via \"$router\"\n",
    )
    .unwrap();
    run_ok("chmod", &["+x", script.to_str().unwrap()]);
    let children: Vec<_> = guests
        .iter()
        .map(|g| {
            g.command(BUSYBOX).args(["udhcpc", "-i", "eth0", "-n", "-q", "-t", "10", "-T", "3", "-s"]).arg(&script).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
        })
        .collect();
    children
        .into_iter()
        .map(|out| {
            let out = out.and_then(|child| child.wait_with_output()).expect("run udhcpc");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "udhcpc got no lease: {text}{}", String::from_utf8_lossy(&out.stderr));
            let line = text.lines().find(|l| l.starts_with("LEASE ")).expect("the script's LEASE line");
            let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("").to_owned();
            DhcpResult { ip: field("ip="), router: field("router=") }
        })
        .collect()
}

pub fn pings(from: &Netns, to: &str) -> bool {
    exec(from, &[BUSYBOX, "ping", "-c", "1", "-W", "2", to]).status.success()
}

/// The address `name` resolves to through the DNS server `server`, as busybox nslookup says.
pub fn resolve(from: &Netns, name: &str, server: &str) -> Option<String> {
    let out = exec(from, &[BUSYBOX, "nslookup", name, server]);
    let text = String::from_utf8_lossy(&out.stdout);
    let after_name = text.split_once(&format!("Name:\t{name}"))?.1;
    after_name.lines().find_map(|l| l.trim().strip_prefix("Address: ")).map(|a| a.split(':').next().unwrap_or(a).to_owned())
}

/// Live (not zombie) processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
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

/// Kills, when dropped, every dnsmasq still running on a state directory: a test that fails
/// half-way must not leave daemons behind (they would keep its namespace alive).
pub struct KillLeftovers(pub String);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.0) {
            // SAFETY: kill(2) with a pid and a signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
