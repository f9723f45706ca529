//! The snapshots service: virsh-style snapshots of a domain, as a tree. It owns the snapshot
//! rows in the store (the tree: each snapshot's parent, the domain's current snapshot, the
//! definition each was taken with) and the snapshot directories under
//! `$FERRO_HOME/snapshots/<domain uuid>/<snapshot name>/`, which hold the VMM's memory and state
//! files (docs/snapshot-format.md) of a snapshot taken while the domain ran.
//!
//! Taking one of a running or paused domain saves its VM through the VMM (the guest is paused
//! only while that runs); of a shut-off domain, its disks only. Reverting to one taken while the
//! domain ran stops the domain's VMM and starts one restored from the snapshot directory; to a
//! shut-off one leaves the domain shut off. Create and revert run as jobs. A new snapshot's
//! parent is the domain's current one, so taking one after a revert starts a sibling branch.
//! Operations on one domain's snapshots are serialized by a per-domain lock; the domain's own
//! operations (start, destroy, saving the VM) go through the domains service.

mod disks;

use crate::domain::validate_name;
use crate::domains::Domains;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::{Job, JobContext, JobError, Jobs, NewJob};
use crate::model::{DomainInfo, DomainState, ProgressUnit, SnapshotInfo, now_ms, rfc3339};
use crate::store::{Store, StoredSnapshot};
use ferro_vmm_api::control::{Done, Request};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The longest description a snapshot may have, in bytes.
const MAX_DESCRIPTION: usize = 4096;

/// How a revert leaves the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertTo {
    /// As the snapshot was taken: running, paused or shut off.
    AsTaken,
    Running,
    Paused,
}

/// What `undefine` does with a domain's snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotsOnUndefine {
    /// Refuse to undefine a domain that has snapshots.
    Refuse,
    /// Forget them (their memory and state files go too; internal snapshots stay in the disks).
    Metadata,
    /// Delete them all, the disks' internal snapshots included.
    RemoveAll,
}

pub struct Snapshots {
    /// `$FERRO_HOME/snapshots`: one directory per domain uuid.
    root: PathBuf,
    store: Arc<Store>,
    events: Arc<EventHub>,
    jobs: Arc<Jobs>,
    domains: Arc<Domains>,
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn no_snapshot(domain: &str, name: &str) -> Error {
    Error::not_found(format!("domain {domain} has no snapshot {name:?} (see `ferro snapshot-list {domain}`)"))
}

fn failed(e: Error) -> JobError {
    JobError::Failed(e.message)
}

impl Snapshots {
    pub fn open(root: PathBuf, store: Arc<Store>, events: Arc<EventHub>, jobs: Arc<Jobs>, domains: Arc<Domains>) -> Arc<Snapshots> {
        Arc::new(Snapshots { root, store, events, jobs, domains, op_locks: Mutex::new(HashMap::new()) })
    }

