//! The operations behind `ferro img`, with qemu-img's semantics and JSON field names: info,
//! check, convert, compare, map, commit, rebase, resize.
use crate::error::{Error, Result};
use crate::qcow2::{BitmapInfo, DirtyBitmap, Qcow2, SnapshotInfo, check::CheckReport};
use crate::vmdk::{STREAM_GRAIN, StreamWriter};
use crate::{Access, CreateOptions, DiskImage, Format, ImageInfo, OpenOptions, Status, create, open, open_with, probe};
use serde_json::{Map, Value, json};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Unit of copying for convert, compare, commit and rebase.
const CHUNK: u64 = 1 << 20;

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// The access of a reading operation: `force_share` (`-U`) reads an image others may be
/// writing instead of refusing it.
fn read_access(force_share: bool) -> Access {
    if force_share { Access::ReadShared } else { Access::Read }
}

/// Opens an image and its chain for reading.
fn open_read(path: &Path, format: Option<Format>, force_share: bool) -> Result<Box<dyn DiskImage>> {
    open_with(path, &OpenOptions { format, access: read_access(force_share), open_backing: true })
}

fn opened_format(path: &Path, format: Option<Format>) -> Result<Format> {
    match format {
        Some(f) => Ok(f),
        None => probe(path),
    }
}

/// `info` as qemu-img's JSON object (same field names).
pub fn info_json(info: &ImageInfo) -> Result<Value> {
    let meta = std::fs::metadata(&info.path).map_err(Error::io(&info.path, "stat"))?;
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(info.path.display().to_string()));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(info.format.name()));
    m.insert("actual-size".into(), json!(meta.blocks() * 512));
    if let Some(q) = &info.qcow2 {
        let mut data = json!({
            "compat": q.compat,
            "lazy-refcounts": q.lazy_refcounts,
            "refcount-bits": q.refcount_bits,
            "corrupt": q.corrupt,
            "extended-l2": q.extended_l2,
        });
        if q.compat == "1.1" {
            data["compression-type"] = json!("zlib");
        }
        if !q.bitmaps.is_empty() {
            let list: Vec<Value> = q
                .bitmaps
                .iter()
                .map(|b| json!({ "flags": bitmap_flags(b), "name": b.name, "granularity": b.granularity }))
                .collect();
            data["bitmaps"] = Value::Array(list);
        }
        m.insert("format-specific".into(), json!({ "type": "qcow2", "data": data }));
    }
    if let Some(q) = info.qcow2.as_ref().filter(|q| !q.snapshots.is_empty()) {
        m.insert("snapshots".into(), snapshot_list_json(&q.snapshots));
    }
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &info.full_backing_file {
        m.insert("full-backing-filename".into(), json!(b.display().to_string()));
    }
    if let Some(f) = &info.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Ok(Value::Object(m))
}

/// Infos of an image and (with `chain`) each image below it, top first.
pub fn info(path: &Path, format: Option<Format>, chain: bool, force_share: bool) -> Result<Vec<ImageInfo>> {
    let mut out = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    let mut seen = Vec::new();
    while let Some((p, f)) = next.take() {
        let canonical = p.canonicalize().map_err(Error::io(&p, "open"))?;
        if seen.contains(&canonical) || seen.len() >= crate::MAX_CHAIN_DEPTH {
            return Err(Error::BackingChain { path: p, reason: "loop or chain too deep".into() });
        }
        seen.push(canonical);
        let img = open_with(&p, &OpenOptions { format: f, access: read_access(force_share), open_backing: false })?;
        let i = img.info();
        if chain {
            if let Some(full) = &i.full_backing_file {
                let bf = match &i.backing_format {
                    Some(name) => Format::from_name(name),
                    None => None,
                };
                next = Some((full.clone(), bf));
            }
        }
        out.push(i);
    }
    Ok(out)
}

