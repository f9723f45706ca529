//! The shared-storage check of a migration: without disk copying the destination must open the
//! very files the source's VMM has open, so before anything moves the source proves, per disk,
//! that the destination sees the same file.
//!
//! The proof is a marker: the source writes a file with a fresh random name and content next to
//! each disk (in the directory its path resolves to) and tells the destination the name, the
//! content and the disk's size; the destination resolves the disk as its own definition says
//! (paths, or volumes of its pool of the same name), and looks for that marker in that directory.
//! A name of 128 random bits that was made a moment ago can only be seen there if the directory
//! is the source's own, shared; the disk's file of the same name in it is then the source's file.
//! The size catches a path that resolves elsewhere through a symlink of the destination's. A
//! content hash would not do better: the guest writes to the disk while it runs, and a copy
//! made earlier can hold the same bytes. The markers are removed once the destination answered.
//! A disk path that holds nothing on the destination is one an offline migration may copy there
//! ([`Place::Absent`]).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the destination is told about one disk of the domain, in the definition's order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskClaim {
    /// The disk's size on the source, in bytes.
    pub size: u64,
    /// The marker's file name, in the directory of the disk.
    pub marker: String,
    /// What the marker holds.
    pub nonce: String,
    /// The image's format ("raw", "qcow2") and virtual size in bytes: what a copy of the disk
    /// made on the destination (`--copy-storage-all`) must be.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub virtual_size: Option<u64>,
}

/// Markers placed next to the source's disks; removed on drop.
pub struct Markers {
    files: Vec<PathBuf>,
    pub claims: Vec<DiskClaim>,
}

impl Markers {
    /// Places one marker beside each disk (one per directory, shared by the disks in it).
    pub fn place(disks: &[PathBuf]) -> Result<Markers> {
        Markers::place_described(&disks.iter().map(|d| (d.clone(), None)).collect::<Vec<_>>())
    }

    /// As [`place`](Self::place), each claim also naming the disk's format (when given) and
    /// virtual size, read from the image without locking it (its VMM may hold it).
    pub fn place_described(disks: &[(PathBuf, Option<ferro_block::Format>)]) -> Result<Markers> {
        let mut markers = Markers { files: Vec::new(), claims: Vec::new() };
        for (i, (disk, format)) in disks.iter().enumerate() {
            let real = disk.canonicalize().map_err(|e| Error::conflict(format!("disk[{i}] {}: {e}", disk.display())))?;
            let size = std::fs::metadata(&real).map_err(|e| Error::conflict(format!("disk[{i}] {}: {e}", real.display())))?.len();
            let dir = real.parent().unwrap_or(Path::new("/"));
            let placed = markers.files.iter().position(|f| f.parent() == Some(dir)).and_then(|at| {
                let name = markers.files[at].file_name()?.to_str()?;
                markers.claims.iter().find(|c| c.marker == name).cloned()
            });
            let described = match format {
                Some(format) => {
                    let opts = ferro_block::OpenOptions { format: Some(*format), access: ferro_block::Access::ReadShared, open_backing: false };
                    let image = ferro_block::open_with(&real, &opts).map_err(|e| Error::conflict(format!("disk[{i}] {}: {e}", real.display())))?;
                    (Some(format.name().to_string()), Some(image.size()))
                }
                None => (None, None),
            };
            let claim = match placed {
                Some(same_dir) => DiskClaim { size, format: described.0, virtual_size: described.1, ..same_dir },
                None => {
                    let nonce = random_hex()?;
                    let marker = format!(".ferro-migration-{nonce}");
                    let file = dir.join(&marker);
                    std::fs::write(&file, &nonce).map_err(|e| {
                        Error::conflict(format!(
                            "disk[{i}] {}: cannot write the shared-storage marker {} ({e}); ferrod checks with it that the \
                             destination sees the same disk files",
                            real.display(),
                            file.display()
                        ))
                    })?;
                    markers.files.push(file);
                    DiskClaim { size, marker, nonce, format: described.0, virtual_size: described.1 }
                }
            };
            markers.claims.push(claim);
        }
        Ok(markers)
    }
}

impl Drop for Markers {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Where a disk the source described is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The source's own file: the storage is shared.
    Shared,
    /// Nothing at the disk's path here: a copy may go there.
    Absent,
}

