//! Power loss at every moment of a workload: qcow2 (and raw) run over a recorder instead of a
//! file (tests/common/powerloss.rs); then, for every interval between two syncs, the file as a
//! power cut would leave it (what the last sync made durable, plus chosen subsets of the page
//! writes after it) must keep the promises the block layer makes:
//!
//! - no corruption, in our `check` and in `qemu-img check` (leaked clusters are allowed);
//! - every guest write acknowledged by a completed flush reads back, and every other byte
//!   holds either what the last completed flush left there or what a later write put there;
//! - the image opens for writing again and stays consistent through more writes.
//!
//! - a persistent dirty bitmap made before the workload is never lost: it is either marked
//!   in_use (inconsistent, never trusted) or has a bit set for every granule that differs from
//!   the image it was made on.
//!
//! qemu-img check runs on every state a sync left (the empty subsets) and on a sample of the
//! rest; our own check, the read-back and the rewrite run on all of them.
mod common;
use common::powerloss::{Interval, Mark, Recorder, for_each_interval, subsets};
use common::*;
use ferro_block::qcow2::Qcow2;
use ferro_block::raw::RawImage;
use ferro_block::{Access, CreateOptions, DiskImage, Format, create};
use std::cell::Cell;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;

/// Deterministic xorshift stream.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// An image under test, the recorder under it, and the guest's view of what it should hold.
struct Workload {
    rec: Recorder,
    path: PathBuf,
    format: Format,
    img: Option<Box<dyn DiskImage>>,
    model: Vec<u8>,
    /// Guest writes in order (zeroing too, as zero data).
    writes: Vec<(u64, Vec<u8>)>,
    /// The guest's view at each completed flush.
    flushes: Vec<Vec<u8>>,
    /// Every virtual size the image had.
    sizes: Vec<u64>,
    /// The image carries the dirty bitmap [`TRACKED`], made before any write.
    tracked: bool,
    /// Crash states whose bitmap was consistent, and so was checked bit by bit.
    bitmap_checks: Cell<usize>,
}

/// Name of the dirty bitmap a workload's image carries.
const TRACKED: &str = "tracked";

impl Workload {
    /// Starts from an image file already created at `path` (its bytes go into the recorder).
    fn new(path: &Path, format: Format) -> Workload {
        let rec = Recorder::new(std::fs::read(path).expect("read the created image"));
        let mut w = Workload {
            rec,
            path: path.to_path_buf(),
            format,
            img: None,
            model: Vec::new(),
            writes: Vec::new(),
            flushes: Vec::new(),
            sizes: Vec::new(),
            tracked: false,
            bitmap_checks: Cell::new(0),
        };
        // The initial contents come from the file itself: opening for writing already writes
        // (a bitmap's in_use flag), after the first mark.
        w.model = read_all(path);
        w.sizes.push(w.model.len() as u64);
        w.rec.mark(Mark::FlushDone(0));
        w.flushes.push(w.model.clone());
        w.open();
        w
    }

    fn open(&mut self) {
        let storage = Box::new(self.rec.clone());
        self.img = Some(match self.format {
            Format::Raw => Box::new(RawImage::open_on(storage, &self.path, false).expect("open raw on the recorder")),
            _ => {
                let mut q = Qcow2::open_on(storage, &self.path, false).expect("open qcow2 on the recorder");
                if let Some((bpath, bfmt)) = q.backing_target().expect("backing") {
                    q.set_backing_image(ferro_block::open(&bpath, bfmt, true).expect("open the backing file"));
                }
                Box::new(q)
            }
        });
    }

    fn img(&mut self) -> &mut dyn DiskImage {
        self.img.as_mut().expect("image open").as_mut()
    }

