//! VMDK as a read-only input format (for `convert`, e.g. OVA imports): single-file sparse
//! extents, both monolithicSparse and streamOptimized (compressed grains, footer at the end).
//! Split or flat descriptor-based layouts are refused with a clear error.
use crate::error::{Error, Result};
use crate::{Access, DiskImage, Extent, Format, ImageInfo, Status, check_range};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
const GD_AT_END: u64 = u64::MAX;
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
        let out = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&input, self.grain as usize)
            .map_err(|e| Error::corrupt(&self.path, format!("compressed grain at sector {sector}: {e:?}")))?;
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
