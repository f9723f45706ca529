//! The backups service: libvirt-style checkpoints and backups of a domain's disks. It owns the
//! checkpoint rows in the store; `disk` does the image work.
//!
//! A checkpoint is a dirty bitmap of its name in every writable disk of the domain. The
//! checkpoints of a domain form one chain: only the newest one's bitmap tracks writes, each older
//! one holds the writes between it and the next, so the clusters written since checkpoint C are
//! the union of C's bitmap and every later one's. A backup writes `DIR/<target>.qcow2` per disk
//! (vda, vdb, ... in definition order) and makes a new checkpoint at the point in time it copies:
//! a full backup holds every cluster with data; an incremental one (since C) only the clusters
//! written since C, with C's backup file as its backing file, so the newest file of a chain is
//! the whole disk to `qemu-img convert`.
//!
//! A backup runs as a job holding the disks and the new files (`claims`), so the domain cannot
//! start under it. It copies into hidden `.part` files, then switches the bitmaps, then gives the
//! files their names (never replacing a file), then marks the checkpoint made. A failure or a
//! cancel on the way undoes what was done; a checkpoint row is written (pending) before any disk
//! changes, so a ferrod that died during a backup undoes it at its next start. Deleting a
//! checkpoint merges its bitmap into its parent's.

mod disk;

use crate::claims::Access;
use crate::domain::validate_name;
use crate::domains::Domains;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::{JobContext, JobError, Jobs, NewJob};
use crate::model::{JobInfo, ProgressUnit, now_ms, rfc3339};
use crate::store::{Store, StoredCheckpoint};
use disk::Since;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One disk of a checkpoint: the image holding its bitmap, and the backup made of it then.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointDisk {
    /// The disk's name in the guest: vda, vdb, ... in definition order.
    pub target: String,
    /// The disk image (it holds a dirty bitmap named after the checkpoint).
    pub path: String,
    /// The backup file the checkpoint's backup wrote of it.
    pub backup: String,
}

/// A checkpoint as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    pub domain: String,
    pub name: String,
    /// The checkpoint before it in the domain's chain (None for the oldest).
    pub parent: Option<String>,
    pub created: String,
    pub created_ms: u64,
    pub disks: Vec<CheckpointDisk>,
}

/// What a backup request asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Directory on ferrod's host for the backup files (made if missing).
    pub target: PathBuf,
    /// Only the clusters written since this checkpoint (default: a full backup).
    #[serde(default)]
    pub incremental: Option<String>,
    /// The new checkpoint's name (default: the time in seconds since the epoch, as libvirt does).
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// A started backup: its job, the checkpoint it makes and the files it writes.
#[derive(Debug, Clone, Serialize)]
pub struct BackupStarted {
    pub job: JobInfo,
    pub checkpoint: String,
    pub files: Vec<String>,
}

/// One disk of a backup being made.
struct DiskPlan {
    target: String,
    path: PathBuf,
    since: Since,
    /// The hidden file the copy goes to, and the file it becomes.
    part: PathBuf,
    file: PathBuf,
}

struct Plan {
    domain: String,
    checkpoint: String,
    parent: Option<String>,
    disks: Vec<DiskPlan>,
}

pub struct Backups {
    store: Arc<Store>,
    events: Arc<EventHub>,
    jobs: Arc<Jobs>,
    domains: Arc<Domains>,
}

fn no_checkpoint(domain: &str, name: &str) -> Error {
    Error::not_found(format!("domain {domain} has no checkpoint {name:?} (see `ferro checkpoint-list {domain}`)"))
}

/// The guest's name of the `i`th disk: vda ... vdz, vdaa ...
fn target_name(i: usize) -> String {
    let letter = |n: usize| char::from(b'a' + (n % 26) as u8);
    if i < 26 { format!("vd{}", letter(i)) } else { format!("vd{}{}", letter(i / 26 - 1), letter(i)) }
}

fn disks_of(row: &StoredCheckpoint) -> Vec<CheckpointDisk> {
    serde_json::from_str(&row.disks).unwrap_or_default()
}