/// qemu-img's human `info` text.
pub fn info_text(info: &ImageInfo) -> Result<String> {
    let meta = std::fs::metadata(&info.path).map_err(Error::io(&info.path, "stat"))?;
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.path.display(),
        info.format,
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(meta.blocks() * 512)
    );
    if let Some(cs) = info.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &info.backing_file {
        s += &format!("backing file: {b}\n");
    }
    if let Some(f) = &info.backing_format {
        s += &format!("backing file format: {f}\n");
    }
    if let Some(q) = info.qcow2.as_ref().filter(|q| !q.snapshots.is_empty()) {
        s += &snapshot_list_text(&q.snapshots);
    }
    if let Some(q) = &info.qcow2 {
        s += &format!(
            "Format specific information:\n    compat: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n    extended l2: {}\n",
            q.compat, q.lazy_refcounts, q.refcount_bits, q.corrupt, q.extended_l2
        );
        if !q.bitmaps.is_empty() {
            s += "    bitmaps:\n";
            for (i, b) in q.bitmaps.iter().enumerate() {
                s += &format!("        [{i}]:\n            flags:\n");
                for (j, f) in bitmap_flags(b).iter().enumerate() {
                    s += &format!("                [{j}]: {f}\n");
                }
                s += &format!("            name: {}\n            granularity: {}\n", b.name, b.granularity);
            }
        }
    }
    Ok(s)
}

/// qemu-img's names for a bitmap's flags.
fn bitmap_flags(b: &BitmapInfo) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.enabled {
        flags.push("auto");
    }
    flags
}

/// What `bitmap` does to a bitmap, in the order qemu-img applies its options.
#[derive(Clone, Debug, Default)]
pub struct BitmapActions {
    /// Create it; `granularity` for the new bitmap (default: the cluster size).
    pub add: bool,
    pub granularity: Option<u64>,
    pub clear: bool,
    /// Merge these bitmaps into it...
    pub merge: Vec<String>,
    /// ...found in this image (and format), or in the image itself if `None`.
    pub merge_from: Option<(std::path::PathBuf, Option<Format>)>,
    /// `Some(true)` enables, `Some(false)` disables (a new bitmap is enabled unless disabled).
    pub enable: Option<bool>,
    pub remove: bool,
}

/// `bitmap`: adds, clears, merges into, enables, disables or removes a persistent dirty bitmap
/// of a qcow2 image.
pub fn bitmap(path: &Path, format: Option<Format>, name: &str, actions: &BitmapActions) -> Result<()> {
    if opened_format(path, format)? != Format::Qcow2 {
        return Err(Error::unsupported(path, "dirty bitmaps need a qcow2 image"));
    }
    // Bitmaps of other images are read before this one is opened for writing.
    let mut sources: Vec<(&str, Option<DirtyBitmap>)> = Vec::new();
    for source in &actions.merge {
        let other = match &actions.merge_from {
            Some((file, fmt)) => {
                if opened_format(file, *fmt)? != Format::Qcow2 {
                    return Err(Error::unsupported(file, "dirty bitmaps need a qcow2 image"));
                }
                Some(Qcow2::open(file, Access::Read)?.dirty_bitmap(source)?)
            }
            None => None,
        };
        sources.push((source, other));
    }
    let mut img = Qcow2::open(path, Access::Write)?;
    if actions.add {
        img.add_bitmap(name, actions.granularity, actions.enable != Some(false))?;
    }
    if actions.clear {
        img.clear_bitmap(name)?;
    }
    for (source, other) in sources {
        let bits = match other {
            Some(bits) => bits,
            None => img.dirty_bitmap(source)?,
        };
        img.merge_into_bitmap(name, &bits)?;
    }
    if let Some(on) = actions.enable.filter(|_| !actions.add) {
        img.set_bitmap_enabled(name, on)?;
    }
    if actions.remove {
        img.remove_bitmap(name)?;
    }
    img.close()
}

/// Sizes the way qemu prints them ("4 MiB", "1.5 GiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

/// Outcome of [`check`] on any format.
pub enum CheckOutcome {
    Checked(CheckReport),
    /// The format has no consistency metadata (qemu-img exits 63).
    NotSupported(Format),
}

/// `check`: qcow2 metadata consistency (other formats have none to check). `repair` needs the
/// image for writing, so it cannot go with `force_share`.
pub fn check(path: &Path, format: Option<Format>, repair: bool, force_share: bool) -> Result<CheckOutcome> {
    if repair && force_share {
        return Err(Error::invalid(path, "repairing needs the image for writing: it cannot be forced shared"));
    }
    match opened_format(path, format)? {
        Format::Qcow2 => Ok(CheckOutcome::Checked(crate::qcow2::check::check(path, repair, read_access(force_share))?)),
        f => Ok(CheckOutcome::NotSupported(f)),
    }
}

