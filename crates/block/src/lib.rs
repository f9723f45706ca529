//! ferro-block: disk images for Ferrovisor.
//!
//! Raw (sparse-aware) and qcow2 (v3 read/write, v2 read/write without zero clusters) images with
//! backing chains, VMDK (monolithicSparse, streamOptimized) as an input format and streamOptimized
//! as a convert output, and the operations behind `ferro img` in [`ops`]. The API is blocking:
//! one `DiskImage` per open image, used from one thread at a time. Every open locks its files the
//! way QEMU does ([`lock`]), so ferro and QEMU never write one image at the same time.
//!
//! Crash safety of qcow2 comes from write ordering, not from a dirty bit: refcount increments
//! reach the disk before any table that points at the new cluster, and a cluster is only freed
//! after the table that stopped pointing at it is durable. A process killed at any point leaves
//! at worst leaked clusters, which `check` reports.
mod deflate;
mod error;
pub mod lock;
pub mod ops;
pub mod qcow2;
pub mod raw;
pub mod storage;
pub mod vmdk;

pub use error::{Error, Result};
pub use lock::Access;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Image formats the block layer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// Read-only input format (conversion source).
    Vmdk,
}

impl Format {
    /// The name qemu-img uses for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vmdk" => Some(Format::Vmdk),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one layer of a chain says about a range of the virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// This layer holds the data, at `offset` in its file when that is meaningful.
    Data { offset: Option<u64> },
    /// This layer holds compressed data.
    Compressed,
    /// This layer says the range reads as zeroes (without consulting any backing file).
    Zero,
    /// This layer has nothing: reads fall through to the backing file, or zeroes without one.
    Unallocated,
}

/// A run of the virtual disk with one [`Status`] in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub status: Status,
    pub len: u64,
}

/// qcow2 specifics shown by `info` under `format-specific`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Details {
    /// "1.1" for version 3, "0.10" for version 2 (qemu's names).
    pub compat: &'static str,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub has_bitmaps: bool,
    /// Persistent dirty bitmaps (valid ones; none when a bitmap-unaware program made them stale).
    pub bitmaps: Vec<qcow2::BitmapInfo>,
    /// Internal snapshots (docs/qcow2-snapshots.md), in table order.
    pub snapshots: Vec<qcow2::SnapshotInfo>,
}

/// Static facts about an open image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    pub path: PathBuf,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    /// The backing file name as recorded in the image.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The backing file name resolved against the image's directory.
    pub full_backing_file: Option<PathBuf>,
    pub dirty: bool,
    pub qcow2: Option<Qcow2Details>,
}

impl ImageInfo {
    /// Facts about an image without a backing file or qcow2 specifics.
    pub(crate) fn plain(format: Format, path: &Path, virtual_size: u64, cluster_size: Option<u64>) -> ImageInfo {
        ImageInfo {
            format,
            path: path.to_path_buf(),
            virtual_size,
            cluster_size,
            backing_file: None,
            backing_format: None,
            full_backing_file: None,
            dirty: false,
            qcow2: None,
        }
    }
}