fn info_of(row: &StoredCheckpoint) -> CheckpointInfo {
    CheckpointInfo {
        domain: row.domain.clone(),
        name: row.name.clone(),
        parent: row.parent.clone(),
        created: rfc3339(row.created_ms),
        created_ms: row.created_ms,
        disks: disks_of(row),
    }
}

fn store_failed(e: rusqlite::Error) -> JobError {
    JobError::Failed(format!("state store: {e}"))
}

impl Backups {
    /// Opens the service and undoes the checkpoints a dead ferrod left half made (see `recover`).
    pub fn open(store: Arc<Store>, events: Arc<EventHub>, jobs: Arc<Jobs>, domains: Arc<Domains>) -> Arc<Backups> {
        let backups = Arc::new(Backups { store, events, jobs, domains });
        backups.recover();
        backups
    }

    /// Undoes every pending checkpoint: its bitmaps leave the disks (merged into the parent's),
    /// the backup files its job had already named are removed (the job was recorded failed), and
    /// its row goes.
    fn recover(&self) {
        let pending = match self.store.pending_checkpoints() {
            Ok(rows) => rows,
            Err(e) => return tracing::error!("cannot read pending checkpoints: {e}"),
        };
        for row in pending {
            match self.undo(&row, true) {
                Ok(()) => tracing::info!(domain = row.domain, checkpoint = row.name, "undid a checkpoint a stopped ferrod left half made"),
                Err(e) => tracing::error!(domain = row.domain, checkpoint = row.name, "cannot undo a half-made checkpoint: {e}"),
            }
        }
    }

    /// Takes a pending checkpoint's bitmaps out of its disks and forgets it; with
    /// `remove_files`, also its backup files (a job that died may have named some).
    fn undo(&self, row: &StoredCheckpoint, remove_files: bool) -> std::result::Result<(), String> {
        for d in disks_of(row) {
            if remove_files {
                let _ = std::fs::remove_file(&d.backup);
            }
            if Path::new(&d.path).is_file() {
                disk::remove_checkpoint(Path::new(&d.path), &row.name, row.parent.as_deref()).map_err(|e| e.to_string())?;
            }
        }
        self.store.delete_checkpoint(&row.domain, &row.name).map_err(|e| e.to_string())
    }

    /// A domain's checkpoints, oldest first.
    pub fn list(&self, domain: &str) -> Result<Vec<CheckpointInfo>> {
        self.domains.info(domain)?;
        Ok(self.store.checkpoints(domain)?.iter().filter(|r| !r.pending).map(info_of).collect())
    }

    pub fn info(&self, domain: &str, name: &str) -> Result<CheckpointInfo> {
        self.list(domain)?.into_iter().find(|c| c.name == name).ok_or_else(|| no_checkpoint(domain, name))
    }

    /// Starts a backup of a domain's writable disks into `req.target` (a job), making a new
    /// checkpoint.
    pub fn begin(self: &Arc<Self>, domain: &str, req: BackupRequest) -> Result<BackupStarted> {
        let plan = self.plan(domain, &req)?;
        let files: Vec<String> = plan.disks.iter().map(|d| d.file.display().to_string()).collect();
        let mut uses: Vec<(PathBuf, Access)> = Vec::new();
        for d in &plan.disks {
            uses.push((d.path.clone(), Access::Write));
            uses.push((d.file.clone(), Access::Write));
            if let Since::Checkpoint { backing, .. } = &d.since {
                uses.push((backing.clone(), Access::Read));
            }
        }
        let new = NewJob {
            kind: "backup",
            source: domain.to_string(),
            target: req.target.display().to_string(),
            unit: ProgressUnit::Bytes,
            scratch_files: plan.disks.iter().map(|d| d.part.clone()).collect(),
            uses,
        };
        let checkpoint = plan.checkpoint.clone();
        let this = self.clone();
        let job = self.jobs.start(new, move |ctx| async move {
            tokio::task::spawn_blocking(move || this.run(&ctx, &plan))
                .await
                .unwrap_or_else(|e| Err(JobError::Failed(format!("backup task failed: {e}"))))
        })?;
        Ok(BackupStarted { job: job.info(), checkpoint, files })
    }

