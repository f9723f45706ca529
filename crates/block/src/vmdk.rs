//! VMDK: read as an input format (for `convert`, e.g. OVA imports) from single-file sparse
//! extents, both monolithicSparse and streamOptimized (compressed grains, footer at the end);
//! written only as streamOptimized ([`StreamWriter`], for OVF exports), the one subformat every
//! OVF consumer reads. Split or flat descriptor-based layouts are refused with a clear error.
use crate::error::{Error, Result};
use crate::{Access, DiskImage, Extent, Format, ImageInfo, Status, check_range};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
const GD_AT_END: u64 = u64::MAX;
/// The header's line-ending check characters are valid (always set by writers).
const FLAG_NEWLINE_TEST: u32 = 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// Grain directories above this many entries (64 MiB) are refused.
const MAX_GD_ENTRIES: u64 = 16 << 20;
/// Most grain tables kept in memory at once.
const GT_CACHE: usize = 256;

/// An open VMDK sparse extent.
pub struct VmdkImage {
    path: PathBuf,
    file: File,
    file_len: u64,
    size: u64,
    grain: u64,
    gtes: u64,
    compressed: bool,
    gd: Vec<u32>,
    gts: HashMap<usize, Vec<u32>>,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

impl VmdkImage {
    /// Opens a VMDK file read-only and takes its locks (`access` must be a read access).
    pub fn open(path: &Path, access: Access) -> Result<Box<dyn DiskImage>> {
        let file = crate::open_locked(path, access)?;
        let file_len = file.metadata().map_err(Error::io(path, "stat"))?.len();
        let mut hdr = [0u8; 512];
        if file_len < 512 {
            return Err(Error::corrupt(path, "VMDK file shorter than its 512-byte header"));
        }
        file.read_exact_at(&mut hdr, 0).map_err(Error::io(path, "read header"))?;
        if &hdr[0..4] != SPARSE_MAGIC {
            return Err(Error::unsupported(
                path,
                "descriptor-only VMDK (flat or split extents); only single-file sparse VMDKs can be read",
            ));
        }
        let mut flags = le32(&hdr, 8);
        if le64(&hdr, 56) == GD_AT_END {
            // streamOptimized: the real header is the footer, 1024 bytes before the end.
            if file_len < 1536 {
                return Err(Error::corrupt(path, "streamOptimized VMDK without a footer"));
            }
            file.read_exact_at(&mut hdr, file_len - 1024).map_err(Error::io(path, "read footer"))?;
            if &hdr[0..4] != SPARSE_MAGIC {
                return Err(Error::corrupt(path, "streamOptimized VMDK footer has no magic"));
            }
            flags = le32(&hdr, 8);
        }
        let capacity = le64(&hdr, 12);
        let grain = le64(&hdr, 20);
        let gtes = u64::from(le32(&hdr, 44));
        let gd_off = le64(&hdr, 56);
        if !grain.is_power_of_two() || !(1..=4096).contains(&grain) {
            return Err(Error::corrupt(path, format!("grain size of {grain} sectors")));
        }
        if !(1..=65536).contains(&gtes) {
            return Err(Error::corrupt(path, format!("{gtes} entries per grain table")));
        }
        let size = capacity.checked_mul(512).ok_or_else(|| Error::corrupt(path, "capacity overflows"))?;
        let gd_entries = capacity.div_ceil(grain * gtes);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(Error::corrupt(path, format!("grain directory of {gd_entries} entries")));
        }
        let gd_bytes = gd_entries * 4;
        let gd_pos = gd_off.checked_mul(512).filter(|p| p.checked_add(gd_bytes).is_some_and(|e| e <= file_len));
        let Some(gd_pos) = gd_pos else {
            return Err(Error::corrupt(path, format!("grain directory at sector {gd_off} is past the end of the file")));
        };
        let mut raw = vec![0u8; gd_bytes as usize];
        file.read_exact_at(&mut raw, gd_pos).map_err(Error::io(path, "read grain directory"))?;
        let gd = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(Box::new(VmdkImage {
            path: path.to_path_buf(),
            file,
            file_len,
            size,
            grain: grain * 512,
            gtes,
            compressed: flags & FLAG_COMPRESSED != 0 || flags & FLAG_MARKERS != 0,
            gd,
            gts: HashMap::new(),
        }))
    }

