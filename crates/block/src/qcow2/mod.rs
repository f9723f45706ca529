//! qcow2 images: lookup through L1/L2 tables, reads (normal, zero, compressed clusters, backing
//! fall-through), allocating writes with copy-on-write, zeroing and discard, resize.
//! Cluster allocation, refcounts and the ordered write-back live in `alloc`; `check` walks the
//! metadata to find corruptions and leaks; `metamap` knows where metadata lies, and every L2
//! entry is checked against it (and the end of the file) before anything follows it.
mod alloc;
mod bitmaps;
pub use bitmaps::{BitmapInfo, DirtyBitmap};
mod cache;
pub mod check;
mod header;
mod metamap;
mod snapshot;
pub use snapshot::SnapshotInfo;

use crate::error::{Error, Result};
use crate::{Access, CreateOptions, DiskImage, Extent, Format, ImageInfo, Qcow2Details, Status, check_range, resolve_backing};
use cache::MetaCache;
pub(crate) use header::MAGIC;
use header::*;
use metamap::{MetaKind, MetaMap};
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
const REFT_OFFSET_MASK: u64 = !0x1ff;

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L2Entry {
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64>, copied: bool },
    Normal { host: u64, copied: bool },
    /// Compressed data at `host` spanning `len` bytes of the file.
    Compressed { host: u64, len: u64 },
}

/// How [`Qcow2::zero_clusters`] changes whole clusters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    /// Make the cluster unallocated (falls through to the backing file).
    Unmap,
    /// Set the zero flag (v3): reads zeroes even with a backing file.
    ZeroFlag,
}

/// An open qcow2 image.
pub struct Qcow2 {
    path: PathBuf,
    file: Box<dyn Storage>,
    readonly: bool,
    h: Header,
    cb: u32,
    cs: u64,
    l1: Vec<u64>,
    l1_dirty: bool,
    reftable: Vec<u64>,
    reftable_dirty: bool,
    /// The header's refcount table fields changed (table moved) and must be rewritten.
    reftable_moved: bool,
    l2_cache: MetaCache,
    rb_cache: MetaCache,
    file_len: u64,
    /// First cluster index past everything allocated or present in the file.
    end_cluster: u64,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Host clusters (first index, count) to dereference once the tables that dropped them are
    /// durable.
    pending_free: Vec<(u64, u64)>,
    /// Something was written since the last fdatasync.
    unsynced: bool,
    backing: Option<Box<dyn DiskImage>>,
    /// Last decompressed cluster (host offset of the compressed data, contents).
    compressed_cache: Option<(u64, Vec<u8>)>,
    /// Where the metadata lies: no data pointer may lead into it.
    meta: MetaMap,
    /// Persistent dirty bitmaps (see `bitmaps`).
    bitmaps: Vec<bitmaps::Bitmap>,
    /// The bitmaps on disk are marked in_use by us or changed: write them back at close.
    bitmaps_to_store: bool,
}