impl CheckReport {
    /// qemu-img's exit status: 0 clean, 2 corruptions, 3 leaks only, 1 check errors.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The JSON object qemu-img prints for `check --output json`.
    pub fn to_json(&self, filename: &str) -> Value {
        let mut m = Map::new();
        m.insert("image-end-offset".into(), json!(self.image_end_offset));
        m.insert("total-clusters".into(), json!(self.total_clusters));
        m.insert("check-errors".into(), json!(self.check_errors));
        for (k, v) in [
            ("leaks", self.leaks),
            ("corruptions", self.corruptions),
            ("leaks-fixed", self.leaks_fixed),
            ("corruptions-fixed", self.corruptions_fixed),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ] {
            if v > 0 {
                m.insert(k.into(), json!(v));
            }
        }
        m.insert("allocated-clusters".into(), json!(self.allocated_clusters));
        m.insert("filename".into(), json!(filename));
        m.insert("format".into(), json!("qcow2"));
        Value::Object(m)
    }

    /// qemu-img's human text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for m in &self.messages {
            s += m;
            s.push('\n');
        }
        if self.leaks_fixed > 0 {
            s += &format!("The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n\n", self.leaks_fixed);
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s += "No errors were found on the image.\n";
        }
        if self.corruptions > 0 {
            s += &format!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", self.corruptions);
        }
        if self.leaks > 0 {
            s += &format!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", self.leaks);
        }
        let pct = |n: u64| if self.total_clusters == 0 { 0.0 } else { n as f64 * 100.0 / self.total_clusters as f64 };
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\nImage end offset: {}\n",
            self.allocated_clusters,
            self.total_clusters,
            pct(self.allocated_clusters),
            pct(self.fragmented_clusters),
            pct(self.compressed_clusters),
            self.image_end_offset
        );
        s
    }
}

/// Where a range of the virtual disk comes from, through the whole chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
    /// The file holding the data (for human output).
    pub file: String,
}

/// Status of the chain at `off`: walks down while layers are unallocated.
fn chain_status(img: &mut dyn DiskImage, off: u64, len: u64, depth: u32) -> Result<MapEntry> {
    let info_format = img.info().format;
    let file = img.info().path.display().to_string();
    let e = img.block_status(off, len)?;
    let mut entry = MapEntry { start: off, length: e.len, depth, present: true, zero: false, data: false, offset: None, file };
    match e.status {
        Status::Data { offset } => {
            entry.data = true;
            entry.offset = offset;
        }
        Status::Compressed => entry.data = true,
        Status::Zero => {
            entry.zero = true;
            if info_format == Format::Raw {
                entry.offset = Some(off);
            }
        }
        Status::Unallocated => {
            let bsize = img.backing_mut().map(|b| b.size());
            match (img.backing_mut(), bsize) {
                (Some(b), Some(bsize)) if off < bsize => {
                    let mut below = chain_status(b, off, e.len.min(bsize - off), depth + 1)?;
                    below.start = off;
                    return Ok(below);
                }
                (Some(_), Some(_)) => {
                    entry.depth = depth + 1;
                    entry.zero = true;
                    entry.present = false;
                }
                _ => {
                    entry.zero = true;
                    entry.present = false;
                }
            }
        }
    }
    Ok(entry)
}

/// `map`: the allocation of every byte of the virtual disk, merged into runs.
pub fn map(path: &Path, format: Option<Format>, force_share: bool) -> Result<Vec<MapEntry>> {
    map_image(open_read(path, format, force_share)?.as_mut())
}

/// `map` of an open image.
pub fn map_image(img: &mut dyn DiskImage) -> Result<Vec<MapEntry>> {
    let size = img.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let e = chain_status(img, off, size - off, 0)?;
        off += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous
                && (last.depth, last.present, last.zero, last.data) == (e.depth, e.present, e.zero, e.data)
                && last.file == e.file
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// qemu-img's JSON for `map --output json` (one object per line inside a list).
pub fn map_json(entries: &[MapEntry]) -> String {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut s = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data
            );
            if let Some(o) = e.offset {
                s += &format!(", \"offset\": {o}");
            }
            s + "}"
        })
        .collect();
    format!("[{}]", lines.join(",\n"))
}

