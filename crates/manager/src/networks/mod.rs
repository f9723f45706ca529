//! The networks service: virtual network definitions (kept as the TOML the user wrote) and their
//! life on this host, built by ferro-net's [`HostNetworks`] (bridge, firewall chains, dnsmasq).
//! It owns the network records and their rows in the store.
//!
//! A network marked active in the store is taken back by a restarted ferrod ([`Networks::recover`])
//! without duplicating rules or dnsmasq instances. The domains service registers the running
//! domains whose NICs are on a network ([`Networks::attach`]): their names go into the network's
//! DNS, and a network in use cannot be destroyed or undefined. Host work (netlink, nft, dnsmasq) is blocking:
//! the API calls these methods on blocking threads. One mutex serializes every change, so two
//! requests never build or tear down networks at the same time.

use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::model::{NetworkInfo, new_uuid};
use crate::store::{Store, StoredNetwork};
use ferro_net::dnsmasq::GuestName;
use ferro_net::{HostNetworks, Lease, NetError, NetworkConfig};
use ferro_vmm_api::MacAddr;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

struct Network {
    uuid: String,
    definition: String,
    /// The parsed definition, or why the stored text no longer validates.
    config: std::result::Result<NetworkConfig, String>,
    autostart: bool,
    /// Whether the network should be running (what a restarted ferrod adopts).
    active: bool,
}

struct Inner {
    records: BTreeMap<String, Network>,
    host: HostNetworks,
    /// For each network, the running domains on it and the MACs of their NICs there.
    users: BTreeMap<String, BTreeMap<String, Vec<MacAddr>>>,
}

impl Inner {
    /// Refuses to take down a network a running domain uses.
    fn check_unused(&self, name: &str, doing: &str) -> Result<()> {
        match self.users.get(name).filter(|u| !u.is_empty()) {
            Some(users) => {
                let names: Vec<&str> = users.keys().map(String::as_str).collect();
                Err(Error::conflict(format!("network {name} is in use by domain {}; stop it before you {doing} the network", names.join(", "))))
            }
            None => Ok(()),
        }
    }

    /// Has the network's DNS answer with the names of the domains on it.
    fn publish_names(&mut self, network: &str) {
        if !self.host.is_running(network) {
            return;
        }
        let guests: Vec<GuestName> = self
            .users
            .get(network)
            .into_iter()
            .flatten()
            .filter(|(domain, _)| ferro_net::config::validate_hostname(domain).is_ok())
            .flat_map(|(domain, macs)| macs.iter().map(|mac| GuestName { mac: *mac, name: domain.clone() }))
            .collect();
        if let Err(e) = self.host.set_guest_names(network, guests) {
            tracing::warn!(network, "cannot update the guest names in DNS: {e}");
        }
    }
}

pub struct Networks {
    store: Arc<Store>,
    events: Arc<EventHub>,
    inner: Mutex<Inner>,
}

/// The network ferrod defines on its first start (see [`Networks::define_default`]).
pub const DEFAULT_NETWORK: &str = "default";

fn no_network(name: &str) -> Error {
    Error::not_found(format!("network {name:?} is not defined (see `ferro net-list --all`)"))
}

/// A host failure from ferro-net as a service error: conflicts stay conflicts (409), a missing
/// program or a refused host operation is an internal error naming it.
fn net_error(network: &str, e: NetError) -> Error {
    match e {
        NetError::Conflict(m) => Error::conflict(format!("network {network}: {m}")),
        NetError::MissingTool { .. } | NetError::Host(_) => Error::internal(format!("network {network}: {e}")),
    }
}