/// Creates a qcow2 image: header, one refcount table cluster and one refcount block, then grows
/// the (initially empty) L1 table to `size` through the ordinary resize path.
pub fn create(path: &Path, size: u64, opts: &CreateOptions, backing_format: Option<Format>) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&cs) {
        return Err(Error::invalid(path, format!("cluster size {cs} must be a power of two between 512 and 2M")));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 || (opts.compat_v2 && rb != 16) {
        return Err(Error::invalid(path, format!("refcount bits {rb} must be a power of two up to 64 (16 for compat=0.10)")));
    }
    let h = Header {
        version: if opts.compat_v2 { 2 } else { 3 },
        cluster_bits: cs.trailing_zeros(),
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: rb.trailing_zeros(),
        header_length: if opts.compat_v2 { V2_HEADER_LEN } else { OUR_HEADER_LEN },
        backing_file: opts.backing_file.clone(),
        backing_format: backing_format.map(|f| f.name().to_string()),
        extensions: Vec::new(),
    };
    let mut first = h.to_cluster(path)?;
    let mut table = vec![0u8; cs as usize];
    table[0..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 {
        alloc::set_rc(&mut block, i, h.refcount_order, 1);
    }
    first.extend_from_slice(&table);
    first.extend_from_slice(&block);
    let mut file = FileStorage(crate::create_locked(path)?);
    file.write_at(&first, 0).map_err(Error::io(path, "write"))?;
    file.sync_data().map_err(Error::io(path, "fdatasync"))?;
    let mut img = Qcow2::open_on(Box::new(file), path, false)?;
    img.resize(size)?;
    img.flush()
}

impl Qcow2 {
    /// Opens a qcow2 file without its backing chain (see [`crate::open`] for the chain) and
    /// takes its locks.
    pub fn open(path: &Path, access: Access) -> Result<Qcow2> {
        let file = crate::open_locked(path, access)?;
        Qcow2::open_on(Box::new(FileStorage(file)), path, access.readonly())
    }

    /// A qcow2 image over any storage, without its backing chain; `path` names it in errors
    /// and is where relative backing file names start.
    pub fn open_on(file: Box<dyn Storage>, path: &Path, readonly: bool) -> Result<Qcow2> {
        let file_len = file.file_len().map_err(Error::io(path, "stat"))?;
        let mut first = vec![0u8; file_len.min(1 << MAX_CLUSTER_BITS) as usize];
        file.read_at(&mut first, 0).map_err(Error::io(path, "read header"))?;
        let h = Header::parse(path, &first, file_len)?;
        let cs = h.cluster_size();
        let unknown = h.incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION);
        if unknown != 0 {
            return Err(Error::unsupported(path, format!("incompatible features: {}", h.incompatible_names(unknown))));
        }
        if !readonly {
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::invalid(path, "image is marked corrupt; open it read-only or repair it"));
            }
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(Error::unsupported(
                    path,
                    "image was not closed cleanly (dirty, lazy refcounts): repair it with `qemu-img check -r all` first",
                ));
            }
        }
        let read_table = |off: u64, entries: u64, what: &'static str| -> Result<Vec<u64>> {
            let mut raw = vec![0u8; (entries * 8) as usize];
            file.read_at(&mut raw, off).map_err(Error::io(path, what))?;
            Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        };
        let l1 = read_table(h.l1_table_offset, u64::from(h.l1_size), "read L1 table")?;
        for (i, &e) in l1.iter().enumerate() {
            let off = e & L1E_OFFSET_MASK;
            if e & L1E_RESERVED != 0 || off % cs != 0 || (off != 0 && off.saturating_add(cs) > file_len) {
                return Err(Error::corrupt(path, format!("L1 entry {i} ({e:#x}) is invalid or points past the end of the file")));
            }
        }
        let rt_entries = u64::from(h.refcount_table_clusters) * cs / 8;
        let reftable = read_table(h.refcount_table_offset, rt_entries, "read refcount table")?;
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if e & !REFT_OFFSET_MASK != 0 || off % cs != 0 || (off != 0 && off.saturating_add(cs) > file_len) {
                return Err(Error::corrupt(
                    path,
                    format!("refcount table entry {i} ({e:#x}) is invalid or points past the end of the file"),
                ));
            }
        }
        let mut img = Qcow2 {
            path: path.to_path_buf(),
            file,
            readonly,
            cb: h.cluster_bits,
            cs,
            l1,
            l1_dirty: false,
            reftable,
            reftable_dirty: false,
            reftable_moved: false,
            l2_cache: MetaCache::new(((8 << 20) / cs) as usize),
            rb_cache: MetaCache::new(((1 << 20) / cs) as usize),
            file_len,
            end_cluster: file_len.div_ceil(cs),
            free_hint: 0,
            pending_free: Vec::new(),
            unsynced: false,
            backing: None,
            compressed_cache: None,
            meta: MetaMap::default(),
            bitmaps: Vec::new(),
            bitmaps_to_store: false,
            h,
        };
        img.meta = img.map_metadata()?;
        img.open_bitmaps()?;
        Ok(img)
    }

    /// Finds every metadata cluster: header, L1 and refcount tables, refcount blocks, L2
    /// tables (active and of snapshots), the snapshot table and snapshot L1 tables, bitmaps.
    /// Two structures sharing a cluster make the image corrupt.
    fn map_metadata(&self) -> Result<MetaMap> {
        let (path, cb, cs) = (self.path.as_path(), self.cb, self.cs);
        let mut m = MetaMap::default();
        m.insert(path, cb, 0, cs, MetaKind::Header)?;
        m.insert(path, cb, self.h.l1_table_offset, u64::from(self.h.l1_size) * 8, MetaKind::L1Table)?;
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * cs;
        m.insert(path, cb, self.h.refcount_table_offset, rt_bytes, MetaKind::RefcountTable)?;
        let present = |off: &u64| *off != 0;
        for off in self.reftable.iter().map(|e| e & REFT_OFFSET_MASK).filter(present) {
            m.insert(path, cb, off, cs, MetaKind::RefcountBlock)?;
        }
        for off in self.l1.iter().map(|e| e & L1E_OFFSET_MASK).filter(present) {
            m.insert(path, cb, off, cs, MetaKind::L2Table)?;
        }
        let (snapshots, table_bytes) = self.read_snapshot_table()?;
        m.insert(path, cb, self.h.snapshots_offset, table_bytes, MetaKind::SnapshotTable)?;
        for (i, s) in snapshots.iter().enumerate() {
            m.insert(path, cb, s.l1_offset, u64::from(s.l1_size) * 8, MetaKind::SnapshotL1Table)?;
            for e in self.read_snapshot_l1(s)? {
                let off = e & L1E_OFFSET_MASK;
                if e & L1E_RESERVED != 0 || off.saturating_add(cs) > self.file_len {
                    return Err(Error::corrupt(path, format!("snapshot {i}: L1 entry {e:#x} is invalid or past the end of the file")));
                }
                if off != 0 {
                    m.insert(path, cb, off, cs, MetaKind::L2Table)?;
                }
            }
        }
        for (off, len, _) in self.bitmap_regions()? {
            m.insert(path, cb, off, len, MetaKind::Bitmap)?;
        }
        Ok(m)
    }

    /// Refuses an entry whose data lies past the end of the file or inside metadata: writing
    /// or freeing through it would destroy the image.
    fn check_host(&self, e: L2Entry) -> Result<()> {
        let (host, len) = match e {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. } => (host, self.cs),
            L2Entry::Compressed { host, len } => (host, len),
            L2Entry::Zero { host: None, .. } | L2Entry::Unallocated => return Ok(()),
        };
        if host >= self.file_len {
            return Err(Error::corrupt(
                &self.path,
                format!("data cluster at {host:#x} is past the end of the file ({} bytes)", self.file_len),
            ));
        }
        self.meta.check_data(&self.path, self.cb, host, len.min(self.file_len - host))
    }

    /// The backing file to open (resolved path and recorded format), if the image names one.
    pub fn backing_target(&self) -> Result<Option<(PathBuf, Option<Format>)>> {
        let Some(name) = &self.h.backing_file else { return Ok(None) };
        let fmt = match &self.h.backing_format {
            None => None,
            Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                Error::unsupported(&self.path, format!("backing file format {f:?}"))
            })?),
        };
        Ok(Some((resolve_backing(&self.path, name), fmt)))
    }

    /// Attaches the opened backing image.
    pub fn set_backing_image(&mut self, backing: Box<dyn DiskImage>) {
        self.backing = Some(backing);
    }

    /// Records a new backing file name and format in the header (`None` removes the backing
    /// file). Data is not touched: callers (rebase) copy what must be preserved first.
    pub fn set_backing_file(&mut self, name: Option<&str>, format: Option<Format>) -> Result<()> {
        self.writable()?;
        self.flush()?;
        let mut h = self.h.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(|f| f.name().to_string());
        let first = h.to_cluster(&self.path)?;
        self.pwrite(&first, 0, "write header")?;
        self.sync()?;
        self.h = h;
        Ok(())
    }

    /// Makes every cluster of this layer unallocated (qemu-img commit empties the top image).
    pub fn make_empty(&mut self) -> Result<()> {
        self.writable()?;
        self.mark_dirty(0, self.h.size);
        let clusters = self.h.size.div_ceil(self.cs);
        self.zero_clusters(0, clusters, ZeroMode::Unmap)?;
        self.flush()
    }

    fn writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::invalid(&self.path, "image is open read-only"));
        }
        Ok(())
    }

    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    /// (L1 index, L2 index) of a guest offset.
    fn indices(&self, off: u64) -> (usize, usize) {
        let cluster = off >> self.cb;
        let l2_bits = self.cb - 3;
        ((cluster >> l2_bits) as usize, (cluster & (self.l2_entries() - 1)) as usize)
    }

    fn pwrite(&mut self, buf: &[u8], off: u64, op: &'static str) -> Result<()> {
        self.unsynced = true;
        self.file.write_at(buf, off).map_err(Error::io(&self.path, op))
    }

    /// Reads file bytes; what lies past the end of the file reads as zeroes.
    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file.read_at(buf, off).map_err(Error::io(&self.path, "read"))
    }

    fn sync(&mut self) -> Result<()> {
        if self.unsynced {
            self.file.sync_data().map_err(Error::io(&self.path, "fdatasync"))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Reads one metadata cluster, which must lie inside the file.
    fn read_meta(&self, off: u64, what: &str) -> Result<Vec<u8>> {
        if off % self.cs != 0 || off.saturating_add(self.cs) > self.file_len {
            return Err(Error::corrupt(&self.path, format!("{what} at {off:#x} is unaligned or past the end of the file")));
        }
        let mut buf = vec![0u8; self.cs as usize];
        self.file.read_at(&mut buf, off).map_err(Error::io(&self.path, "read metadata"))?;
        Ok(buf)
    }

    /// Loads an L2 table into the cache (evicting, with ordered write-back, if full).
    fn l2_table(&mut self, off: u64) -> Result<&mut cache::Slot> {
        if !self.l2_cache.contains(off) {
            self.evict_one_l2()?;
            let data = self.read_meta(off, "L2 table")?;
            return Ok(self.l2_cache.insert(off, data, false));
        }
        self.l2_cache
            .get_mut(off)
            .ok_or_else(|| Error::corrupt(&self.path, "L2 cache lost an entry"))
    }

    fn l2_get(&mut self, l2_off: u64, idx: usize) -> Result<u64> {
        let slot = self.l2_table(l2_off)?;
        let b = &slot.data[idx * 8..idx * 8 + 8];
        Ok(u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn l2_set(&mut self, l2_off: u64, idx: usize, val: u64) -> Result<()> {
        let slot = self.l2_table(l2_off)?;
        slot.data[idx * 8..idx * 8 + 8].copy_from_slice(&val.to_be_bytes());
        slot.dirty = true;
        Ok(())
    }

    /// The decoded entry `idx` of an L2 table, refused if it points outside the data area.
    fn entry(&mut self, l2_off: u64, idx: usize) -> Result<L2Entry> {
        let raw = self.l2_get(l2_off, idx)?;
        let e = self.decode(raw)?;
        self.check_host(e)?;
        Ok(e)
    }

    fn decode(&self, e: u64) -> Result<L2Entry> {
        if e & OFLAG_COMPRESSED != 0 {
            let x = 62 - (self.cb - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (self.cb - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(L2Entry::Compressed { host, len });
        }
        let host = e & L2E_OFFSET_MASK;
        let copied = e & OFLAG_COPIED != 0;
        if e & L2E_RESERVED != 0 || host % self.cs != 0 {
            return Err(Error::corrupt(&self.path, format!("L2 entry {e:#x} has reserved bits set or is unaligned")));
        }
        if e & OFLAG_ZERO != 0 {
            if self.h.version < 3 {
                return Err(Error::corrupt(&self.path, format!("L2 entry {e:#x}: zero flag in a version 2 image")));
            }
            return Ok(L2Entry::Zero { host: (host != 0).then_some(host), copied });
        }
        if host == 0 {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal { host, copied })
    }

    /// The entry for the cluster holding guest offset `off`, and how many bytes from `off`
    /// (at most `max`) continue with the same kind of entry (contiguous on the host for data).
    fn run_at(&mut self, off: u64, max: u64) -> Result<(L2Entry, u64)> {
        let (l1i, l2i) = self.indices(off);
        let in_cluster = off & (self.cs - 1);
        let l2_off = self.l1.get(l1i).map_or(0, |e| e & L1E_OFFSET_MASK);
        let table_left = (self.l2_entries() - l2i as u64) * self.cs - in_cluster;
        if l2_off == 0 {
            return Ok((L2Entry::Unallocated, table_left.min(max)));
        }
        let first = self.entry(l2_off, l2i)?;
        let mut len = (self.cs - in_cluster).min(max);
        if matches!(first, L2Entry::Compressed { .. }) {
            return Ok((first, len));
        }
        let mut i = l2i + 1;
        while len < max && (i as u64) < self.l2_entries() {
            // An entry that does not decode ends the run; the caller meets its error next.
            let Ok(next) = self.l2_get(l2_off, i).and_then(|raw| self.decode(raw)) else { break };
            let same = match (first, next) {
                (L2Entry::Normal { host: a, copied: ca }, L2Entry::Normal { host: b, copied: cb }) => {
                    ca == cb && b == a + (i - l2i) as u64 * self.cs
                }
                (L2Entry::Zero { .. }, L2Entry::Zero { .. }) => true,
                (L2Entry::Unallocated, L2Entry::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + self.cs).min(max);
            i += 1;
        }
        if let L2Entry::Normal { host, .. } = first {
            len = self.clamp_data_run(host, in_cluster, len);
        }
        Ok((first, len))
    }

    /// Cuts a contiguous data run starting at `host` (already checked) before the first cluster
    /// that lies past the end of the file or holds metadata, so that no read or write of the
    /// run reaches it; the next lookup then reports that cluster as corrupt.
    fn clamp_data_run(&self, host: u64, in_cluster: u64, len: u64) -> u64 {
        let clusters = (in_cluster + len).div_ceil(self.cs);
        // An empty run (a zero-length request on an empty image) has nothing to cut.
        if clusters <= 1 {
            return len;
        }
        let first = host >> self.cb;
        let mut good = clusters.min((self.file_len - host).div_ceil(self.cs));
        if let Some((c, _)) = self.meta.first_in(first + 1, good - 1) {
            good = c - first;
        }
        len.min(good * self.cs - in_cluster)
    }

    fn read_backing(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = if off < bsize { (bsize - off).min(buf.len() as u64) as usize } else { 0 };
        if n > 0 {
            b.read_at(&mut buf[..n], off)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn decompress(&mut self, host: u64, len: u64) -> Result<&[u8]> {
        if self.compressed_cache.as_ref().is_none_or(|(h, _)| *h != host) {
            let avail = self.file_len.saturating_sub(host).min(len);
            if avail == 0 {
                return Err(Error::corrupt(&self.path, format!("compressed cluster at {host:#x} is past the end of the file")));
            }
            let mut input = vec![0u8; avail as usize];
            self.pread(&mut input, host)?;
            let out = crate::deflate::inflate(&input, self.cs as usize, crate::deflate::Framing::Raw)
                .map_err(|e| Error::corrupt(&self.path, format!("compressed cluster at {host:#x}: {e}")))?;
            if out.len() as u64 != self.cs {
                return Err(Error::corrupt(&self.path, format!("compressed cluster at {host:#x} inflates to {} bytes", out.len())));
            }
            self.compressed_cache = Some((host, out));
        }
        Ok(self.compressed_cache.as_ref().map_or(&[][..], |(_, d)| d.as_slice()))
    }

    /// Reads a run that `run_at` reported.
    fn read_run(&mut self, buf: &mut [u8], off: u64, entry: L2Entry) -> Result<()> {
        let in_cluster = off & (self.cs - 1);
        match entry {
            L2Entry::Unallocated => self.read_backing(buf, off),
            L2Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => self.pread(buf, host + in_cluster),
            L2Entry::Compressed { host, len } => {
                let data = self.decompress(host, len)?;
                let s = in_cluster as usize;
                buf.copy_from_slice(&data[s..s + buf.len()]);
                Ok(())
            }
        }
    }

    /// Returns the L2 table covering `off`, allocating it (or copying a shared one) if needed.
    fn l2_for_write(&mut self, off: u64) -> Result<(u64, usize)> {
        let (l1i, l2i) = self.indices(off);
        let e = self.l1[l1i];
        let old = e & L1E_OFFSET_MASK;
        if old != 0 && e & OFLAG_COPIED != 0 {
            return Ok((old, l2i));
        }
        let mut contents = vec![0u8; self.cs as usize];
        if old != 0 {
            // A shared table's entries are shared too: the copy's writes must copy them first,
            // so no entry of the copy may claim COPIED (a damaged image could carry stale flags).
            let table = &self.l2_table(old)?.data;
            for (dst, src) in contents.chunks_exact_mut(8).zip(table.chunks_exact(8)) {
                let e = u64::from_be_bytes(src.try_into().unwrap_or([0; 8]));
                dst.copy_from_slice(&(e & !OFLAG_COPIED).to_be_bytes());
            }
        }
        let (new, _) = self.alloc_cluster()?;
        self.meta.insert(&self.path, self.cb, new, self.cs, MetaKind::L2Table)?;
        self.evict_one_l2()?;
        self.l2_cache.insert(new, contents, true);
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty = true;
        if old != 0 {
            self.free_later(old, self.cs);
        }
        Ok((new, l2i))
    }

    fn evict_one_l2(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.write_refcounts()?;
                self.sync()?;
            }
            if let Some(slot) = self.l2_cache.remove(victim) {
                if dirty {
                    self.pwrite(&slot.data, victim, "write L2 table")?;
                }
            }
        }
        Ok(())
    }

    /// Writes within one guest cluster whose entry is not an in-place writable data cluster:
    /// allocates a cluster, fills the rest of it with what reads returned before, and points the
    /// L2 entry at it.
    fn write_allocating(&mut self, buf: &[u8], off: u64) -> Result<()> {
        let (l2_off, l2i) = self.l2_for_write(off)?;
        let entry = self.entry(l2_off, l2i)?;
        let in_cluster = off & (self.cs - 1);
        let cluster_start = off - in_cluster;
        if let L2Entry::Normal { host, copied: true } = entry {
            return self.pwrite(buf, host + in_cluster, "write data");
        }
        let (host, fresh) = match entry {
            L2Entry::Zero { host: Some(h), copied: true } => (h, false),
            _ => self.alloc_cluster()?,
        };
        if buf.len() as u64 == self.cs {
            self.pwrite(buf, host, "write data")?;
        } else {
            let old_data = match entry {
                L2Entry::Unallocated => self.backing.is_some(),
                L2Entry::Zero { .. } => false,
                L2Entry::Normal { .. } | L2Entry::Compressed { .. } => true,
            };
            if old_data || !fresh {
                let mut whole = vec![0u8; self.cs as usize];
                if old_data {
                    // The part of the last cluster beyond the virtual size reads as zeroes.
                    let valid = (self.h.size - cluster_start).min(self.cs) as usize;
                    self.read_run(&mut whole[..valid], cluster_start, entry)?;
                }
                whole[in_cluster as usize..in_cluster as usize + buf.len()].copy_from_slice(buf);
                self.pwrite(&whole, host, "write data")?;
            } else {
                // A fresh cluster past the old end of file is a hole: it already reads as zeroes.
                self.pwrite(buf, host + in_cluster, "write data")?;
            }
        }
        self.l2_set(l2_off, l2i, host | OFLAG_COPIED)?;
        match entry {
            L2Entry::Normal { host: old, .. } => self.free_later(old, self.cs),
            L2Entry::Compressed { host: old, len } => self.free_later(old, len),
            L2Entry::Zero { host: Some(old), .. } if old != host => self.free_later(old, self.cs),
            _ => {}
        }
        Ok(())
    }

    /// Changes whole guest clusters `[first, first+count)` to unallocated or zero.
    fn zero_clusters(&mut self, first: u64, count: u64, mode: ZeroMode) -> Result<()> {
        let mut c = first;
        while c < first + count {
            let off = c << self.cb;
            let (l1i, _) = self.indices(off);
            if mode == ZeroMode::Unmap && self.l1[l1i] & L1E_OFFSET_MASK == 0 {
                // The whole L2 table is unallocated already: skip to the next table.
                c = (c / self.l2_entries() + 1) * self.l2_entries();
                continue;
            }
            let (l2_off, l2i) = self.l2_for_write(off)?;
            let raw = self.l2_get(l2_off, l2i)?;
            let entry = self.decode(raw)?;
            self.check_host(entry)?;
            let new = match mode {
                ZeroMode::Unmap => 0,
                ZeroMode::ZeroFlag => OFLAG_ZERO,
            };
            if raw != new {
                self.l2_set(l2_off, l2i, new)?;
                match entry {
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. } => self.free_later(host, self.cs),
                    L2Entry::Compressed { host, len } => self.free_later(host, len),
                    _ => {}
                }
            }
            c += 1;
        }
        Ok(())
    }

    /// Whether the cluster at `cluster_start` already reads as zeroes without a lookup below us.
    fn reads_zero(&mut self, off: u64) -> Result<bool> {
        let (entry, _) = self.run_at(off, 1)?;
        Ok(match entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    /// Zeroes `[off, off+len)`: whole clusters through metadata, partial ones with zero data.
    fn zero_range(&mut self, off: u64, len: u64, discard: bool) -> Result<()> {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let cstart = pos & !(self.cs - 1);
            let cend = (cstart + self.cs).min(self.h.size);
            let chunk_end = cend.min(end);
            let whole = pos == cstart && chunk_end == cend;
            if whole {
                // Extend over the following whole clusters.
                let n = if end == self.h.size { (end - cstart).div_ceil(self.cs) } else { (end - cstart) / self.cs };
                let mode = if self.backing.is_none() {
                    Some(ZeroMode::Unmap)
                } else if self.h.version >= 3 {
                    Some(ZeroMode::ZeroFlag)
                } else {
                    None
                };
                match mode {
                    Some(m) => self.zero_clusters(cstart >> self.cb, n, m)?,
                    None if discard => {}
                    None => self.write_zero_data(cstart, (cstart + n * self.cs).min(end) - cstart)?,
                }
                pos = (cstart + n * self.cs).min(end);
                continue;
            }
            if !discard && !self.reads_zero(pos)? {
                self.write_zero_data(pos, chunk_end - pos)?;
            }
            pos = chunk_end;
        }
        Ok(())
    }

    fn write_zero_data(&mut self, off: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Grows the L1 table to `entries`, moving it to new clusters (header switch is atomic).
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(&self.path, "virtual size too large for the L1 table limit of 32 MiB"));
        }
        self.writeback()?;
        let clusters = (entries * 8).div_ceil(self.cs);
        let new_off = self.alloc_contiguous(clusters)?;
        self.meta.insert(&self.path, self.cb, new_off, clusters * self.cs, MetaKind::L1Table)?;
        self.write_refcounts()?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&bytes, new_off, "write L1 table")?;
        self.sync()?;
        let mut fields = [0u8; 12];
        fields[0..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..12].copy_from_slice(&new_off.to_be_bytes());
        self.pwrite(&fields, OFF_L1, "write header")?;
        self.sync()?;
        if self.h.l1_size > 0 {
            let old_bytes = u64::from(self.h.l1_size) * 8;
            self.free_later(self.h.l1_table_offset, old_bytes.next_multiple_of(self.cs));
        }
        self.h.l1_size = entries as u32;
        self.h.l1_table_offset = new_off;
        self.l1 = l1;
        Ok(())
    }

    fn write_size(&mut self, size: u64) -> Result<()> {
        self.pwrite(&size.to_be_bytes(), OFF_SIZE, "write header")?;
        self.sync()?;
        self.h.size = size;
        Ok(())
    }
}

impl DiskImage for Qcow2 {
    fn info(&self) -> ImageInfo {
        let h = &self.h;
        ImageInfo {
            format: Format::Qcow2,
            path: self.path.clone(),
            virtual_size: h.size,
            cluster_size: Some(self.cs),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            full_backing_file: h.backing_file.as_deref().map(|n| resolve_backing(&self.path, n)),
            dirty: h.incompatible & INCOMPAT_DIRTY != 0,
            qcow2: Some(Qcow2Details {
                compat: if h.version >= 3 { "1.1" } else { "0.10" },
                lazy_refcounts: h.compatible & COMPAT_LAZY_REFCOUNTS != 0,
                refcount_bits: 1 << h.refcount_order,
                corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
                extended_l2: h.incompatible & INCOMPAT_EXTL2 != 0,
                has_bitmaps: h.extensions.iter().any(|e| e.kind == EXT_BITMAPS),
                bitmaps: self.bitmaps(),
                // The table was read and checked at open; only an I/O error could fail here.
                snapshots: self.snapshots().unwrap_or_default(),
            }),
        }
    }

    fn size(&self) -> u64 {
        self.h.size
    }

    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(&self.path, off, buf.len() as u64, self.h.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (entry, run) = self.run_at(pos, (buf.len() - done) as u64)?;
            let run = run as usize;
            self.read_run(&mut buf[done..done + run], pos, entry)?;
            done += run;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, buf.len() as u64, self.h.size)?;
        self.mark_dirty(off, buf.len() as u64);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (entry, run) = self.run_at(pos, (buf.len() - done) as u64)?;
            if let L2Entry::Normal { host, copied: true } = entry {
                let in_cluster = pos & (self.cs - 1);
                self.pwrite(&buf[done..done + run as usize], host + in_cluster, "write data")?;
                done += run as usize;
                continue;
            }
            let n = ((self.cs - (pos & (self.cs - 1))) as usize).min(buf.len() - done);
            self.write_allocating(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.writeback()?;
        self.sync()
    }

    fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, len, self.h.size)?;
        self.mark_dirty(off, len);
        self.zero_range(off, len, true)
    }

    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(&self.path, off, len, self.h.size)?;
        self.mark_dirty(off, len);
        self.zero_range(off, len, false)
    }

    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, off, len, self.h.size)?;
        let (entry, run) = self.run_at(off, len)?;
        let status = match entry {
            L2Entry::Unallocated => Status::Unallocated,
            L2Entry::Zero { .. } => Status::Zero,
            L2Entry::Normal { host, .. } => Status::Data { offset: Some(host + (off & (self.cs - 1))) },
            L2Entry::Compressed { .. } => Status::Compressed,
        };
        Ok(Extent { status, len: run })
    }

    fn backing_mut(&mut self) -> Option<&mut dyn DiskImage> {
        match &mut self.backing {
            Some(b) => Some(b.as_mut()),
            None => None,
        }
    }

    fn resize(&mut self, size: u64) -> Result<()> {
        self.writable()?;
        self.check_bitmaps_resizable(size)?;
        let old = self.h.size;
        if size < old {
            if self.h.nb_snapshots > 0 {
                return Err(Error::unsupported(&self.path, "shrinking an image with internal snapshots (delete them first)"));
            }
            let first = size.div_ceil(self.cs);
            let count = old.div_ceil(self.cs) - first;
            self.zero_clusters(first, count, ZeroMode::Unmap)?;
            self.writeback()?;
            self.sync()?;
            self.write_size(size)?;
            self.resize_bitmaps(old);
            return Ok(());
        }
        let per_l1 = self.cs * self.l2_entries();
        let needed = size.div_ceil(per_l1);
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        // The new range must read as zeroes: neither stale data in the old last cluster nor a
        // larger backing file may show through. The zeroes must be durable before the new size
        // is, or a power cut in between would show what they hide; until the size is written,
        // only this handle knows the range exists.
        let mut zero_to = old.next_multiple_of(self.cs).min(size);
        if let Some(b) = &self.backing {
            zero_to = zero_to.max(b.size().min(size));
        }
        if zero_to > old {
            self.h.size = size;
            let zeroed = self.zero_range(old, zero_to - old, false).and_then(|_| self.writeback()).and_then(|_| self.sync());
            self.h.size = old;
            zeroed?;
        }
        self.write_size(size)?;
        self.resize_bitmaps(old);
        self.flush()
    }

    fn as_qcow2(&mut self) -> Option<&mut Qcow2> {
        Some(self)
    }
}

impl Qcow2 {
    /// Flushes and writes the dirty bitmaps back, reporting failures (dropping the image does
    /// the same but cannot report them).
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        self.store_bitmaps()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.readonly {
            let _ = self.flush();
            let _ = self.store_bitmaps();
        }
    }
}
