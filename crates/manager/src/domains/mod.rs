//! The domains service: domain definitions (kept as the TOML the user wrote) and their runs. It
//! owns the domain records and their rows in the store.
//!
//! - this file: the records, define/undefine/autostart and the infos the API shows;
//! - `supervise`: starting a domain's VMM under a monitor process, learning how it ended, and
//!   re-attaching to running VMs after ferrod restarts;
//! - `cgroups`: the cgroup of each run, with the limits of the domain's `[limits]`;
//! - `control`: requests to a running VMM (destroy, shutdown, reboot, reset, pause, memory, stats).
//! - `overcommit`: memory committed to running domains against the host's RAM (nodeinfo, and the
//!   check before a start);
//! - `pinning`: which host CPUs a domain's vCPU and emulator threads run on, live and in the definition.
//! - `template`: templates (a shut-off domain turned into the read-only base of linked clones).
//!
//! Operations on one domain are serialized by a per-domain async lock; the record map itself is
//! behind a plain mutex held only for short updates, never across an await.

mod cgroups;
mod control;
mod overcommit;
mod paths;
pub(crate) use paths::resolve;
mod pinning;
mod supervise;
mod template;

pub use overcommit::DEFAULT_OVERCOMMIT_RATIO;
pub use pinning::PinTarget;

use crate::claims::Claims;
use crate::domain::{DomainConfig, NicAttachment};
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::model::{Confinement, Crash, DomainInfo, DomainState, InterfaceInfo, Paths, new_uuid};
use crate::networks::Networks;
use crate::pools::Pools;
use crate::store::Store;
use crate::vmm::RunFiles;
use ferro_jail::cgroup::{Host as CgroupHost, VmCgroup};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// What is persisted about a domain's current run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Runtime {
    state: DomainState,
    monitor_pid: Option<i32>,
    /// Start time of the monitor in clock ticks since boot (field 22 of /proc/PID/stat): tells a
    /// live monitor from a recycled pid.
    monitor_start: Option<u64>,
    vmm_pid: Option<i32>,
    /// The current run's token (see `process_identity`): set before its monitor is started,
    /// cleared once the run's end is recorded.
    run_token: Option<String>,
    started_ms: Option<u64>,
    crash: Option<Crash>,
    reboot_pending: bool,
    /// The run's cgroup (recorded so that a restarted ferrod, wherever it runs, finds it).
    #[serde(default)]
    cgroup: Option<VmCgroup>,
    /// The taps ferrod made for this run's network and bridge NICs, deleted when it ends.
    #[serde(default)]
    taps: Vec<String>,
}

struct Domain {
    uuid: String,
    definition: String,
    /// The parsed definition, or why the stored text no longer validates.
    config: std::result::Result<DomainConfig, String>,
    autostart: bool,
    rt: Runtime,
    /// A destroy is under way: the coming exit is not a crash.
    stopping: bool,
    /// A template: never started, its disks read-only (see `template`).
    template: bool,
}

