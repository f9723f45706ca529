//! `check` for qcow2: counts every reference the metadata makes (header, L1/L2 tables, data,
//! refcount structures, snapshot tables, bitmap directory and tables), compares the counts with
//! the stored refcounts, and optionally repairs leaks. Severity follows qemu-img: a stored
//! refcount below the real count is a corruption, above it a leak.
use super::{L1E_OFFSET_MASK, L2Entry, OFLAG_COPIED, Qcow2};
use crate::Access;
use crate::error::{Error, Result};
use std::path::Path;

/// Most clusters `check` keeps a counter for (2 bytes each).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// What `check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    /// One line per problem, qemu-img style.
    pub messages: Vec<String>,
}

struct Counter {
    refs: Vec<u16>,
    cb: u32,
    report: CheckReport,
}

impl Counter {
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off >> self.cb;
        let last = (off + len - 1) >> self.cb;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!("ERROR {what} at {off:#x}: cluster {c} is past the end of the file"));
                }
            }
        }
    }
}

/// Checks a qcow2 file opened with `access` (a read access); with `repair`, then fixes leaked
/// clusters (stored refcount above the count).
pub fn check(path: &Path, repair: bool, access: Access) -> Result<CheckReport> {
    let mut img = Qcow2::open(path, access)?;
    let cs = img.cs;
    let nclusters = img.file_len.div_ceil(cs);
    if nclusters > MAX_CHECK_CLUSTERS {
        return Err(Error::unsupported(path, format!("checking a file of {nclusters} clusters")));
    }
    let mut n = Counter { refs: vec![0; nclusters as usize], cb: img.cb, report: CheckReport::default() };
    n.report.total_clusters = img.h.size.div_ceil(cs);
    n.inc(0, cs, "header");
    let (l1_off, l1) = (img.h.l1_table_offset, img.l1.clone());
    walk_l1(&mut img, &mut n, l1_off, &l1, true)?;
    let rt_off = img.h.refcount_table_offset;
    n.inc(rt_off, u64::from(img.h.refcount_table_clusters) * cs, "refcount table");
    for i in 0..img.reftable.len() {
        let rb = img.reftable[i] & super::REFT_OFFSET_MASK;
        if rb != 0 {
            n.inc(rb, cs, "refcount block");
        }
    }
    walk_snapshots(&mut img, &mut n)?;
    walk_bitmaps(&mut img, &mut n)?;

    let mut fixes = Vec::new();
    for c in 0..nclusters {
        let stored = img.get_refcount(c)?;
        let real = u64::from(n.refs[c as usize]);
        if real > 0 {
            n.report.image_end_offset = (c + 1) * cs;
        }
        if stored == real {
            continue;
        }
        if stored < real {
            n.report.corruptions += 1;
            n.report.messages.push(format!("ERROR cluster {c} refcount={stored} reference={real}"));
        } else {
            n.report.leaks += 1;
            n.report.messages.push(format!("Leaked cluster {c} refcount={stored} reference={real}"));
            fixes.push((c, real));
        }
    }
    // Refcounts for clusters past the end of the file reference nothing: leaks.
    let per_block = 1u64 << img.rb_bits();
    for ti in 0..img.reftable.len() as u64 {
        if img.reftable[ti as usize] & super::REFT_OFFSET_MASK == 0 {
            continue;
        }
        for c in (ti * per_block).max(nclusters)..(ti + 1) * per_block {
            let stored = img.get_refcount(c)?;
            if stored > 0 {
                n.report.leaks += 1;
                n.report.messages.push(format!("Leaked cluster {c} refcount={stored} reference=0"));
                fixes.push((c, 0));
            }
        }
    }
    if repair && !fixes.is_empty() {
        drop(img);
        let mut rw = Qcow2::open(path, Access::Write)?;
        for &(c, real) in &fixes {
            rw.set_refcount(c, real)?;
        }
        crate::DiskImage::flush(&mut rw)?;
        n.report.leaks_fixed = fixes.len() as u64;
        n.report.leaks -= n.report.leaks_fixed;
    }
    Ok(n.report)
}

/// Counts references from an L1 table, its L2 tables and their data clusters. For the active
/// table (`active`) also checks the COPIED flags and collects allocation statistics.
fn walk_l1(img: &mut Qcow2, n: &mut Counter, l1_off: u64, l1: &[u64], active: bool) -> Result<()> {
    let cs = img.cs;
    n.inc(l1_off, l1.len() as u64 * 8, "L1 table");
    let mut last_host = None;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        n.inc(l2_off, cs, "L2 table");
        if l2_off % cs != 0 || l2_off + cs > img.file_len {
            n.report.messages.push(format!("ERROR L1 entry {i}: L2 table at {l2_off:#x} unaligned or past the end"));
            n.report.corruptions += 1;
            continue;
        }
        if active {
            let rc = img.get_refcount(l2_off >> img.cb)?;
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                n.report.corruptions += 1;
                n.report.messages.push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount={rc}"));
            }
        }
        let table = img.read_meta(l2_off, "L2 table")?;
        for (j, raw) in table.chunks_exact(8).enumerate() {
            let raw = u64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
            let entry = match img.decode(raw) {
                Ok(entry) => entry,
                Err(e) => {
                    n.report.corruptions += 1;
                    n.report.messages.push(format!("ERROR L2 table at {l2_off:#x} entry {j}: {e}"));
                    continue;
                }
            };
            let host = match entry {
                L2Entry::Normal { host, .. } => host,
                L2Entry::Zero { host: Some(host), .. } => host,
                L2Entry::Compressed { host, len } => {
                    n.inc(host, len, "compressed data");
                    if active {
                        n.report.allocated_clusters += 1;
                        n.report.compressed_clusters += 1;
                    }
                    continue;
                }
                _ => continue,
            };
            n.inc(host, cs, "data cluster");
            if !active {
                continue;
            }
            let copied = raw & OFLAG_COPIED != 0;
            let rc = img.get_refcount(host >> img.cb)?;
            if (rc == 1) != copied {
                n.report.corruptions += 1;
                n.report.messages.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:#x} refcount={rc}"));
            }
            if matches!(entry, L2Entry::Normal { .. }) {
                n.report.allocated_clusters += 1;
                if last_host.is_some_and(|l: u64| l + cs != host) {
                    n.report.fragmented_clusters += 1;
                }
                last_host = Some(host);
            }
        }
    }
    Ok(())
}

/// Internal snapshots: the snapshot table and every snapshot's L1 tree.
fn walk_snapshots(img: &mut Qcow2, n: &mut Counter) -> Result<()> {
    let (snapshots, table_bytes) = img.read_snapshot_table()?;
    for s in &snapshots {
        let l1 = img.read_snapshot_l1(s)?;
        walk_l1(img, n, s.l1_offset, &l1, false)?;
    }
    n.inc(img.h.snapshots_offset, table_bytes, "snapshot table");
    Ok(())
}

/// Persistent dirty bitmaps: the directory and each bitmap's table and data clusters.
fn walk_bitmaps(img: &mut Qcow2, n: &mut Counter) -> Result<()> {
    for (off, len, what) in img.bitmap_regions()? {
        n.inc(off, len, what);
    }
    Ok(())
}