/// Whether a range of the chain reads as zeroes without reading data.
fn known_zero(img: &mut dyn DiskImage, off: u64, len: u64) -> Result<u64> {
    let e = chain_status(img, off, len, 0)?;
    Ok(if e.zero && !e.data { e.length } else { 0 })
}

/// Options for [`convert`].
pub struct ConvertOptions {
    pub src_format: Option<Format>,
    /// Read a source others may be writing (`-U`).
    pub force_share: bool,
    pub dst: CreateOptions,
}

/// `convert`: copies the whole virtual disk into a new image, skipping zero ranges so the
/// target stays sparse.
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions, progress: Progress) -> Result<()> {
    let mut s = open_read(src, opts.src_format, opts.force_share)?;
    let size = s.size();
    if opts.dst.format == Format::Vmdk {
        return convert_to_stream_vmdk(s.as_mut(), dst, &opts.dst, progress);
    }
    let mut create_opts = opts.dst.clone();
    create_opts.size = Some(size);
    create(dst, &create_opts)?;
    let mut d = open(dst, Some(opts.dst.format), false)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let len = (size - off).min(CHUNK);
        let z = known_zero(s.as_mut(), off, len)?;
        if z > 0 {
            off += z;
            progress(off, size);
            continue;
        }
        let b = &mut buf[..len as usize];
        s.read_at(b, off)?;
        // Write only the non-zero 4 KiB blocks: the new target already reads zeroes.
        let mut i = 0;
        while i < b.len() {
            let end = (i + 4096).min(b.len());
            if b[i..end].iter().all(|&x| x == 0) {
                i = end;
                continue;
            }
            let mut j = end;
            while j < b.len() && !b[j..(j + 4096).min(b.len())].iter().all(|&x| x == 0) {
                j = (j + 4096).min(b.len());
            }
            d.write_at(&b[i..j], off + i as u64)?;
            i = j;
        }
        off += len;
        progress(off, size);
    }
    d.flush()
}

/// `convert -O vmdk -o subformat=streamOptimized`: every grain that is not all zeroes, compressed,
/// in disk order (the only way that format can be written).
fn convert_to_stream_vmdk(s: &mut dyn DiskImage, dst: &Path, opts: &CreateOptions, progress: Progress) -> Result<()> {
    match opts.subformat.as_deref() {
        Some("streamOptimized") => {}
        other => {
            return Err(Error::unsupported(
                dst,
                format!(
                    "writing VMDK subformat {:?}: only subformat=streamOptimized is written",
                    other.unwrap_or("monolithicSparse")
                ),
            ));
        }
    }
    let size = s.size();
    let mut w = StreamWriter::create(dst, size, opts.adapter_type)?;
    let mut buf = vec![0u8; STREAM_GRAIN as usize];
    let mut off = 0;
    while off < size {
        let len = (size - off).min(STREAM_GRAIN);
        if known_zero(s, off, len)? < len {
            let b = &mut buf[..len as usize];
            s.read_at(b, off)?;
            if b.iter().any(|&x| x != 0) {
                w.write_grain(off / STREAM_GRAIN, b)?;
            }
        }
        off += len;
        progress(off, size);
    }
    w.finish()
}

/// Result of [`compare`].
#[derive(Debug, PartialEq, Eq)]
pub enum CompareResult {
    Identical,
    /// First differing byte offset.
    Mismatch(u64),
    /// Only with `strict`: the sizes differ.
    SizeMismatch,
}

/// What [`compare`] compares and how.
pub struct CompareOptions {
    pub format_a: Option<Format>,
    pub format_b: Option<Format>,
    /// Images of different sizes differ (otherwise the longer one's tail must read zeroes).
    pub strict: bool,
    /// Read images others may be writing (`-U`).
    pub force_share: bool,
}

