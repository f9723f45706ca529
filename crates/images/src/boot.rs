//! Booting a disk's own kernel (`[boot] from = "disk"`), as users of direct kernel boot do by
//! hand: find the boot filesystem on the disk, ask its boot loader configuration what it boots,
//! and copy that kernel and initrd out so the VMM can load them.
//!
//! Each partition (or the whole disk without a table) that holds an ext2/3/4 filesystem is looked
//! at, as a root filesystem (files under /boot) or as a separate /boot. In order, the first that
//! names a kernel wins: the newest BLS entry in `loader/entries/`, the default menu entry of
//! `grub/grub.cfg` or `grub2/grub.cfg`, then the `vmlinuz` and `initrd.img` links Debian keeps in
//! / and /boot. When nothing is found the error lists what was looked at.

use crate::Error;
use crate::bootcfg::{self, Entry};
use crate::partitions::{self, Layout, Partition};
use ext4_view::Ext4;
use ferro_block::{DiskImage, Format};
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Largest kernel copied out of an image.
pub const MAX_KERNEL: u64 = 256 << 20;
/// Largest initrd (all of an entry's initrds together).
pub const MAX_INITRD: u64 = 1 << 30;
/// Largest configuration file read (grub.cfg, a BLS entry, grubenv).
const MAX_CONFIG: u64 = 1 << 20;
/// Most BLS entries considered.
const MAX_BLS_ENTRIES: usize = 256;
/// Most symbolic links followed in one path (Linux's limit), and the longest link target read.
const MAX_LINKS: usize = 40;
const MAX_LINK_TARGET: u64 = 4096;

/// What the disk's configuration says to boot, before anything is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Partition number (0: the whole disk).
    pub partition: u32,
    /// Absolute paths on that partition's filesystem.
    pub kernel: String,
    pub initrds: Vec<String>,
    /// The command line, completed with root= and console= when the configuration has none.
    pub cmdline: String,
    /// Where it was found, for messages ("BLS entry /boot/loader/entries/x.conf on partition 2").
    pub source: String,
}

/// The kernel and initrd copied out of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub source: String,
}

/// A byte range of the disk (one partition), as ext4-view reads it.
struct PartitionReader {
    disk: Rc<RefCell<Box<dyn DiskImage>>>,
    start: u64,
    size: u64,
}

impl ext4_view::Ext4Read for PartitionReader {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64).filter(|&e| e <= self.size);
        if end.is_none() {
            return Err(format!("read at byte {start_byte} (+{}) is past the end of the partition", dst.len()).into());
        }
        self.disk.borrow_mut().read_at(dst, self.start + start_byte).map_err(|e| e.to_string().into())
    }
}

/// Finds what `image` boots and copies the kernel and initrd into `dest` (a directory) as
/// `kernel` and `initrd`, replacing earlier copies.
pub fn extract(image: &Path, format: Option<Format>, dest: &Path) -> Result<Extracted, Error> {
    let disk = ferro_block::open(image, format, true).map_err(|e| Error::new(e.to_string()))?;
    let disk = Rc::new(RefCell::new(disk));
    let (fs, found) = find_in(&disk).map_err(|e| Error::new(format!("{}: {e}", image.display())))?;
    let kernel = dest.join("kernel");
    copy_out(&fs, std::slice::from_ref(&found.kernel), &kernel, MAX_KERNEL, "kernel")?;
    let initrd = if found.initrds.is_empty() {
        let _ = std::fs::remove_file(dest.join("initrd"));
        None
    } else {
        let initrd = dest.join("initrd");
        copy_out(&fs, &found.initrds, &initrd, MAX_INITRD, "initrd")?;
        Some(initrd)
    };
    Ok(Extracted { kernel, initrd, cmdline: found.cmdline, source: found.source })
}

/// Finds what a disk image boots without copying anything.
pub fn find(image: &Path, format: Option<Format>) -> Result<Found, Error> {
    let disk = ferro_block::open(image, format, true).map_err(|e| Error::new(e.to_string()))?;
    let disk = Rc::new(RefCell::new(disk));
    find_in(&disk).map(|(_, found)| found).map_err(|e| Error::new(format!("{}: {e}", image.display())))
}

