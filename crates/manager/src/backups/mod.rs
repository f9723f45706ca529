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
//! A backup runs as a job holding its new files (`claims`), and for a shut-off domain its disks
//! too, so the domain cannot start under it. Of a shut-off domain it copies into hidden `.part`
//! files, then switches the bitmaps; of a running one the VMM first switches the bitmaps and
//! takes temporary internal snapshots while the guest is paused (`backup_begin`), and the copy
//! reads those while the guest runs on (docs/backups.md says why). Then the files get their
//! names (never replacing a file), the VMM deletes its snapshots, and only then is the
//! checkpoint marked made (a VMM that died on the way fails the backup). A failure or a cancel on
//! the way undoes what was done; a checkpoint row is written (pending) before any disk changes,
//! so a ferrod that died during a backup undoes it at its next start. Deleting a checkpoint
//! merges its bitmap into its parent's. `restore` writes a backup back into a disk.

mod disk;
mod restore;

use crate::claims::Access;
use crate::domain::validate_name;
use crate::domains::Domains;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::{JobContext, JobError, Jobs, NewJob};
use crate::model::{JobInfo, ProgressUnit, now_ms, rfc3339};
use crate::store::{Store, StoredCheckpoint};
use crate::vmm::RunFiles;
use disk::{Since, Source};
use ferro_vmm_api::control::{BackupBeginReply, Done, Request};
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
    /// The domain runs: the VMM switches the bitmaps and snapshots the disks.
    running: bool,
    /// For an incremental backup: the bitmaps whose union is what changed.
    since: Vec<String>,
    disks: Vec<DiskPlan>,
}

/// Who undoes a checkpoint, which decides how its disks may be touched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undoer {
    /// The backup's own job, which holds the disks of a shut-off domain (`holds_disks`) and
    /// removes the files it named itself.
    Job { holds_disks: bool },
    /// ferrod at start, or a later backup: the files the row names go too.
    Later,
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
pub(crate) fn target_name(i: usize) -> String {
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

/// The internal snapshot a backup of a running domain reads, deleted when the backup ends.
fn backup_snapshot(checkpoint: &str) -> String {
    format!("ferro-backup-{checkpoint}")
}

/// Where the VMM writes the ranges an incremental backup of a running domain copies: in `dir`,
/// the one directory of its run a jailed VMM may write.
fn ranges_dir(dir: &Path, checkpoint: &str) -> PathBuf {
    dir.join(format!("ranges-{checkpoint}"))
}

/// Makes the directory the VMM writes the ranges in and gives it to the VMM. Whatever the VMM
/// left under that name (a symbolic link it swapped in, a file) is removed first, so ferrod
/// never creates or hands over anything through a link.
fn make_ranges_dir(files: &RunFiles, dir: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(dir)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && std::fs::symlink_metadata(dir)?.is_dir() => {}
        other => other?,
    }
    files.give_to_vmm(dir)
}

/// No ranges file is anywhere near this: a 64 KiB granule changed in every other place of a
/// 1 TiB disk is 8 million ranges, 128 MiB.
const MAX_RANGES_FILE: u64 = 256 << 20;

/// Reads ranges file `name` of the VMM's ranges directory `dir`: pairs of little-endian u64
/// offset and length. The VMM wrote both, so neither is followed if it is a symbolic link, the
/// file must be a regular file (a FIFO would hold ferrod's read forever, a device never end)
/// and no larger than any ranges file can be.
fn read_ranges(dir: &Path, name: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    use ferro_vmm_api::vmm_file::{self, Unreadable};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = dir.join(name);
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", file.display());
    let directory = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| format!("cannot open {} (a symbolic link?): {e}", dir.display()))?;
    let bytes = vmm_file::read(Path::new(&format!("/proc/self/fd/{}/{name}", directory.as_raw_fd())), MAX_RANGES_FILE).map_err(|e| match e {
        Unreadable::Open(e) | Unreadable::Read(e) => cannot(e),
        Unreadable::NotRegular => format!("{} is not a regular file", file.display()),
        Unreadable::TooLarge(len) => format!("{}: {len} bytes is larger than any ranges file", file.display()),
    })?;
    if bytes.len() % 16 != 0 {
        return Err(format!("{}: {} bytes is not a list of ranges", file.display(), bytes.len()));
    }
    let u64_at = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    Ok(bytes.chunks_exact(16).map(|c| (u64_at(&c[..8]), u64_at(&c[8..]))).collect())
}