/// `compare`: content equality; the longer image's tail must be zero unless `strict`.
pub fn compare(a: &Path, b: &Path, opts: &CompareOptions, progress: Progress) -> Result<CompareResult> {
    let (strict, force_share) = (opts.strict, opts.force_share);
    let mut x = open_read(a, opts.format_a, force_share)?;
    let mut y = open_read(b, opts.format_b, force_share)?;
    let (sx, sy) = (x.size(), y.size());
    if strict && sx != sy {
        return Ok(CompareResult::SizeMismatch);
    }
    let total = sx.max(sy);
    let mut bx = vec![0u8; CHUNK as usize];
    let mut by = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < total {
        let len = (total - off).min(CHUNK);
        let zx = if off < sx { known_zero(x.as_mut(), off, len.min(sx - off))? } else { len };
        let zy = if off < sy { known_zero(y.as_mut(), off, len.min(sy - off))? } else { len };
        let both_zero = zx.min(zy);
        if both_zero > 0 {
            off += both_zero;
            progress(off, total);
            continue;
        }
        let read = |img: &mut Box<dyn DiskImage>, buf: &mut [u8], size: u64| -> Result<()> {
            buf.fill(0);
            if off < size {
                let n = (size - off).min(buf.len() as u64) as usize;
                img.read_at(&mut buf[..n], off)?;
            }
            Ok(())
        };
        read(&mut x, &mut bx[..len as usize], sx)?;
        read(&mut y, &mut by[..len as usize], sy)?;
        if let Some(i) = bx[..len as usize].iter().zip(&by[..len as usize]).position(|(p, q)| p != q) {
            return Ok(CompareResult::Mismatch(off + i as u64));
        }
        off += len;
        progress(off, total);
    }
    Ok(CompareResult::Identical)
}

/// `commit`: writes what the top image holds into its backing file, then (unless `keep`)
/// empties the top image.
pub fn commit(path: &Path, format: Option<Format>, keep: bool, progress: Progress) -> Result<()> {
    if opened_format(path, format)? != Format::Qcow2 {
        return Err(Error::invalid(path, "commit needs a qcow2 image with a backing file"));
    }
    let mut top = Qcow2::open(path, Access::Read)?;
    let Some((bpath, bfmt)) = top.backing_target()? else {
        return Err(Error::invalid(path, "image has no backing file to commit into"));
    };
    let mut base = open(&bpath, bfmt, false)?;
    let size = top.size();
    if base.size() < size {
        base.resize(size)?;
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let e = top.block_status(off, (size - off).min(CHUNK))?;
        match e.status {
            Status::Unallocated => {}
            Status::Zero => base.write_zeroes(off, e.len)?,
            Status::Data { .. } | Status::Compressed => {
                let b = &mut buf[..e.len as usize];
                top.read_at(b, off)?;
                base.write_at(b, off)?;
            }
        }
        off += e.len;
        progress(off, size);
    }
    base.flush()?;
    drop(base);
    drop(top);
    if !keep {
        Qcow2::open(path, Access::Write)?.make_empty()?;
    }
    Ok(())
}

/// `rebase`: points the image at a new backing file (`None`: no backing file). In safe mode,
/// first copies into the image every range where the old and new backing contents differ, so
/// the guest-visible content is unchanged.
pub fn rebase(
    path: &Path,
    new_backing: Option<&str>,
    new_format: Option<Format>,
    unsafe_mode: bool,
    progress: Progress,
) -> Result<()> {
    if opened_format(path, None)? != Format::Qcow2 {
        return Err(Error::invalid(path, "rebase needs a qcow2 image"));
    }
    let new_format = match (new_backing, new_format) {
        (Some(name), None) => Some(probe(&crate::resolve_backing(path, name))?),
        (_, f) => f,
    };
    if !unsafe_mode {
        let mut img = open(path, Some(Format::Qcow2), false)?;
        let mut new = match new_backing {
            Some(name) => Some(open(crate::resolve_backing(path, name), new_format, true)?),
            None => None,
        };
        let size = img.size();
        let mut old_buf = vec![0u8; CHUNK as usize];
        let mut new_buf = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < size {
            let e = img.block_status(off, (size - off).min(CHUNK))?;
            if e.status == Status::Unallocated {
                let n = e.len as usize;
                img.read_at(&mut old_buf[..n], off)?;
                new_buf[..n].fill(0);
                if let Some(nb) = new.as_mut() {
                    let nsize = nb.size();
                    if off < nsize {
                        let m = (nsize - off).min(e.len) as usize;
                        nb.read_at(&mut new_buf[..m], off)?;
                    }
                }
                if old_buf[..n] != new_buf[..n] {
                    img.write_at(&old_buf[..n], off)?;
                }
            }
            off += e.len;
            progress(off, size);
        }
        img.flush()?;
    }
    let mut img = Qcow2::open(path, Access::Write)?;
    img.set_backing_file(new_backing, new_format)
}

