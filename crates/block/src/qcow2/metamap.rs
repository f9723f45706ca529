//! Which host clusters of a qcow2 file hold metadata. L2 entries come from the file and may be
//! hostile: every path that follows one (read, write, zero, discard, map) asks this map first,
//! so that a data pointer into the header, a table or a refcount block is refused instead of
//! being written through. The allocator also never hands out a cluster listed here, even when
//! a damaged refcount says it is free.
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// What a metadata cluster holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    L1Table,
    RefcountTable,
    RefcountBlock,
    L2Table,
    SnapshotTable,
    SnapshotL1Table,
    Bitmap,
}

impl MetaKind {
    fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "the header",
            MetaKind::L1Table => "the L1 table",
            MetaKind::RefcountTable => "the refcount table",
            MetaKind::RefcountBlock => "a refcount block",
            MetaKind::L2Table => "an L2 table",
            MetaKind::SnapshotTable => "the snapshot table",
            MetaKind::SnapshotL1Table => "a snapshot's L1 table",
            MetaKind::Bitmap => "dirty bitmap metadata",
        }
    }

    /// Kinds that several references may legitimately share (an L2 table is shared between
    /// the active L1 and snapshots' L1 tables).
    fn shareable(self) -> bool {
        matches!(self, MetaKind::L2Table | MetaKind::Bitmap)
    }
}

/// Metadata clusters by cluster index.
#[derive(Default)]
pub(crate) struct MetaMap {
    clusters: BTreeMap<u64, MetaKind>,
}

impl MetaMap {
    /// Records `[off, off+bytes)` as metadata of `kind`. Two different structures claiming one
    /// cluster means the image is corrupt: writing either would destroy the other.
    pub fn insert(&mut self, path: &Path, cb: u32, off: u64, bytes: u64, kind: MetaKind) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let first = off >> cb;
        let last = (off + bytes - 1) >> cb;
        for c in first..=last {
            match self.clusters.insert(c, kind) {
                Some(old) if old != kind || !kind.shareable() => {
                    return Err(Error::corrupt(
                        path,
                        format!("cluster {c} (at {:#x}) is used as both {} and {}", c << cb, old.name(), kind.name()),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Forgets a cluster that no longer holds metadata (its refcount dropped to zero).
    pub fn remove(&mut self, cluster: u64) {
        self.clusters.remove(&cluster);
    }

    pub fn contains(&self, cluster: u64) -> bool {
        self.clusters.contains_key(&cluster)
    }

    /// The first metadata cluster in `[first, first+count)`, with its kind.
    pub fn first_in(&self, first: u64, count: u64) -> Option<(u64, MetaKind)> {
        self.clusters.range(first..first.saturating_add(count)).next().map(|(&c, &k)| (c, k))
    }

    /// Refuses a data range that overlaps metadata, naming what it would overwrite.
    pub fn check_data(&self, path: &Path, cb: u32, host: u64, bytes: u64) -> Result<()> {
        let first = host >> cb;
        let count = ((host + bytes.max(1) - 1) >> cb) - first + 1;
        match self.first_in(first, count) {
            None => Ok(()),
            Some((c, kind)) => Err(Error::corrupt(
                path,
                format!("an L2 entry points data at {host:#x}, inside {} (cluster {c})", kind.name()),
            )),
        }
    }
}
