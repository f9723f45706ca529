//! Requests to the VMM of a running domain, through its control socket: destroy, shutdown,
//! reboot, reset, pause and resume, memory (the balloon), counters, and saving the VM for a
//! snapshot.

use super::supervise::{START_TIMEOUT, VMM_TIMEOUT};
use super::{Domains, not_running};
use crate::error::{Error, Result};
use crate::model::{DomainInfo, DomainState, DomainStats};
use crate::vmm;
use ferro_vmm_api::control::{BalloonReply, Done, Request, SnapshotReply, StatsReply};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `destroy` waits after `quit` before killing the VMM.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// How long a VMM may take to save a snapshot (its memory file is written while the guest is
/// paused).
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

impl Domains {
    /// Checks the state and returns the control socket of an active domain.
    pub(super) fn active_socket(&self, name: &str, allow_paused: bool) -> Result<PathBuf> {
        let (state, files) = self.state_and_files(name)?;
        match state {
            DomainState::Running => Ok(files.api_socket()),
            DomainState::Paused if allow_paused => Ok(files.api_socket()),
            DomainState::Paused => Err(Error::conflict(format!("domain {name} is paused; resume it first"))),
            _ => Err(not_running(name, state)),
        }
    }

    /// Sends a request that only succeeds or fails.
    async fn request(socket: &std::path::Path, request: Request) -> Result<()> {
        vmm::call::<Done>(socket, &request, VMM_TIMEOUT).await.map(drop).map_err(Error::vmm)
    }

    /// Stops the VM at once (`quit`, then SIGKILL if the VMM does not go).
    pub async fn destroy(&self, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let pid = self.current_monitor(name).ok_or_else(|| not_running(name, DomainState::Shutoff))?;
        self.update(name, |d| d.stopping = true)?;
        let quit = Self::request(&socket, Request::Quit).await;
        if quit.is_err() || !self.wait_for_exit(name, pid, QUIT_GRACE).await {
            tracing::warn!(domain = name, "VMM did not quit ({quit:?}); killing it");
            self.kill_run(name).await;
            if !self.wait_for_exit(name, pid, Duration::from_secs(10)).await {
                return Err(Error::internal(format!("domain {name}: the VMM survived SIGKILL")));
            }
        }
        self.info(name)
    }

    /// Presses the ACPI power button; with `wait`, waits until the domain is off.
    pub async fn shutdown(&self, name: &str, wait: Option<Duration>) -> Result<DomainInfo> {
        let pid = {
            let _op = self.lock_op(name).await;
            let socket = self.active_socket(name, false)?;
            Self::request(&socket, Request::PowerButton).await?;
            self.events.emit("domain", name, "shutdown_requested", "ACPI power button");
            self.current_monitor(name)
        };
        if let (Some(wait), Some(pid)) = (wait, pid)
            && !self.wait_for_exit(name, pid, wait).await
        {
            return Err(Error::timeout(format!(
                "domain {name} did not shut down within {} s (the guest ignored the power button); use `ferro destroy {name}`",
                wait.as_secs()
            )));
        }
        self.info(name)
    }