/// One open disk image (and, through it, its backing chain).
pub trait DiskImage: Send {
    /// Facts about the image (format, sizes, backing file).
    fn info(&self) -> ImageInfo;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`; the range must lie within the virtual size.
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()>;
    /// Writes `buf` at `off`; the range must lie within the virtual size.
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()>;
    /// Makes every completed write durable (data and metadata).
    fn flush(&mut self) -> Result<()>;
    /// Tells the image the range is no longer needed; its contents become unspecified (qcow2
    /// reads zeroes or backing data; raw punches a hole and reads zeroes).
    fn discard(&mut self, off: u64, len: u64) -> Result<()>;
    /// Makes the range read as zeroes, without writing zero buffers where the format can avoid it.
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()>;
    /// The status of this layer at `off`, for at most `len` bytes (`len` > 0).
    fn block_status(&mut self, off: u64, len: u64) -> Result<Extent>;
    /// The backing image, if this layer has one open.
    fn backing_mut(&mut self) -> Option<&mut dyn DiskImage>;
    /// Changes the virtual size (growing reads as zeroes).
    fn resize(&mut self, size: u64) -> Result<()>;
    /// The qcow2 image itself (for its dirty bitmaps), if this layer is one.
    fn as_qcow2(&mut self) -> Option<&mut qcow2::Qcow2> {
        None
    }
}

/// The qcow2 layer of an open image, for internal snapshots. Other formats have nowhere to keep
/// one and are refused naming the file.
pub fn snapshot_capable(img: &mut dyn DiskImage) -> Result<&mut qcow2::Qcow2> {
    let info = img.info();
    img.as_qcow2().ok_or_else(|| {
        Error::Unsupported {
            path: info.path,
            reason: format!(
                "a {} image cannot hold internal snapshots; convert it to qcow2 (ferro img convert -O qcow2)",
                info.format.name()
            ),
        }
    })
}

/// Deepest backing chain we follow.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Options for [`open_with`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Format, or `None` to probe from the file's contents.
    pub format: Option<Format>,
    /// How the image is used (backing files are always read); decides the locks taken.
    pub access: Access,
    /// Whether to open the backing chain (tools that only touch metadata skip it).
    pub open_backing: bool,
}

/// Opens an image and its backing chain (backing files are always read-only), locking every
/// file for writing (`readonly` false) or reading (see [`lock`]).
pub fn open(path: impl AsRef<Path>, format: Option<Format>, readonly: bool) -> Result<Box<dyn DiskImage>> {
    let access = if readonly { Access::Read } else { Access::Write };
    open_with(path.as_ref(), &OpenOptions { format, access, open_backing: true })
}

/// Closes an image as a clean close does, reporting what fails: every completed write made
/// durable and, for qcow2, the dirty bitmaps stored with their `in_use` flags cleared. Once this
/// returns Ok the image is consistent on disk and its locks are released, so another process may
/// open it (a migration's hand-over, docs/migration.md); dropping an image does the same but
/// cannot report a failure. On failure the image is closed all the same (dropped, which tries
/// once more), so its locks are released either way.
pub fn close(mut img: Box<dyn DiskImage>) -> Result<()> {
    img.flush()?;
    if let Some(qcow2) = img.as_qcow2() {
        qcow2.store_bitmaps()?;
    }
    Ok(())
}

/// Opens an image with explicit options.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    let mut seen = Vec::new();
    open_layer(path, opts.format, opts.access, opts.open_backing, &mut seen)
}

fn open_layer(
    path: &Path,
    format: Option<Format>,
    access: Access,
    open_backing: bool,
    seen: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskImage>> {
    let canonical = path.canonicalize().map_err(Error::io(path, "open"))?;
    if seen.contains(&canonical) {
        let chain: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::BackingChain {
            path: path.to_path_buf(),
            reason: format!("loop: {} -> {}", chain.join(" -> "), canonical.display()),
        });
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::BackingChain {
            path: path.to_path_buf(),
            reason: format!("chain deeper than {MAX_CHAIN_DEPTH} images"),
        });
    }
    seen.push(canonical);
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawImage::open(path, access)?)),
        Format::Vmdk => {
            if !access.readonly() {
                return Err(Error::unsupported(path, "VMDK images can only be opened read-only (convert them)"));
            }
            vmdk::VmdkImage::open(path, access)
        }
        Format::Qcow2 => {
            let mut img = qcow2::Qcow2::open(path, access)?;
            if open_backing {
                if let Some((bpath, bfmt)) = img.backing_target()? {
                    let backing = open_layer(&bpath, bfmt, access.for_backing(), true, seen).map_err(|e| match e {
                        Error::BackingChain { .. } | Error::InUse { .. } => e,
                        e => Error::BackingChain { path: path.to_path_buf(), reason: format!("backing file: {e}") },
                    })?;
                    img.set_backing_image(backing);
                }
            }
            Ok(Box::new(img))
        }
    }
}

/// Creates or empties an image file, after taking its locks for writing (so that a file in
/// use is refused before anything is lost).
pub(crate) fn create_locked(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Error::io(path, "create"))?;
    lock::lock(&file, path, Access::Write)?;
    file.set_len(0).map_err(Error::io(path, "truncate"))?;
    Ok(file)
}

/// Opens an image file with the given access and takes its locks.
pub(crate) fn open_locked(path: &Path, access: Access) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!access.readonly())
        .open(path)
        .map_err(Error::io(path, "open"))?;
    lock::lock(&file, path, access)?;
    Ok(file)
}

/// Guesses the format from the first bytes of the file (qcow2 and VMDK magic; raw otherwise).
pub fn probe(path: &Path) -> Result<Format> {
    let mut f = File::open(path).map_err(Error::io(path, "open"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..]).map_err(Error::io(path, "read"))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &head[..n];
    if head.starts_with(qcow2::MAGIC) {
        Ok(Format::Qcow2)
    } else if head.starts_with(vmdk::SPARSE_MAGIC) || head.starts_with(b"# Disk DescriptorFile") {
        Ok(Format::Vmdk)
    } else {
        Ok(Format::Raw)
    }
}

/// Resolves a backing file name the way qemu does: relative names are relative to the directory
/// of the image that names them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Options for [`create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// qcow2 cluster size (power of two, 512 B ..= 2 MiB).
    pub cluster_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<Format>,
    /// qcow2 version 2 ("compat=0.10") instead of 3.
    pub compat_v2: bool,
    /// qcow2 refcount width (power of two, 1..=64).
    pub refcount_bits: u32,
    /// VMDK subformat (qemu-img's `subformat=`): only "streamOptimized" is written, by convert.
    pub subformat: Option<String>,
    /// VMDK adapter type named in the descriptor (qemu-img's `adapter_type=`).
    pub adapter_type: vmdk::Adapter,
}

impl CreateOptions {
    /// Defaults matching `qemu-img create -f FORMAT`.
    pub fn new(format: Format, size: Option<u64>) -> Self {
        CreateOptions {
            format,
            size,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            compat_v2: false,
            refcount_bits: 16,
            subformat: None,
            adapter_type: vmdk::Adapter::Ide,
        }
    }
}

/// Creates a new image (truncating an existing file).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let mut backing_format = opts.backing_format;
    let mut size = opts.size;
    if let Some(name) = &opts.backing_file {
        if opts.format != Format::Qcow2 {
            return Err(Error::invalid(path, format!("{} images cannot have a backing file", opts.format)));
        }
        let bpath = resolve_backing(path, name);
        if backing_format.is_none() || size.is_none() {
            let fmt = match backing_format {
                Some(f) => f,
                None => probe(&bpath)?,
            };
            backing_format = Some(fmt);
            if size.is_none() {
                size = Some(open(&bpath, Some(fmt), true)?.size());
            }
        }
    }
    let Some(size) = size else {
        return Err(Error::invalid(path, "no size given and no backing file to take it from"));
    };
    match opts.format {
        Format::Raw => raw::create(path, size),
        Format::Qcow2 => qcow2::create(path, size, opts, backing_format),
        Format::Vmdk => Err(Error::unsupported(path, "creating empty VMDK images (convert into subformat=streamOptimized instead)")),
    }
}

/// Checks that `[off, off+len)` lies within `size`.
pub(crate) fn check_range(path: &Path, off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(
            path,
            format!("request at offset {off} of {len} bytes is beyond the virtual size {size}"),
        )),
    }
}
