//! What a backup and a checkpoint do to one disk image from ferrod's side: copying its data (all
//! of it, or the clusters written since a checkpoint) into a new qcow2 backup file, and adding
//! and removing checkpoint bitmaps in an image no VMM has open. Blocking code, run on a blocking
//! thread. The bitmap chain itself is the block layer's (`Qcow2::add_checkpoint` and friends),
//! which the VMM uses for running domains.

use crate::jobs::{JobContext, JobError};
use crate::pools::copy::{Zeroes, copy_ranges, data_ranges};
use ferro_block::qcow2::Qcow2;
use ferro_block::{Access, CreateOptions, DiskImage, Format, OpenOptions};
use std::path::{Path, PathBuf};

fn failed(e: ferro_block::Error) -> JobError {
    JobError::Failed(e.to_string())
}

/// What to copy of a disk: every range that holds data, or the ones written since a checkpoint,
/// on top of the backup file that checkpoint made.
pub(super) enum Since {
    Full,
    /// The checkpoint's bitmap and every later one's (their union is what was written since),
    /// and the checkpoint's backup file of this disk.
    Checkpoint { bitmaps: Vec<String>, backing: PathBuf },
}

/// Where a backup reads a disk: the image itself (its domain is shut off), or an internal
/// snapshot the VMM took at the backup's point in time (the domain runs on).
pub(super) enum Source {
    Disk,
    /// The snapshot's name, and the ranges the VMM says were written since the checkpoint (for
    /// an incremental backup: a running VMM holds the bitmaps).
    Snapshot { name: String, changed: Option<Vec<(u64, u64)>> },
}

/// Opens what a backup reads of `disk`.
fn open_source(disk: &Path, source: &Source) -> ferro_block::Result<Box<dyn DiskImage>> {
    match source {
        Source::Disk => ferro_block::open(disk, Some(Format::Qcow2), true),
        Source::Snapshot { name, .. } => {
            let opts = OpenOptions { format: Some(Format::Qcow2), access: Access::ReadShared, open_backing: true };
            let mut img = ferro_block::open_with(disk, &opts)?;
            ferro_block::snapshot_capable(img.as_mut())?.view_snapshot(name)?;
            Ok(img)
        }
    }
}

/// The ranges of `disk` a backup copies.
pub(super) fn ranges_to_copy(disk: &Path, source: &Source, since: &Since) -> Result<Vec<(u64, u64)>, JobError> {
    match (since, source) {
        (Since::Full, source) => data_ranges(open_source(disk, source).map_err(failed)?.as_mut()),
        (Since::Checkpoint { .. }, Source::Snapshot { changed: Some(ranges), .. }) => Ok(ranges.clone()),
        (Since::Checkpoint { bitmaps, .. }, _) => {
            let img = Qcow2::open(disk, Access::Read).map_err(failed)?;
            let changed = img.changed_since(bitmaps).map_err(|e| JobError::Failed(format!("{e}; take a full backup")))?;
            Ok(changed.ranges())
        }
    }
}

/// The name a backup file records for its backing file: relative when both lie in one directory
/// (so a chain of backups can be moved together), else absolute.
fn backing_name(file: &Path, backing: &Path) -> String {
    match (file.parent(), backing.parent(), backing.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
        _ => backing.display().to_string(),
    }
}

/// Copies `ranges` of `disk` (as `source` shows it) into a new qcow2 file `file` of the disk's
/// size: standalone and sparse for a full backup, backed by the previous backup otherwise (then
/// the ranges' zeroes are written as zeroes). The file is synced.
pub(super) fn write_backup(
    ctx: &JobContext,
    disk: &Path,
    source: &Source,
    since: &Since,
    ranges: &[(u64, u64)],
    file: &Path,
) -> Result<(), JobError> {
    let mut reader = open_source(disk, source).map_err(failed)?;
    let mut opts = CreateOptions::new(Format::Qcow2, Some(reader.size()));
    let zeroes = match since {
        Since::Full => Zeroes::Skip,
        Since::Checkpoint { backing, .. } => {
            opts.backing_file = Some(backing_name(file, backing));
            opts.backing_format = Some(Format::Qcow2);
            Zeroes::Write
        }
    };
    ferro_block::create(file, &opts).map_err(failed)?;
    let mut target = ferro_block::open(file, Some(Format::Qcow2), false).map_err(failed)?;
    copy_ranges(ctx, reader.as_mut(), target.as_mut(), ranges, zeroes)?;
    target.flush().map_err(failed)
}

/// Makes checkpoint `name` on a disk no VMM has open.
pub(super) fn add_checkpoint(disk: &Path, name: &str, parent: Option<&str>) -> ferro_block::Result<()> {
    let mut img = Qcow2::open(disk, Access::Write)?;
    img.add_checkpoint(name, parent)?;
    img.close()
}

/// Removes checkpoint `name` from a disk no VMM has open (merged into `parent`), and the
/// internal snapshot `snapshot` a backup of the running domain left in it, if any.
pub(super) fn remove_checkpoint(disk: &Path, name: &str, parent: Option<&str>, snapshot: Option<&str>) -> ferro_block::Result<()> {
    let mut img = Qcow2::open(disk, Access::Write)?;
    img.remove_checkpoint(name, parent)?;
    if let Some(snapshot) = snapshot.filter(|s| img.snapshots().is_ok_and(|list| list.iter().any(|x| x.name == *s))) {
        img.delete_snapshot(snapshot)?;
    }
    img.close()
}

/// Gives `part` its final name `file` unless a file of that name exists (never replaced), and
/// makes the name durable.
pub(super) fn publish(part: &Path, file: &Path) -> std::io::Result<()> {
    crate::crashpoint::step("backup file named");
    std::fs::hard_link(part, file)?;
    std::fs::remove_file(part)?;
    crate::durable::sync_dir(file.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backing_file_beside_the_backup_is_named_relatively() {
        assert_eq!(backing_name(Path::new("/b/2/vda.qcow2"), Path::new("/b/1/vda.qcow2")), "/b/1/vda.qcow2");
        assert_eq!(backing_name(Path::new("/b/vda.2.qcow2"), Path::new("/b/vda.1.qcow2")), "vda.1.qcow2");
    }
}
