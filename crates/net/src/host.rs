//! [`HostNetworks`]: the networks running on this host, brought up, found again after a restart,
//! supervised and torn down; and the taps of guests' NICs.
//!
//! Starting a nat or isolated network: check the host (bridge name free, subnet clear of every
//! host route and running network), create the bridge with the gateway address, install the
//! firewall chains, switch IPv4 forwarding on for NAT, start dnsmasq and a thread that restarts
//! it if it dies. A failure part-way undoes what was done. Destroying undoes all of it; nothing of
//! the network stays on the host (its state directory keeps the lease database only).
//!
//! Dropping a `HostNetworks` (ferrod exiting) leaves the networks running: [`HostNetworks::adopt`]
//! takes them back without duplicating rules or dnsmasq instances.

use crate::config::{Mode, NetworkConfig};
use crate::dnsmasq::{self, Files, GuestName, Lease, Process};
use crate::firewall::{self, NetworkRules};
use crate::link::Netlink;
use crate::{NetError, find_program, tap};
use ferro_vmm_api::MacAddr;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// dnsmasq restarts allowed within [`RESTART_WINDOW`] before the supervisor gives up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
const RESTART_DELAY: Duration = Duration::from_secs(1);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// How [`HostNetworks::adopt`] found a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Its bridge, rules and dnsmasq were there and are ours again.
    Adopted,
    /// Its bridge was gone (the host rebooted): it was started afresh.
    Restarted,
}

/// The networks ferrod runs on this host.
pub struct HostNetworks {
    /// One directory per network (dnsmasq's files), and the forwarding marker.
    state_dir: PathBuf,
    running: BTreeMap<String, Running>,
}

struct Running {
    config: NetworkConfig,
    guests: Vec<GuestName>,
    /// nat and isolated networks: the supervised dnsmasq.
    dnsmasq: Option<Supervisor>,
}

impl HostNetworks {
    /// `state_dir` is where the networks' dnsmasq files go (`$FERRO_HOME/networks`).
    pub fn new(state_dir: &Path) -> HostNetworks {
        HostNetworks { state_dir: state_dir.to_owned(), running: BTreeMap::new() }
    }

    fn files(&self, network: &str) -> Files {
        Files::new(&self.state_dir.join(network))
    }

    pub fn is_running(&self, network: &str) -> bool {
        self.running.contains_key(network)
    }

    /// The bridge guests of a running network are attached to.
    pub fn bridge_of(&self, network: &str) -> Option<&str> {
        self.running.get(network).map(|r| r.config.bridge.as_str())
    }

    /// The pid of a running network's dnsmasq (None for bridge networks, or while it restarts).
    pub fn dnsmasq_pid(&self, network: &str) -> Option<u32> {
        let pid = self.running.get(network)?.dnsmasq.as_ref()?.pid.load(Ordering::SeqCst);
        (pid != 0).then_some(pid)
    }

    /// Starts `config`, which must not be running.
    pub fn start(&mut self, config: &NetworkConfig) -> Result<(), NetError> {
        if self.is_running(&config.name) {
            return Err(NetError::Conflict(format!("network {} is already running", config.name)));
        }
        let mut nl = netlink()?;
        if config.mode == Mode::Bridge {
            check_host_bridge(&mut nl, &config.bridge)?;
            self.running.insert(config.name.clone(), Running { config: config.clone(), guests: Vec::new(), dnsmasq: None });
            return Ok(());
        }
        find_program("nft", "nftables")?;
        find_program("dnsmasq", "dnsmasq-base")?;
        self.check_clear(&mut nl, config)?;
        self.stop_stale_dnsmasq(&config.name);
        let result = self.bring_up(&mut nl, config, Vec::new());
        if result.is_err() {
            self.tear_down(&mut nl, config);
        }
        result
    }