    async fn lock_op(&self, domain: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.op_locks.lock().unwrap_or_else(|p| p.into_inner()).entry(domain.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Waits until no snapshot operation (take, revert, delete) of `domain` is under way;
    /// whether one was.
    pub async fn settle(&self, domain: &str) -> bool {
        let m = self.op_locks.lock().unwrap_or_else(|p| p.into_inner()).entry(domain.to_string()).or_default().clone();
        if m.try_lock().is_ok() {
            return false;
        }
        drop(m.lock().await);
        true
    }

    fn domain_dir(&self, uuid: &str) -> PathBuf {
        self.root.join(uuid)
    }

    /// Where a snapshot's memory and state files are.
    fn dir(&self, uuid: &str, name: &str) -> PathBuf {
        self.domain_dir(uuid).join(name)
    }

    /// Every snapshot of a domain, oldest first.
    pub fn list(&self, domain: &str) -> Result<Vec<SnapshotInfo>> {
        self.domains.info(domain)?;
        let rows = self.store.snapshots(domain)?;
        Ok(rows.iter().map(|row| info_of(row, &rows)).collect())
    }

    pub fn info(&self, domain: &str, name: &str) -> Result<SnapshotInfo> {
        self.list(domain)?.into_iter().find(|s| s.name == name).ok_or_else(|| no_snapshot(domain, name))
    }

    fn row(&self, domain: &str, name: &str) -> Result<StoredSnapshot> {
        self.store.snapshots(domain)?.into_iter().find(|s| s.name == name).ok_or_else(|| no_snapshot(domain, name))
    }

    /// Starts taking snapshot `name` of a domain (a job): of a running or paused domain its
    /// memory, devices and disks, of a shut-off one its disks.
    pub fn create(self: &Arc<Self>, domain: &str, name: &str, description: Option<String>) -> Result<Arc<Job>> {
        validate_name(name).map_err(|e| Error::invalid(format!("snapshot name: {e}")))?;
        if let Some(text) = &description
            && (text.len() > MAX_DESCRIPTION || text.chars().any(|c| c.is_control() && c != '\n'))
        {
            return Err(Error::invalid(format!("description: at most {MAX_DESCRIPTION} bytes of text without control characters")));
        }
        let info = self.domains.info(domain)?;
        check_disks(&info)?;
        if self.row(domain, name).is_ok() {
            return Err(Error::conflict(format!("domain {domain} already has a snapshot {name:?}; delete it first or pick another name")));
        }
        let new = NewJob {
            kind: "snapshot-create",
            source: domain.to_string(),
            target: format!("{domain}/{name}"),
            unit: ProgressUnit::Steps,
            scratch_files: Vec::new(),
            uses: Vec::new(),
        };
        let (this, domain, name) = (self.clone(), domain.to_string(), name.to_string());
        self.jobs.start(new, move |ctx| async move { this.take(&ctx, &domain, &name, description).await })
    }

    async fn take(&self, ctx: &JobContext, domain: &str, name: &str, description: Option<String>) -> std::result::Result<(), JobError> {
        let _op = self.lock_op(domain).await;
        ctx.set_total(2);
        let info = self.domains.info(domain).map_err(failed)?;
        check_disks(&info).map_err(failed)?;
        let rows = self.store.snapshots(domain).map_err(|e| failed(e.into()))?;
        if rows.iter().any(|s| s.name == name) {
            return Err(JobError::Failed(format!("domain {domain} already has a snapshot {name:?}")));
        }
        let definition = self.domains.definition(domain).map_err(failed)?;
        let dir = self.dir(&info.uuid, name);
        // A directory left by a take that ferrod did not finish (no row names it).
        let _ = std::fs::remove_dir_all(&dir);
        let (state, saved, disks) = if info.state.is_active() {
            std::fs::create_dir_all(self.domain_dir(&info.uuid))
                .map_err(|e| JobError::Failed(format!("cannot create {}: {e}", self.domain_dir(&info.uuid).display())))?;
            match self.domains.save_vm(domain, &dir, name).await {
                Ok((state, reply)) => {
                    let disks = reply.disks.clone();
                    (state, Some(reply), disks)
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(failed(e));
                }
            }
        } else {
            let disks = self.domains.writable_disk_files(domain).map_err(failed)?;
            self.on_shut_off_disks(domain, &disks, name, "disk snapshot", disks::create).await.map_err(failed)?;
            (DomainState::Shutoff, None, disks)
        };
        ctx.advance(1);
        let row = StoredSnapshot {
            domain: domain.to_string(),
            name: name.to_string(),
            parent: rows.iter().find(|s| s.current).map(|s| s.name.clone()),
            state: state.name().to_string(),
            created_ms: now_ms(),
            description,
            definition,
            current: true,
            pause_us: saved.as_ref().map(|r| r.pause_us),
            memory_bytes: saved.as_ref().map(|r| r.memory_bytes_written),
            disks: serde_json::to_string(&disks).unwrap_or_else(|_| "[]".to_string()),
        };
        if let Err(e) = self.store.insert_snapshot(&row) {
            let _ = std::fs::remove_dir_all(&dir);
            // The disk snapshots of a snapshot that was never recorded (a running domain's disks
            // stay open in its VMM; those are named in the log).
            if let Err(e) = self.on_shut_off_disks(domain, &disks, name, "disk snapshot deletion", disks::delete).await {
                tracing::warn!(domain, snapshot = name, "disk snapshots left in {disks:?}: {e}");
            }
            return Err(JobError::Failed(format!("cannot record snapshot {name}: {e}")));
        }
        ctx.advance(1);
        let detail = match &saved {
            Some(reply) => format!("{name} ({}; guest paused {:.3} ms)", state.word(), reply.pause_us as f64 / 1000.0),
            None => format!("{name} (shut off: disks only)"),
        };
        self.events.emit("domain", domain, "snapshot_created", detail);
        Ok(())
    }

    /// Starts reverting a domain to snapshot `name` (a job). One taken while the domain ran comes
    /// back running or paused as it was (or as `to` says); one taken while it was shut off leaves
    /// it shut off (or starts it afresh when `to` says so). The domain's definition goes back to
    /// the one the snapshot was taken with.
    pub fn revert(self: &Arc<Self>, domain: &str, name: &str, to: RevertTo) -> Result<Arc<Job>> {
        self.row(domain, name)?;
        let new = NewJob {
            kind: "snapshot-revert",
            source: format!("{domain}/{name}"),
            target: domain.to_string(),
            unit: ProgressUnit::Steps,
            scratch_files: Vec::new(),
            uses: Vec::new(),
        };
        let (this, domain, name) = (self.clone(), domain.to_string(), name.to_string());
        self.jobs.start(new, move |ctx| async move { this.go_back(&ctx, &domain, &name, to).await })
    }

    async fn go_back(&self, ctx: &JobContext, domain: &str, name: &str, to: RevertTo) -> std::result::Result<(), JobError> {
        let _op = self.lock_op(domain).await;
        ctx.set_total(3);
        let row = self.row(domain, name).map_err(failed)?;
        let taken = state_of(&row.state);
        let info = self.domains.info(domain).map_err(failed)?;
        let dir = self.dir(&info.uuid, name);
        if taken.is_active() {
            // Before the domain is stopped: a snapshot whose state is gone or damaged must not
            // cost the running guest.
            check_state_file(&dir).map_err(failed)?;
        }
        if info.state.is_active() {
            self.domains.destroy(domain).await.map_err(failed)?;
        }
        let disks = disk_files(&row);
        if !disks.is_empty() {
            self.on_shut_off_disks(domain, &disks, name, "disk snapshot revert", disks::apply).await.map_err(failed)?;
        }
        ctx.advance(1);
        if self.domains.definition(domain).map_err(failed)? != row.definition {
            self.domains.define(&row.definition).await.map_err(failed)?;
        }
        ctx.advance(1);
        let started = match (taken.is_active(), to) {
            (true, RevertTo::AsTaken) => Some(self.domains.start_restored(domain, &dir, taken == DomainState::Paused).await),
            (true, to) => Some(self.domains.start_restored(domain, &dir, to == RevertTo::Paused).await),
            (false, RevertTo::AsTaken) => None,
            (false, RevertTo::Running) => Some(self.domains.start(domain).await),
            (false, RevertTo::Paused) => {
                let started = self.domains.start(domain).await;
                Some(match started {
                    Ok(_) => self.domains.suspend(domain).await,
                    Err(e) => Err(e),
                })
            }
        };
        if let Some(started) = started {
            started.map_err(failed)?;
        }
        self.store.set_current_snapshot(domain, Some(name)).map_err(|e| failed(e.into()))?;
        ctx.advance(1);
        let now = self.domains.info(domain).map(|i| i.state.word()).unwrap_or("unknown");
        self.events.emit("domain", domain, "snapshot_reverted", format!("{name} (now {now})"));
        Ok(())
    }

    /// Deletes snapshot `name`: its children move to its parent (which becomes current if it
    /// was), its files are removed.
    pub async fn delete(&self, domain: &str, name: &str) -> Result<()> {
        let _op = self.lock_op(domain).await;
        let info = self.domains.info(domain)?;
        let row = self.row(domain, name)?;
        self.delete_disk_snapshots(&row).await?;
        self.store.delete_snapshot(domain, name)?;
        let _ = std::fs::remove_dir_all(self.dir(&info.uuid, name));
        self.events.emit("domain", domain, "snapshot_deleted", name);
        Ok(())
    }

    /// Undefines a domain (see `Domains::undefine`), doing with its snapshots what `policy` says.
    pub async fn undefine_domain(&self, domain: &str, policy: SnapshotsOnUndefine) -> Result<()> {
        let _op = self.lock_op(domain).await;
        let info = self.domains.info(domain)?;
        let rows = self.store.snapshots(domain)?;
        let names: Vec<&str> = rows.iter().map(|s| s.name.as_str()).collect();
        if !names.is_empty() && policy == SnapshotsOnUndefine::Refuse {
            return Err(Error::conflict(format!(
                "domain {domain} has {} snapshot(s) ({}): undefine it with --snapshots-metadata to forget them (disk snapshots \
                 stay in the disks) or --remove-all-snapshots to delete them",
                names.len(),
                names.join(", ")
            )));
        }
        if policy == SnapshotsOnUndefine::RemoveAll {
            if info.state.is_active() {
                return Err(Error::conflict(format!("domain {domain} is {}; destroy or shut it down first", info.state.word())));
            }
            for row in &rows {
                self.delete_disk_snapshots(row).await?;
            }
        }
        self.domains.undefine(domain).await?;
        // A crash here leaves rows no domain has; a domain defined later under this name would
        // see them, so they go right after the domain.
        self.store.delete_domain_snapshots(domain)?;
        let _ = std::fs::remove_dir_all(self.domain_dir(&info.uuid));
        Ok(())
    }
}

impl Snapshots {
    /// Deletes a snapshot's internal snapshots from its disks: a running or paused domain's
    /// VMM, which holds the disks open, deletes them itself; a disk file that is gone is skipped.
    async fn delete_disk_snapshots(&self, row: &StoredSnapshot) -> Result<()> {
        let disks: Vec<PathBuf> = disk_files(row).into_iter().filter(|f| f.exists()).collect();
        if disks.is_empty() {
            return Ok(());
        }
        if self.domains.info(&row.domain)?.state.is_active() {
            let request = Request::DiskSnapshotDelete { name: row.name.clone() };
            return self.domains.disk_request::<Done>(&row.domain, &request).await.map(drop);
        }
        self.on_shut_off_disks(&row.domain, &disks, &row.name, "disk snapshot deletion", disks::delete).await
    }

    /// Runs `action` (create, apply or delete internal snapshot `name`) on a shut-off domain's
    /// disks through `Domains::while_shut_off`, which names the work as `what`.
    async fn on_shut_off_disks(
        &self,
        domain: &str,
        disks: &[PathBuf],
        name: &str,
        what: &'static str,
        action: fn(&[PathBuf], &str) -> Result<()>,
    ) -> Result<()> {
        let (files, snapshot) = (disks.to_vec(), name.to_string());
        self.domains.while_shut_off(domain, disks, what, move || action(&files, &snapshot)).await
    }
}

/// The disk files holding a snapshot's internal snapshots.
fn disk_files(row: &StoredSnapshot) -> Vec<PathBuf> {
    serde_json::from_str(&row.disks).unwrap_or_default()
}

/// Refuses a domain whose disks cannot be snapshotted: a writable raw disk keeps no internal
/// snapshots. Read-only disks never change and are left out.
fn check_disks(info: &DomainInfo) -> Result<()> {
    let Some(config) = &info.config else {
        return Err(Error::conflict(format!("domain {} has an invalid stored definition; define it again", info.name)));
    };
    for (i, disk) in config.disks.iter().enumerate() {
        if disk.readonly || disk.format != "raw" {
            continue;
        }
        let file = match (&disk.path, &disk.pool, &disk.volume) {
            (Some(path), _, _) => path.clone(),
            (None, Some(pool), Some(volume)) => format!("{pool}/{volume}"),
            _ => format!("disk[{i}]"),
        };
        if disk.format == "raw" {
            return Err(Error::conflict(format!(
                "domain {}: disk[{i}] ({file}) is raw, which cannot hold snapshots; convert it to qcow2 (`ferro vol-convert ... \
                 --format qcow2`, then point the domain at the new volume) or make it read-only",
                info.name
            )));
        }
    }
    Ok(())
}

/// Checks the frame of a snapshot's state file (magic, version, length, checksum) and that its
/// body is a JSON object; the VMM checks the rest when it restores.
fn check_state_file(dir: &Path) -> Result<()> {
    // The domain's VMM writes the directory holding its snapshots: a link it put in a
    // snapshot's place is never restored from (the jail would bind whatever it names).
    if std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::conflict(format!("snapshot {} is not a directory (a symbolic link?); refusing to restore from it", dir.display())));
    }
    let body = ferro_vmm_api::snapshot_file::read_body(&dir.join("state")).map_err(Error::conflict)?;
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(Error::conflict(format!("state file {}/state: the body is not a JSON object (the file is damaged)", dir.display()))),
    }
}

fn state_of(word: &str) -> DomainState {
    match word {
        "running" => DomainState::Running,
        "paused" => DomainState::Paused,
        _ => DomainState::Shutoff,
    }
}

fn info_of(row: &StoredSnapshot, all: &[StoredSnapshot]) -> SnapshotInfo {
    SnapshotInfo {
        domain: row.domain.clone(),
        name: row.name.clone(),
        parent: row.parent.clone(),
        children: all.iter().filter(|s| s.parent.as_deref() == Some(row.name.as_str())).map(|s| s.name.clone()).collect(),
        state: state_of(&row.state),
        created: rfc3339(row.created_ms),
        created_ms: row.created_ms,
        current: row.current,
        description: row.description.clone(),
        pause_us: row.pause_us,
        memory_bytes: row.memory_bytes,
        disks: serde_json::from_str(&row.disks).unwrap_or_default(),
    }
}