pub struct Domains {
    paths: Paths,
    store: Arc<Store>,
    events: Arc<EventHub>,
    pools: Arc<Pools>,
    networks: Arc<Networks>,
    claims: Arc<Claims>,
    /// The cgroup hierarchies, as seen from ferrod's own cgroup.
    cgroups: CgroupHost,
    domains: Mutex<BTreeMap<String, Domain>>,
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Domains to start again after a guest-requested reboot (see `supervise`).
    restarts: tokio::sync::mpsc::UnboundedSender<String>,
    restart_queue: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Memory committed to running domains may be at most this many times the host's RAM.
    overcommit_ratio: f64,
    /// Memory of domains being started: checked against the limit but not running yet (see
    /// `overcommit`), so two starts at the same instant cannot both pass it.
    starting: Mutex<HashMap<String, u64>>,
    confinement: Confinement,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn no_domain(name: &str) -> Error {
    Error::not_found(format!("domain {name:?} is not defined (see `ferro list --all`)"))
}

fn not_running(name: &str, state: DomainState) -> Error {
    Error::conflict(format!("domain {name} is not running (state: {}); start it first", state.word()))
}

impl Domains {
    /// Loads every domain from the store; does not touch running VMs yet (see `reattach`).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        paths: Paths,
        store: Arc<Store>,
        events: Arc<EventHub>,
        pools: Arc<Pools>,
        networks: Arc<Networks>,
        claims: Arc<Claims>,
        overcommit_ratio: f64,
        confinement: Confinement,
    ) -> std::result::Result<Arc<Domains>, String> {
        std::fs::create_dir_all(&paths.run).map_err(|e| format!("cannot create {}: {e}", paths.run.display()))?;
        let mut domains = BTreeMap::new();
        for row in store.domains().map_err(|e| format!("cannot read domains: {e}"))? {
            let config = DomainConfig::parse(&row.definition).map_err(|e| e.to_string()).and_then(|c| {
                if c.name == row.name { Ok(c) } else { Err(format!("name: stored as {:?} but the text says {:?}", row.name, c.name)) }
            });
            if let Err(e) = &config {
                tracing::error!(domain = row.name, "stored definition is invalid: {e}");
            }
            let rt = match row.runtime.as_deref().map(serde_json::from_str::<Runtime>) {
                Some(Ok(rt)) => rt,
                Some(Err(e)) => {
                    tracing::error!(domain = row.name, "stored runtime record is unreadable: {e}");
                    Runtime::default()
                }
                None => Runtime::default(),
            };
            domains.insert(
                row.name,
                Domain {
                    uuid: row.uuid,
                    definition: row.definition,
                    config,
                    autostart: row.autostart,
                    rt,
                    stopping: false,
                    template: row.template,
                },
            );
        }
        let (restarts, queue) = tokio::sync::mpsc::unbounded_channel();
        let mut cgroups = CgroupHost::detect();
        for warning in cgroups.enable_for_children() {
            tracing::warn!("{warning}");
        }
        let domains = Arc::new(Domains {
            paths,
            store,
            events,
            pools,
            networks,
            claims,
            cgroups,
            domains: Mutex::new(domains),
            op_locks: Mutex::new(HashMap::new()),
            restarts,
            restart_queue: Mutex::new(Some(queue)),
            overcommit_ratio,
            starting: Mutex::new(HashMap::new()),
            confinement,
        });
        domains.hold_template_disks();
        Ok(domains)
    }