    fn write(&mut self, off: u64, data: Vec<u8>, how: Write) {
        self.rec.mark(Mark::WriteStart(self.writes.len()));
        let len = data.len() as u64;
        match how {
            Write::Data => self.img().write_at(&data, off).expect("write"),
            Write::Zeroes => self.img().write_zeroes(off, len).expect("write_zeroes"),
            Write::Discard => self.img().discard(off, len).expect("discard"),
        }
        self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
        self.writes.push((off, data));
    }

    fn flush(&mut self) {
        self.img().flush().expect("flush");
        self.flushed();
    }

    fn flushed(&mut self) {
        self.rec.mark(Mark::FlushDone(self.flushes.len()));
        self.flushes.push(self.model.clone());
    }

    /// Flushes, closes and opens the image again.
    fn reopen(&mut self) {
        self.flush();
        self.img = None;
        self.open();
    }

    fn grow(&mut self, by: u64) {
        let new = self.model.len() as u64 + by;
        self.rec.mark(Mark::Resize(new));
        self.img().resize(new).expect("resize");
        self.model.resize(new as usize, 0);
        self.sizes.push(new);
        self.flush();
    }
}

#[derive(Clone, Copy)]
enum Write {
    Data,
    Zeroes,
    /// Only for whole clusters of images where discard makes them read zeroes.
    Discard,
}

/// A random workload of `steps` operations on an image with clusters of `cs` bytes.
fn random_workload(w: &mut Workload, seed: u64, steps: usize, cs: u64, discard_zeroes: bool) {
    let mut r = rng(seed);
    for step in 0..steps {
        let size = w.model.len() as u64;
        match r() % 20 {
            0..=9 => {
                let len = 1 + r() % (3 * cs).min(size);
                let len = if r() % 2 == 0 { len.next_multiple_of(SECTOR).min(size) } else { len };
                let off = r() % (size - len + 1);
                w.write(off, data(seed * 1000 + step as u64, len as usize), Write::Data);
            }
            10..=13 => w.flush(),
            14 | 15 => {
                let len = 1 + r() % (4 * cs).min(size);
                let off = r() % (size - len + 1);
                w.write(off, vec![0; len as usize], Write::Zeroes);
            }
            16 if discard_zeroes => {
                let clusters = size / cs;
                let first = r() % clusters;
                let n = 1 + r() % (clusters - first).min(4);
                w.write(first * cs, vec![0; (n * cs) as usize], Write::Discard);
            }
            17 => w.reopen(),
            // Growing by one L2 table's reach adds L1 entries (the L1 table moves).
            18 if w.format == Format::Qcow2 && w.sizes.len() < 3 && cs * cs / 8 <= 4 << 20 => w.grow(cs * cs / 8),
            _ => w.flush(),
        }
    }
    w.flush();
}

/// What one crash state broke, for the failure report.
struct Failure {
    interval: usize,
    kept: String,
    what: String,
}

/// Checks the guest's view of a crash image against the workload's promises.
fn check_contents(w: &Workload, iv: &Interval, view: &[u8]) -> Result<(), String> {
    let flushed_at = iv.marks.iter().rev().find_map(|m| match m {
        Mark::FlushDone(n) => Some(*n),
        _ => None,
    });
    let flushed_at = flushed_at.expect("the workload marks a flush before any I/O");
    let flushed = &w.flushes[flushed_at];
    // Marks after the last completed flush: writes that may or may not have landed, and
    // resizes that may or may not have.
    let after = iv.marks.iter().rposition(|m| *m == Mark::FlushDone(flushed_at)).map_or(0, |p| p + 1);
    let mut candidates = Vec::new();
    let mut sizes = vec![flushed.len() as u64];
    for m in &iv.marks[after..] {
        match m {
            Mark::WriteStart(i) => candidates.push(&w.writes[*i]),
            Mark::Resize(s) => sizes.push(*s),
            Mark::FlushDone(_) => {}
        }
    }
    if !sizes.contains(&(view.len() as u64)) {
        return Err(format!("virtual size {} is none of {sizes:?}", view.len()));
    }
    // Byte by byte: what the last completed flush left, or what some later write put there
    // (sectors equal to the flushed state are skipped whole).
    let sector = SECTOR as usize;
    for start in (0..view.len()).step_by(sector) {
        let end = (start + sector).min(view.len());
        if end <= flushed.len() && view[start..end] == flushed[start..end] {
            continue;
        }
        for (pos, &b) in view.iter().enumerate().take(end).skip(start) {
            if b == flushed.get(pos).copied().unwrap_or(0) {
                continue;
            }
            let from_write = candidates.iter().any(|(off, d)| {
                let off = *off as usize;
                (off..off + d.len()).contains(&pos) && d[pos - off] == b
            });
            if !from_write && pos >= flushed.len() {
                return Err(format!("guest byte {pos:#x} in the grown range is not zero"));
            }
            if !from_write {
                let acked = if candidates.is_empty() { " (no write was pending: flushed data lost)" } else { "" };
                return Err(format!("guest byte {pos:#x} holds neither the flushed data nor a later write{acked}"));
            }
        }
    }
    Ok(())
}