fn find_in(disk: &Rc<RefCell<Box<dyn DiskImage>>>) -> Result<(Ext4, Found), String> {
    let size = disk.borrow().size();
    let layout = partitions::read_layout(disk.borrow_mut().as_mut()).map_err(|e| e.to_string())?;
    let mut looked = Vec::new();
    for part in layout.partitions(size) {
        let name = if part.number == 0 { "the whole disk".to_string() } else { format!("partition {}", part.number) };
        let mut reader = PartitionReader { disk: disk.clone(), start: part.start, size: part.size };
        if let Err(e) = check_block_groups(&mut reader) {
            looked.push(format!("{name}: {e}"));
            continue;
        }
        let fs = match Ext4::load(Box::new(reader)) {
            Ok(fs) => fs,
            Err(e) => {
                looked.push(format!("{name}: not ext2/3/4 ({e})"));
                continue;
            }
        };
        match find_on_fs(&fs, &part, &layout) {
            Ok(mut found) => {
                found.source = format!("{} on {name}", found.source);
                return Ok((fs, found));
            }
            Err(notes) => looked.push(format!("{name} (ext4): {notes}")),
        }
    }
    if looked.is_empty() {
        looked.push("no partitions".to_string());
    }
    Err(format!("no kernel found ({}; looked at {})", layout.describe(), looked.join("; ")))
}

/// Most block groups an ext2/3/4 file system may claim: 128 TiB in 4 KiB blocks.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Refuses an ext2/3/4 superblock that claims more blocks than its partition holds, or more
/// block groups than [`MAX_BLOCK_GROUPS`], before ext4-view allocates a descriptor for each group:
/// the superblock is whatever the guest wrote, and one claiming 2^32 groups made ferrod ask for
/// gigabytes (found by the `disk_boot` fuzz target). Anything else is left to ext4-view.
fn check_block_groups(reader: &mut PartitionReader) -> Result<(), String> {
    use ext4_view::Ext4Read;
    let mut sb = [0u8; 1024];
    if reader.size < 2048 || reader.read(1024, &mut sb).is_err() {
        return Ok(());
    }
    let u32_at = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    let (magic, log_block_size, per_group) = (u16::from_le_bytes([sb[0x38], sb[0x39]]), u32_at(0x18), u32_at(0x20));
    if magic != 0xef53 || per_group == 0 {
        return Ok(());
    }
    // Linux mounts blocks of 1 to 64 KiB; ext4-view takes any size up to 2^31, and a guest's
    // superblock claiming 4 MiB blocks and 2^43 of them made it allocate 16 GiB for the
    // block group descriptors (the disk_boot fuzz target's second find).
    if log_block_size > 6 {
        return Err(format!("ext2/3/4 superblock claims blocks of 2^{} bytes (at most 64 KiB)", u64::from(log_block_size) + 10));
    }
    let block_size = 1024u64 << log_block_size;
    // The high half of the block count, as ext4-view reads it: always, whatever the features
    // say (Linux counts it only with the 64bit feature, incompat 0x80, but what ext4-view will
    // allocate for is what matters here).
    let blocks = u64::from(u32_at(0x150)) << 32 | u64::from(u32_at(0x4));
    if blocks.saturating_mul(block_size) > reader.size {
        return Err(format!("ext2/3/4 superblock claims {blocks} blocks of {block_size} bytes, more than the {} bytes there are", reader.size));
    }
    let groups = blocks.div_ceil(u64::from(per_group));
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!("ext2/3/4 superblock claims {groups} block groups (at most {MAX_BLOCK_GROUPS} are read)"));
    }
    Ok(())
}

/// `path` with every symbolic link in it resolved here, so that ext4-view never follows one
/// itself: it reads a link's whole target into memory at the size the link's inode claims, and
/// the inode is whatever the guest wrote (the `disk_boot` fuzz target found a link claiming a
/// terabyte, which made ferrod, as root, ask for that much memory). A link claiming more than
/// [`MAX_LINK_TARGET`] bytes, or a path through more than [`MAX_LINKS`] links, is an error. A
/// component that does not exist ends the walk: the rest is kept as it is (it cannot be reached,
/// so nothing in it is followed).
fn no_links(fs: &Ext4, path: &str) -> Result<String, String> {
    let mut done: Vec<String> = Vec::new();
    let mut todo: Vec<String> = path.split('/').filter(|c| !c.is_empty()).rev().map(str::to_string).collect();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = format!("/{}", done.iter().chain([&part]).map(String::as_str).collect::<Vec<_>>().join("/"));
        let Ok(meta) = fs.symlink_metadata(here.as_str()) else {
            done.push(part);
            done.extend(todo.drain(..).rev());
            break;
        };
        if !meta.is_symlink() {
            done.push(part);
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(format!("{path}: more than {MAX_LINKS} symbolic links"));
        }
        if meta.len() > MAX_LINK_TARGET {
            return Err(format!("{here}: a symbolic link whose target claims {} bytes (at most {MAX_LINK_TARGET} are read)", meta.len()));
        }
        let target = fs.read_link(here.as_str()).map_err(|e| format!("{here}: {e}"))?;
        let target = target.to_str().map_err(|_| format!("{here}: its target is not UTF-8"))?;
        if target.starts_with('/') {
            done.clear();
        }
        todo.extend(target.split('/').filter(|c| !c.is_empty()).rev().map(str::to_string));
    }
    Ok(format!("/{}", done.join("/")))
}