    /// The grain table entry (a sector number, 0 unallocated, 1 zero) for a guest offset.
    fn entry(&mut self, off: u64) -> Result<u32> {
        let g = off / self.grain;
        let (gdi, gti) = ((g / self.gtes) as usize, (g % self.gtes) as usize);
        let Some(&gt_sector) = self.gd.get(gdi) else { return Ok(0) };
        if gt_sector == 0 {
            return Ok(0);
        }
        if !self.gts.contains_key(&gdi) {
            if self.gts.len() >= GT_CACHE {
                self.gts.clear();
            }
            let pos = u64::from(gt_sector) * 512;
            let bytes = self.gtes * 4;
            if pos + bytes > self.file_len {
                return Err(Error::corrupt(&self.path, format!("grain table at sector {gt_sector} is past the end of the file")));
            }
            let mut raw = vec![0u8; bytes as usize];
            self.file.read_exact_at(&mut raw, pos).map_err(Error::io(&self.path, "read grain table"))?;
            self.gts.insert(gdi, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
        }
        Ok(self.gts.get(&gdi).map_or(0, |t| t[gti]))
    }

    fn read_grain(&mut self, sector: u32, buf: &mut [u8], in_grain: usize) -> Result<()> {
        let pos = u64::from(sector) * 512;
        if pos >= self.file_len {
            return Err(Error::corrupt(&self.path, format!("grain at sector {sector} is past the end of the file")));
        }
        if !self.compressed {
            self.file.read_exact_at(buf, pos + in_grain as u64).map_err(Error::io(&self.path, "read grain"))?;
            return Ok(());
        }
        let mut marker = [0u8; 12];
        self.file.read_exact_at(&mut marker, pos).map_err(Error::io(&self.path, "read grain marker"))?;
        let len = u64::from(le32(&marker, 8));
        if len > 2 * self.grain + 1024 || pos + 12 + len > self.file_len {
            return Err(Error::corrupt(&self.path, format!("compressed grain at sector {sector} of {len} bytes")));
        }
        let mut input = vec![0u8; len as usize];
        self.file.read_exact_at(&mut input, pos + 12).map_err(Error::io(&self.path, "read grain"))?;
        let out = crate::deflate::inflate(&input, self.grain as usize, crate::deflate::Framing::Zlib).map_err(|e| Error::corrupt(&self.path, format!("compressed grain at sector {sector}: {e}")))?;
        let end = in_grain + buf.len();
        if out.len() < end {
            buf.fill(0);
            let have = out.len().saturating_sub(in_grain);
            buf[..have].copy_from_slice(&out[in_grain.min(out.len())..]);
        } else {
            buf.copy_from_slice(&out[in_grain..end]);
        }
        Ok(())
    }

    fn read_only(&self) -> Result<()> {
        Err(Error::invalid(&self.path, "VMDK images are read-only here; convert them first"))
    }
}

impl DiskImage for VmdkImage {
    fn info(&self) -> ImageInfo {
        ImageInfo::plain(Format::Vmdk, &self.path, self.size, Some(self.grain))
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(&self.path, off, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_grain = (pos % self.grain) as usize;
            let n = (self.grain as usize - in_grain).min(buf.len() - done);
            match self.entry(pos)? {
                0 | 1 => buf[done..done + n].fill(0),
                sector => self.read_grain(sector, &mut buf[done..done + n], in_grain)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> {
        self.read_only()
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn discard(&mut self, _: u64, _: u64) -> Result<()> {
        self.read_only()
    }

    fn write_zeroes(&mut self, _: u64, _: u64) -> Result<()> {
        self.read_only()
    }

    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, off, len, self.size)?;
        let n = (self.grain - off % self.grain).min(len);
        let status = match self.entry(off)? {
            0 => Status::Unallocated,
            1 => Status::Zero,
            _ if self.compressed => Status::Compressed,
            s => Status::Data { offset: Some(u64::from(s) * 512 + off % self.grain) },
        };
        Ok(Extent { status, len: n })
    }

    fn backing_mut(&mut self) -> Option<&mut dyn DiskImage> {
        None
    }

    fn resize(&mut self, _: u64) -> Result<()> {
        self.read_only()
    }
}

/// The SCSI or IDE adapter a VMDK's descriptor names (`ddb.adapterType`, qemu-img's
/// `adapter_type=`); importers use it to pick the controller and the disk geometry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Adapter {
    #[default]
    Ide,
    LsiLogic,
    BusLogic,
    LegacyEsx,
}

impl Adapter {
    /// The descriptor's (and qemu-img's) name.
    pub fn name(self) -> &'static str {
        match self {
            Adapter::Ide => "ide",
            Adapter::LsiLogic => "lsilogic",
            Adapter::BusLogic => "buslogic",
            Adapter::LegacyEsx => "legacyESX",
        }
    }