/// Runs every chosen crash state of `w`'s log through the checks; returns how many states were
/// checked, and by qemu-img.
fn check_every_crash(s: &TempDir, w: &Workload, seed: u64, budget: usize, qemu_every: u64) -> (usize, usize) {
    let crash = s.join("crash-image");
    let mut r = rng(seed ^ 0x5eed);
    let log = w.rec.log();
    let mut failures: Vec<Failure> = Vec::new();
    let (mut states, mut by_qemu) = (0, 0);
    for_each_interval(&log, |iv| {
        for keep in subsets(iv.pending.len(), budget, &mut r) {
            states += 1;
            let bytes = iv.crash(&keep);
            std::fs::write(&crash, &bytes).expect("write crash image");
            let mut kept: String = keep.iter().take(64).map(|&k| if k { '1' } else { '0' }).collect();
            if keep.len() > 64 {
                kept += &format!("... ({} of {} ops)", keep.iter().filter(|&&k| k).count(), keep.len());
            }
            let fail = |what: String| Failure { interval: iv.index, kept: kept.clone(), what };
            let qemu = keep.iter().all(|&k| !k) || r() % qemu_every == 0;
            if let Err(what) = check_state(w, iv, &crash, qemu, &mut r) {
                failures.push(fail(what));
            }
            if qemu {
                by_qemu += 1;
            }
        }
    });
    if !failures.is_empty() {
        let kept = s.join("first-failure.img");
        let _ = std::fs::copy(&crash, &kept);
        let report: Vec<String> = failures
            .iter()
            .take(10)
            .map(|f| format!("interval {} kept {}: {}", f.interval, f.kept, f.what))
            .collect();
        panic!("seed {seed}: {} of {states} crash states broke a promise:\n{}", failures.len(), report.join("\n"));
    }
    (states, by_qemu)
}