/// The destination's side: where each disk of the definition (resolved on this host) is, next to
/// the file the source claims. A file at a disk's path that is not the source's is an error
/// naming the disk (it is never overwritten).
pub fn locate(disks: &[PathBuf], claims: &[DiskClaim]) -> Result<Vec<Place>> {
    if disks.len() != claims.len() {
        return Err(Error::invalid(format!("disks: the definition has {} disks, the source described {}", disks.len(), claims.len())));
    }
    let mut places = Vec::new();
    for (i, (disk, claim)) in disks.iter().zip(claims).enumerate() {
        let other = |why: String| Error::conflict(format!("disk[{i}] {}: a file here that is not the source's ({why})", disk.display()));
        let is_marker_name = claim.marker.strip_prefix(".ferro-migration-").is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if !is_marker_name {
            return Err(Error::invalid(format!("disks[{i}].marker: {:?} is not a migration marker name", claim.marker)));
        }
        if std::fs::symlink_metadata(disk).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            places.push(Place::Absent);
            continue;
        }
        let real = disk.canonicalize().map_err(|e| other(e.to_string()))?;
        let dir = real.parent().unwrap_or(Path::new("/"));
        let marker = dir.join(&claim.marker);
        match std::fs::read_to_string(&marker) {
            Ok(text) if text == claim.nonce => {}
            Ok(_) => return Err(other(format!("the marker {} holds something else", marker.display()))),
            Err(_) => return Err(other(format!("the source's marker {} is not in {} here", claim.marker, dir.display()))),
        }
        let size = std::fs::metadata(&real).map_err(|e| other(e.to_string()))?.len();
        if size != claim.size {
            return Err(other(format!("{size} bytes here, {} on the source", claim.size)));
        }
        places.push(Place::Shared);
    }
    Ok(places)
}

/// The destination's side of a migration without disk copies: every disk must be the source's.
pub fn check(disks: &[PathBuf], claims: &[DiskClaim]) -> Result<()> {
    let places = locate(disks, claims).map_err(|e| Error {
        message: format!("{e}; without disk copies the disks must be on storage both hosts share, at the same path"),
        ..e
    })?;
    match places.iter().position(|p| *p == Place::Absent) {
        Some(i) => Err(Error::conflict(format!(
            "disk[{i}] {}: no such file here; without disk copies the disks must be on storage both hosts share, at the same path",
            disks[i].display()
        ))),
        None => Ok(()),
    }
}

/// The destination's side of a migration that copies the writable disks along: each must be
/// absent here (a file at its path is never overwritten, and one the source shares would be
/// copied onto itself) and is created empty with the source's format and virtual size; the
/// read-only ones are not copied and must be shared. Returns the files created, for the caller
/// to remove should the migration fail; on error none is left.
pub fn create_copies(disks: &[PathBuf], readonly: &[bool], claims: &[DiskClaim]) -> Result<Vec<PathBuf>> {
    let places = locate(disks, claims)?;
    let mut created = Vec::new();
    let made = (|| {
        for (i, ((disk, place), claim)) in disks.iter().zip(&places).zip(claims).enumerate() {
            let shown = disk.display();
            match (readonly.get(i).copied().unwrap_or(false), place) {
                (true, Place::Shared) => {}
                (true, Place::Absent) => {
                    return Err(Error::conflict(format!(
                        "disk[{i}] {shown}: no such file here; read-only disks are not copied, they must be on storage both hosts share"
                    )));
                }
                (false, Place::Shared) => {
                    return Err(Error::conflict(format!(
                        "disk[{i}] {shown}: on storage both hosts share, so copying it would copy it onto itself; migrate without copying the disks"
                    )));
                }
                (false, Place::Absent) => {
                    let format = claim.format.as_deref().and_then(ferro_block::Format::from_name);
                    let (Some(format), Some(size)) = (format.filter(|f| matches!(f, ferro_block::Format::Raw | ferro_block::Format::Qcow2)), claim.virtual_size)
                    else {
                        return Err(Error::invalid(format!("disks[{i}]: the source did not say the disk's format (raw or qcow2) and virtual size")));
                    };
                    if !disk.parent().is_some_and(Path::is_dir) {
                        return Err(Error::conflict(format!("disk[{i}] {shown}: its directory does not exist here")));
                    }
                    // Exclusively: a file that appeared since the check is left alone.
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(disk)
                        .map_err(|e| Error::conflict(format!("disk[{i}] {shown}: cannot create the copy: {e}")))?;
                    created.push(disk.clone());
                    ferro_block::create(disk, &ferro_block::CreateOptions::new(format, Some(size)))
                        .map_err(|e| Error::conflict(format!("disk[{i}] {shown}: cannot create the copy: {e}")))?;
                }
            }
        }
        Ok(())
    })();
    match made {
        Ok(()) => Ok(created),
        Err(e) => {
            for file in &created {
                let _ = std::fs::remove_file(file);
            }
            Err(e)
        }
    }
}