    /// Checks a request against the domain and its checkpoints and says what each disk gets.
    fn plan(&self, domain: &str, req: &BackupRequest) -> Result<Plan> {
        let info = self.domains.info(domain)?;
        if info.state.is_active() {
            return Err(Error::conflict(format!(
                "domain {domain} is {}: this ferrod backs up shut-off domains only; shut it down first",
                info.state.word()
            )));
        }
        let dir = &req.target;
        if !dir.is_absolute() {
            return Err(Error::invalid(format!("target: {} is not an absolute path", dir.display())));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::invalid(format!("target: cannot create {}: {e}", dir.display())))?;
        let rows = self.store.checkpoints(domain)?;
        if let Some(busy) = rows.iter().find(|r| r.pending) {
            return Err(Error::conflict(format!("domain {domain}: checkpoint {} is being made by another backup", busy.name)));
        }
        let checkpoint = match &req.checkpoint {
            Some(name) => {
                validate_name(name).map_err(|e| Error::invalid(format!("checkpoint: {e}")))?;
                if rows.iter().any(|r| &r.name == name) {
                    return Err(Error::conflict(format!("domain {domain} already has a checkpoint {name:?}; pick another name")));
                }
                name.clone()
            }
            None => {
                let secs = now_ms() / 1000;
                let taken = |name: &String| rows.iter().any(|r| &r.name == name);
                let mut name = secs.to_string();
                let mut n = 1;
                while taken(&name) {
                    n += 1;
                    name = format!("{secs}-{n}");
                }
                name
            }
        };
        // The checkpoints whose bitmaps hold what changed since the one asked for.
        let since = match &req.incremental {
            None => None,
            Some(name) => {
                let at = rows.iter().position(|r| &r.name == name).ok_or_else(|| no_checkpoint(domain, name).for_key("incremental"))?;
                Some((&rows[at], rows[at..].iter().map(|r| r.name.clone()).collect::<Vec<_>>()))
            }
        };
        let (_, files) = self.domains.disk_files(domain)?;
        let config = info.config.as_ref().ok_or_else(|| Error::conflict(format!("domain {domain} has an invalid stored definition")))?;
        let mut disks = Vec::new();
        for (i, ((path, format), def)) in files.into_iter().zip(&config.disks).enumerate() {
            if def.readonly {
                continue;
            }
            let target = target_name(i);
            if format != ferro_block::Format::Qcow2 {
                return Err(Error::conflict(format!(
                    "domain {domain}: disk {target} ({}) is {}, which cannot hold checkpoints; convert it to qcow2 or make it read-only",
                    path.display(),
                    format.name()
                )));
            }
            let since = match &since {
                None => Since::Full,
                Some((base, bitmaps)) => {
                    let made = disks_of(base).into_iter().find(|d| d.target == target && Path::new(&d.path) == path).ok_or_else(|| {
                        Error::conflict(format!(
                            "incremental: checkpoint {} has no bitmap of disk {target} ({}); take a full backup",
                            base.name,
                            path.display()
                        ))
                    })?;
                    let backing = PathBuf::from(&made.backup);
                    if !backing.is_file() {
                        return Err(Error::conflict(format!(
                            "incremental: the backup checkpoint {} made of {target} ({}) is gone; take a full backup",
                            base.name,
                            backing.display()
                        )));
                    }
                    Since::Checkpoint { bitmaps: bitmaps.clone(), backing }
                }
            };
            let file = dir.join(format!("{target}.qcow2"));
            if file.exists() {
                return Err(Error::conflict(format!(
                    "target: {} exists; backups never replace a file (pick a new directory)",
                    file.display()
                )));
            }
            let part = dir.join(format!(".{target}.qcow2.part"));
            disks.push(DiskPlan { target, path, since, part, file });
        }
        if disks.is_empty() {
            return Err(Error::conflict(format!("domain {domain} has no writable disk to back up")));
        }
        let parent = rows.last().map(|r| r.name.clone());
        Ok(Plan { domain: domain.to_string(), checkpoint, parent, disks })
    }