/// How many times (50 ms apart) a backup whose VMM failed it looks whether the domain is shut off.
const VMM_EXIT_POLLS: u32 = 100;

fn failed(e: Error) -> JobError {
    JobError::Failed(e.message)
}

fn store_failed(e: rusqlite::Error) -> JobError {
    JobError::Failed(format!("state store: {e}"))
}

impl Backups {
    /// Opens the service and undoes the checkpoints a dead ferrod left half made on shut-off
    /// domains (before anything can start them); those of running domains wait for `recover`.
    pub fn open(store: Arc<Store>, events: Arc<EventHub>, jobs: Arc<Jobs>, domains: Arc<Domains>) -> Arc<Backups> {
        let backups = Arc::new(Backups { store, events, jobs, domains });
        for row in backups.store.pending_checkpoints().unwrap_or_default() {
            if backups.domains.info(&row.domain).is_ok_and(|i| i.state.is_active()) {
                continue;
            }
            match undo_offline(&row, true).and_then(|()| backups.store.delete_checkpoint(&row.domain, &row.name).map_err(|e| e.to_string())) {
                Ok(()) => tracing::info!(domain = row.domain, checkpoint = row.name, "undid a checkpoint a stopped ferrod left half made"),
                Err(e) => tracing::error!(domain = row.domain, checkpoint = row.name, "cannot undo a half-made checkpoint: {e}"),
            }
        }
        backups
    }

    /// Undoes the checkpoints a dead ferrod left half made on running domains (call once they
    /// are re-attached: their VMMs hold the bitmaps).
    pub async fn recover(&self) {
        let pending = match self.store.pending_checkpoints() {
            Ok(rows) => rows,
            Err(e) => return tracing::error!("cannot read pending checkpoints: {e}"),
        };
        for row in pending {
            match self.undo(&row, Undoer::Later).await {
                Ok(()) => tracing::info!(domain = row.domain, checkpoint = row.name, "undid a checkpoint a stopped ferrod left half made"),
                Err(e) => tracing::error!(domain = row.domain, checkpoint = row.name, "cannot undo a half-made checkpoint: {e}"),
            }
        }
    }