/// All checks on one crash image at `path`.
fn check_state(w: &Workload, iv: &Interval, path: &Path, qemu: bool, r: &mut impl FnMut() -> u64) -> Result<(), String> {
    if w.format == Format::Qcow2 {
        let report = match ferro_block::ops::check(path, Some(Format::Qcow2), false, false) {
            Ok(ferro_block::ops::CheckOutcome::Checked(rep)) => rep,
            Ok(_) => return Err("check: not a qcow2 image".into()),
            Err(e) => return Err(format!("check cannot read the image: {e}")),
        };
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(format!("our check: {}", report.messages.join("; ")));
        }
        if qemu {
            let out = qemu_img(&["check", path.to_str().expect("utf-8")]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            if !matches!(out.status.code(), Some(0 | 3)) || text.contains("ERROR") {
                return Err(format!("qemu-img check: {text}"));
            }
        }
    }
    let mut img = ferro_block::open(path, Some(w.format), true).map_err(|e| format!("open: {e}"))?;
    let mut view = vec![0u8; img.size() as usize];
    img.read_at(&mut view, 0).map_err(|e| format!("read: {e}"))?;
    drop(img);
    check_contents(w, iv, &view)?;
    if w.tracked {
        check_bitmap(w, path, &view)?;
    }
    // The image must take more writes and stay consistent.
    let mut img = ferro_block::open(path, Some(w.format), false).map_err(|e| format!("reopen for writing: {e}"))?;
    let size = img.size();
    let len = (r() % 200_000).min(size);
    let off = r() % (size - len + 1);
    let more = data(r(), len as usize);
    img.write_at(&more, off).map_err(|e| format!("write after the crash: {e}"))?;
    img.flush().map_err(|e| format!("flush after the crash: {e}"))?;
    drop(img);
    if w.format == Format::Qcow2 {
        match ferro_block::ops::check(path, Some(Format::Qcow2), false, false) {
            Ok(ferro_block::ops::CheckOutcome::Checked(rep)) if rep.corruptions == 0 => {}
            Ok(ferro_block::ops::CheckOutcome::Checked(rep)) => {
                return Err(format!("check after writing on: {}", rep.messages.join("; ")));
            }
            other => return Err(format!("check after writing on: {:?}", other.err())),
        }
    }
    let back = read_all(path);
    if back[off as usize..(off + len) as usize] != more[..] {
        return Err("a write after the crash did not read back".into());
    }
    Ok(())
}

/// The bitmap made before the workload is still there, and if it is not in_use it marks every
/// granule that differs from the image it was made on.
fn check_bitmap(w: &Workload, path: &Path, view: &[u8]) -> Result<(), String> {
    let img = Qcow2::open(path, Access::Read).map_err(|e| format!("open for the bitmap: {e}"))?;
    let Some(info) = img.bitmaps().into_iter().find(|b| b.name == TRACKED) else {
        return Err(format!("the bitmap {TRACKED:?} is gone"));
    };
    if info.in_use {
        return Ok(());
    }
    let bits = img.dirty_bitmap(TRACKED).map_err(|e| format!("read the bitmap: {e}"))?;
    let base = &w.flushes[0];
    let g = bits.granularity as usize;
    for (i, granule) in view.chunks(g).enumerate() {
        let start = i * g;
        let changed = granule.iter().enumerate().any(|(j, &b)| base.get(start + j).copied().unwrap_or(0) != b);
        if changed && !bits.is_set(i as u64) {
            return Err(format!("bitmap {TRACKED:?} is consistent but misses the write at {start:#x}"));
        }
    }
    w.bitmap_checks.set(w.bitmap_checks.get() + 1);
    Ok(())
}

/// One qcow2 configuration: created on disk, then driven on the recorder. Version 3 images
/// carry a dirty bitmap through the workload.
fn qcow2_case(tag: &str, cs: u64, v2: bool, refcount_bits: u32, backing: bool, seed: u64, steps: usize) -> (usize, usize) {
    let s = TempDir::new(&format!("block-powerloss-{tag}"));
    let path = s.join("crash-image");
    let size = 2 << 20;
    let mut o = CreateOptions::new(Format::Qcow2, Some(size));
    o.cluster_size = cs;
    o.compat_v2 = v2;
    o.refcount_bits = refcount_bits;
    if backing {
        std::fs::write(s.join("base.raw"), data(seed, size as usize)).expect("base");
        o.backing_file = Some("base.raw".into());
        o.backing_format = Some(Format::Raw);
    }
    create(&path, &o).expect("create");
    if !v2 {
        let mut img = Qcow2::open(&path, Access::Write).expect("open to add a bitmap");
        img.add_bitmap(TRACKED, Some(4096), true).expect("add a bitmap");
        img.close().expect("store the bitmap");
    }
    let mut w = Workload::new(&path, Format::Qcow2);
    w.tracked = !v2;
    random_workload(&mut w, seed, steps, cs, !(v2 && backing));
    drop(w.img.take());
    let counts = check_every_crash(&s, &w, seed, 16, 8);
    assert!(!w.tracked || w.bitmap_checks.get() > 0, "no crash state had a consistent bitmap to check");
    counts
}

