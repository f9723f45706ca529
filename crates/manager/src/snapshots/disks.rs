//! The disk half of a domain snapshot taken, reverted or deleted by ferrod itself (a shut-off
//! domain; a running domain's VMM takes its disks' snapshots): a qcow2 internal snapshot named
//! like the domain snapshot in each of the domain's writable disks. Blocking: run it through
//! `Domains::while_shut_off`.

use crate::error::{Error, Result};
use ferro_block::Format;
use ferro_block::ops::{self, SnapshotAction};
use std::path::PathBuf;

fn on(disk: &std::path::Path, action: SnapshotAction) -> Result<()> {
    ops::snapshot(disk, Some(Format::Qcow2), action, false).map(drop).map_err(|e| Error::conflict(e.to_string()))
}

/// Takes internal snapshot `name` in every disk, or in none: a failure removes the ones taken.
pub(super) fn create(disks: &[PathBuf], name: &str) -> Result<()> {
    for (i, disk) in disks.iter().enumerate() {
        if let Err(e) = on(disk, SnapshotAction::Create(name)) {
            for taken in &disks[..i] {
                if let Err(undo) = on(taken, SnapshotAction::Delete(name)) {
                    tracing::warn!(disk = %taken.display(), "internal snapshot {name} left behind: {undo}");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Reverts every disk to its internal snapshot `name`.
pub(super) fn apply(disks: &[PathBuf], name: &str) -> Result<()> {
    disks.iter().try_for_each(|disk| on(disk, SnapshotAction::Apply(name)))
}

/// Deletes internal snapshot `name` from every disk (its clusters are freed).
pub(super) fn delete(disks: &[PathBuf], name: &str) -> Result<()> {
    disks.iter().try_for_each(|disk| on(disk, SnapshotAction::Delete(name)))
}
