//! What a backup and a checkpoint do to one disk image: copying its data (all of it, or the
//! clusters its checkpoint bitmaps mark) into a new qcow2 backup file, and adding, switching and
//! removing the dirty bitmaps that make its checkpoints. Blocking code, run on a blocking thread.

use crate::jobs::{JobContext, JobError};
use crate::pools::copy::{Zeroes, copy_ranges, data_ranges};
use ferro_block::qcow2::{DirtyBitmap, Qcow2};
use ferro_block::{Access, CreateOptions, Format};
use std::path::{Path, PathBuf};

fn failed(e: ferro_block::Error) -> JobError {
    JobError::Failed(e.to_string())
}

/// What to copy of a disk: every range that holds data, or the ones marked dirty since a
/// checkpoint, on top of the backup file that checkpoint made.
pub(super) enum Since {
    Full,
    /// The bitmaps of the checkpoint and of every later one (their union is every cluster
    /// written since it), and that checkpoint's backup file of this disk.
    Checkpoint {
        bitmaps: Vec<String>,
        backing: PathBuf,
    },
}

/// The ranges of `disk` a backup copies.
pub(super) fn ranges_to_copy(disk: &Path, since: &Since) -> Result<Vec<(u64, u64)>, JobError> {
    match since {
        Since::Full => data_ranges(disk, Format::Qcow2),
        Since::Checkpoint { bitmaps, .. } => {
            let img = Qcow2::open(disk, Access::Read).map_err(failed)?;
            let mut dirty: Option<DirtyBitmap> = None;
            for name in bitmaps {
                let bits = img
                    .dirty_bitmap(name)
                    .map_err(|e| JobError::Failed(format!("{}: bitmap {name} cannot be used ({e}); take a full backup", disk.display())))?;
                match &mut dirty {
                    Some(d) => d.merge(&bits),
                    None => dirty = Some(bits),
                }
            }
            Ok(dirty.map(|d| d.ranges()).unwrap_or_default())
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

/// Copies `ranges` of `disk` into a new qcow2 file `file` of the disk's size: standalone and
/// sparse for a full backup, backed by the previous backup otherwise (then the ranges' zeroes are
/// written as zeroes). The file is synced.
pub(super) fn write_backup(ctx: &JobContext, disk: &Path, since: &Since, ranges: &[(u64, u64)], file: &Path) -> Result<(), JobError> {
    let mut source = ferro_block::open(disk, Some(Format::Qcow2), true).map_err(failed)?;
    let mut opts = CreateOptions::new(Format::Qcow2, Some(source.size()));
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
    copy_ranges(ctx, source.as_mut(), target.as_mut(), ranges, zeroes)?;
    target.flush().map_err(failed)
}

/// Makes checkpoint `name` on a disk: a new enabled bitmap `name`, and the previous checkpoint's
/// bitmap (`parent`, if the disk has it) disabled, so that each bitmap holds the writes between
/// its checkpoint and the next.
pub(super) fn add_checkpoint(disk: &Path, name: &str, parent: Option<&str>) -> ferro_block::Result<()> {
    let mut img = Qcow2::open(disk, Access::Write)?;
    img.add_bitmap(name, None, true)?;
    if let Some(parent) = parent.filter(|p| has_usable_bitmap(&img, p)) {
        img.set_bitmap_enabled(parent, false)?;
    }
    img.close()
}

/// Removes checkpoint `name` from a disk: its bitmap is merged into its parent's (which takes
/// over tracking if `name` tracked), then removed. A disk without the bitmap is left alone.
pub(super) fn remove_checkpoint(disk: &Path, name: &str, parent: Option<&str>) -> ferro_block::Result<()> {
    let mut img = Qcow2::open(disk, Access::Write)?;
    let Some(this) = img.bitmaps().into_iter().find(|b| b.name == name) else {
        return img.close();
    };
    if let Some(parent) = parent.filter(|p| has_usable_bitmap(&img, p)) {
        // An inconsistent bitmap has nothing to give; its parent keeps what it has.
        if let Ok(bits) = img.dirty_bitmap(name) {
            img.merge_into_bitmap(parent, &bits)?;
        }
        if this.enabled {
            img.set_bitmap_enabled(parent, true)?;
        }
    }
    img.remove_bitmap(name)?;
    img.close()
}

/// Whether the image has a consistent bitmap `name` (one found in use when the image was opened
/// is never trusted; while we have it open for writing, every bitmap shows in use).
fn has_usable_bitmap(img: &Qcow2, name: &str) -> bool {
    img.dirty_bitmap(name).is_ok()
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