#[test]
fn qcow2_small_clusters_survive_power_loss_anywhere() {
    // 512-byte clusters: many L2 tables, refcount blocks and table growth per write.
    let (states, qemu) = qcow2_case("512", 512, false, 16, false, 1, 40);
    eprintln!("512-byte clusters: {states} crash states, {qemu} also by qemu-img");
}

#[test]
fn qcow2_with_backing_file_survives_power_loss_anywhere() {
    let (states, qemu) = qcow2_case("backing", 4096, false, 16, true, 2, 50);
    eprintln!("4 KiB clusters over a backing file: {states} crash states, {qemu} also by qemu-img");
}

#[test]
fn qcow2_v2_narrow_refcounts_survive_power_loss_anywhere() {
    let (states, qemu) = qcow2_case("v2", 65536, true, 16, true, 3, 40);
    eprintln!("64 KiB clusters, compat 0.10: {states} crash states, {qemu} also by qemu-img");
    let (states, qemu) = qcow2_case("rc1", 4096, false, 1, false, 4, 40);
    eprintln!("1-bit refcounts: {states} crash states, {qemu} also by qemu-img");
}

#[test]
fn qcow2_made_by_qemu_with_compressed_clusters_survives_power_loss_anywhere() {
    // Overwriting compressed clusters copies them out and frees their (shared) host clusters.
    let s = TempDir::new("block-powerloss-qemu");
    let path = s.join("crash-image");
    let raw = s.join("source.raw");
    let mut content = data(8, 2 << 20);
    content[1 << 20..].iter_mut().enumerate().for_each(|(i, b)| *b = (i / 700) as u8);
    std::fs::write(&raw, &content).expect("source");
    qemu_img_ok(&["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw.to_str().expect("utf-8"), path.to_str().expect("utf-8")]);
    let mut w = Workload::new(&path, Format::Qcow2);
    random_workload(&mut w, 9, 40, 4096, true);
    drop(w.img.take());
    let (states, qemu) = check_every_crash(&s, &w, 9, 16, 8);
    eprintln!("qemu-made, compressed: {states} crash states, {qemu} also by qemu-img");
}

#[test]
fn raw_survives_power_loss_anywhere() {
    let s = TempDir::new("block-powerloss-raw");
    let path = s.join("crash-image");
    create(&path, &CreateOptions::new(Format::Raw, Some(1 << 20))).expect("create");
    let mut w = Workload::new(&path, Format::Raw);
    random_workload(&mut w, 5, 40, 4096, false);
    drop(w.img.take());
    let (states, _) = check_every_crash(&s, &w, 5, 16, u64::MAX);
    eprintln!("raw: {states} crash states");
}

/// Regression: growing an image wrote the new size before making the grown range read zeroes,
/// so a power cut in between showed the backing file (or stale bytes past the old end) in
/// what must be a zeroed extension.
#[test]
fn qcow2_growth_never_shows_backing_or_stale_data() {
    let s = TempDir::new("block-powerloss-grow");
    let path = s.join("crash-image");
    std::fs::write(s.join("base.raw"), data(6, 2 << 20)).expect("base");
    let mut o = CreateOptions::new(Format::Qcow2, Some((1 << 20) - 1000));
    o.cluster_size = 4096;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some(Format::Raw);
    create(&path, &o).expect("create");
    let mut w = Workload::new(&path, Format::Qcow2);
    let size = w.model.len() as u64;
    w.write(0, data(7, size as usize), Write::Data);
    w.flush();
    w.grow((1 << 20) + 1000);
    drop(w.img.take());
    let (states, qemu) = check_every_crash(&s, &w, 6, 16, 4);
    eprintln!("growth: {states} crash states, {qemu} also by qemu-img");
}
