//! The qcow2 header: parsing with bounds checks, and serialisation of the whole first cluster
//! (fixed fields, header extensions, backing file name) so that it can be rewritten in one write.
use crate::error::{Error, Result};
use std::path::Path;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// qemu refuses L1 tables above 32 MiB; so do we (bounds the allocation at open).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu refuses refcount tables above 8 MiB; so do we.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on the backing file name.
pub(crate) const MAX_BACKING_NAME: usize = 1023;

pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_HEADER_LEN: u32 = 104;
/// Header length we write: v3 plus the compression type byte, padded to 8.
pub(crate) const OUR_HEADER_LEN: u32 = 112;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;

/// Byte offsets of header fields that are updated in place.
pub(crate) const OFF_SIZE: u64 = 24;
pub(crate) const OFF_L1: u64 = 36; // l1_size (u32) then l1_table_offset (u64): 12 bytes
pub(crate) const OFF_REFTABLE: u64 = 48; // refcount_table_offset (u64) then clusters (u32): 12 bytes
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// A header extension we do not interpret but keep when rewriting the header.
#[derive(Clone, Debug)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The decoded qcow2 header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Extensions kept verbatim on rewrite (bitmaps, feature names, unknown ones).
    pub extensions: Vec<Extension>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Decodes the header from the start of the file. `first` holds up to the first cluster
    /// (fewer bytes if the file is shorter); `file_len` is the file's length.
    pub fn parse(path: &Path, first: &[u8], file_len: u64) -> Result<Header> {
        let bad = |r: String| Error::corrupt(path, r);
        if first.len() < V2_HEADER_LEN as usize || &first[0..4] != MAGIC {
            return Err(bad("not a qcow2 image (bad magic or file shorter than the header)".into()));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(path, format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        let crypt = be32(first, 32);
        if crypt != 0 {
            return Err(Error::unsupported(path, format!("encryption method {crypt}")));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            extensions: Vec::new(),
        };
        if version == 3 {
            if first.len() < V3_HEADER_LEN as usize {
                return Err(bad("file shorter than the version 3 header".into()));
            }
            h.incompatible = be64(first, 72);
            h.compatible = be64(first, 80);
            h.autoclear = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length % 8 != 0 {
                return Err(bad(format!("header_length {} invalid", h.header_length)));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > first.len() {
                return Err(bad(format!("header_length {} beyond the first cluster", h.header_length)));
            }
            if h.header_length > V3_HEADER_LEN && first[104] != 0 {
                return Err(Error::unsupported(path, format!("compression type {} (only zlib)", first[104])));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} above 6", h.refcount_order)));
        }
        // Table placement and sizes, all bounded before anything is allocated from them.
        let l2_entries = cs / 8;
        let per_l1 = cs * l2_entries;
        let needed_l1 = h.size.div_ceil(per_l1);
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {} entries exceeds 32 MiB", h.l1_size)));
        }
        if needed_l1 > u64::from(h.l1_size) {
            return Err(bad(format!(
                "L1 table of {} entries too small for virtual size {} (needs {needed_l1})",
                h.l1_size, h.size
            )));
        }
        check_table(path, "L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8, cs, file_len)?;
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES || rt_bytes == 0 {
            return Err(bad(format!(
                "refcount table of {} clusters is empty or exceeds 8 MiB",
                h.refcount_table_clusters
            )));
        }
        check_table(path, "refcount table", h.refcount_table_offset, rt_bytes, cs, file_len)?;
        if h.nb_snapshots > 0 {
            check_table(path, "snapshot table", h.snapshots_offset, 1, cs, file_len)?;
        }
        h.parse_extensions(path, first)?;
        let bf_off = be64(first, 8);
        let bf_len = be32(first, 16) as usize;
        if bf_off != 0 {
            if bf_len > MAX_BACKING_NAME {
                return Err(bad(format!("backing file name of {bf_len} bytes (limit 1023)")));
            }
            let end = bf_off.checked_add(bf_len as u64).filter(|&e| e <= first.len() as u64 && e <= cs);
            let Some(end) = end else {
                return Err(bad("backing file name lies outside the first cluster".into()));
            };
            let name = &first[bf_off as usize..end as usize];
            if name.contains(&0) {
                return Err(bad("backing file name contains NUL bytes".into()));
            }
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, first: &[u8]) -> Result<()> {
        let mut off = self.header_length as usize;
        loop {
            if off + 8 > first.len() {
                return Err(Error::corrupt(path, "header extensions run past the first cluster"));
            }
            let kind = be32(first, off);
            let len = be32(first, off + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let start = off + 8;
            let end = start.checked_add(len).filter(|&e| e <= first.len());
            let Some(end) = end else {
                return Err(Error::corrupt(path, format!("header extension {kind:#x} of {len} bytes runs past the first cluster")));
            };
            let data = &first[start..end];
            match kind {
                EXT_BACKING_FORMAT => {
                    let fmt = String::from_utf8(data.to_vec())
                        .map_err(|_| Error::corrupt(path, "backing format is not UTF-8"))?;
                    self.backing_format = Some(fmt);
                }
                _ => self.extensions.push(Extension { kind, data: data.to_vec() }),
            }
            off = start + len.next_multiple_of(8);
        }
    }

    /// Names of incompatible feature bits, from the feature name table if the image has one.
    pub fn incompatible_names(&self, bits: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let from_table = self.extensions.iter().filter(|e| e.kind == EXT_FEATURE_TABLE).find_map(|e| {
                e.data.chunks_exact(48).find(|c| c[0] == 0 && u32::from(c[1]) == bit).map(|c| {
                    let n = &c[2..48];
                    let n = &n[..n.iter().position(|&b| b == 0).unwrap_or(n.len())];
                    String::from_utf8_lossy(n).into_owned()
                })
            });
            let known = match bit {
                0 => "dirty",
                1 => "corrupt",
                2 => "external data file",
                3 => "compression type",
                4 => "extended L2 entries",
                _ => "unknown",
            };
            names.push(from_table.unwrap_or_else(|| format!("{known} (bit {bit})")));
        }
        names.join(", ")
    }

    /// Serialises the first cluster: fixed fields, extensions, end marker, backing file name.
    pub fn to_cluster(&self, path: &Path) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for e in &self.extensions {
            push_ext(&mut b, e.kind, &e.data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME {
                return Err(Error::invalid(path, format!("backing file name longer than {MAX_BACKING_NAME} bytes")));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err(Error::invalid(path, "header, extensions and backing name do not fit in the first cluster"));
        }
        b.resize(cs, 0);
        Ok(b)
    }
}

/// A metadata table must be cluster aligned, non-overlapping the header and inside the file.
pub(crate) fn check_table(path: &Path, what: &str, offset: u64, bytes: u64, cs: u64, file_len: u64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if offset == 0 || offset % cs != 0 {
        return Err(Error::corrupt(path, format!("{what} offset {offset:#x} is zero or not cluster aligned")));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            path,
            format!("{what} at {offset:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"),
        )),
    }
}
