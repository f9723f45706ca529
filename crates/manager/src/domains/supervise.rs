//! Supervision of one VMM per running domain.
//!
//! Each running domain has a monitor process (see `monitor`) in its own session that runs the VMM.
//! ferrod records the run's token before it starts the monitor, then the monitor's pid and start
//! time; it learns that a VM stopped when the monitor exits (as its parent, or through a pidfd
//! after a restart) and reads the monitor's exit report. Processes are only ever signalled once
//! proven to be the run's (`process_identity`). A running domain holds its disks (`claims`) from
//! its start until its monitor is gone.
//!
//! NICs on a network or a host bridge get a tap ferrod makes (`fv<uuid prefix>-<n>`), plugs into
//! the bridge and opens; the monitor and the VMM inherit the open tap, so the VMM needs no network
//! privileges. The domain is registered with its networks (`Networks::attach`) while it runs, and
//! its taps are deleted when the run ends.

use super::{Domain, Domains, Runtime, cgroups, lock, no_domain};
use crate::claims::{Access, Holder};
use crate::domain::{DomainConfig, NicAttachment};
use crate::durable;
use crate::error::{Error, Result};
use crate::model::{Crash, DomainInfo, DomainState, new_uuid, now_ms};
use crate::monitor::{self, ExitReport};
use crate::process_identity;
use crate::vmm::{self, ResolvedDisk, RunFiles, VmNic};
use ferro_jail::cgroup::VmCgroup;
use ferro_vmm_api::{DiskFormat, MacAddr};
use std::os::fd::AsRawFd;
use ferro_vmm_api::control::RunState;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a new VMM gets to open its control socket.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one control request may take.
pub(super) const VMM_TIMEOUT: Duration = Duration::from_secs(3);

impl Domains {
    /// Re-attaches to the VMs that were running when ferrod last stopped and starts the task that
    /// restarts domains after a guest-requested reboot.
    pub async fn reattach(self: &Arc<Self>) {
        if let Some(mut queue) = lock(&self.restart_queue).take() {
            let domains = self.clone();
            tokio::spawn(async move {
                while let Some(name) = queue.recv().await {
                    if let Err(e) = domains.start(&name).await {
                        tracing::error!(domain = name, "restart after reboot failed: {e}");
                    }
                }
            });
        }
        let records: Vec<(String, Runtime, Option<DomainConfig>)> = lock(&self.domains)
            .iter()
            .filter(|(_, d)| d.rt.monitor_pid.is_some() || d.rt.run_token.is_some())
            .map(|(n, d)| (n.clone(), d.rt.clone(), d.config.clone().ok()))
            .collect();
        for (name, rt, config) in records {
            let proven = match (rt.monitor_pid, rt.monitor_start, rt.run_token.as_deref()) {
                (Some(pid), Some(start), Some(token)) => process_identity::prove(pid, start, token).map(|fd| (pid, token, fd)),
                _ => None,
            };
            let Some((pid, token, pidfd)) = proven else {
                // Gone, or a pid that is not this run's process any more: never signalled.
                self.monitor_exited(&name, rt.run_token.clone()).await;
                continue;
            };
            tracing::info!(domain = name, monitor = pid, "re-attached to running VM");
            if let Some(config) = &config {
                self.claim_running_disks(&name, config);
                for (network, mac) in network_macs(config) {
                    if let Err(e) = self.networks.register(network, &name, &[mac]) {
                        tracing::warn!(domain = name, network, "running domain not registered with its network: {e}");
                    }
                }
            }
            self.watch_pidfd(name.clone(), pid, token.to_string(), pidfd);
            // Refresh what the VMM says about itself; a failure here is not fatal.
            if let Some(files) = self.files(&name)
                && let Ok((info, vmm_pid)) = vmm::info(&files.api_socket(), VMM_TIMEOUT).await
            {
                let _ = self.update(&name, |d| {
                    if d.rt.monitor_pid == Some(pid) {
                        d.rt.vmm_pid = Some(vmm_pid);
                        d.rt.state = match info.state {
                            RunState::Paused => DomainState::Paused,
                            RunState::Running => DomainState::Running,
                        };
                    }
                });
            }
            self.events.emit("domain", &name, "reattached", format!("monitor pid {pid}"));
        }
    }

    /// Starts every domain set to autostart that is not running (once per host boot, see `daemon`).
    pub async fn autostart(self: &Arc<Self>) {
        let names: Vec<String> =
            lock(&self.domains).iter().filter(|(_, d)| d.autostart && !d.rt.state.is_active()).map(|(n, _)| n.clone()).collect();
        for name in names {
            match self.start(&name).await {
                Ok(_) => tracing::info!(domain = name, "autostarted"),
                Err(e) => tracing::error!(domain = name, "autostart failed: {e}"),
            }
        }
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        self.start_run(name, None).await
    }

