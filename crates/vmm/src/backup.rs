//! The backup ops of the control socket (docs/backups.md): one point in time for every writable
//! disk of a running VM, the guest paused only while checkpoint bitmaps switch and temporary
//! internal snapshots are taken; ferrod then reads the snapshots while the guest runs on, and
//! ends the backup by deleting them. Checkpoint bitmaps of a running VM live in its open images,
//! so removing a checkpoint goes through here too.

use crate::vm::VmControl;
use ferro_devices::virtio::block::BlockDisk;
use ferro_vmm_api::control::BackupBeginReply;
use std::path::Path;
use std::time::Instant;

/// The `backup_begin` op: checks every writable disk, then, paused, adds checkpoint
/// `checkpoint` and snapshot `snapshot` to each (undoing the disks done if one fails), resumes
/// a VM that ran, and writes the ranges written since `since` for each disk into `ranges_dir`.
pub fn begin(
    vm: &VmControl,
    checkpoint: &str,
    parent: Option<&str>,
    snapshot: &str,
    since: &[String],
    ranges_dir: Option<&Path>,
) -> Result<BackupBeginReply, String> {
    let disks = vm.writable_disks();
    if disks.is_empty() {
        return Err("the VM has no writable disk".into());
    }
    if !since.is_empty() && ranges_dir.is_none() {
        return Err("ranges_dir: needed with since".into());
    }
    for d in &disks {
        d.check_backup(checkpoint, snapshot, since)?;
    }
    let was_running = !vm.is_paused();
    // The snapshot flushes each disk while the guest is paused; flushed first, it has only
    // the last moments' writes left to make durable.
    for d in &disks {
        d.flush()?;
    }
    let start = Instant::now();
    vm.pause()?;
    let switched = switch(&disks, checkpoint, parent, snapshot);
    let changed = switched.and_then(|()| {
        // Older bitmaps stopped tracking at the switch, so this is the point in time's answer.
        if since.is_empty() { Ok(Vec::new()) } else { disks.iter().map(|d| d.changed_since(since)).collect() }
    });
    let resumed = if was_running { vm.resume() } else { Ok(()) };
    let pause_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let changed = changed.inspect_err(|_| undo(&disks, checkpoint, parent, snapshot))?;
    resumed?;
    if let Some(dir) = ranges_dir.filter(|_| !since.is_empty()) {
        for (i, ranges) in changed.iter().enumerate() {
            let bytes: Vec<u8> = ranges.iter().flat_map(|&(off, len)| off.to_le_bytes().into_iter().chain(len.to_le_bytes())).collect();
            let file = dir.join(i.to_string());
            std::fs::write(&file, bytes).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        }
    }
    Ok(BackupBeginReply { pause_us, disks: disks.iter().map(|d| d.path().to_path_buf()).collect() })
}

/// Adds the checkpoint and the snapshot to every disk, or to none.
fn switch(disks: &[BlockDisk], checkpoint: &str, parent: Option<&str>, snapshot: &str) -> Result<(), String> {
    for (i, d) in disks.iter().enumerate() {
        let done = d.add_checkpoint(checkpoint, parent).and_then(|()| {
            d.create_snapshot(snapshot).inspect_err(|_| {
                let _ = d.remove_checkpoint(checkpoint, parent);
            })
        });
        if let Err(e) = done {
            undo(&disks[..i], checkpoint, parent, snapshot);
            return Err(e);
        }
    }
    Ok(())
}

fn undo(disks: &[BlockDisk], checkpoint: &str, parent: Option<&str>, snapshot: &str) {
    for d in disks {
        let _ = d.remove_checkpoint(checkpoint, parent);
        if d.has_snapshot(snapshot).unwrap_or(false) {
            let _ = d.delete_snapshot(snapshot);
        }
    }
}

/// The `backup_end` op: deletes the backup's snapshot from every writable disk that has it.
pub fn end(vm: &VmControl, snapshot: &str) -> Result<(), String> {
    crate::snapshot::delete_disk_snapshot(vm, snapshot)
}

/// The `checkpoint_remove` op: removes checkpoint `checkpoint` from every writable disk.
pub fn remove_checkpoint(vm: &VmControl, checkpoint: &str, parent: Option<&str>) -> Result<(), String> {
    for d in vm.writable_disks() {
        d.remove_checkpoint(checkpoint, parent)?;
    }
    Ok(())
}