/// Metadata of `path`, its links followed by [`no_links`].
fn metadata(fs: &Ext4, path: &str) -> Result<ext4_view::Metadata, String> {
    let real = no_links(fs, path)?;
    fs.metadata(real.as_str()).map_err(|e| format!("{path}: {e}"))
}

/// A file's text if it exists, refusing files larger than [`MAX_CONFIG`].
fn config_text(fs: &Ext4, path: &str) -> Result<Option<String>, String> {
    let path = no_links(fs, path)?;
    let path = path.as_str();
    match fs.metadata(path) {
        Ok(m) if m.is_dir() => return Ok(None),
        Ok(m) if m.len() > MAX_CONFIG => return Err(format!("{path} is {} bytes (more than {MAX_CONFIG})", m.len())),
        Ok(_) => {}
        Err(_) => return Ok(None),
    }
    fs.read(path).map(|b| Some(String::from_utf8_lossy(&b).into_owned())).map_err(|e| format!("{path}: {e}"))
}

fn is_file(fs: &Ext4, path: &str) -> bool {
    metadata(fs, path).is_ok_and(|m| !m.is_dir())
}

/// A path as the configuration wrote it, found on this filesystem: as is, or under /boot when
/// the configuration was written for a separate /boot partition but /boot is a directory here.
fn resolve(fs: &Ext4, boot_dir: &str, path: &str) -> Option<String> {
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    [path.clone(), format!("{boot_dir}{path}")].into_iter().find(|p| is_file(fs, p))
}

fn find_on_fs(fs: &Ext4, part: &Partition, layout: &Layout) -> Result<Found, String> {
    // A root filesystem keeps its boot files in /boot; a separate /boot partition at its root.
    let boot_dir = if metadata(fs, "/boot").is_ok_and(|m| m.is_dir()) { "/boot" } else { "" };
    let mut notes = Vec::new();
    let grubenv = ["grub/grubenv", "grub2/grubenv"].iter().find_map(|p| config_text(fs, &format!("{boot_dir}/{p}")).ok().flatten());
    let var = |name: &str| grubenv.as_deref().and_then(|t| bootcfg::grubenv(t, name));

    // 1. Boot Loader Specification entries, newest version first.
    let entries_dir = format!("{boot_dir}/loader/entries");
    match no_links(fs, &entries_dir).and_then(|dir| fs.read_dir(dir.as_str()).map_err(|e| e.to_string())) {
        Ok(dir) => {
            let mut entries = Vec::new();
            for item in dir.flatten().take(MAX_BLS_ENTRIES) {
                let Ok(name) = item.file_name().as_str().map(str::to_string) else { continue };
                if !name.ends_with(".conf") {
                    continue;
                }
                let path = format!("{entries_dir}/{name}");
                let text = config_text(fs, &path)?.unwrap_or_default();
                match bootcfg::parse_bls(&text, &var) {
                    Ok(Some((version, entry))) => entries.push((version, path, entry)),
                    Ok(None) => notes.push(format!("{path} names no kernel")),
                    Err(e) => notes.push(format!("{path}: {e}")),
                }
            }
            entries.sort_by(|a, b| bootcfg::newest_first(&a.0, &b.0).then(b.1.cmp(&a.1)));
            match entries.into_iter().next() {
                Some((_, path, entry)) => return complete(fs, boot_dir, entry, part, layout, format!("BLS entry {path}")),
                None => notes.push(format!("{entries_dir} has no usable entry")),
            }
        }
        Err(_) => notes.push(format!("no {entries_dir}")),
    }

    // 2. GRUB's default menu entry.
    for cfg in ["grub/grub.cfg", "grub2/grub.cfg"] {
        let path = format!("{boot_dir}/{cfg}");
        match config_text(fs, &path)? {
            None => notes.push(format!("no {path}")),
            Some(text) => match bootcfg::grub_default(&text, var("saved_entry").as_deref()) {
                Ok(Some(entry)) => return complete(fs, boot_dir, entry, part, layout, format!("default entry of {path}")),
                Ok(None) => notes.push(format!("{path} has no menu entry with a kernel")),
                Err(e) => notes.push(format!("{path}: {e}")),
            },
        }
    }

    // 3. The links Debian's kernel packages maintain.
    for dir in if boot_dir.is_empty() { vec![""] } else { vec!["/boot", ""] } {
        let (kernel, initrd) = (format!("{dir}/vmlinuz"), format!("{dir}/initrd.img"));
        if let Err(e) = no_links(fs, &kernel) {
            notes.push(e);
            continue;
        }
        if is_file(fs, &kernel) {
            let initrds = if is_file(fs, &initrd) { vec![initrd.clone()] } else { Vec::new() };
            let entry = Entry { title: String::new(), kernel: kernel.clone(), initrds, cmdline: String::new() };
            return complete(fs, boot_dir, entry, part, layout, format!("link {kernel}"));
        }
        notes.push(format!("no {kernel}"));
    }
    Err(notes.join(", "))
}