    /// The bridge name and subnet of `config` are free on the host.
    fn check_clear(&self, nl: &mut Netlink, config: &NetworkConfig) -> Result<(), NetError> {
        if nl.link(&config.bridge).map_err(|e| NetError::host("netlink: look up links", e))?.is_some() {
            return Err(NetError::Conflict(format!("bridge: {} already exists on the host; choose another bridge name", config.bridge)));
        }
        let subnet = config.subnet().expect("validated: nat and isolated networks have an address");
        for other in self.running.values() {
            if let Some(theirs) = other.config.subnet()
                && overlaps(subnet, theirs)
            {
                return Err(NetError::Conflict(format!("ip: {subnet} overlaps network {} ({theirs})", other.config.name)));
            }
        }
        for route in nl.routes().map_err(|e| NetError::host("netlink: list routes", e))? {
            if overlaps(subnet, route.destination) {
                let device = route.device.map(|d| format!(" on {d}")).unwrap_or_default();
                return Err(NetError::Conflict(format!("ip: {subnet} overlaps the host route to {}{device}; choose another subnet", route.destination)));
            }
        }
        Ok(())
    }

    fn bring_up(&mut self, nl: &mut Netlink, config: &NetworkConfig, guests: Vec<GuestName>) -> Result<(), NetError> {
        let gateway = config.ip.expect("validated: nat and isolated networks have an address");
        let what = |step: &str| format!("network {}: {step} {}", config.name, config.bridge);
        nl.add_bridge(&config.bridge, MacAddr::random()).map_err(|e| NetError::host(what("create bridge"), e))?;
        let index = link_index(nl, &config.bridge)?;
        nl.add_address(index, gateway).map_err(|e| NetError::host(what(&format!("add address {gateway} to")), e))?;
        nl.set_up(index, true).map_err(|e| NetError::host(what("bring up"), e))?;
        self.finish(config, guests)
    }

    /// Firewall, forwarding and dnsmasq for a network whose bridge is up.
    fn finish(&mut self, config: &NetworkConfig, guests: Vec<GuestName>) -> Result<(), NetError> {
        let subnet = config.subnet().expect("validated: nat and isolated networks have an address");
        firewall::apply(&NetworkRules { network: &config.name, bridge: &config.bridge, subnet, nat: config.mode == Mode::Nat })?;
        if config.mode == Mode::Nat {
            self.forwarding_on(&config.name)?;
        }
        let files = self.files(&config.name);
        dnsmasq::write_files(&files, config, &guests)?;
        let pid = match dnsmasq::running_pid(&files) {
            Some(pid) => {
                // An adopted dnsmasq rereads the hosts file just written.
                dnsmasq::reload(pid)?;
                pid
            }
            None => dnsmasq::start(&files)?,
        };
        let supervisor = Supervisor::spawn(&config.name, files, pid)?;
        self.running.insert(config.name.clone(), Running { config: config.clone(), guests, dnsmasq: Some(supervisor) });
        Ok(())
    }

    /// Takes back a network that ran under a previous ferrod: reuses its bridge, replaces its
    /// firewall chains (one transaction, so rules are never doubled) and keeps its dnsmasq if it
    /// still runs, else starts one. Starts the network afresh when its bridge is gone.
    pub fn adopt(&mut self, config: &NetworkConfig, guests: Vec<GuestName>) -> Result<Adoption, NetError> {
        if self.is_running(&config.name) {
            return Err(NetError::Conflict(format!("network {} is already running", config.name)));
        }
        let mut nl = netlink()?;
        if config.mode == Mode::Bridge {
            self.start(config)?;
            return Ok(Adoption::Adopted);
        }
        let existing = nl.link(&config.bridge).map_err(|e| NetError::host("netlink: look up links", e))?;
        let Some(bridge) = existing else {
            self.stop_stale_dnsmasq(&config.name);
            self.start(config)?;
            self.set_guest_names(&config.name, guests)?;
            return Ok(Adoption::Restarted);
        };
        if bridge.kind.as_deref() != Some("bridge") {
            return Err(NetError::Conflict(format!("bridge: {} exists on the host but is not a bridge", config.bridge)));
        }
        let gateway = config.ip.expect("validated: nat and isolated networks have an address");
        let addresses = nl.addresses(bridge.index).map_err(|e| NetError::host("netlink: list addresses", e))?;
        if !addresses.contains(&gateway) {
            nl.add_address(bridge.index, gateway).map_err(|e| NetError::host(format!("add address {gateway} to {}", config.bridge), e))?;
        }
        if !bridge.up {
            nl.set_up(bridge.index, true).map_err(|e| NetError::host(format!("bring up {}", config.bridge), e))?;
        }
        self.finish(config, guests)?;
        Ok(Adoption::Adopted)
    }