    /// Starts a shut-off domain from the VM saved in snapshot directory `dir` (written by
    /// [`Domains::save_vm`]), running or, with `paused`, paused. The VMM gets the same
    /// configuration as a fresh start (the NICs' new taps among it), so a later guest reset
    /// boots the domain as usual.
    pub async fn start_restored(self: &Arc<Self>, name: &str, dir: &Path, paused: bool) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        self.start_run(name, Some(FirstRun::Restore { dir, paused })).await
    }

    /// Starts a shut-off domain's VMM waiting for its VM to migrate in on the unix socket
    /// `RUN_DIR/incoming.sock` (`ferro vmm --incoming`, docs/migration.md) and returns that
    /// socket once the VMM listens on it. The domain shows as paused until
    /// [`Domains::incoming_arrived`] finds the VM arrived.
    pub async fn start_incoming(self: &Arc<Self>, name: &str) -> Result<PathBuf> {
        let _op = self.lock_op(name).await;
        let socket = self.files(name).ok_or_else(|| no_domain(name))?.incoming_socket();
        // A socket left by an earlier incoming VMM (killed, or its migration cancelled) would pass
        // for this one's before it listens: the source then met "connection refused".
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::internal(format!("domain {name}: cannot remove the old migration socket {}: {e}", socket.display()))),
        }
        self.start_run(name, Some(FirstRun::Incoming { socket: &socket })).await?;
        Ok(socket)
    }

    /// After the migration stream of [`Domains::start_incoming`] ended: waits (at most
    /// `START_TIMEOUT`) until the VMM answers on its control socket, which it opens once the VM
    /// has arrived, and records its pid and state. An error if the VMM is gone (the migration
    /// failed) or does not answer (then it is killed).
    pub async fn incoming_arrived(&self, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let pid = self.current_monitor(name).ok_or_else(|| Error::vmm(format!("domain {name}: the VM did not arrive")))?;
        let files = self.files(name).ok_or_else(|| no_domain(name))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.current_monitor(name) != Some(pid) {
                let reason = self.info(name)?.crash.map(|c| c.reason).unwrap_or_else(|| "its VMM exited".to_string());
                return Err(Error::vmm(format!("domain {name}: the VM did not arrive: {reason}")));
            }
            if let Ok((info, vmm_pid)) = vmm::info(&files.api_socket(), VMM_TIMEOUT).await {
                self.update(name, |d| {
                    if d.rt.monitor_pid == Some(pid) {
                        d.rt.vmm_pid = Some(vmm_pid);
                        d.rt.state = if info.state == RunState::Paused { DomainState::Paused } else { DomainState::Running };
                    }
                })?;
                self.events.emit("domain", name, "migrated_in", format!("VMM pid {vmm_pid}"));
                return self.info(name);
            }
            if Instant::now() > deadline {
                self.stop_run(name, pid).await?;
                return Err(Error::vmm(format!(
                    "domain {name}: the VMM did not open its control socket within {} s of the migration's end",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn start_run(self: &Arc<Self>, name: &str, first: Option<FirstRun<'_>>) -> Result<DomainInfo> {
        let (uuid, config) = {
            let domains = lock(&self.domains);
            let d = domains.get(name).ok_or_else(|| no_domain(name))?;
            if d.rt.state.is_active() {
                return Err(Error::conflict(format!("domain {name} is already {}", d.rt.state.word())));
            }
            if d.template {
                return Err(Error::conflict(format!(
                    "domain {name} is a template, which never runs (its disks are the read-only base of linked clones); \
                     clone it: `ferro clone {name} --name NEW --linked`"
                )));
            }
            let config = d
                .config
                .clone()
                .map_err(|e| Error::conflict(format!("domain {name} has an invalid stored definition ({e}); define it again")))?;
            (d.uuid.clone(), config)
        };
        self.check_paths(&config)?;
        let _reservation = self.check_commitment(name, &config).await?;
        let mut disks = self.resolve_disks(&config)?;
        self.check_backing_files(&disks)?;
        for (key, path) in [("boot.kernel", &config.boot.kernel), ("boot.initrd", &config.boot.initrd)] {
            if let Some(path) = path
                && !std::path::Path::new(path).is_file()
            {
                return Err(Error::invalid(format!("{key}: {path} does not exist or is not a file")));
            }
        }
        let files = RunFiles::new(&self.paths.run, &uuid);
        std::fs::create_dir_all(&files.dir).map_err(|e| Error::internal(format!("cannot create {}: {e}", files.dir.display())))?;
        if config.cloud_init.is_some() {
            disks.push(ResolvedDisk { path: files.cloud_init_seed(), format: DiskFormat::Raw, readonly: true });
        }
        let holder = Holder::Domain(name.to_string());
        let uses = disk_uses(disks.iter().map(|d| (d.path.clone(), d.format.name(), d.readonly)));
        self.claims
            .claim(&uses, &holder)
            .map_err(|busy| Error::conflict(format!("domain {name}: disk {} is in use by {}", busy.path.display(), busy.holder)))?;
        let plugged = {
            let (domains, name, uuid, config) = (self.clone(), name.to_string(), uuid.clone(), config.clone());
            tokio::task::spawn_blocking(move || domains.plug_nics(&name, &uuid, &config))
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("NIC task failed: {e}"))))
        };
        let plugs = match plugged {
            Ok(plugs) => plugs,
            Err(e) => {
                self.claims.release(&holder);
                return Err(e);
            }
        };
        let nics: Vec<VmNic> =
            plugs.iter().map(|p| VmNic { tap: p.tap.clone(), mac: p.mac, fd: p.fd.as_ref().map(|fd| fd.as_raw_fd()) }).collect();
        let taps: Vec<String> = plugs.iter().filter(|p| p.fd.is_some()).map(|p| p.tap.clone()).collect();
        let started = match prepare_boot_files(name, &uuid, &config, &disks, &files).await {
            Ok(disk_boot) => vmm::vm_config(&config, &disks, &nics, disk_boot.as_ref()).map_err(Error::invalid).and_then(|vm| {
                let cgroup = self.create_cgroup(name, &uuid, &config, &disks[..config.disks.len()])?;
                let first_run = first.as_ref().map(FirstRun::vmm_args).unwrap_or_default();
                let restore = match &first {
                    Some(FirstRun::Restore { dir, .. }) => Some(*dir),
                    _ => None,
                };
                let jail = self.write_jail(&uuid, &files, &vm, restore)?;
                self.spawn_monitor(name, &files, &vm, &cgroup, taps.clone(), &first_run, jail.as_deref())
                    .inspect_err(|_| cgroups::remove(name, &cgroup))
            }),
            Err(e) => Err(e),
        };
        // The monitor has its own copies of the taps now (or there is no monitor).
        drop(plugs);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                self.claims.release(&holder);
                self.unplug_nics(name, &taps);
                return Err(e);
            }
        };

        let paused = match first {
            Some(FirstRun::Restore { paused, .. }) => paused,
            Some(FirstRun::Incoming { socket }) => return self.wait_listening(name, pid, socket).await,
            None => false,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.current_monitor(name) != Some(pid) {
                let info = self.info(name)?;
                if info.state == DomainState::Shutoff {
                    // The guest ran and powered off before the VMM was asked for its pid.
                    return Ok(info);
                }
                let reason = info.crash.map(|c| c.reason).unwrap_or_else(|| "it exited at once".to_string());
                return Err(Error::vmm(format!("domain {name} failed to start: {reason}")));
            }
            match vmm::info(&files.api_socket(), VMM_TIMEOUT).await {
                Ok((_, vmm_pid)) => {
                    self.update(name, |d| {
                        if d.rt.monitor_pid == Some(pid) {
                            d.rt.vmm_pid = Some(vmm_pid);
                            // Not from `info`: a booting VMM answers before its vCPUs first run.
                            if paused {
                                d.rt.state = DomainState::Paused;
                            }
                        }
                    })?;
                    break;
                }
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    self.stop_run(name, pid).await?;
                    return Err(Error::vmm(format!(
                        "domain {name} failed to start: no control socket after {} s ({e})",
                        START_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        self.info(name)
    }

    /// Waits (at most `START_TIMEOUT`) until the VMM of a domain started for an incoming
    /// migration listens on `socket`; the domain is paused until the VM has arrived.
    async fn wait_listening(&self, name: &str, pid: i32, socket: &Path) -> Result<DomainInfo> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if self.current_monitor(name) != Some(pid) {
                let reason = self.info(name)?.crash.map(|c| c.reason).unwrap_or_else(|| "it exited at once".to_string());
                return Err(Error::vmm(format!("domain {name} failed to start for the incoming migration: {reason}")));
            }
            if Instant::now() > deadline {
                self.stop_run(name, pid).await?;
                return Err(Error::vmm(format!("domain {name}: the VMM did not listen for the migration within {} s", START_TIMEOUT.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.update(name, |d| {
            if d.rt.monitor_pid == Some(pid) {
                d.rt.state = DomainState::Paused;
            }
        })?;
        self.info(name)
    }

    /// Prepares the run directory, starts the monitor (which starts the VMM) in a new session and
    /// in the run's cgroup, records the run and watches for its end. Returns the monitor's pid.
    /// The NICs' open taps (`taps`, recorded in the run) are inherited by the monitor and the VMM
    /// on the descriptor numbers the VM config names. `first_run` goes to the VMM's first run
    /// only (a restore); `jail` describes the VMM's jail, if it has one.
    #[allow(clippy::too_many_arguments)]
    fn spawn_monitor(
        self: &Arc<Self>,
        name: &str,
        files: &RunFiles,
        vm: &ferro_vmm_api::VmConfig,
        cgroup: &VmCgroup,
        taps: Vec<String>,
        first_run: &[String],
        jail: Option<&Path>,
    ) -> Result<i32> {
        let placement = cgroup.placement().map_err(|e| Error::internal(format!("domain {name}: {e}")))?;
        let inherited: Vec<i32> = vm
            .devices
            .iter()
            .filter_map(|d| match d.kind {
                ferro_vmm_api::DeviceKind::Net { fd, .. } => fd,
                _ => None,
            })
            .collect();
        std::fs::create_dir_all(files.vmm_dir()).map_err(|e| Error::internal(format!("cannot create {}: {e}", files.vmm_dir().display())))?;
        for stale in [files.exit_report(), files.api_socket(), files.serial_socket(), files.incoming_socket()] {
            let _ = std::fs::remove_file(stale);
        }
        for log in [files.log(), files.stderr()] {
            std::fs::File::create(log).map_err(|e| Error::internal(format!("cannot create VMM log: {e}")))?;
        }
        // Read by the VMM at each (re)start; replaced whole, so a restart never sees half a file.
        let config = serde_json::to_vec_pretty(vm).map_err(|e| Error::internal(format!("cannot encode the VM config: {e}")))?;
        durable::write(&files.vm_config(), &config)
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", files.vm_config().display())))?;
        // Recorded before any process carries it: whatever ferrod finds after a crash from here
        // on, it can tell this run's processes from strangers.
        let token = new_uuid();
        self.update(name, |d| {
            d.stopping = false;
            d.rt.run_token = Some(token.clone());
        })?;
        let mut cmd = tokio::process::Command::new(&self.paths.monitor_bin);
        cmd.env(process_identity::TOKEN_VAR, &token)
            .arg("monitor")
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
            .args(first_run.iter().map(|arg| format!("--first-run-arg={arg}")))
            .args(jail.iter().flat_map(|spec| [std::ffi::OsStr::new("--jail"), spec.as_os_str()]))
            .arg("--")
            .arg(&self.paths.ferro_bin)
            .args(vmm::vmm_args(files, &self.confinement))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls write(2) on
        // descriptors opened before the fork (joining the cgroup), setsid(2) and fcntl(2), which
        // are async-signal-safe and touch no memory shared with the parent; fcntl clears
        // close-on-exec on the taps' descriptors in the child only, so they leak into no other
        // process ferrod starts meanwhile.
        unsafe {
            cmd.pre_exec(move || {
                placement.join()?;
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &inherited {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                self.update(name, |d| d.rt.run_token = None)?;
                return Err(Error::internal(format!("cannot run the VMM monitor {}: {e}", self.paths.monitor_bin.display())));
            }
        };
        crate::crashpoint::step("VMM monitor spawned, its run not yet recorded");
        let Some(pid) = child.id().map(|p| p as i32) else {
            self.update(name, |d| d.rt.run_token = None)?;
            return Err(Error::internal("the VMM monitor exited at once"));
        };
        let recorded = self.update(name, |d| {
            d.rt = Runtime {
                state: DomainState::Running,
                monitor_pid: Some(pid),
                monitor_start: process_identity::start_time(pid),
                started_ms: Some(now_ms()),
                run_token: Some(token.clone()),
                cgroup: Some(cgroup.clone()),
                taps,
                ..Runtime::default()
            };
        });
        // Before the watcher can report the end of a short run.
        self.events.emit("domain", name, "started", format!("monitor pid {pid}"));
        let domains = self.clone();
        let watched = name.to_string();
        tokio::spawn(async move {
            let _ = child.wait().await;
            domains.monitor_exited(&watched, Some(token)).await;
        });
        recorded.map(|()| pid)
    }

    /// Ends a run that did not come up as it should: its processes are killed and its end is
    /// recorded as a stop, not a crash.
    async fn stop_run(&self, name: &str, pid: i32) -> Result<()> {
        self.update(name, |d| d.stopping = true)?;
        self.kill_run(name).await;
        self.wait_for_exit(name, pid, Duration::from_secs(5)).await;
        Ok(())
    }

    pub(super) fn current_monitor(&self, name: &str) -> Option<i32> {
        lock(&self.domains).get(name).and_then(|d| d.rt.monitor_pid)
    }

    /// Waits until the monitor `pid` of `name` has been reaped; false on timeout.
    pub(super) async fn wait_for_exit(&self, name: &str, pid: i32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.current_monitor(name) == Some(pid) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn watch_pidfd(self: &Arc<Self>, name: String, pid: i32, token: String, pidfd: OwnedFd) {
        let domains = self.clone();
        tokio::spawn(async move {
            // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped; nothing else
            // closes or replaces the descriptor.
            match unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(e) => {
                    tracing::warn!(domain = name, "cannot poll pidfd ({e}); polling /proc instead");
                    let start = process_identity::start_time(pid);
                    while start.is_some() && process_identity::start_time(pid) == start {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            domains.monitor_exited(&name, Some(token)).await;
        });
    }

    /// The token of the domain's current run, if one was started.
    fn run_token(&self, name: &str) -> Option<String> {
        lock(&self.domains).get(name).and_then(|d| d.rt.run_token.clone())
    }

    /// SIGKILLs whatever processes of the domain's current run are alive (its monitor and VMM),
    /// each proven to be the run's first (see `process_identity`).
    pub(super) async fn kill_run(&self, name: &str) {
        let Some(token) = self.run_token(name) else { return };
        let killed = tokio::task::spawn_blocking(move || process_identity::kill_run(&token)).await.unwrap_or(0);
        tracing::info!(domain = name, killed, "killed the run's processes");
    }

    /// The run `token` of a domain is over: its monitor exited, or ferrod, restarted, cannot
    /// prove that the recorded monitor is still the run's. Records how the run ended and frees
    /// its disks. `None` is a run recorded by a ferrod that gave runs no token.
    async fn monitor_exited(&self, name: &str, token: Option<String>) {
        let Some(files) = self.files(name) else { return };
        let mut report = match monitor::read_report(&files.exit_report()) {
            Some(report) => report,
            None => {
                // The monitor died without a report (it was killed): its VMM may live on, and
                // only processes carrying the run's token are taken for it.
                let reason = match token.clone() {
                    Some(token) => {
                        let killed = tokio::task::spawn_blocking(move || process_identity::kill_run(&token)).await.unwrap_or(0);
                        match killed {
                            0 => "the VMM monitor process is gone and left no exit report".to_string(),
                            n => format!("the VMM monitor process died without a report; {n} leftover process(es) of the run were killed"),
                        }
                    }
                    None => "the VMM monitor recorded by an earlier ferrod is gone or cannot be proven to be this \
                             domain's (no run token); nothing was signalled"
                        .to_string(),
                };
                ExitReport { code: None, signal: None, reason, resets: 0 }
            }
        };
        let cgroup = self.run_cgroup(name).filter(|_| self.run_token(name) == token);
        if let Some(cgroup) = &cgroup {
            cgroups::explain_oom(cgroup, &mut report);
        }
        // The taps go before the end is recorded, so whoever waits for the domain to be off
        // finds them gone.
        let taps = lock(&self.domains).get(name).filter(|d| d.rt.run_token == token).map(|d| d.rt.taps.clone());
        if let Some(taps) = taps {
            self.unplug_nics(name, &taps);
        }
        // The disks are released with the end recorded (under the domains lock), so whoever sees
        // the domain off may at once use its volumes.
        let outcome = self.update(name, |d| {
            let end = record_exit(d, token.as_deref(), &report);
            if end.is_some() {
                d.rt.taps.clear();
                self.claims.release(&Holder::Domain(name.to_string()));
            }
            end
        });
        let Ok(Some((kind, detail, reboot))) = outcome else { return };
        if let Some(cgroup) = &cgroup {
            cgroups::remove(name, cgroup);
        }
        for socket in [files.api_socket(), files.serial_socket()] {
            let _ = std::fs::remove_file(socket);
        }
        self.events.emit("domain", name, kind, detail);
        if reboot {
            // Handed to the restarter task: starting from here would make `start` recursive.
            let _ = self.restarts.send(name.to_string());
        }
    }

    /// Makes the taps of a starting domain's network and bridge NICs (plugged into their bridge,
    /// up, opened) and registers the domain with its networks, starting a stopped network set to
    /// autostart. A tap of the user's is passed by name. Undoes all of it on failure.
    fn plug_nics(&self, name: &str, uuid: &str, config: &DomainConfig) -> Result<Vec<NicPlug>> {
        let mut plugs: Vec<NicPlug> = Vec::new();
        let mut plug = |i: usize, nic: &crate::domain::NicConfig| -> Result<()> {
            let mac = nic_mac(nic);
            let bridge = match nic.attachment() {
                NicAttachment::Tap(tap) => {
                    plugs.push(NicPlug { tap: tap.to_string(), mac, fd: None });
                    return Ok(());
                }
                NicAttachment::Network(network) => self.networks.attach(network, name, &[mac]).map_err(|e| e.for_key(&format!("nic[{i}].network")))?,
                NicAttachment::Bridge(bridge) => bridge.to_string(),
            };
            let tap = format!("fv{}-{i}", uuid.get(..8).unwrap_or(uuid));
            // A tap of this domain's that an earlier run could not delete (ferrod died).
            let _ = ferro_net::host::unplug_tap(&tap);
            let fd = ferro_net::host::plug_tap(&tap, &bridge).map_err(|e| match e {
                ferro_net::NetError::Conflict(m) => Error::conflict(format!("nic[{i}]: {m}")),
                other => Error::internal(format!("nic[{i}]: {other}")),
            })?;
            plugs.push(NicPlug { tap, mac, fd: Some(fd) });
            Ok(())
        };
        let result = config.nics.iter().enumerate().try_for_each(|(i, nic)| plug(i, nic));
        if let Err(e) = result {
            let made: Vec<String> = plugs.iter().filter(|p| p.fd.is_some()).map(|p| p.tap.clone()).collect();
            drop(plugs);
            self.unplug_nics(name, &made);
            return Err(e);
        }
        Ok(plugs)
    }

    /// Deletes a run's taps and takes the domain off its networks.
    fn unplug_nics(&self, name: &str, taps: &[String]) {
        for tap in taps {
            if let Err(e) = ferro_net::host::unplug_tap(tap) {
                tracing::warn!(domain = name, tap, "cannot delete the NIC's tap: {e}");
            }
        }
        self.networks.detach(name);
    }

    /// A domain's definition and its disks as files with their formats (for an export).
    pub fn disk_files(&self, name: &str) -> Result<(DomainConfig, Vec<(PathBuf, ferro_block::Format)>)> {
        let config = {
            let domains = lock(&self.domains);
            let d = domains.get(name).ok_or_else(|| no_domain(name))?;
            d.config.clone().map_err(|e| Error::conflict(format!("domain {name} has an invalid stored definition ({e})")))?
        };
        let disks = self.resolve_disks(&config)?;
        let files = disks.into_iter().map(|d| (d.path, ferro_block::Format::from_name(d.format.name()).unwrap_or(ferro_block::Format::Raw))).collect();
        Ok((config, files))
    }

    /// The files of a domain's writable disks, with pool volumes resolved.
    pub fn writable_disk_files(&self, name: &str) -> Result<Vec<PathBuf>> {
        let (config, files) = self.disk_files(name)?;
        Ok(config.disks.iter().zip(files).filter(|(disk, _)| !disk.readonly).map(|(_, (path, _))| path).collect())
    }

    /// Runs blocking `work` on `files` of a shut-off domain (its disks) while nothing else can
    /// start the domain or change the files: under the domain's operation lock, with the files
    /// claimed for writing. Refused while the domain runs, naming `what` (a noun: "disk
    /// snapshot deletion") needs it shut off.
    pub async fn while_shut_off<T: Send + 'static>(
        &self,
        name: &str,
        files: &[PathBuf],
        what: &'static str,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _op = self.lock_op(name).await;
        let (state, _) = self.state_and_files(name)?;
        if state.is_active() {
            return Err(Error::conflict(format!(
                "domain {name} is {}: the {what} needs its disks, which its VMM holds open; shut it down first",
                state.word()
            )));
        }
        let uses: Vec<(PathBuf, Access)> = files.iter().map(|f| (f.clone(), Access::Write)).collect();
        let _held = self
            .claims
            .hold(&uses, what)
            .map_err(|busy| Error::conflict(format!("domain {name}: disk {} is in use by {}", busy.path.display(), busy.holder)))?;
        tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(Error::internal(format!("{what}: the task failed: {e}"))))
    }

    /// The disks of a definition as files, with pool volumes resolved; each must exist.
    fn resolve_disks(&self, config: &DomainConfig) -> Result<Vec<ResolvedDisk>> {
        let mut disks = Vec::new();
        for (i, (disk, path)) in config.disks.iter().zip(self.disk_places(config)?).enumerate() {
            if !path.is_file() {
                return Err(Error::invalid(format!("disk[{i}]: {} does not exist", path.display())));
            }
            let format = DiskFormat::from_name(&disk.format)
                .ok_or_else(|| Error::invalid(format!("disk[{i}].format: {:?} is not raw or qcow2", disk.format)))?;
            disks.push(ResolvedDisk { path, format, readonly: disk.readonly });
        }
        Ok(disks)
    }

    /// Where the disks of a definition are on this host, pool volumes resolved, whether their
    /// files exist or not.
    pub fn disk_places(&self, config: &DomainConfig) -> Result<Vec<PathBuf>> {
        let place = |(i, disk): (usize, &crate::domain::DiskConfig)| match (&disk.path, &disk.pool, &disk.volume) {
            (Some(p), _, _) => Ok(PathBuf::from(p)),
            (None, Some(pool), Some(vol)) => self.pools.disk_path(pool, vol, &format!("disk[{i}].pool")),
            _ => Err(Error::invalid(format!("disk[{i}]: no path"))),
        };
        config.disks.iter().enumerate().map(place).collect()
    }

    /// Claims the disks of a domain found running after a restart, as far as they still resolve.
    fn claim_running_disks(&self, name: &str, config: &DomainConfig) {
        let uses: Vec<(PathBuf, &str, bool)> = config
            .disks
            .iter()
            .filter_map(|disk| {
                let path = match (&disk.path, &disk.pool, &disk.volume) {
                    (Some(p), _, _) => PathBuf::from(p),
                    (None, Some(pool), Some(vol)) => self.pools.volume_file(pool, vol)?,
                    _ => return None,
                };
                Some((path, disk.format.as_str(), disk.readonly))
            })
            .collect();
        let uses = disk_uses(uses.into_iter());
        if let Err(busy) = self.claims.claim(&uses, &Holder::Domain(name.to_string())) {
            tracing::warn!(domain = name, "disk {} is also used by {}", busy.path.display(), busy.holder);
        }
    }
}

/// Writes what a start needs besides the definition into the run directory: the cloud-init seed
/// (made again from the definition at every start, so a redefinition takes effect at the next
/// one) and, with `from = "disk"`, the kernel and initrd the first disk's boot configuration names
/// (found again at every start, so a kernel updated inside the guest is the one booted).
async fn prepare_boot_files(
    name: &str,
    uuid: &str,
    config: &DomainConfig,
    disks: &[ResolvedDisk],
    files: &RunFiles,
) -> Result<Option<vmm::DiskBoot>> {
    let seed = config.cloud_init.as_ref().map(|ci| ferro_images::seed::Seed {
        meta_data: ci.meta_data.clone().unwrap_or_else(|| ferro_images::seed::Seed::default_meta_data(uuid, name)),
        user_data: ci.user_data.clone(),
        network_config: ci.network_config.clone(),
    });
    let first_disk = config.boot.from_disk().then(|| disks.first().map(|d| (d.path.clone(), d.format))).flatten();
    let (seed_path, dir) = (files.cloud_init_seed(), files.dir.clone());
    let name = name.to_string();
    let work = move || -> Result<Option<vmm::DiskBoot>> {
        if let Some(seed) = seed {
            seed.write(&seed_path).map_err(|e| Error::internal(format!("domain {name}: {e}")))?;
        }
        let Some((disk, format)) = first_disk else { return Ok(None) };
        let format = ferro_block::Format::from_name(format.name());
        let found = ferro_images::boot::extract(&disk, format, &dir)
            .map_err(|e| Error::invalid(format!("boot.from: domain {name} boots from its first disk, but {e}")))?;
        tracing::info!(domain = name, "booting {} from its first disk", found.source);
        Ok(Some(vmm::DiskBoot { kernel: found.kernel, initrd: found.initrd, cmdline: found.cmdline }))
    };
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(Error::internal(format!("boot file task failed: {e}"))))
}

impl Domains {
    /// Writes the jail of a run's VMM for its monitor (None when VMMs run unjailed); the
    /// directories the VMM writes (its sockets', the domain's snapshots') exist from here on.
    fn write_jail(&self, uuid: &str, files: &RunFiles, vm: &ferro_vmm_api::VmConfig, restore: Option<&Path>) -> Result<Option<PathBuf>> {
        let Some(jailer) = &self.confinement.jail else { return Ok(None) };
        let snapshots = self.paths.snapshots().join(uuid);
        for dir in [files.vmm_dir(), snapshots.clone()] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let spec = vmm::jail_spec(files, vm, jailer, &snapshots, restore).map_err(Error::invalid)?;
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| Error::internal(format!("cannot encode the VMM's jail: {e}")))?;
        durable::write(&files.jail_spec(), &json).map_err(|e| Error::internal(format!("cannot write {}: {e}", files.jail_spec().display())))?;
        Ok(Some(files.jail_spec()))
    }
}

/// What a domain's first VMM run starts from instead of a boot (a reset later boots afresh).
enum FirstRun<'a> {
    /// The VM saved in a snapshot directory, running or paused.
    Restore { dir: &'a Path, paused: bool },
    /// A VM migrating in, received on this unix socket (docs/migration.md).
    Incoming { socket: &'a Path },
}

impl FirstRun<'_> {
    /// What the VMM's first run adds to its command line.
    fn vmm_args(&self) -> Vec<String> {
        match self {
            FirstRun::Restore { dir, paused } => {
                let mut args = vec!["--restore".to_string(), dir.display().to_string()];
                if *paused {
                    args.push("--paused".to_string());
                }
                args
            }
            FirstRun::Incoming { socket } => vec!["--incoming".to_string(), format!("unix:{}", socket.display())],
        }
    }
}

/// A NIC's tap for the VMM: `fd` is the open tap for one ferrod made, None for a tap of the
/// user's, which the VMM opens by name.
struct NicPlug {
    tap: String,
    mac: MacAddr,
    fd: Option<std::os::fd::OwnedFd>,
}

/// A NIC's MAC: the one in its definition (every NIC gets one at define time; a definition
/// stored by an older ferrod may lack it, and then the run gets a new one).
fn nic_mac(nic: &crate::domain::NicConfig) -> MacAddr {
    nic.mac.as_deref().and_then(|m| m.parse().ok()).unwrap_or_else(MacAddr::random)
}

/// The (network, MAC) of each NIC of `config` that is on a virtual network.
pub(super) fn network_macs(config: &DomainConfig) -> Vec<(&str, MacAddr)> {
    config
        .nics
        .iter()
        .filter_map(|nic| match nic.attachment() {
            NicAttachment::Network(network) => Some((network, nic_mac(nic))),
            _ => None,
        })
        .collect()
}

fn disk_access(readonly: bool) -> Access {
    if readonly { Access::Read } else { Access::Write }
}

/// What a domain's disks (path, format, read-only) use: each disk as it is attached, and every file of
/// its backing chain for reading, so that no volume a running domain reads through an overlay is
/// wiped, resized or replaced under it. A chain that cannot be read is left to the VMM, whose
/// open fails with the reason.
fn disk_uses<'a>(disks: impl Iterator<Item = (PathBuf, &'a str, bool)>) -> Vec<(PathBuf, Access)> {
    let mut uses = Vec::new();
    for (path, format, readonly) in disks {
        // The format is the definition's, never probed: a raw disk's guest may write anything.
        let format = ferro_block::Format::from_name(format);
        if format.is_some()
            && let Ok(chain) = ferro_block::ops::info(&path, format, true, true)
        {
            uses.extend(chain.into_iter().skip(1).map(|backing| (backing.path, Access::Read)));
        }
        uses.push((path, disk_access(readonly)));
    }
    uses
}

/// Records the end of run `token` in a domain's record: shut off after a clean exit or a destroy,
/// crashed otherwise. Returns the event to emit and whether to start the domain again, or None
/// if the record is about another run.
fn record_exit(d: &mut Domain, token: Option<&str>, report: &ExitReport) -> Option<(&'static str, String, bool)> {
    if d.rt.run_token.as_deref() != token || (token.is_none() && d.rt.monitor_pid.is_none()) {
        return None;
    }
    d.rt.run_token = None;
    if d.rt.monitor_pid.is_none() {
        // ferrod died between starting the monitor and recording it: the start was never
        // acknowledged, and the domain stays as it was.
        return Some(("stopped", format!("a start cut short by a ferrod crash ({})", report.reason), false));
    }
    let clean = report.code == Some(0);
    let stopping = std::mem::take(&mut d.stopping);
    let reboot = d.rt.reboot_pending && clean;
    d.rt.monitor_pid = None;
    d.rt.monitor_start = None;
    d.rt.vmm_pid = None;
    d.rt.reboot_pending = false;
    d.rt.cgroup = None;
    if clean || stopping {
        d.rt.state = DomainState::Shutoff;
        d.rt.crash = None;
        return Some(("stopped", if stopping { "destroyed".to_string() } else { report.reason.clone() }, reboot));
    }
    d.rt.state = DomainState::Crashed;
    d.rt.crash = Some(Crash { reason: report.reason.clone(), exit_code: report.code, signal: report.signal, time_ms: now_ms() });
    let status = match (report.code, report.signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "status unknown".to_string(),
    };
    Some(("crashed", format!("{} ({status})", report.reason), false))
}
