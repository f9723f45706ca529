//! Domains: the in-memory model backed by the store, and supervision of one VMM per running domain.
//!
//! Each running domain has a monitor process (see `monitor`) in its own session that runs the VMM.
//! ferrod records the monitor's pid and start time; it learns that a VM stopped when the monitor
//! exits (as its parent, or through a pidfd after a restart) and reads the monitor's exit report.

use crate::domain::{DomainConfig, validate_name};
use crate::error::{ApiError, ApiResult};
use crate::events::EventHub;
use crate::jobs::Jobs;
use crate::monitor::{self, ExitReport};
use crate::pools::Pool;
use crate::store::Store;
use crate::vmm::{self, ResolvedDisk, RunFiles};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a new VMM gets to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one control request may take.
const VMM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `destroy` waits after `quit` before killing the VMM.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// Where things live and which binaries to run.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub db: PathBuf,
    /// `$home/run`: one directory per running domain.
    pub run: PathBuf,
    /// The `ferro` binary whose hidden `vmm` subcommand runs a VM.
    pub ferro_bin: PathBuf,
    /// The `ferrod` binary, run as `ferrod monitor` for each VM.
    pub monitor_bin: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    #[default]
    Shutoff,
    Running,
    Paused,
    Crashed,
}

impl DomainState {
    fn is_active(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Paused)
    }
}

/// Why the last run of a domain ended badly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Crash {
    pub reason: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub time_ms: u64,
}

/// What is persisted about a domain's current run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Runtime {
    state: DomainState,
    monitor_pid: Option<i32>,
    /// Start time of the monitor in clock ticks since boot (field 22 of /proc/PID/stat): tells a
    /// live monitor from a recycled pid.
    monitor_start: Option<u64>,
    vmm_pid: Option<i32>,
    started_ms: Option<u64>,
    crash: Option<Crash>,
    reboot_pending: bool,
}

struct Domain {
    uuid: String,
    definition: String,
    /// The parsed definition, or why the stored text no longer validates.
    config: Result<DomainConfig, String>,
    autostart: bool,
    rt: Runtime,
    /// A destroy is under way: the coming exit is not a crash.
    stopping: bool,
}

/// A domain as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub autostart: bool,
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Pid of the VMM process while the domain runs.
    pub pid: Option<i32>,
    pub started_ms: Option<u64>,
    pub log: String,
    pub crash: Option<Crash>,
    /// Set when the stored definition no longer validates.
    pub error: Option<String>,
    pub config: Option<DomainConfig>,
}

pub struct Manager {
    pub paths: Paths,
    pub events: EventHub,
    store: Mutex<Store>,
    domains: Mutex<BTreeMap<String, Domain>>,
    pub(crate) pools: Mutex<BTreeMap<String, Pool>>,
    pub(crate) jobs: Jobs,
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Domains to start again after a guest-requested reboot (see `run_restarter`).
    restarts: tokio::sync::mpsc::UnboundedSender<String>,
    restart_queue: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn no_domain(name: &str) -> ApiError {
    ApiError::not_found(format!("domain {name:?} is not defined (see `ferro list --all`)"))
}

fn not_running(name: &str, state: DomainState) -> ApiError {
    ApiError::conflict(format!("domain {name} is not running (state: {}); start it first", state_word(state)))
}

/// The human word for a state, as virsh prints it.
pub fn state_word(state: DomainState) -> &'static str {
    match state {
        DomainState::Shutoff => "shut off",
        DomainState::Running => "running",
        DomainState::Paused => "paused",
        DomainState::Crashed => "crashed",
    }
}