    /// Asks the guest to shut down and starts it again once it is off.
    pub async fn reboot(&self, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, false)?;
        self.update(name, |d| d.rt.reboot_pending = true)?;
        if let Err(e) = Self::request(&socket, Request::PowerButton).await {
            self.update(name, |d| d.rt.reboot_pending = false)?;
            return Err(e);
        }
        self.events.emit("domain", name, "reboot_requested", "ACPI power button");
        self.info(name)
    }

    /// Hard reset: the VMM exits and its monitor starts it again at once.
    pub async fn reset(&self, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let old = self.info(name)?.pid;
        Self::request(&socket, Request::Reset).await?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((_, pid)) = vmm::info(&socket, VMM_TIMEOUT).await {
                let pid = Some(pid);
                if pid != old {
                    self.update(name, |d| {
                        d.rt.vmm_pid = pid;
                        d.rt.state = DomainState::Running;
                    })?;
                    break;
                }
            }
            if self.current_monitor(name).is_none() {
                return Err(Error::vmm(format!("domain {name} stopped during the reset")));
            }
            if Instant::now() > deadline {
                return Err(Error::vmm(format!("domain {name} did not come back within {} s of a reset", START_TIMEOUT.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.events.emit("domain", name, "reset", "");
        self.info(name)
    }

    pub async fn suspend(&self, name: &str) -> Result<DomainInfo> {
        self.pause_or_resume(name, true).await
    }

    pub async fn resume(&self, name: &str) -> Result<DomainInfo> {
        self.pause_or_resume(name, false).await
    }

    async fn pause_or_resume(&self, name: &str, pause: bool) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        Self::request(&socket, if pause { Request::Pause } else { Request::Resume }).await?;
        let state = if pause { DomainState::Paused } else { DomainState::Running };
        self.update(name, |d| d.rt.state = state)?;
        self.events.emit("domain", name, if pause { "paused" } else { "resumed" }, "");
        self.info(name)
    }

    /// Saves a running or paused domain's VM (memory and device state) into snapshot directory
    /// `dir`, which must not exist yet, and has the VMM take internal snapshot `disk_snapshot` of
    /// each writable (qcow2) disk meanwhile. The guest is paused only while the VMM saves it; a
    /// paused one stays paused. Returns the state it was in and what the VMM reports (the pause
    /// time, the disks).
    pub async fn save_vm(&self, name: &str, dir: &Path, disk_snapshot: &str) -> Result<(DomainState, SnapshotReply)> {
        let _op = self.lock_op(name).await;
        let (state, files) = self.state_and_files(name)?;
        if !state.is_active() {
            return Err(not_running(name, state));
        }
        let request =
            Request::Snapshot { dir: dir.to_path_buf(), resume: state == DomainState::Running, disk_snapshot: Some(disk_snapshot.to_string()) };
        let reply = vmm::call::<SnapshotReply>(&files.api_socket(), &request, SAVE_TIMEOUT).await.map_err(Error::vmm)?;
        Ok((state, reply))
    }

    /// Sends a request about the disks (a backup's) to a running or paused domain's VMM, under
    /// the domain's operation lock. Taking a backup's snapshots can take a while on big disks.
    pub async fn disk_request<R: serde::de::DeserializeOwned>(&self, name: &str, request: &Request) -> Result<R> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        vmm::call::<R>(&socket, request, SAVE_TIMEOUT).await.map_err(Error::vmm)
    }

    /// Sets the memory a running guest may use (virsh setmem, live only): the balloon takes back
    /// the rest of the defined memory. The definition is not changed.
    pub async fn setmem(&self, name: &str, memory: u64) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let socket = self.active_socket(name, true)?;
        let config = self.info(name)?.config.ok_or_else(|| Error::conflict(format!("domain {name} has an invalid definition")))?;
        if config.balloon.is_none() {
            return Err(Error::conflict(format!(
                "domain {name} has no balloon: add a [balloon] table to its definition, then restart it"
            )));
        }
        let defined = config.memory_bytes();
        if memory < 1 << 20 || memory > defined {
            return Err(Error::invalid(format!("memory: must be between 1M and the defined {}M", defined >> 20)));
        }
        let target_mib = (defined - memory) >> 20;
        vmm::call::<BalloonReply>(&socket, &Request::Balloon { target_mib }, VMM_TIMEOUT).await.map_err(Error::vmm)?;
        self.events.emit("domain", name, "memory_set", format!("{}M for the guest, balloon target {target_mib}M", memory >> 20));
        self.info(name)
    }

    /// Counters of a running domain: what the VMM reports plus the configured sizes.
    pub async fn stats(&self, name: &str) -> Result<DomainStats> {
        let socket = self.active_socket(name, true)?;
        // A VMM just started (a start, a revert) is not listening at once: until the start has
        // seen it answer (and so knows its pid), a failed request is tried again, as the
        // start's own is, rather than failing a client that asked a moment too early.
        let deadline = Instant::now() + START_TIMEOUT;
        let vmm = loop {
            match vmm::call::<StatsReply>(&socket, &Request::Stats, VMM_TIMEOUT).await {
                Ok(reply) => break reply,
                Err(_) if self.info(name)?.pid.is_none() && self.current_monitor(name).is_some() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(Error::vmm(e)),
            }
        };
        let info = self.info(name)?;
        Ok(DomainStats {
            name: name.to_string(),
            state: info.state,
            memory_bytes: info.memory_bytes.unwrap_or(0),
            vcpus: info.vcpus.unwrap_or(0),
            vmm,
            cgroup: self.cgroup_stats(name),
        })
    }

    /// Every domain with its counters when it runs, fetched concurrently (for /metrics).
    pub async fn all_stats(&self) -> Vec<(DomainInfo, Option<DomainStats>)> {
        let fetches = self.list().into_iter().map(|info| async move {
            let stats = if info.state.is_active() { self.stats(&info.name).await.ok() } else { None };
            (info, stats)
        });
        futures_util::future::join_all(fetches).await
    }
}