/// 128 random bits as 32 hex digits.
fn random_hex() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| Error::internal("no random numbers from the system"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in a shared directory passes; a copy of it in another directory (same name, same
    /// size, same bytes) does not, nor does the shared one once it changed size; a disk missing
    /// here may be copied to.
    #[test]
    fn only_the_same_file_in_the_same_directory_passes() {
        let root = std::env::temp_dir().join(format!("ferro-migration-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (shared, copy) = (root.join("shared"), root.join("copy"));
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&copy).unwrap();
        for dir in [&shared, &copy] {
            std::fs::write(dir.join("a.raw"), vec![7u8; 4096]).unwrap();
            std::fs::write(dir.join("b.raw"), vec![8u8; 8192]).unwrap();
        }
        let disks = [shared.join("a.raw"), shared.join("b.raw")];
        let markers = Markers::place(&disks).unwrap();
        assert_eq!(markers.claims.len(), 2);
        assert_eq!(markers.claims[0].marker, markers.claims[1].marker, "one marker per directory");
        assert_eq!((markers.claims[0].size, markers.claims[1].size), (4096, 8192));
        check(&disks, &markers.claims).unwrap();

        let copies = [copy.join("a.raw"), copy.join("b.raw")];
        let e = check(&copies, &markers.claims).unwrap_err();
        assert!(e.message.starts_with("disk[0] ") && e.message.contains("is not in") && e.message.contains("share"), "{e}");
        assert!(check(&disks[..1], &markers.claims).unwrap_err().message.contains("the source described 2"));
        let elsewhere = [shared.join("a.raw"), copy.join("c.raw")];
        assert_eq!(locate(&elsewhere, &markers.claims).unwrap(), [Place::Shared, Place::Absent]);
        assert!(check(&elsewhere, &markers.claims).unwrap_err().message.starts_with(&format!("disk[1] {}: no such file here", elsewhere[1].display())));

        std::fs::write(&disks[1], vec![8u8; 4096]).unwrap();
        let e = check(&disks, &markers.claims).unwrap_err();
        assert!(e.message.contains("disk[1]") && e.message.contains("4096 bytes here, 8192 on the source"), "{e}");

        let mut forged = markers.claims.clone();
        forged[0].marker = "../../etc/passwd".into();
        assert!(check(&disks, &forged).unwrap_err().message.starts_with("disks[0].marker"));
        drop(markers);
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 2, "the markers are gone");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Copying along: a writable disk missing here is created with the source's format and
    /// virtual size; one the source shares, a read-only one missing here, and a claim without a
    /// format are refused, and a refusal leaves none of the copies made before it.
    #[test]
    fn copies_are_made_only_where_nothing_is() {
        let root = std::env::temp_dir().join(format!("ferro-migration-copies-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (shared, here) = (root.join("shared"), root.join("here"));
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&here).unwrap();
        let source = [shared.join("a.qcow2"), shared.join("b.raw")];
        ferro_block::create(&source[0], &ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(32 << 20))).unwrap();
        std::fs::write(&source[1], vec![1u8; 8192]).unwrap();
        let markers = Markers::place_described(&[(source[0].clone(), Some(ferro_block::Format::Qcow2)), (source[1].clone(), Some(ferro_block::Format::Raw))]).unwrap();
        assert_eq!((markers.claims[0].format.as_deref(), markers.claims[0].virtual_size), (Some("qcow2"), Some(32 << 20)));
        assert_eq!((markers.claims[1].format.as_deref(), markers.claims[1].virtual_size), (Some("raw"), Some(8192)));

        let copies = [here.join("a.qcow2"), here.join("b.raw")];
        let made = create_copies(&copies, &[false, false], &markers.claims).unwrap();
        assert_eq!(made, copies);
        let a = ferro_block::open(&copies[0], None, true).unwrap();
        assert_eq!((a.info().format, a.size()), (ferro_block::Format::Qcow2, 32 << 20));
        assert_eq!(std::fs::metadata(&copies[1]).unwrap().len(), 8192);
        assert!(std::fs::read(&copies[1]).unwrap().iter().all(|b| *b == 0), "a fresh raw copy reads zeroes");
        drop(a);

        // Now they exist: refused, left alone.
        let e = create_copies(&copies, &[false, false], &markers.claims).unwrap_err();
        assert!(e.message.starts_with("disk[0]") && e.message.contains("not the source's"), "{e}");
        for f in &copies {
            std::fs::remove_file(f).unwrap();
        }
        let e = create_copies(&[copies[0].clone(), source[1].clone()], &[false, false], &markers.claims).unwrap_err();
        assert!(e.message.starts_with("disk[1]") && e.message.contains("onto itself"), "{e}");
        assert!(!copies[0].exists(), "the copy made before the refusal is gone");
        let e = create_copies(&copies, &[false, true], &markers.claims).unwrap_err();
        assert!(e.message.starts_with("disk[1]") && e.message.contains("read-only"), "{e}");
        assert!(!copies[0].exists());
        create_copies(&[copies[0].clone(), source[1].clone()], &[false, true], &markers.claims).unwrap();
        std::fs::remove_file(&copies[0]).unwrap();
        let mut vague = markers.claims.clone();
        vague[0].format = None;
        assert!(create_copies(&copies, &[false, false], &vague).unwrap_err().message.starts_with("disks[0]: the source did not say"));
        drop(markers);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