/// Checks that the entry's files exist and completes its command line.
fn complete(fs: &Ext4, boot_dir: &str, entry: Entry, part: &Partition, layout: &Layout, source: String) -> Result<Found, String> {
    let kernel = resolve(fs, boot_dir, &entry.kernel).ok_or_else(|| format!("{source} names kernel {}, which does not exist", entry.kernel))?;
    let mut initrds = Vec::new();
    for initrd in &entry.initrds {
        initrds.push(resolve(fs, boot_dir, initrd).ok_or_else(|| format!("{source} names initrd {initrd}, which does not exist"))?);
    }
    let mut cmdline = entry.cmdline.clone();
    let has = |cmdline: &str, key: &str| cmdline.split_whitespace().any(|w| w.starts_with(key));
    if !has(&cmdline, "root=") {
        // A filesystem holding /boot is the root filesystem; a separate /boot partition does not
        // tell which partition holds the root, so nothing is guessed for it.
        if !boot_dir.is_empty() {
            let root = match (&part.guid, layout) {
                (Some(guid), Layout::Gpt(_)) => format!("root=PARTUUID={guid}"),
                _ if part.number == 0 => "root=/dev/vda".to_string(),
                _ => format!("root=/dev/vda{}", part.number),
            };
            cmdline = format!("{root} ro {cmdline}");
        }
    }
    if !has(&cmdline, "console=") {
        cmdline.push_str(" console=ttyS0");
    }
    Ok(Found { partition: part.number, kernel, initrds, cmdline: cmdline.split_whitespace().collect::<Vec<_>>().join(" "), source })
}

/// Copies files out of the filesystem, one after the other, into `dest` (through a temporary
/// file renamed into place), refusing to copy more than `max` bytes in all.
fn copy_out(fs: &Ext4, paths: &[String], dest: &Path, max: u64, what: &str) -> Result<(), Error> {
    let paths = paths.iter().map(|p| no_links(fs, p)).collect::<Result<Vec<_>, _>>().map_err(|e| Error::new(format!("the {what}: {e}")))?;
    let total: u64 = paths.iter().map(|p| fs.metadata(p.as_str()).map(|m| m.len()).unwrap_or(0)).sum();
    if total > max {
        return Err(Error::new(format!("the {what} ({}) is {total} bytes, more than the {max} this host copies", paths.join(" + "))));
    }
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(|e| Error::new(format!("cannot create {}: {e}", tmp.display())))?;
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let result = (|| {
        for path in &paths {
            let mut file = fs.open(path.as_str()).map_err(|e| format!("{path}: {e}"))?;
            loop {
                let n = file.read_bytes(&mut buf).map_err(|e| format!("{path}: {e}"))?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                if copied > max {
                    return Err(format!("{path} grew past {max} bytes while being read"));
                }
                out.write_all(&buf[..n]).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
            }
        }
        out.sync_all().map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dest).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::new(format!("copying the {what} out of the image: {e}")));
    }
    Ok(())
}