impl Manager {
    /// Opens the store and loads every domain and pool; does not touch running VMs yet (see `recover`).
    pub fn open(paths: Paths) -> Result<Arc<Manager>, String> {
        std::fs::create_dir_all(&paths.run).map_err(|e| format!("cannot create {}: {e}", paths.run.display()))?;
        let store = Store::open(&paths.db).map_err(|e| format!("cannot open state store {}: {e}", paths.db.display()))?;
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
                Domain { uuid: row.uuid, definition: row.definition, config, autostart: row.autostart, rt, stopping: false },
            );
        }
        let pools = crate::pools::load(&store).map_err(|e| format!("cannot read pools: {e}"))?;
        let (jobs, interrupted) = crate::jobs::load(&store).map_err(|e| format!("cannot read jobs: {e}"))?;
        let (restarts, queue) = tokio::sync::mpsc::unbounded_channel();
        let manager = Arc::new(Manager {
            restarts,
            restart_queue: Mutex::new(Some(queue)),
            paths,
            events: EventHub::default(),
            store: Mutex::new(store),
            domains: Mutex::new(domains),
            pools: Mutex::new(pools),
            jobs,
            op_locks: Mutex::new(HashMap::new()),
        });
        for job in interrupted {
            manager.events.emit("job", &job.id.to_string(), job.state.name(), job.error.unwrap_or_default());
        }
        Ok(manager)
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Re-attaches to the VMs that were running when ferrod last stopped, then runs autostart once
    /// per host boot.
    pub async fn recover(self: &Arc<Self>) {
        if let Some(mut queue) = lock(&self.restart_queue).take() {
            let mgr = self.clone();
            tokio::spawn(async move {
                while let Some(name) = queue.recv().await {
                    if let Err(e) = mgr.start(&name).await {
                        tracing::error!(domain = name, "restart after reboot failed: {e}");
                    }
                }
            });
        }
        let records: Vec<(String, Runtime)> =
            lock(&self.domains).iter().filter(|(_, d)| d.rt.monitor_pid.is_some()).map(|(n, d)| (n.clone(), d.rt.clone())).collect();
        for (name, rt) in records {
            let Some(pid) = rt.monitor_pid else { continue };
            match open_pidfd(pid, rt.monitor_start) {
                Some(pidfd) => {
                    tracing::info!(domain = name, monitor = pid, "re-attached to running VM");
                    self.watch_pidfd(name.clone(), pid, pidfd);
                    // Refresh what the VMM says about itself; a failure here is not fatal.
                    if let Some(socket) = self.api_socket(&name)
                        && let Ok(info) = vmm::op(&socket, "info", VMM_TIMEOUT).await
                    {
                        let _ = self.update(&name, |d| {
                            if d.rt.monitor_pid == Some(pid) {
                                d.rt.vmm_pid = info.get("pid").and_then(Value::as_i64).map(|p| p as i32).or(d.rt.vmm_pid);
                                d.rt.state = if info.get("state").and_then(Value::as_str) == Some("paused") {
                                    DomainState::Paused
                                } else {
                                    DomainState::Running
                                };
                            }
                        });
                    }
                    self.events.emit("domain", &name, "reattached", format!("monitor pid {pid}"));
                }
                None => self.monitor_exited(&name, pid).await,
            }
        }
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        let last = self.store().meta("boot_id").ok().flatten();
        if last.as_deref() != Some(boot_id.as_str()) {
            self.autostart_all().await;
            if let Err(e) = self.store().set_meta("boot_id", &boot_id) {
                tracing::error!("cannot record boot id: {e}");
            }
        }
    }

    async fn autostart_all(self: &Arc<Self>) {
        self.autostart_pools();
        let names: Vec<String> = lock(&self.domains)
            .iter()
            .filter(|(_, d)| d.autostart && !d.rt.state.is_active())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            match self.start(&name).await {
                Ok(_) => tracing::info!(domain = name, "autostarted"),
                Err(e) => tracing::error!(domain = name, "autostart failed: {e}"),
            }
        }
    }

    async fn lock_op(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.op_locks).entry(name.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Applies `f` to a domain and persists its runtime record under the same lock, so the store
    /// always sees updates in the order they happened.
    fn update<R>(&self, name: &str, f: impl FnOnce(&mut Domain) -> R) -> ApiResult<R> {
        let mut domains = lock(&self.domains);
        let d = domains.get_mut(name).ok_or_else(|| no_domain(name))?;
        let r = f(d);
        let json = serde_json::to_string(&d.rt).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store().set_runtime(name, &json)?;
        Ok(r)
    }

    fn info_of(&self, name: &str, d: &Domain) -> DomainInfo {
        let config = d.config.as_ref().ok();
        DomainInfo {
            name: name.to_string(),
            uuid: d.uuid.clone(),
            state: d.rt.state,
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

    pub fn info(&self, name: &str) -> ApiResult<DomainInfo> {
        let domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        Ok(self.info_of(name, d))
    }

    pub fn definition(&self, name: &str) -> ApiResult<String> {
        lock(&self.domains).get(name).map(|d| d.definition.clone()).ok_or_else(|| no_domain(name))
    }

    fn files(&self, name: &str) -> Option<RunFiles> {
        lock(&self.domains).get(name).map(|d| RunFiles::new(&self.paths.run, &d.uuid))
    }

    fn api_socket(&self, name: &str) -> Option<PathBuf> {
        self.files(name).map(|f| f.api_socket())
    }

    /// The serial socket of a running domain (for the console proxy).
    pub fn serial_socket(&self, name: &str) -> ApiResult<PathBuf> {
        let (state, files) = self.state_and_files(name)?;
        if !state.is_active() {
            return Err(not_running(name, state));
        }
        Ok(files.serial_socket())
    }

    fn state_and_files(&self, name: &str) -> ApiResult<(DomainState, RunFiles)> {
        let domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        Ok((d.rt.state, RunFiles::new(&self.paths.run, &d.uuid)))
    }

    /// Defines a new domain or replaces the definition of an existing one (effective at next start).
    /// Returns whether it was new.
    pub async fn define(&self, text: &str) -> ApiResult<(bool, DomainInfo)> {
        let config = DomainConfig::parse(text).map_err(|e| ApiError::invalid(e.to_string()))?;
        let name = config.name.clone();
        let _op = self.lock_op(&name).await;
        let mut domains = lock(&self.domains);
        let created = !domains.contains_key(&name);
        let uuid = domains.get(&name).map(|d| d.uuid.clone()).unwrap_or_else(new_uuid);
        self.store().put_domain(&name, &uuid, text, config.autostart)?;
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
                };
                domains.insert(name.clone(), d);
            }
        }
        let info = self.info_of(&name, &domains[&name]);
        drop(domains);
        self.events.emit("domain", &name, if created { "defined" } else { "redefined" }, "");
        Ok((created, info))
    }

    pub async fn undefine(&self, name: &str) -> ApiResult<()> {
        let _op = self.lock_op(name).await;
        let mut domains = lock(&self.domains);
        let d = domains.get(name).ok_or_else(|| no_domain(name))?;
        if d.rt.state.is_active() {
            return Err(ApiError::conflict(format!("domain {name} is {}; destroy or shut it down first", state_word(d.rt.state))));
        }
        let files = RunFiles::new(&self.paths.run, &d.uuid);
        self.store().delete_domain(name)?;
        domains.remove(name);
        drop(domains);
        let _ = std::fs::remove_dir_all(&files.dir);
        lock(&self.op_locks).remove(name);
        self.events.emit("domain", name, "undefined", "");
        Ok(())
    }

    pub async fn set_autostart(&self, name: &str, enabled: bool) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let mut domains = lock(&self.domains);
        let d = domains.get_mut(name).ok_or_else(|| no_domain(name))?;
        let definition = set_top_level_bool(&d.definition, "autostart", enabled);
        self.store().put_domain(name, &d.uuid, &definition, enabled)?;
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

    pub async fn start(self: &Arc<Self>, name: &str) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        self.start_locked(name).await
    }

    async fn start_locked(self: &Arc<Self>, name: &str) -> ApiResult<DomainInfo> {
        let (uuid, config) = {
            let domains = lock(&self.domains);
            let d = domains.get(name).ok_or_else(|| no_domain(name))?;
            if d.rt.state.is_active() {
                return Err(ApiError::conflict(format!("domain {name} is already {}", state_word(d.rt.state))));
            }
            let config = d.config.clone().map_err(|e| {
                ApiError::conflict(format!("domain {name} has an invalid stored definition ({e}); define it again"))
            })?;
            (d.uuid.clone(), config)
        };
        let disks = self.resolve_disks(&config)?;
        for (key, path) in [("boot.kernel", &config.boot.kernel), ("boot.initrd", &config.boot.initrd)] {
            if let Some(path) = path
                && !std::path::Path::new(path).is_file()
            {
                return Err(ApiError::invalid(format!("{key}: {path} does not exist or is not a file")));
            }
        }
        let files = RunFiles::new(&self.paths.run, &uuid);
        std::fs::create_dir_all(&files.dir).map_err(|e| ApiError::internal(format!("cannot create {}: {e}", files.dir.display())))?;
        for stale in [files.exit_report(), files.api_socket(), files.serial_socket()] {
            let _ = std::fs::remove_file(stale);
        }
        for log in [files.log(), files.stderr()] {
            std::fs::File::create(log).map_err(|e| ApiError::internal(format!("cannot create VMM log: {e}")))?;
        }

        let mut cmd = tokio::process::Command::new(&self.paths.monitor_bin);
        cmd.arg("monitor")
            .arg("--exit-report")
            .arg(files.exit_report())
            .arg("--log")
            .arg(files.log())
            .arg("--stderr")
            .arg(files.stderr())
            .arg("--socket")
            .arg(files.api_socket())
            .arg("--socket")
            .arg(files.serial_socket())
            .arg("--")
            .arg(&self.paths.ferro_bin)
            .args(vmm::vmm_args(&config, &disks, &files))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
        // is async-signal-safe and touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            ApiError::internal(format!("cannot run the VMM monitor {}: {e}", self.paths.monitor_bin.display()))
        })?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            return Err(ApiError::internal("the VMM monitor exited at once"));
        };
        let started_ms = crate::now_ms();
        self.update(name, |d| {
            d.stopping = false;
            d.rt = Runtime {
                state: DomainState::Running,
                monitor_pid: Some(pid),
                monitor_start: proc_start_time(pid),
                started_ms: Some(started_ms),
                ..Runtime::default()
            };
        })?;
        let mgr = self.clone();
        let watched = name.to_string();
        tokio::spawn(async move {
            let _ = child.wait().await;
            mgr.monitor_exited(&watched, pid).await;
        });

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.current_monitor(name) != Some(pid) {
                let info = self.info(name)?;
                let reason = info.crash.map(|c| c.reason).unwrap_or_else(|| "it exited at once".to_string());
                return Err(ApiError::vmm(format!("domain {name} failed to start: {reason}")));
            }
            match vmm::op(&files.api_socket(), "info", VMM_TIMEOUT).await {
                Ok(info) => {
                    let vmm_pid = info.get("pid").and_then(Value::as_i64).map(|p| p as i32);
                    self.update(name, |d| {
                        if d.rt.monitor_pid == Some(pid) {
                            d.rt.vmm_pid = vmm_pid;
                        }
                    })?;
                    break;
                }
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    self.update(name, |d| d.stopping = true)?;
                    kill_group(pid);
                    self.wait_for_exit(name, pid, Duration::from_secs(5)).await;
                    return Err(ApiError::vmm(format!(
                        "domain {name} failed to start: no control socket after {} s ({e})",
                        START_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        self.events.emit("domain", name, "started", format!("monitor pid {pid}"));
        self.info(name)
    }

    fn current_monitor(&self, name: &str) -> Option<i32> {
        lock(&self.domains).get(name).and_then(|d| d.rt.monitor_pid)
    }

    /// Waits until the monitor `pid` of `name` has been reaped; false on timeout.
    async fn wait_for_exit(&self, name: &str, pid: i32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.current_monitor(name) == Some(pid) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn watch_pidfd(self: &Arc<Self>, name: String, pid: i32, pidfd: OwnedFd) {
        let mgr = self.clone();
        tokio::spawn(async move {
            // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped; nothing else
            // closes or replaces the descriptor.
            match unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(e) => {
                    tracing::warn!(domain = name, "cannot poll pidfd ({e}); polling /proc instead");
                    let start = proc_start_time(pid);
                    while start.is_some() && proc_start_time(pid) == start {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            mgr.monitor_exited(&name, pid).await;
        });
    }

    /// The monitor of a run has exited: record how the run ended.
    async fn monitor_exited(self: &Arc<Self>, name: &str, pid: i32) {
        let Some(files) = self.files(name) else { return };
        let report = monitor::read_report(&files.exit_report());
        if report.is_none() {
            // The monitor itself was killed; make sure its VMM does not live on unsupervised.
            kill_group(pid);
        }
        let report = report.unwrap_or(ExitReport {
            code: None,
            signal: None,
            reason: "the VMM monitor process died without a report".to_string(),
            resets: 0,
        });
        let outcome = self.update(name, |d| {
            if d.rt.monitor_pid != Some(pid) {
                return None;
            }
            let clean = report.code == Some(0);
            let stopping = std::mem::take(&mut d.stopping);
            let reboot = d.rt.reboot_pending && clean;
            d.rt.monitor_pid = None;
            d.rt.monitor_start = None;
            d.rt.vmm_pid = None;
            d.rt.reboot_pending = false;
            if clean || stopping {
                d.rt.state = DomainState::Shutoff;
                d.rt.crash = None;
                Some(("stopped", if stopping { "destroyed".to_string() } else { report.reason.clone() }, reboot))
            } else {
                d.rt.state = DomainState::Crashed;
                d.rt.crash = Some(Crash {
                    reason: report.reason.clone(),
                    exit_code: report.code,
                    signal: report.signal,
                    time_ms: crate::now_ms(),
                });
                let status = match (report.code, report.signal) {
                    (Some(c), _) => format!("exit status {c}"),
                    (None, Some(s)) => format!("signal {s}"),
                    (None, None) => "status unknown".to_string(),
                };
                Some(("crashed", format!("{} ({status})", report.reason), false))
            }
        });
        let Ok(Some((kind, detail, reboot))) = outcome else { return };
        for socket in [files.api_socket(), files.serial_socket()] {
            let _ = std::fs::remove_file(socket);
        }
        self.events.emit("domain", name, kind, detail);
        if reboot {
            // Handed to the restarter task: starting from here would make `start` recursive.
            let _ = self.restarts.send(name.to_string());
        }
    }

    /// Checks the state and returns the control socket of an active domain.
    fn active_socket(&self, name: &str, allow_paused: bool) -> ApiResult<PathBuf> {
        let (state, files) = self.state_and_files(name)?;
        match state {
            DomainState::Running => Ok(files.api_socket()),
            DomainState::Paused if allow_paused => Ok(files.api_socket()),
            DomainState::Paused => Err(ApiError::conflict(format!("domain {name} is paused; resume it first"))),
            _ => Err(not_running(name, state)),
        }
    }

    /// Stops the VM at once (`quit`, then SIGKILL if the VMM does not go).
    pub async fn destroy(&self, name: &str) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let pid = self.current_monitor(name).ok_or_else(|| not_running(name, DomainState::Shutoff))?;
        self.update(name, |d| d.stopping = true)?;
        let quit = vmm::op(&socket, "quit", VMM_TIMEOUT).await;
        if quit.is_err() || !self.wait_for_exit(name, pid, QUIT_GRACE).await {
            tracing::warn!(domain = name, "VMM did not quit ({quit:?}); killing it");
            kill_group(pid);
            if !self.wait_for_exit(name, pid, Duration::from_secs(10)).await {
                return Err(ApiError::internal(format!("domain {name}: the VMM survived SIGKILL")));
            }
        }
        self.info(name)
    }

    /// Presses the ACPI power button; with `wait`, waits until the domain is off.
    pub async fn shutdown(&self, name: &str, wait: Option<Duration>) -> ApiResult<DomainInfo> {
        let pid = {
            let _op = self.lock_op(name).await;
            let socket = self.active_socket(name, false)?;
            vmm::op(&socket, "power_button", VMM_TIMEOUT).await.map_err(ApiError::vmm)?;
            self.events.emit("domain", name, "shutdown_requested", "ACPI power button");
            self.current_monitor(name)
        };
        if let (Some(wait), Some(pid)) = (wait, pid)
            && !self.wait_for_exit(name, pid, wait).await
        {
            return Err(ApiError::timeout(format!(
                "domain {name} did not shut down within {} s (the guest ignored the power button); use `ferro destroy {name}`",
                wait.as_secs()
            )));
        }
        self.info(name)
    }

    /// Asks the guest to shut down and starts it again once it is off.
    pub async fn reboot(&self, name: &str) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, false)?;
        self.update(name, |d| d.rt.reboot_pending = true)?;
        if let Err(e) = vmm::op(&socket, "power_button", VMM_TIMEOUT).await {
            self.update(name, |d| d.rt.reboot_pending = false)?;
            return Err(ApiError::vmm(e));
        }
        self.events.emit("domain", name, "reboot_requested", "ACPI power button");
        self.info(name)
    }

    /// Hard reset: the VMM exits and its monitor starts it again at once.
    pub async fn reset(&self, name: &str) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let old = self.info(name)?.pid;
        vmm::op(&socket, "reset", VMM_TIMEOUT).await.map_err(ApiError::vmm)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(info) = vmm::op(&socket, "info", VMM_TIMEOUT).await {
                let pid = info.get("pid").and_then(Value::as_i64).map(|p| p as i32);
                if pid != old {
                    self.update(name, |d| {
                        d.rt.vmm_pid = pid;
                        d.rt.state = DomainState::Running;
                    })?;
                    break;
                }
            }
            if self.current_monitor(name).is_none() {
                return Err(ApiError::vmm(format!("domain {name} stopped during the reset")));
            }
            if Instant::now() > deadline {
                return Err(ApiError::vmm(format!("domain {name} did not come back within {} s of a reset", START_TIMEOUT.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.events.emit("domain", name, "reset", "");
        self.info(name)
    }

    pub async fn suspend(&self, name: &str) -> ApiResult<DomainInfo> {
        self.pause_or_resume(name, true).await
    }

    pub async fn resume(&self, name: &str) -> ApiResult<DomainInfo> {
        self.pause_or_resume(name, false).await
    }

    async fn pause_or_resume(&self, name: &str, pause: bool) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let op = if pause { "pause" } else { "resume" };
        vmm::op(&socket, op, VMM_TIMEOUT).await.map_err(ApiError::vmm)?;
        let state = if pause { DomainState::Paused } else { DomainState::Running };
        self.update(name, |d| d.rt.state = state)?;
        self.events.emit("domain", name, if pause { "paused" } else { "resumed" }, "");
        self.info(name)
    }

    /// Sets the memory a running guest may use (virsh setmem, live only): the balloon takes back
    /// the rest of the defined memory. The definition is not changed.
    pub async fn setmem(&self, name: &str, memory: u64) -> ApiResult<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let config = self.info(name)?.config.ok_or_else(|| ApiError::conflict(format!("domain {name} has an invalid definition")))?;
        if config.balloon.is_none() {
            return Err(ApiError::conflict(format!(
                "domain {name} has no balloon: add a [balloon] table to its definition, then restart it"
            )));
        }
        let defined = config.memory_bytes();
        if memory < 1 << 20 || memory > defined {
            return Err(ApiError::invalid(format!("memory: must be between 1M and the defined {}M", defined >> 20)));
        }
        let target_mib = (defined - memory) >> 20;
        let request = serde_json::json!({ "op": "balloon", "target_mib": target_mib });
        vmm::request(&socket, request, VMM_TIMEOUT).await.map_err(ApiError::vmm)?;
        self.events.emit("domain", name, "memory_set", format!("{}M for the guest, balloon target {target_mib}M", memory >> 20));
        self.info(name)
    }

    /// Counters of a running domain: what the VMM reports plus the configured sizes.
    pub async fn stats(&self, name: &str) -> ApiResult<Value> {
        let socket = self.active_socket(name, true)?;
        let info = self.info(name)?;
        let mut stats = vmm::op(&socket, "stats", VMM_TIMEOUT).await.map_err(ApiError::vmm)?;
        if let Some(obj) = stats.as_object_mut() {
            obj.remove("ok");
            obj.insert("name".into(), Value::from(name));
            obj.insert("state".into(), serde_json::to_value(info.state).unwrap_or_default());
            obj.insert("memory_bytes".into(), Value::from(info.memory_bytes.unwrap_or(0)));
            obj.insert("vcpus".into(), Value::from(info.vcpus.unwrap_or(0)));
        }
        Ok(stats)
    }

    /// Stats of every active domain, fetched concurrently, for /metrics.
    pub async fn all_stats(&self) -> Vec<(DomainInfo, Option<Value>)> {
        let list = self.list();
        let fetches = list.into_iter().map(|info| async move {
            let stats = if info.state.is_active() { self.stats(&info.name).await.ok() } else { None };
            (info, stats)
        });
        futures_util::future::join_all(fetches).await
    }

    /// Paths of disks that active domains use, to refuse changing a volume under a running VM.
    pub(crate) fn disks_in_use(&self) -> Vec<(String, PathBuf)> {
        let domains = lock(&self.domains);
        let pools = lock(&self.pools);
        let mut used = Vec::new();
        for (name, d) in domains.iter().filter(|(_, d)| d.rt.state.is_active()) {
            let Ok(config) = &d.config else { continue };
            for disk in &config.disks {
                let path = match (&disk.path, &disk.pool, &disk.volume) {
                    (Some(p), _, _) => PathBuf::from(p),
                    (None, Some(pool), Some(vol)) => match pools.get(pool) {
                        Some(p) => PathBuf::from(&p.target).join(vol),
                        None => continue,
                    },
                    _ => continue,
                };
                used.push((name.clone(), path));
            }
        }
        used
    }

    fn resolve_disks(&self, config: &DomainConfig) -> ApiResult<Vec<ResolvedDisk>> {
        let pools = lock(&self.pools);
        let mut disks = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let path = match (&disk.path, &disk.pool, &disk.volume) {
                (Some(p), _, _) => p.clone(),
                (None, Some(pool), Some(vol)) => {
                    let p = pools
                        .get(pool)
                        .ok_or_else(|| ApiError::invalid(format!("disk[{i}].pool: pool {pool:?} is not defined")))?;
                    if !p.active {
                        return Err(ApiError::conflict(format!("disk[{i}].pool: pool {pool} is not active; run `ferro pool-start {pool}`")));
                    }
                    PathBuf::from(&p.target).join(vol).display().to_string()
                }
                _ => return Err(ApiError::invalid(format!("disk[{i}]: no path"))),
            };
            if !std::path::Path::new(&path).is_file() {
                return Err(ApiError::invalid(format!("disk[{i}]: {path} does not exist")));
            }
            disks.push(ResolvedDisk { path, format: disk.format.clone(), readonly: disk.readonly });
        }
        Ok(disks)
    }
}

/// Validates a name taken from a URL.
pub fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|e| ApiError::invalid(format!("{kind} name: {e}")))
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
        let is_key = !in_table
            && trimmed.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='));
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

pub(crate) fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid").map(|s| s.trim().to_string()).unwrap_or_else(|_| {
        let t = crate::now_ms();
        format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), t & 0xffff_ffff_ffff)
    })
}

/// Start time (clock ticks since boot) of a live, non-zombie process.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 22 overall is the 20th after the command name (field 3 is the state just read).
    fields.nth(18)?.parse().ok()
}

/// A pidfd for `pid` if it is still the process that started at `start`.
fn open_pidfd(pid: i32, start: Option<u64>) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall just returned this descriptor to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after opening: the pidfd pins the process, so a match now cannot be a recycled pid.
    (start.is_some() && proc_start_time(pid) == start).then_some(fd)
}

/// SIGKILLs the process group of a monitor (the monitor and its VMM share it).
fn kill_group(pid: i32) {
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
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

    #[test]
    fn own_start_time_is_readable() {
        assert!(proc_start_time(std::process::id() as i32).is_some());
        assert!(proc_start_time(i32::MAX).is_none());
    }
}