    pub fn from_name(name: &str) -> Option<Adapter> {
        [Adapter::Ide, Adapter::LsiLogic, Adapter::BusLogic, Adapter::LegacyEsx].into_iter().find(|a| a.name() == name)
    }

    /// (cylinders, heads, sectors) as VMware computes them: 16 heads for IDE, 255 for SCSI.
    fn geometry(self, sectors: u64) -> (u64, u64, u64) {
        let heads = if self == Adapter::Ide { 16 } else { 255 };
        ((sectors / (heads * 63)).clamp(1, 16383), heads, 63)
    }
}

/// Bytes of one grain in the VMDKs we write (128 sectors, what VMware and qemu use).
pub const STREAM_GRAIN: u64 = 64 << 10;
/// Grain table entries per table (each table covers 32 MiB).
const STREAM_GTES: u64 = 512;
/// Sectors reserved for the embedded descriptor, right after the header.
const DESCRIPTOR_SECTORS: u64 = 20;
/// Sectors before the first grain: header, descriptor, padding to a grain boundary.
const STREAM_OVERHEAD: u64 = STREAM_GRAIN / 512;
/// zlib level of the grains (zlib's default, as qemu-img and VMware use).
const STREAM_LEVEL: u32 = 6;

/// Metadata marker types of the stream format.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// Writes a streamOptimized VMDK front to back: the header (with the grain directory "at the
/// end"), the descriptor, then each non-zero grain compressed behind a marker, each grain table
/// after the grains it covers, and at the end the grain directory, a footer repeating the header
/// with the directory's place, and an end-of-stream marker. Grains must come in increasing
/// order; grains never written read as zeroes. Nothing is valid until [`StreamWriter::finish`].
pub struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes written so far; always a whole number of sectors.
    pos: u64,
    capacity_sectors: u64,
    /// Sector of each grain table written so far (0: none, the 32 MiB read as zeroes).
    gd: Vec<u32>,
    /// The grain table being filled, for grain group `group`.
    gt: Vec<u32>,
    group: u64,
    /// The smallest grain index the next write may use.
    next_grain: u64,
}

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(512)
}