/// A new virtual size for [`resize`]: absolute, or relative to the current one (qemu-img's
/// `SIZE`, `+DELTA`, `-DELTA`; the caller parses the text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeChange {
    To(u64),
    Grow(u64),
    Shrink(u64),
}

/// `resize`: to a new virtual size; shrinking needs `shrink`. Returns the new size.
pub fn resize(path: &Path, format: Option<Format>, change: SizeChange, shrink: bool) -> Result<u64> {
    let mut img = open_with(path, &OpenOptions { format, access: Access::Write, open_backing: true })?;
    let cur = img.size();
    let new = match change {
        SizeChange::To(bytes) => bytes,
        SizeChange::Grow(by) => cur.checked_add(by).ok_or_else(|| Error::invalid(path, format!("{cur} + {by} bytes is too large")))?,
        SizeChange::Shrink(by) => {
            cur.checked_sub(by).ok_or_else(|| Error::invalid(path, format!("cannot shrink {cur} bytes by {by}")))?
        }
    };
    if new < cur && !shrink {
        return Err(Error::invalid(
            path,
            "use the --shrink option to confirm shrinking (data beyond the new size is lost)",
        ));
    }
    img.resize(new)?;
    img.flush()?;
    Ok(new)
}

/// What `img snapshot` does to an image's internal snapshots.
#[derive(Clone, Copy, Debug)]
pub enum SnapshotAction<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

/// `snapshot` (qemu-img's): lists, creates, reverts to or deletes an internal snapshot of a
/// qcow2 image; other formats are refused naming the file. Returns the snapshots afterwards.
pub fn snapshot(path: &Path, format: Option<Format>, action: SnapshotAction, force_share: bool) -> Result<Vec<SnapshotInfo>> {
    let access = match action {
        SnapshotAction::List if force_share => Access::ReadShared,
        SnapshotAction::List => Access::Read,
        _ => Access::Write,
    };
    let format = opened_format(path, format)?;
    let mut img = open_with(path, &OpenOptions { format: Some(format), access, open_backing: false })?;
    let q = crate::snapshot_capable(img.as_mut())?;
    match action {
        SnapshotAction::List => {}
        SnapshotAction::Create(name) => {
            q.create_snapshot(name)?;
        }
        SnapshotAction::Apply(name) => q.apply_snapshot(name)?,
        SnapshotAction::Delete(name) => q.delete_snapshot(name)?,
    }
    let list = q.snapshots()?;
    img.flush()?;
    Ok(list)
}

/// A Unix timestamp as "YYYY-MM-DD HH:MM:SS" in UTC (qemu-img's snapshot dates, virsh's lease
/// expiry).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a proleptic Gregorian date (era-based, exact for any u32 time).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `snapshot -l` as qemu-img prints it (dates in UTC).
pub fn snapshot_list_text(list: &[SnapshotInfo]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out += &format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
    for s in list {
        let clock_secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            clock_secs / 3600,
            clock_secs % 3600 / 60,
            clock_secs % 60,
            s.vm_clock_nsec % 1_000_000_000 / 1_000_000
        );
        out += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            utc_date(u64::from(s.date_sec)),
            clock,
            s.icount.map_or("--".to_string(), |n| n.to_string())
        );
    }
    out
}

/// `snapshot -l --json` and `info`'s "snapshots": one object per snapshot, with qemu-img info's
/// field names (and the disk size).
pub fn snapshot_list_json(list: &[SnapshotInfo]) -> Value {
    Value::Array(
        list.iter()
            .map(|s| {
                let mut v = json!({
                    "id": s.id,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "disk-size": s.disk_size,
                });
                if let Some(n) = s.icount {
                    v["icount"] = json!(n);
                }
                v
            })
            .collect(),
    )
}