    async fn lock_op(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.op_locks).entry(name.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Applies `f` to a domain and persists its runtime record under the same lock, so the store
    /// always sees updates in the order they happened.
    fn update<R>(&self, name: &str, f: impl FnOnce(&mut Domain) -> R) -> Result<R> {
        let mut domains = lock(&self.domains);
        let d = domains.get_mut(name).ok_or_else(|| no_domain(name))?;
        let r = f(d);
        let json = serde_json::to_string(&d.rt).map_err(|e| Error::internal(e.to_string()))?;
        self.store.set_runtime(name, &json)?;
        Ok(r)
    }

    fn info_of(&self, name: &str, d: &Domain) -> DomainInfo {
        let config = d.config.as_ref().ok();
        DomainInfo {
            name: name.to_string(),
            uuid: d.uuid.clone(),
            state: d.rt.state,
            template: d.template,
            autostart: d.autostart,
            vcpus: config.map(|c| c.vcpus),
            memory_bytes: config.map(|c| c.memory_bytes()),
            pid: d.rt.vmm_pid.filter(|_| d.rt.state.is_active()),
            started_ms: d.rt.started_ms.filter(|_| d.rt.state.is_active()),
            log: RunFiles::new(&self.paths.run, &d.uuid).log().display().to_string(),
            crash: d.rt.crash.clone().filter(|_| d.rt.state == DomainState::Crashed),
            error: d.config.as_ref().err().cloned(),
            config: config.cloned(),
        }
    }

    pub fn list(&self) -> Vec<DomainInfo> {
        lock(&self.domains).iter().map(|(n, d)| self.info_of(n, d)).collect()
    }

    pub fn info(&self, name: &str) -> Result<DomainInfo> {
        let domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        Ok(self.info_of(name, d))
    }

    /// The definition as the user wrote it.
    pub fn definition(&self, name: &str) -> Result<String> {
        lock(&self.domains).get(name).map(|d| d.definition.clone()).ok_or_else(|| no_domain(name))
    }

    /// The files of a domain's runs (sockets, logs) in its run directory.
    pub fn run_files(&self, name: &str) -> Result<RunFiles> {
        self.files(name).ok_or_else(|| no_domain(name))
    }

    fn files(&self, name: &str) -> Option<RunFiles> {
        lock(&self.domains).get(name).map(|d| RunFiles::new(&self.paths.run, &d.uuid))
    }

    fn state_and_files(&self, name: &str) -> Result<(DomainState, RunFiles)> {
        let domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        Ok((d.rt.state, RunFiles::new(&self.paths.run, &d.uuid)))
    }

    /// Defines a new domain or replaces the definition of an existing one (effective at next start).
    /// Returns whether it was new.
    /// A NIC defined without a MAC gets one here, written into the stored text, so the guest's
    /// address never changes across starts: the MAC the same NIC had in the previous definition,
    /// else a new one.
    pub async fn define(&self, text: &str) -> Result<(bool, DomainInfo)> {
        self.define_text(text, false).await
    }

    /// Defines a new domain; a domain of the name that exists is a conflict (not replaced).
    pub async fn define_new(&self, text: &str) -> Result<DomainInfo> {
        Ok(self.define_text(text, true).await?.1)
    }

    async fn define_text(&self, text: &str, only_new: bool) -> Result<(bool, DomainInfo)> {
        let parsed = DomainConfig::parse(text).map_err(|e| Error::invalid(e.to_string()))?;
        self.check_paths(&parsed)?;
        let name = parsed.name.clone();
        let _op = self.lock_op(&name).await;
        let mut domains = lock(&self.domains);
        match domains.get(&name) {
            Some(_) if only_new => return Err(Error::conflict(format!("name: domain {name} already exists"))),
            Some(d) if d.template => {
                return Err(Error::conflict(format!(
                    "domain {name} is a template: its definition stays as it is (linked clones depend on its disks); clone it and change the clone"
                )));
            }
            _ => {}
        }
        let previous = domains.get(&name).and_then(|d| d.config.as_ref().ok());
        let (text, config) = with_nic_macs(text, parsed, previous)?;
        let text = text.as_str();
        let created = !domains.contains_key(&name);
        let uuid = domains.get(&name).map(|d| d.uuid.clone()).unwrap_or_else(new_uuid);
        self.store.put_domain(&name, &uuid, text, config.autostart)?;
        let autostart = config.autostart;
        match domains.get_mut(&name) {
            Some(d) => {
                d.definition = text.to_string();
                d.config = Ok(config);
                d.autostart = autostart;
            }
            None => {
                let d = Domain {
                    uuid,
                    definition: text.to_string(),
                    config: Ok(config),
                    autostart,
                    rt: Runtime::default(),
                    stopping: false,
                    template: false,
                };
                domains.insert(name.clone(), d);
            }
        }
        let info = self.info_of(&name, &domains[&name]);
        drop(domains);
        self.events.emit("domain", &name, if created { "defined" } else { "redefined" }, "");
        Ok((created, info))
    }

    pub async fn undefine(&self, name: &str) -> Result<()> {
        let _op = self.lock_op(name).await;
        if self.info(name)?.template {
            // Refused while linked clones use its disks.
            self.release_template(name)?;
        }
        let mut domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        if d.rt.state.is_active() {
            return Err(Error::conflict(format!("domain {name} is {}; destroy or shut it down first", d.rt.state.word())));
        }
        let files = RunFiles::new(&self.paths.run, &d.uuid);
        self.store.delete_domain(name)?;
        domains.remove(name);
        drop(domains);
        let _ = std::fs::remove_dir_all(&files.dir);
        lock(&self.op_locks).remove(name);
        self.events.emit("domain", name, "undefined", "");
        Ok(())
    }

    pub async fn set_autostart(&self, name: &str, enabled: bool) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let mut domains = lock(&self.domains);
        let d = domains.get_mut(name).ok_or_else(|| no_domain(name))?;
        if enabled && d.template {
            return Err(Error::conflict(format!("domain {name} is a template, which never runs")));
        }
        let definition = set_top_level_bool(&d.definition, "autostart", enabled);
        self.store.put_domain(name, &d.uuid, &definition, enabled)?;
        d.definition = definition;
        d.autostart = enabled;
        if let Ok(c) = &mut d.config {
            c.autostart = enabled;
        }
        let info = self.info_of(name, d);
        drop(domains);
        self.events.emit("domain", name, "autostart", if enabled { "enabled" } else { "disabled" });
        Ok(info)
    }