impl StreamWriter {
    /// Creates (truncating) `path` for a disk of `capacity` bytes (a multiple of 512).
    pub fn create(path: &Path, capacity: u64, adapter: Adapter) -> Result<StreamWriter> {
        if capacity % 512 != 0 || capacity == 0 {
            return Err(Error::invalid(path, format!("a VMDK's size must be a positive multiple of 512 bytes, not {capacity}")));
        }
        let file = File::create(path).map_err(Error::io(path, "create"))?;
        let capacity_sectors = capacity / 512;
        let groups = capacity_sectors.div_ceil(STREAM_GTES * (STREAM_GRAIN / 512));
        let mut w = StreamWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            capacity_sectors,
            gd: vec![0; groups as usize],
            gt: vec![0; STREAM_GTES as usize],
            group: 0,
            next_grain: 0,
        };
        let header = w.header(GD_AT_END);
        w.put(&header)?;
        let name = path.file_name().map(|n| n.to_string_lossy().replace('"', "_")).unwrap_or_default();
        let descriptor = descriptor(&name, capacity_sectors, adapter);
        if descriptor.len() as u64 > DESCRIPTOR_SECTORS * 512 {
            return Err(Error::invalid(path, "the VMDK descriptor does not fit its 20 sectors (file name too long)"));
        }
        let mut padded = descriptor.into_bytes();
        padded.resize(((STREAM_OVERHEAD - 1) * 512) as usize, 0);
        w.put(&padded)?;
        Ok(w)
    }

    /// The 512-byte sparse extent header (also the footer, with the real `gd_offset`).
    fn header(&self, gd_offset: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(SPARSE_MAGIC);
        put32(&mut h, 4, 3);
        put32(&mut h, 8, FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS);
        put64(&mut h, 12, self.capacity_sectors);
        put64(&mut h, 20, STREAM_GRAIN / 512);
        put64(&mut h, 28, 1);
        put64(&mut h, 36, DESCRIPTOR_SECTORS);
        put32(&mut h, 44, STREAM_GTES as u32);
        put64(&mut h, 48, 0);
        put64(&mut h, 56, gd_offset);
        put64(&mut h, 64, STREAM_OVERHEAD);
        h[72] = 0; // not unclean
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes()); // deflate
        h
    }

    /// Appends bytes, padding them to a whole sector.
    fn put(&mut self, data: &[u8]) -> Result<()> {
        let padded = sectors_for(data.len() as u64) * 512;
        self.out.write_all(data).map_err(Error::io(&self.path, "write"))?;
        let pad = (padded - data.len() as u64) as usize;
        self.out.write_all(&[0u8; 512][..pad]).map_err(Error::io(&self.path, "write"))?;
        self.pos += padded;
        Ok(())
    }

    /// The sector the next `put` starts at, as the 32-bit number the tables hold.
    fn next_sector(&self) -> Result<u32> {
        u32::try_from(self.pos / 512).map_err(|_| Error::invalid(&self.path, "a VMDK cannot hold more than 2 TiB of compressed data"))
    }

    fn marker(&mut self, sectors: u64, kind: u32) -> Result<()> {
        let mut m = [0u8; 512];
        put64(&mut m, 0, sectors);
        put32(&mut m, 12, kind);
        self.put(&m)
    }

    /// Writes grain `index` (bytes `index * STREAM_GRAIN ..`); `data` may be shorter than a grain
    /// only for the disk's last grain. Indexes must increase from one call to the next.
    pub fn write_grain(&mut self, index: u64, data: &[u8]) -> Result<()> {
        let lba = index * (STREAM_GRAIN / 512);
        if index < self.next_grain || lba >= self.capacity_sectors || data.len() as u64 > STREAM_GRAIN {
            return Err(Error::invalid(&self.path, format!("grain {index} written out of order or beyond the disk")));
        }
        let group = index / STREAM_GTES;
        if group != self.group {
            self.flush_table()?;
            self.group = group;
        }
        let mut grain = data.to_vec();
        grain.resize(STREAM_GRAIN as usize, 0);
        let compressed = crate::deflate::zlib(&grain, STREAM_LEVEL);
        let sector = self.next_sector()?;
        let mut block = Vec::with_capacity(12 + compressed.len());
        block.extend_from_slice(&lba.to_le_bytes());
        block.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        block.extend_from_slice(&compressed);
        self.put(&block)?;
        self.gt[(index % STREAM_GTES) as usize] = sector;
        self.next_grain = index + 1;
        Ok(())
    }

    /// Writes the current grain table (if any grain of its group was written) behind a marker.
    fn flush_table(&mut self) -> Result<()> {
        if self.gt.iter().all(|&e| e == 0) {
            return Ok(());
        }
        let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.marker(sectors_for(bytes.len() as u64), MARKER_GT)?;
        let sector = self.next_sector()?;
        self.put(&bytes)?;
        self.gd[self.group as usize] = sector;
        self.gt.fill(0);
        Ok(())
    }

    /// Writes the last grain table, the grain directory, the footer and the end-of-stream
    /// marker, and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        self.flush_table()?;
        let gd: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.marker(sectors_for(gd.len() as u64), MARKER_GD)?;
        let gd_sector = u64::from(self.next_sector()?);
        self.put(&gd)?;
        self.marker(1, MARKER_FOOTER)?;
        let footer = self.header(gd_sector);
        self.put(&footer)?;
        self.marker(0, MARKER_EOS)?;
        let file = self.out.into_inner().map_err(|e| Error::io(&self.path, "write")(e.into_error()))?;
        file.sync_all().map_err(Error::io(&self.path, "sync"))
    }
}

/// The embedded descriptor of a streamOptimized extent (one extent: the file itself).
fn descriptor(file_name: &str, sectors: u64, adapter: Adapter) -> String {
    let (cylinders, heads, per_track) = adapter.geometry(sectors);
    let cid = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {sectors} SPARSE \"{file_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"{per_track}\"\nddb.adapterType = \"{}\"\n",
        adapter.name()
    )
}