    fn stop_stale_dnsmasq(&self, network: &str) {
        let files = self.files(network);
        if let Some(pid) = dnsmasq::running_pid(&files)
            && let Err(e) = dnsmasq::stop(pid, &files)
        {
            tracing::warn!(network, "stale dnsmasq: {e}");
        }
    }

    /// Stops a running network and removes everything it put on the host.
    pub fn destroy(&mut self, network: &str) -> Result<(), NetError> {
        let Some(mut running) = self.running.remove(network) else {
            return Err(NetError::Conflict(format!("network {network} is not running")));
        };
        if let Some(supervisor) = running.dnsmasq.take() {
            supervisor.stop();
        }
        if running.config.mode == Mode::Bridge {
            return Ok(());
        }
        let mut nl = netlink()?;
        self.tear_down(&mut nl, &running.config);
        self.forwarding_off_if_idle()?;
        // Anything tear_down could not remove is still there: say so rather than pretend.
        let files = self.files(network);
        if dnsmasq::running_pid(&files).is_some() {
            return Err(NetError::Host(format!("network {network}: dnsmasq is still running after the stop")));
        }
        if nl.link(&running.config.bridge).map_err(|e| NetError::host("netlink: look up links", e))?.is_some() {
            return Err(NetError::Host(format!("network {network}: bridge {} could not be removed", running.config.bridge)));
        }
        if firewall::has_rules(network)? {
            return Err(NetError::Host(format!("network {network}: its nftables chains could not be removed")));
        }
        Ok(())
    }

    /// Removes dnsmasq, the chains and the bridge of `config`, whichever exist; errors are logged
    /// (this also runs after a failed start, where some parts were never made).
    fn tear_down(&self, nl: &mut Netlink, config: &NetworkConfig) {
        self.stop_stale_dnsmasq(&config.name);
        if let Err(e) = firewall::remove(&config.name) {
            tracing::warn!(network = config.name, "remove firewall chains: {e}");
        }
        match nl.link(&config.bridge) {
            Ok(Some(link)) if link.kind.as_deref() == Some("bridge") => {
                if let Err(e) = nl.delete_link(link.index) {
                    tracing::warn!(network = config.name, "delete bridge {}: {e}", config.bridge);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(network = config.name, "look up bridge {}: {e}", config.bridge),
        }
        let _ = std::fs::remove_file(self.files(&config.name).pid());
    }

    /// Deletes the state directory of a network that is being undefined (its lease database).
    pub fn forget(&self, network: &str) -> Result<(), NetError> {
        if self.is_running(network) {
            return Err(NetError::Conflict(format!("network {network} is running")));
        }
        let dir = self.state_dir.join(network);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetError::host(dir.display(), e)),
            _ => Ok(()),
        }
    }

    /// The DHCP leases of a running nat or isolated network.
    pub fn leases(&self, network: &str) -> Vec<Lease> {
        match self.running.get(network) {
            Some(r) if r.config.mode != Mode::Bridge => dnsmasq::read_leases(&self.files(network)),
            _ => Vec::new(),
        }
    }

    /// Sets the guest names DNS answers with on a running network (MAC -> name), replacing the
    /// previous list, and has dnsmasq reread them.
    pub fn set_guest_names(&mut self, network: &str, guests: Vec<GuestName>) -> Result<(), NetError> {
        let files = self.files(network);
        let Some(running) = self.running.get_mut(network) else {
            return Err(NetError::Conflict(format!("network {network} is not running")));
        };
        running.guests = guests;
        let Some(supervisor) = &running.dnsmasq else { return Ok(()) };
        let pid = supervisor.pid.load(Ordering::SeqCst);
        if pid == 0 {
            // Between restarts: the next start writes the files anew.
            return dnsmasq::write_files(&files, &running.config, &running.guests);
        }
        dnsmasq::update_hosts(&files, &running.config, &running.guests, pid)
    }