impl Networks {
    /// Loads every network from the store; `state_dir` holds the networks' dnsmasq files. Does
    /// not touch the host yet (see `recover`).
    pub fn open(state_dir: &Path, store: Arc<Store>, events: Arc<EventHub>) -> std::result::Result<Arc<Networks>, String> {
        let mut records = BTreeMap::new();
        for row in store.networks().map_err(|e| format!("cannot read networks: {e}"))? {
            let config = NetworkConfig::parse(&row.definition).map_err(|e| e.to_string()).and_then(|c| {
                if c.name == row.name { Ok(c) } else { Err(format!("name: stored as {:?} but the text says {:?}", row.name, c.name)) }
            });
            if let Err(e) = &config {
                tracing::error!(network = row.name, "stored definition is invalid: {e}");
            }
            let network = Network { uuid: row.uuid, definition: row.definition, config, autostart: row.autostart, active: row.active };
            records.insert(row.name, network);
        }
        let inner = Inner { records, host: HostNetworks::new(state_dir), users: BTreeMap::new() };
        Ok(Arc::new(Networks { store, events, inner: Mutex::new(inner) }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, name: &str, n: &Network) -> Result<()> {
        self.store.put_network(&StoredNetwork {
            name: name.to_string(),
            uuid: n.uuid.clone(),
            definition: n.definition.clone(),
            autostart: n.autostart,
            active: n.active,
        })?;
        Ok(())
    }

    fn info_of(host: &HostNetworks, name: &str, n: &Network) -> NetworkInfo {
        let config = n.config.as_ref().ok();
        NetworkInfo {
            name: name.to_string(),
            uuid: n.uuid.clone(),
            mode: config.map(|c| c.mode.name()),
            bridge: config.map(|c| c.bridge.clone()),
            active: host.is_running(name),
            autostart: n.autostart,
            dnsmasq_pid: host.dnsmasq_pid(name),
            error: n.config.as_ref().err().cloned(),
            config: config.cloned(),
        }
    }

    pub fn list(&self) -> Vec<NetworkInfo> {
        let inner = self.lock();
        inner.records.iter().map(|(name, n)| Self::info_of(&inner.host, name, n)).collect()
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo> {
        let inner = self.lock();
        let n = inner.records.get(name).ok_or_else(|| no_network(name))?;
        Ok(Self::info_of(&inner.host, name, n))
    }

    /// The definition as the user wrote it.
    pub fn definition(&self, name: &str) -> Result<String> {
        self.lock().records.get(name).map(|n| n.definition.clone()).ok_or_else(|| no_network(name))
    }

    /// Defines a new network or replaces the definition of an inactive one. Returns whether it
    /// was new.
    pub fn define(&self, text: &str) -> Result<(bool, NetworkInfo)> {
        let config = NetworkConfig::parse(text).map_err(|e| Error::invalid(e.to_string()))?;
        let name = config.name.clone();
        let mut inner = self.lock();
        if inner.host.is_running(&name) {
            return Err(Error::conflict(format!("network {name} is running; destroy it before changing its definition")));
        }
        let created = !inner.records.contains_key(&name);
        let (uuid, autostart) = inner.records.get(&name).map(|n| (n.uuid.clone(), n.autostart)).unwrap_or_else(|| (new_uuid(), false));
        let network = Network { uuid, definition: text.to_string(), config: Ok(config), autostart, active: false };
        self.persist(&name, &network)?;
        let info = Self::info_of(&inner.host, &name, &network);
        inner.records.insert(name.clone(), network);
        drop(inner);
        self.events.emit("network", &name, if created { "defined" } else { "redefined" }, "");
        Ok((created, info))
    }

    /// Removes an inactive network's definition and its state directory (the lease database).
    pub fn undefine(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        if !inner.records.contains_key(name) {
            return Err(no_network(name));
        }
        inner.check_unused(name, "undefine")?;
        if inner.host.is_running(name) {
            return Err(Error::conflict(format!("network {name} is running; run `ferro net-destroy {name}` first")));
        }
        inner.host.forget(name).map_err(|e| net_error(name, e))?;
        self.store.delete_network(name)?;
        inner.records.remove(name);
        drop(inner);
        self.events.emit("network", name, "undefined", "");
        Ok(())
    }

    /// Builds the network on the host: bridge, firewall chains, dnsmasq.
    pub fn start(&self, name: &str) -> Result<NetworkInfo> {
        self.start_locked(&mut self.lock(), name)
    }

    fn start_locked(&self, inner: &mut Inner, name: &str) -> Result<NetworkInfo> {
        let n = inner.records.get_mut(name).ok_or_else(|| no_network(name))?;
        if inner.host.is_running(name) {
            return Err(Error::conflict(format!("network {name} is already running")));
        }
        let config = n.config.as_ref().map_err(|e| Error::invalid(format!("network {name} has an invalid definition: {e}")))?;
        inner.host.start(config).map_err(|e| net_error(name, e))?;
        n.active = true;
        if let Err(e) = self.persist(name, n) {
            // Not recorded as active: a restarted ferrod would not adopt it, so do not leave it up.
            let _ = inner.host.destroy(name);
            return Err(e);
        }
        let info = Self::info_of(&inner.host, name, n);
        self.events.emit("network", name, "started", "");
        Ok(info)
    }

    /// Tears the network down; nothing of it stays on the host.
    pub fn destroy(&self, name: &str) -> Result<NetworkInfo> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if !inner.records.contains_key(name) {
            return Err(no_network(name));
        }
        if !inner.host.is_running(name) {
            return Err(Error::conflict(format!("network {name} is not running")));
        }
        inner.check_unused(name, "destroy")?;
        let n = inner.records.get_mut(name).ok_or_else(|| no_network(name))?;
        n.active = false;
        self.persist(name, n)?;
        let result = inner.host.destroy(name).map_err(|e| net_error(name, e));
        let info = Self::info_of(&inner.host, name, n);
        self.events.emit("network", name, "destroyed", "");
        result.map(|()| info)
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<NetworkInfo> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let n = inner.records.get_mut(name).ok_or_else(|| no_network(name))?;
        n.autostart = enabled;
        self.persist(name, n)?;
        let info = Self::info_of(&inner.host, name, n);
        self.events.emit("network", name, "autostart", if enabled { "enabled" } else { "disabled" });
        Ok(info)
    }

    /// The DHCP leases dnsmasq handed out on a running network.
    pub fn leases(&self, name: &str) -> Result<Vec<Lease>> {
        let inner = self.lock();
        if !inner.records.contains_key(name) {
            return Err(no_network(name));
        }
        if !inner.host.is_running(name) {
            return Err(Error::conflict(format!("network {name} is not running; run `ferro net-start {name}`")));
        }
        Ok(inner.host.leases(name))
    }

    /// Puts a starting domain's NICs (their MACs) on `network`, starting the network first when it
    /// is stopped and set to autostart. Returns the bridge the NICs' taps go on.
    pub fn attach(&self, network: &str, domain: &str, macs: &[MacAddr]) -> Result<String> {
        let mut inner = self.lock();
        if !inner.host.is_running(network) {
            match inner.records.get(network).map(|n| n.autostart) {
                None => return Err(Error::conflict(format!("network {network} is not defined (see `ferro net-list --all`)"))),
                Some(false) => {
                    return Err(Error::conflict(format!(
                        "network {network} is not running; start it with `ferro net-start {network}` (or mark it autostart)"
                    )));
                }
                Some(true) => {
                    self.start_locked(&mut inner, network)?;
                    tracing::info!(network, domain, "started the autostart network for the domain");
                }
            }
        }
        Self::register_locked(&mut inner, network, domain, macs)
    }

    /// Records that running `domain` has NICs with `macs` on the running `network` (after a
    /// ferrod restart, for domains found running). Returns the network's bridge.
    pub fn register(&self, network: &str, domain: &str, macs: &[MacAddr]) -> Result<String> {
        Self::register_locked(&mut self.lock(), network, domain, macs)
    }

    fn register_locked(inner: &mut Inner, network: &str, domain: &str, macs: &[MacAddr]) -> Result<String> {
        let Some(bridge) = inner.host.bridge_of(network).map(str::to_owned) else {
            return Err(Error::conflict(format!("network {network} is not running")));
        };
        inner.users.entry(network.to_string()).or_default().entry(domain.to_string()).or_default().extend_from_slice(macs);
        inner.publish_names(network);
        Ok(bridge)
    }

    /// Takes a domain that stopped off every network it was on.
    pub fn detach(&self, domain: &str) {
        let mut inner = self.lock();
        let networks: Vec<String> = inner.users.iter().filter(|(_, users)| users.contains_key(domain)).map(|(n, _)| n.clone()).collect();
        for network in networks {
            if let Some(users) = inner.users.get_mut(&network) {
                users.remove(domain);
            }
            inner.publish_names(&network);
        }
    }

    /// Defines `default`, set to autostart, as libvirt does on its first start: a NAT network on
    /// 192.168.122.0/24, or the first /24 above it that no host route and no other network
    /// overlaps, on the first free bridge `ferbr<n>`. Nothing when `default` is defined already.
    pub fn define_default(&self) -> Result<()> {
        if self.lock().records.contains_key(DEFAULT_NETWORK) {
            return Ok(());
        }
        let routes = ferro_net::link::Netlink::open()
            .and_then(|mut nl| nl.routes())
            .map_err(|e| Error::internal(format!("default network: cannot list the host's routes: {e}")))?;
        let (subnets, bridges): (Vec<ipnet::Ipv4Net>, Vec<String>) = {
            let inner = self.lock();
            let configs = inner.records.values().filter_map(|n| n.config.as_ref().ok());
            (configs.clone().filter_map(NetworkConfig::subnet).collect(), configs.map(|c| c.bridge.clone()).collect())
        };
        let taken = |net: &ipnet::Ipv4Net| {
            routes.iter().map(|r| r.destination).chain(subnets.iter().copied()).any(|other| other.contains(&net.network()) || net.contains(&other.network()))
        };
        let Some(third) = (122..=254u8).find(|third| !taken(&ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(192, 168, *third, 0), 24).unwrap_or_default()))
        else {
            return Err(Error::conflict("default network: every 192.168.122-254.0/24 overlaps a host route or another network"));
        };
        let links = ferro_net::link::Netlink::open().and_then(|mut nl| nl.links()).map_err(|e| Error::internal(format!("default network: cannot list links: {e}")))?;
        let bridge = (0..100)
            .map(|n| format!("ferbr{n}"))
            .find(|name| !bridges.contains(name) && !links.iter().any(|l| &l.name == name))
            .ok_or_else(|| Error::conflict("default network: ferbr0 to ferbr99 are all taken"))?;
        let text = format!(
            "# The default network, defined by ferrod on its first start.
name = \"{DEFAULT_NETWORK}\"
mode = \"nat\"
bridge = \"{bridge}\"
             ip = \"192.168.{third}.1/24\"
[dhcp]
start = \"192.168.{third}.2\"
end = \"192.168.{third}.254\"
"
        );
        self.define(&text)?;
        self.set_autostart(DEFAULT_NETWORK, true)?;
        tracing::info!(bridge, subnet = format!("192.168.{third}.0/24"), "defined the default network");
        Ok(())
    }

    /// After ferrod starts: on the first start since the host booted, the networks set to
    /// autostart are started (and the others are no longer active: the reboot took them down);
    /// otherwise the networks that were running are adopted.
    pub fn recover(&self, first_since_boot: bool) {
        let names: Vec<String> = self.lock().records.keys().cloned().collect();
        for name in names {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let Some(n) = inner.records.get_mut(&name) else { continue };
            let wanted = if first_since_boot { n.autostart } else { n.active };
            let Ok(config) = &n.config else {
                n.active = false;
                continue;
            };
            let outcome = if !wanted {
                Ok("stays down")
            } else if first_since_boot {
                inner.host.start(config).map(|()| "autostarted")
            } else {
                inner.host.adopt(config, Vec::new()).map(|how| match how {
                    ferro_net::host::Adoption::Adopted => "adopted",
                    ferro_net::host::Adoption::Restarted => "restarted (its bridge was gone)",
                })
            };
            match outcome {
                Ok(what) => {
                    if wanted {
                        tracing::info!(network = name, "{what}");
                        self.events.emit("network", &name, "started", what);
                    }
                }
                Err(e) => tracing::error!(network = name, "cannot bring the network back: {e}"),
            }
            let running = inner.host.is_running(&name);
            if n.active != running {
                n.active = running;
                if let Err(e) = self.persist(&name, n) {
                    tracing::error!(network = name, "cannot record its state: {e}");
                }
            }
        }
    }
}