    /// Takes a pending checkpoint out of its disks (its bitmap, and the backup snapshot of a
    /// running domain's backup), through the VMM when the domain runs, and forgets it. A row
    /// that cannot be undone now stays pending, to be undone by the next backup or start.
    async fn undo(&self, row: &StoredCheckpoint, by: Undoer) -> std::result::Result<(), String> {
        let remove_files = by == Undoer::Later;
        match self.domains.info(&row.domain) {
            Ok(info) if info.state.is_active() => {
                remove_scratch(row, remove_files);
                let (checkpoint, parent) = (row.name.clone(), row.parent.clone());
                let remove = Request::CheckpointRemove { checkpoint, parent };
                self.domains.disk_request::<Done>(&row.domain, &remove).await.map_err(|e| e.message)?;
                let end = Request::BackupEnd { snapshot: backup_snapshot(&row.name) };
                self.domains.disk_request::<Done>(&row.domain, &end).await.map_err(|e| e.message)?;
            }
            Ok(_) if by != (Undoer::Job { holds_disks: true }) => {
                let files: Vec<PathBuf> = disks_of(row).iter().map(|d| PathBuf::from(&d.path)).collect();
                let copy = row.clone();
                let work = move || undo_offline(&copy, remove_files).map_err(Error::internal);
                self.domains.while_shut_off(&row.domain, &files, "backup undo", work).await.map_err(|e| e.message)?;
            }
            // The job holds the disks itself, or the domain is gone.
            _ => undo_offline(row, remove_files)?,
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
    /// checkpoint. A checkpoint a failed backup could not undo then is undone first.
    pub async fn begin(self: &Arc<Self>, domain: &str, req: BackupRequest) -> Result<BackupStarted> {
        for row in self.store.checkpoints(domain)?.into_iter().filter(|r| r.pending) {
            if self.jobs.list().iter().any(|j| j.kind == "backup" && j.source == domain && j.state == crate::model::JobState::Running) {
                return Err(Error::conflict(format!("domain {domain}: a backup is running (see `ferro domjobinfo {domain}`)")));
            }
            self.undo(&row, Undoer::Later)
                .await
                .map_err(|e| Error::conflict(format!("domain {domain}: cannot undo the unfinished checkpoint {}: {e}", row.name)))?;
        }
        let plan = self.plan(domain, &req)?;
        let files: Vec<String> = plan.disks.iter().map(|d| d.file.display().to_string()).collect();
        let mut uses: Vec<(PathBuf, Access)> = Vec::new();
        for d in &plan.disks {
            if !plan.running {
                uses.push((d.path.clone(), Access::Write));
            }
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
        let job = self.jobs.start(new, move |ctx| async move { this.run(ctx, Arc::new(plan)).await })?;
        Ok(BackupStarted { job: job.info(), checkpoint, files })
    }

    /// Checks a request against the domain and its checkpoints and says what each disk gets.
    fn plan(&self, domain: &str, req: &BackupRequest) -> Result<Plan> {
        let info = self.domains.info(domain)?;
        let dir = &req.target;
        if !dir.is_absolute() {
            return Err(Error::invalid(format!("target: {} is not an absolute path", dir.display())));
        }
        let rows = self.store.checkpoints(domain)?;
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
                return Err(Error::conflict(format!("target: {} exists; backups never replace a file (pick a new directory)", file.display())));
            }
            let part = dir.join(format!(".{target}.qcow2.part"));
            disks.push(DiskPlan { target, path, since, part, file });
        }
        if disks.is_empty() {
            return Err(Error::conflict(format!("domain {domain} has no writable disk to back up")));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::invalid(format!("target: cannot create {}: {e}", dir.display())))?;
        let parent = rows.last().map(|r| r.name.clone());
        let since = since.map(|(_, bitmaps)| bitmaps).unwrap_or_default();
        Ok(Plan { domain: domain.to_string(), checkpoint, parent, running: info.state.is_active(), since, disks })
    }

    /// The backup job's work. The checkpoint is recorded pending first; anything failing on the
    /// way undoes what was done.
    async fn run(self: Arc<Self>, ctx: JobContext, plan: Arc<Plan>) -> std::result::Result<(), JobError> {
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
        let result = self.make(&ctx, &plan).await;
        match &result {
            Err(e) => {
                for d in &plan.disks {
                    let _ = std::fs::remove_file(&d.part);
                }
                if let Err(undo) = self.undo(&row, Undoer::Job { holds_disks: !plan.running }).await {
                    tracing::error!(domain = plan.domain, checkpoint = plan.checkpoint, "cannot undo a failed backup ({e:?}) yet: {undo}");
                }
            }
            Ok(()) => {
                let files: Vec<String> = disks.iter().map(|d| d.backup.clone()).collect();
                let detail = format!("checkpoint {}: {}", plan.checkpoint, files.join(", "));
                self.events.emit("domain", &plan.domain, "backup_completed", detail);
            }
        }
        result
    }

    /// Makes the point in time (the bitmaps switch; a running domain's VMM also snapshots the
    /// disks), copies, names the files, ends the VMM's part, and marks the checkpoint made. The
    /// checkpoint is made only once every step is: a VMM that died on the way (its bitmaps are
    /// in use then, never to be trusted) fails the backup, which is then undone.
    async fn make(&self, ctx: &JobContext, plan: &Arc<Plan>) -> std::result::Result<(), JobError> {
        let sources = if plan.running { self.begin_in_vmm(plan).await? } else { plan.disks.iter().map(|_| Source::Disk).collect() };
        let (copy_plan, copy_ctx) = (plan.clone(), ctx.clone());
        let named = tokio::task::spawn_blocking(move || copy_and_name(&copy_ctx, &copy_plan, &sources))
            .await
            .unwrap_or_else(|e| Err(JobError::Failed(format!("backup task failed: {e}"))))?;
        let ended = if plan.running { self.end_in_vmm(plan).await } else { Ok(()) };
        let result = ended.and_then(|()| self.store.complete_checkpoint(&plan.domain, &plan.checkpoint).map_err(store_failed));
        if result.is_err() {
            for file in named {
                let _ = std::fs::remove_file(file);
            }
        }
        result
    }

    /// Has the VMM delete the backup's snapshots. If it cannot (it died during the backup), waits
    /// a moment for the domain to be seen shut off, so that the undo can work on its files.
    async fn end_in_vmm(&self, plan: &Plan) -> std::result::Result<(), JobError> {
        let end = Request::BackupEnd { snapshot: backup_snapshot(&plan.checkpoint) };
        let Err(e) = self.domains.disk_request::<Done>(&plan.domain, &end).await else { return Ok(()) };
        for _ in 0..VMM_EXIT_POLLS {
            if !self.domains.info(&plan.domain).is_ok_and(|i| i.state.is_active()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(JobError::Failed(format!("domain {}: its VMM could not end the backup ({e}); the backup is undone", plan.domain)))
    }

    /// Has the VMM switch the bitmaps and snapshot the disks; the sources the copy reads.
    async fn begin_in_vmm(&self, plan: &Plan) -> std::result::Result<Vec<Source>, JobError> {
        let snapshot = backup_snapshot(&plan.checkpoint);
        let files = self.domains.run_files(&plan.domain).map_err(failed)?;
        let ranges = (!plan.since.is_empty()).then(|| ranges_dir(&files.vmm_dir(), &plan.checkpoint));
        if let Some(dir) = &ranges {
            let cannot = |e: std::io::Error| JobError::Failed(format!("cannot create {}: {e}", dir.display()));
            make_ranges_dir(&files, dir).map_err(cannot)?;
        }
        let request = Request::BackupBegin {
            checkpoint: plan.checkpoint.clone(),
            parent: plan.parent.clone(),
            snapshot: snapshot.clone(),
            since: plan.since.clone(),
            ranges_dir: ranges.clone(),
        };
        let reply: BackupBeginReply = self.domains.disk_request(&plan.domain, &request).await.map_err(failed)?;
        let same = reply.disks.len() == plan.disks.len()
            && reply.disks.iter().zip(&plan.disks).all(|(a, b)| a.canonicalize().ok() == b.path.canonicalize().ok());
        if !same {
            return Err(JobError::Failed(format!(
                "domain {}: its VMM runs other disks than its definition names (redefined since it started?); restart it first",
                plan.domain
            )));
        }
        let mut sources = Vec::new();
        for i in 0..plan.disks.len() {
            let changed = match &ranges {
                Some(dir) => Some(read_ranges(dir, &i.to_string()).map_err(JobError::Failed)?),
                None => None,
            };
            sources.push(Source::Snapshot { name: snapshot.clone(), changed });
        }
        if let Some(dir) = &ranges {
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!(domain = plan.domain, checkpoint = plan.checkpoint, pause_us = reply.pause_us, "backup point in time taken");
        Ok(sources)
    }

    /// Deletes checkpoint `name`: its bitmap is merged into its parent's in every disk (through
    /// the VMM while the domain runs), and the next checkpoint's parent becomes its parent. Its
    /// backup files stay.
    pub async fn delete(&self, domain: &str, name: &str) -> Result<()> {
        let row = self
            .store
            .checkpoints(domain)?
            .into_iter()
            .find(|r| r.name == name && !r.pending)
            .ok_or_else(|| no_checkpoint(domain, name))?;
        if self.domains.info(domain)?.state.is_active() {
            let request = Request::CheckpointRemove { checkpoint: row.name.clone(), parent: row.parent.clone() };
            self.domains.disk_request::<Done>(domain, &request).await?;
            self.store.delete_checkpoint(domain, name)?;
        } else {
            let files: Vec<PathBuf> = disks_of(&row).into_iter().map(|d| PathBuf::from(d.path)).collect();
            let store = self.store.clone();
            let work = move || -> Result<()> {
                let snapshot = backup_snapshot(&row.name);
                for d in disks_of(&row) {
                    if Path::new(&d.path).is_file() {
                        disk::remove_checkpoint(Path::new(&d.path), &row.name, row.parent.as_deref(), Some(&snapshot))
                            .map_err(|e| Error::internal(format!("disk {}: cannot remove checkpoint {}: {e}", d.target, row.name)))?;
                    }
                }
                Ok(store.delete_checkpoint(&row.domain, &row.name)?)
            };
            self.domains.while_shut_off(domain, &files, "checkpoint deletion", work).await?;
        }
        self.events.emit("domain", domain, "checkpoint_deleted", name);
        Ok(())
    }

    /// Forgets the checkpoints of an undefined domain (their bitmaps stay in the disks).
    pub fn forget_domain(&self, domain: &str) -> Result<()> {
        Ok(self.store.delete_domain_checkpoints(domain)?)
    }
}

/// Removes what a pending checkpoint's backup left: with `files`, the backup files it named (a
/// ranges directory left in the run's VMM directory goes with the run's files).
fn remove_scratch(row: &StoredCheckpoint, files: bool) {
    let disks = disks_of(row);
    if files {
        for d in &disks {
            let _ = std::fs::remove_file(&d.backup);
        }
    }
}

/// Undoes a pending checkpoint in disks no VMM has open: its bitmap (merged into its parent's)
/// and a running backup's snapshot leave them, and its leftovers go (see `remove_scratch`).
fn undo_offline(row: &StoredCheckpoint, files: bool) -> std::result::Result<(), String> {
    remove_scratch(row, files);
    let snapshot = backup_snapshot(&row.name);
    for d in disks_of(row).iter().filter(|d| Path::new(&d.path).is_file()) {
        disk::remove_checkpoint(Path::new(&d.path), &row.name, row.parent.as_deref(), Some(&snapshot)).map_err(|e| format!("{}: {e}", d.path))?;
    }
    Ok(())
}

/// The blocking part of a backup: copies every disk into its `.part` file, adds the checkpoint
/// to the disks of a shut-off domain (a running one's VMM did), and names the files (all or
/// none: the ones named are removed again if one cannot be). Returns the named files.
fn copy_and_name(ctx: &JobContext, plan: &Plan, sources: &[Source]) -> std::result::Result<Vec<PathBuf>, JobError> {
    let mut ranges = Vec::new();
    for (d, source) in plan.disks.iter().zip(sources) {
        ranges.push(disk::ranges_to_copy(&d.path, source, &d.since)?);
    }
    ctx.set_total(ranges.iter().flatten().map(|(_, len)| len).sum());
    for ((d, source), ranges) in plan.disks.iter().zip(sources).zip(&ranges) {
        disk::write_backup(ctx, &d.path, source, &d.since, ranges, &d.part)?;
    }
    ctx.check_stop()?;
    if !plan.running {
        for d in &plan.disks {
            crate::crashpoint::step("checkpoint bitmap added");
            disk::add_checkpoint(&d.path, &plan.checkpoint, plan.parent.as_deref())
                .map_err(|e| JobError::Failed(format!("disk {}: cannot add checkpoint {}: {e}", d.target, plan.checkpoint)))?;
        }
    }
    let mut named = Vec::new();
    for d in &plan.disks {
        if let Err(e) = disk::publish(&d.part, &d.file) {
            for file in &named {
                let _ = std::fs::remove_file(file);
            }
            return Err(JobError::Failed(format!("cannot name {}: {e}", d.file.display())));
        }
        named.push(d.file.clone());
    }
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_as_the_guest_sees_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52].into_iter().map(target_name).collect();
        assert_eq!(names, ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba"]);
    }

    /// What a compromised VMM could leave in its directory for ferrod (root) to follow: a link
    /// in place of the ranges directory or of a ranges file, a FIFO, a device. Each is refused
    /// naming it; ferrod reads nothing through them and makes the directory afresh.
    #[test]
    fn ranges_planted_by_the_vmm_are_never_followed() {
        let run = std::env::temp_dir().join(format!("ferro-ranges-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let files = RunFiles { dir: run.clone() };
        std::fs::create_dir_all(files.vmm_dir()).unwrap();
        let elsewhere = run.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let mut pairs = 5u64.to_le_bytes().to_vec();
        pairs.extend(7u64.to_le_bytes());
        std::fs::write(elsewhere.join("0"), &pairs).unwrap();

        let dir = ranges_dir(&files.vmm_dir(), "c1");
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let e = read_ranges(&dir, "0").unwrap_err();
        assert!(e.contains("a symbolic link?"), "{e}");
        make_ranges_dir(&files, &dir).unwrap();
        assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir(), "the link is replaced by a directory");
        assert!(elsewhere.join("0").exists(), "nothing behind the link is touched");

        std::fs::write(dir.join("0"), &pairs).unwrap();
        assert_eq!(read_ranges(&dir, "0").unwrap(), [(5, 7)]);
        std::os::unix::fs::symlink(elsewhere.join("0"), dir.join("1")).unwrap();
        assert!(read_ranges(&dir, "1").unwrap_err().starts_with(&format!("cannot read {}", dir.join("1").display())));
        let fifo = std::ffi::CString::new(dir.join("2").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(read_ranges(&dir, "2").unwrap_err(), format!("{} is not a regular file", dir.join("2").display()));
        std::fs::write(dir.join("3"), [0u8; 17]).unwrap();
        assert!(read_ranges(&dir, "3").unwrap_err().contains("17 bytes is not a list of ranges"));
        let _ = std::fs::remove_dir_all(&run);
    }
}