    /// The domain's NICs: what each is on, its MAC, its tap and, on a network, the address the
    /// network's DHCP server leased to it (the newest lease of its MAC).
    pub fn interfaces(&self, name: &str) -> Result<Vec<InterfaceInfo>> {
        let (config, taps) = {
            let domains = lock(&self.domains);
            let d = domains.get(name).ok_or_else(|| no_domain(name))?;
            let config = d.config.clone().map_err(|e| Error::conflict(format!("domain {name} has an invalid stored definition ({e})")))?;
            (config, if d.rt.state.is_active() { d.rt.taps.clone() } else { Vec::new() })
        };
        let mut made = taps.into_iter();
        let interfaces = config
            .nics
            .iter()
            .map(|nic| {
                let at = nic.attachment();
                let tap = match at {
                    NicAttachment::Tap(tap) => Some(tap.to_string()),
                    _ => made.next(),
                };
                let mac = nic.mac.as_deref().and_then(|m| m.parse::<ferro_vmm_api::MacAddr>().ok());
                let address = match (at, mac) {
                    (NicAttachment::Network(network), Some(mac)) => self
                        .networks
                        .leases(network)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|lease| lease.mac == mac)
                        .max_by_key(|lease| lease.expiry.unwrap_or(u64::MAX))
                        .map(|lease| lease.ip.to_string()),
                    _ => None,
                };
                InterfaceInfo { kind: at.kind(), source: at.source().to_string(), mac: nic.mac.clone(), tap, address }
            })
            .collect();
        Ok(interfaces)
    }

    /// The serial socket of a running domain (for the console proxy).
    pub fn serial_socket(&self, name: &str) -> Result<PathBuf> {
        let (state, files) = self.state_and_files(name)?;
        if !state.is_active() {
            return Err(not_running(name, state));
        }
        Ok(files.serial_socket())
    }
}

/// What `define` (POST /v1/domains, `ferro define`) makes of a definition's text before it
/// stores it, for a domain not defined before: the text is parsed and validated, and NICs without
/// a MAC get one. Returns the text as it would be stored and the domain. What depends on the
/// daemon (the directories `allowed_image_paths` permits, a domain of that name) is checked by
/// `define` afterwards. The fuzz target `definition` runs this (docs/fuzzing.md).
pub fn checked_definition(text: &str) -> Result<(String, DomainConfig)> {
    let parsed = DomainConfig::parse(text).map_err(|e| Error::invalid(e.to_string()))?;
    with_nic_macs(text, parsed, None)
}

/// Gives every NIC of `config` without a MAC one (the same NIC's in `previous`, else a new one)
/// and writes it into `text` right after that NIC's `[[nic]]` header, keeping the rest as
/// written. A definition whose NICs are not `[[nic]]` tables is stored re-serialized instead.
fn with_nic_macs(text: &str, mut config: DomainConfig, previous: Option<&DomainConfig>) -> Result<(String, DomainConfig)> {
    let mut added: Vec<Option<String>> = Vec::new();
    for (i, nic) in config.nics.iter_mut().enumerate() {
        if nic.mac.is_some() {
            added.push(None);
            continue;
        }
        let old = previous.and_then(|p| p.nics.get(i)).filter(|old| old.attachment() == nic.attachment()).and_then(|old| old.mac.clone());
        let mac = old.unwrap_or_else(|| ferro_vmm_api::MacAddr::random().to_string());
        nic.mac = Some(mac.clone());
        added.push(Some(mac));
    }
    if added.iter().all(Option::is_none) {
        return Ok((text.to_string(), config));
    }
    let mut out = String::new();
    let mut nic = 0;
    for line in text.split_inclusive('\n') {
        out.push_str(line);
        if line.trim_start().starts_with("[[nic]]") {
            if let Some(Some(mac)) = added.get(nic) {
                if !line.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("mac = \"{mac}\"\n"));
            }
            nic += 1;
        }
    }
    let rewritten = match DomainConfig::parse(&out) {
        Ok(c) if c == config => out,
        _ => toml::to_string(&config).map_err(|e| Error::internal(format!("cannot write the definition with its MACs: {e}")))?,
    };
    config.validate().map_err(|e| Error::invalid(e.to_string()))?;
    Ok((rewritten, config))
}

/// Rewrites (or adds) a top-level `key = true|false` line, keeping the rest of the text as written.
fn set_top_level_bool(text: &str, key: &str, value: bool) -> String {
    let mut out = Vec::new();
    let mut done = false;
    let mut in_table = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            if !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            in_table = true;
        }
        let is_key = !in_table && trimmed.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='));
        if is_key {
            if !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
        } else {
            out.push(line.to_string());
        }
    }
    if !done {
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autostart_line_is_rewritten_in_place() {
        let text = "# web\nname = \"a\"\nautostart = false\n[boot]\nguest = \"hello\"\n";
        let out = set_top_level_bool(text, "autostart", true);
        assert_eq!(out, "# web\nname = \"a\"\nautostart = true\n[boot]\nguest = \"hello\"\n");
        let text = "name = \"a\"\n[boot]\nautostart_x = 1\n";
        let out = set_top_level_bool(text, "autostart", true);
        assert_eq!(out, "name = \"a\"\nautostart = true\n[boot]\nautostart_x = 1\n");
        assert!(DomainConfig::parse(&set_top_level_bool("name = \"a\"\nmemory = \"1G\"\n[boot]\nguest = \"x\"\n", "autostart", true))
            .unwrap()
            .autostart);
    }
}