    /// The backup job's work: copy, switch bitmaps, name the files, mark the checkpoint made.
    /// Anything failing on the way undoes what was done before.
    fn run(&self, ctx: &JobContext, plan: &Plan) -> std::result::Result<(), JobError> {
        let disks: Vec<CheckpointDisk> = plan
            .disks
            .iter()
            .map(|d| CheckpointDisk { target: d.target.clone(), path: d.path.display().to_string(), backup: d.file.display().to_string() })
            .collect();
        let row = StoredCheckpoint {
            domain: plan.domain.clone(),
            name: plan.checkpoint.clone(),
            parent: plan.parent.clone(),
            created_ms: now_ms(),
            disks: serde_json::to_string(&disks).map_err(|e| JobError::Failed(e.to_string()))?,
            pending: true,
        };
        self.store.insert_checkpoint(&row).map_err(store_failed)?;
        let result = self.copy_and_commit(ctx, plan);
        if let Err(e) = &result {
            if let Err(undo) = self.undo(&row, false) {
                tracing::error!(domain = plan.domain, checkpoint = plan.checkpoint, "cannot undo a failed backup ({e:?}): {undo}");
            }
            for d in &plan.disks {
                let _ = std::fs::remove_file(&d.part);
            }
        } else {
            let files: Vec<String> = disks.iter().map(|d| d.backup.clone()).collect();
            self.events.emit("domain", &plan.domain, "backup_completed", format!("checkpoint {}: {}", plan.checkpoint, files.join(", ")));
        }
        result
    }

    fn copy_and_commit(&self, ctx: &JobContext, plan: &Plan) -> std::result::Result<(), JobError> {
        let mut ranges = Vec::new();
        for d in &plan.disks {
            ranges.push(disk::ranges_to_copy(&d.path, &d.since)?);
        }
        ctx.set_total(ranges.iter().flatten().map(|(_, len)| len).sum());
        for (d, ranges) in plan.disks.iter().zip(&ranges) {
            disk::write_backup(ctx, &d.path, &d.since, ranges, &d.part)?;
        }
        ctx.check_stop()?;
        for d in &plan.disks {
            crate::crashpoint::step("checkpoint bitmap added");
            disk::add_checkpoint(&d.path, &plan.checkpoint, plan.parent.as_deref())
                .map_err(|e| JobError::Failed(format!("disk {}: cannot add checkpoint {}: {e}", d.target, plan.checkpoint)))?;
        }
        let mut named: Vec<&Path> = Vec::new();
        let mut result = Ok(());
        for d in &plan.disks {
            match disk::publish(&d.part, &d.file) {
                Ok(()) => named.push(&d.file),
                Err(e) => {
                    result = Err(JobError::Failed(format!("cannot name {}: {e}", d.file.display())));
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.store.complete_checkpoint(&plan.domain, &plan.checkpoint).map_err(store_failed);
        }
        if result.is_err() {
            for file in named {
                let _ = std::fs::remove_file(file);
            }
        }
        result
    }

    /// Deletes checkpoint `name` of a shut-off domain: its bitmap is merged into its parent's in
    /// every disk, and the next checkpoint's parent becomes its parent. Its backup files stay.
    pub async fn delete(&self, domain: &str, name: &str) -> Result<()> {
        let row = self
            .store
            .checkpoints(domain)?
            .into_iter()
            .find(|r| r.name == name && !r.pending)
            .ok_or_else(|| no_checkpoint(domain, name))?;
        let files: Vec<PathBuf> = disks_of(&row).into_iter().map(|d| PathBuf::from(d.path)).collect();
        let store = self.store.clone();
        let work = move || -> Result<()> {
            for d in disks_of(&row) {
                if Path::new(&d.path).is_file() {
                    disk::remove_checkpoint(Path::new(&d.path), &row.name, row.parent.as_deref())
                        .map_err(|e| Error::internal(format!("disk {}: cannot remove checkpoint {}: {e}", d.target, row.name)))?;
                }
            }
            Ok(store.delete_checkpoint(&row.domain, &row.name)?)
        };
        self.domains.while_shut_off(domain, &files, "checkpoint deletion", work).await?;
        self.events.emit("domain", domain, "checkpoint_deleted", name);
        Ok(())
    }

    /// Forgets the checkpoints of an undefined domain (their bitmaps stay in the disks).
    pub fn forget_domain(&self, domain: &str) -> Result<()> {
        Ok(self.store.delete_domain_checkpoints(domain)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_as_the_guest_sees_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52].into_iter().map(target_name).collect();
        assert_eq!(names, ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba"]);
    }
}