    fn marker(&self) -> PathBuf {
        self.state_dir.join("ip_forward.switched-on")
    }

    /// Switches IPv4 forwarding on for NAT network `network` if it is off, and remembers that
    /// ferrod did it (so it switches it off again, and only then).
    fn forwarding_on(&self, network: &str) -> Result<(), NetError> {
        let on = std::fs::read_to_string(IP_FORWARD).map_err(|e| NetError::host(IP_FORWARD, e))?.trim() == "1";
        if on {
            return Ok(());
        }
        std::fs::create_dir_all(&self.state_dir).map_err(|e| NetError::host(self.state_dir.display(), e))?;
        std::fs::write(self.marker(), "ferrod switched IPv4 forwarding on\n").map_err(|e| NetError::host(self.marker().display(), e))?;
        std::fs::write(IP_FORWARD, "1").map_err(|e| NetError::host(IP_FORWARD, e))?;
        tracing::info!(network, "IPv4 forwarding switched on: NAT network {network} runs");
        Ok(())
    }

    /// Switches IPv4 forwarding off when ferrod switched it on and no NAT network runs any more.
    fn forwarding_off_if_idle(&self) -> Result<(), NetError> {
        if self.running.values().any(|r| r.config.mode == Mode::Nat) || !self.marker().exists() {
            return Ok(());
        }
        std::fs::write(IP_FORWARD, "0").map_err(|e| NetError::host(IP_FORWARD, e))?;
        let _ = std::fs::remove_file(self.marker());
        tracing::info!("IPv4 forwarding switched off: no NAT network runs");
        Ok(())
    }
}

impl Drop for HostNetworks {
    /// Stops supervising; the networks and their dnsmasq keep running for the next ferrod.
    fn drop(&mut self) {
        for running in self.running.values_mut() {
            if let Some(supervisor) = running.dnsmasq.take() {
                supervisor.detach();
            }
        }
    }
}

fn netlink() -> Result<Netlink, NetError> {
    Netlink::open().map_err(|e| NetError::host("open a netlink socket", e))
}

fn link_index(nl: &mut Netlink, name: &str) -> Result<u32, NetError> {
    match nl.link(name).map_err(|e| NetError::host(format!("look up {name}"), e))? {
        Some(link) => Ok(link.index),
        None => Err(NetError::Host(format!("{name} vanished right after it was made"))),
    }
}

fn check_host_bridge(nl: &mut Netlink, bridge: &str) -> Result<u32, NetError> {
    match nl.link(bridge).map_err(|e| NetError::host("netlink: look up links", e))? {
        Some(link) if link.kind.as_deref() == Some("bridge") => Ok(link.index),
        Some(_) => Err(NetError::Conflict(format!("bridge: {bridge} exists on the host but is not a bridge"))),
        None => Err(NetError::Conflict(format!("bridge: {bridge} does not exist on the host; create it first"))),
    }
}

fn overlaps(a: ipnet::Ipv4Net, b: ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Creates the persistent tap `tap`, attaches it to bridge `bridge`, brings it up and returns it
/// opened for a VMM. The name must be free.
pub fn plug_tap(tap: &str, bridge: &str) -> Result<OwnedFd, NetError> {
    let mut nl = netlink()?;
    let bridge_index = check_host_bridge(&mut nl, bridge)?;
    if nl.link(tap).map_err(|e| NetError::host("netlink: look up links", e))?.is_some() {
        return Err(NetError::Conflict(format!("tap: {tap} already exists on the host")));
    }
    tap::create_persistent(tap).map_err(|e| NetError::host(format!("create tap {tap}"), e))?;
    let plugged = (|| {
        let index = link_index(&mut nl, tap)?;
        nl.set_controller(index, bridge_index).map_err(|e| NetError::host(format!("attach {tap} to {bridge}"), e))?;
        nl.set_up(index, true).map_err(|e| NetError::host(format!("bring up {tap}"), e))?;
        tap::open(tap).map_err(|e| NetError::host(format!("open tap {tap}"), e))
    })();
    if plugged.is_err() {
        let _ = unplug_tap(tap);
    }
    plugged
}

/// Deletes the tap `tap` if it exists (and is a tap).
pub fn unplug_tap(tap: &str) -> Result<(), NetError> {
    let mut nl = netlink()?;
    match nl.link(tap).map_err(|e| NetError::host("netlink: look up links", e))? {
        Some(link) if link.kind.as_deref() == Some("tun") => nl.delete_link(link.index).map_err(|e| NetError::host(format!("delete tap {tap}"), e)),
        Some(_) => Err(NetError::Conflict(format!("{tap} is not a tap; not deleting it"))),
        None => Ok(()),
    }
}

/// The first interface name `prefix0`, `prefix1`, ... that is not in use.
pub fn free_ifname(prefix: &str) -> Result<String, NetError> {
    let links = netlink()?.links().map_err(|e| NetError::host("netlink: list links", e))?;
    (0..10_000)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| name.len() <= 15 && !links.iter().any(|l| &l.name == name))
        .ok_or_else(|| NetError::Conflict(format!("no free interface name starting with {prefix}")))
}

