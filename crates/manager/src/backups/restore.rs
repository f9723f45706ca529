//! Restoring a backup into a shut-off domain's disk: the backup chain's contents (what
//! `qemu-img convert` of the newest file gives) are written over the disk in place, as a job
//! holding the disk. In place, so the disk keeps its internal snapshots, and its checkpoint
//! bitmaps count the restore as written (the next incremental backup carries it).

use super::{Backups, target_name};
use crate::claims::Access;
use crate::error::{Error, Result};
use crate::jobs::{Job, JobContext, JobError, NewJob};
use crate::model::ProgressUnit;
use crate::pools::copy::{Zeroes, copy_ranges, data_ranges};
use ferro_block::Format;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn failed(e: ferro_block::Error) -> JobError {
    JobError::Failed(e.to_string())
}

impl Backups {
    /// Starts writing the backup chain whose newest file is `from` into disk `disk` (a target
    /// name: vda, ...) of a shut-off domain. Without `disk`: the disk the file is named after
    /// (`vdb.qcow2`), else the domain's only writable disk.
    pub fn restore(&self, domain: &str, from: &Path, disk: Option<&str>) -> Result<Arc<Job>> {
        let info = self.domains.info(domain)?;
        if info.state.is_active() {
            return Err(Error::conflict(format!("domain {domain} is {}: restore into a shut-off domain", info.state.word())));
        }
        if !from.is_absolute() || !from.is_file() {
            return Err(Error::invalid(format!("from: {} is not an absolute path to a file on ferrod's host", from.display())));
        }
        let from_format = ferro_block::probe(from).map_err(|e| Error::invalid(format!("from: {e}")))?;
        let (config, files) = self.domains.disk_files(domain)?;
        let writable: Vec<(String, PathBuf, Format)> = files
            .into_iter()
            .zip(&config.disks)
            .enumerate()
            .filter(|(_, (_, def))| !def.readonly)
            .map(|(i, ((path, format), _))| (target_name(i), path, format))
            .collect();
        let stem = from.file_stem().map(|s| s.to_string_lossy().into_owned());
        let chosen = match disk {
            Some(name) => writable.iter().find(|(t, _, _)| t == name).ok_or_else(|| {
                Error::invalid(format!("disk: domain {domain} has no writable disk {name:?} (see `ferro domblklist {domain}`)"))
            })?,
            None => match (writable.iter().find(|(t, _, _)| Some(t) == stem.as_ref()), writable.as_slice()) {
                (Some(named), _) => named,
                (None, [only]) => only,
                _ => return Err(Error::invalid(format!("disk: domain {domain} has several writable disks; say which (--disk vda)"))),
            },
        };
        let (target, path, format) = chosen.clone();
        let new = NewJob {
            kind: "restore",
            source: from.display().to_string(),
            target: format!("{domain}/{target}"),
            unit: ProgressUnit::Bytes,
            scratch_files: Vec::new(),
            uses: vec![(path.clone(), Access::Write), (from.to_path_buf(), Access::Read)],
        };
        let (events, domain, from) = (self.events.clone(), domain.to_string(), from.to_path_buf());
        self.jobs.start(new, move |ctx| async move {
            let (source, disk) = (from.clone(), path.clone());
            tokio::task::spawn_blocking(move || write_over(&ctx, &source, from_format, &disk, format))
                .await
                .unwrap_or_else(|e| Err(JobError::Failed(format!("restore task failed: {e}"))))?;
            events.emit("domain", &domain, "backup_restored", format!("{target} from {}", from.display()));
            Ok(())
        })
    }
}

/// Writes what `src` reads over `disk` (same virtual size): its data ranges, and zeroes
/// everywhere else.
fn write_over(ctx: &JobContext, src: &Path, src_format: Format, disk: &Path, disk_format: Format) -> std::result::Result<(), JobError> {
    let mut source = ferro_block::open(src, Some(src_format), true).map_err(failed)?;
    let mut target = ferro_block::open(disk, Some(disk_format), false).map_err(failed)?;
    if source.size() != target.size() {
        return Err(JobError::Failed(format!(
            "{} is {} bytes, the disk {} is {}: restore a backup of this disk",
            src.display(),
            source.size(),
            disk.display(),
            target.size()
        )));
    }
    let data = data_ranges(source.as_mut())?;
    ctx.set_total(data.iter().map(|(_, len)| len).sum());
    let mut at = 0;
    for &(off, len) in data.iter().chain(std::iter::once(&(target.size(), 0))) {
        if off > at {
            target.write_zeroes(at, off - at).map_err(failed)?;
        }
        at = off + len;
    }
    copy_ranges(ctx, source.as_mut(), target.as_mut(), &data, Zeroes::Write)?;
    target.flush().map_err(failed)
}