/// A thread that waits for a network's dnsmasq to exit and starts it again.
struct Supervisor {
    /// The current dnsmasq's pid; 0 while none runs.
    pid: Arc<AtomicU32>,
    files: Files,
    /// Writing to it (or closing it) stops the thread.
    stop: OwnedFd,
    thread: JoinHandle<()>,
}

impl Supervisor {
    fn spawn(network: &str, files: Files, pid: u32) -> Result<Supervisor, NetError> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds, which become owned right below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(NetError::host("pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: both fds are new and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let shared = Arc::new(AtomicU32::new(pid));
        let (network, thread_files, thread_pid) = (network.to_owned(), files.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("dnsmasq-{network}"))
            .spawn(move || supervise(&network, &thread_files, &thread_pid, &read))
            .map_err(|e| NetError::host("spawn the dnsmasq supervisor", e))?;
        Ok(Supervisor { pid: shared, files, stop: write, thread })
    }

    /// Ends supervision and stops the dnsmasq.
    fn stop(self) {
        let files = self.files.clone();
        let pid = self.detach();
        if pid != 0
            && let Err(e) = dnsmasq::stop(pid, &files)
        {
            tracing::warn!("{e}");
        }
    }

    /// Ends supervision, leaving dnsmasq running; returns its pid.
    fn detach(self) -> u32 {
        drop(self.stop);
        let _ = self.thread.join();
        self.pid.load(Ordering::SeqCst)
    }
}

/// Waits until one of `fds` is readable (or hung up) or `limit` passes (None: no limit); says
/// which are.
fn wait_readable(fds: &[&OwnedFd], limit: Option<Duration>) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> = fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let timeout = limit.map_or(-1, |l| l.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: poll on pollfds that live for the call.
    let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}

fn supervise(network: &str, files: &Files, pid: &AtomicU32, stop: &OwnedFd) {
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let current = pid.load(Ordering::SeqCst);
        let process = Process::open(current).ok();
        let exited = match &process {
            Some(p) => wait_readable(&[stop, p.fd()], None),
            None => vec![false, true],
        };
        if exited[0] {
            return;
        }
        if !exited[1] {
            continue;
        }
        pid.store(0, Ordering::SeqCst);
        restarts.push_back(Instant::now());
        while restarts.front().is_some_and(|t| t.elapsed() > RESTART_WINDOW) {
            restarts.pop_front();
        }
        if restarts.len() > MAX_RESTARTS {
            tracing::error!(network, "dnsmasq exited {} times within {:?}; no longer restarting it (DHCP and DNS are down)", restarts.len(), RESTART_WINDOW);
            let _ = wait_readable(&[stop], None);
            return;
        }
        tracing::warn!(network, pid = current, "dnsmasq exited; restarting it");
        if wait_readable(&[stop], Some(RESTART_DELAY))[0] {
            return;
        }
        match dnsmasq::start(files) {
            Ok(new) => {
                tracing::info!(network, pid = new, "dnsmasq restarted");
                pid.store(new, Ordering::SeqCst);
            }
            Err(e) => tracing::error!(network, "restart dnsmasq: {e}"),
        }
    }
}
