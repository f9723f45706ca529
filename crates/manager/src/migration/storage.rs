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
}

/// Markers placed next to the source's disks; removed on drop.
pub struct Markers {
    files: Vec<PathBuf>,
    pub claims: Vec<DiskClaim>,
}

impl Markers {
    /// Places one marker beside each disk (one per directory, shared by the disks in it).
    pub fn place(disks: &[PathBuf]) -> Result<Markers> {
        let mut markers = Markers { files: Vec::new(), claims: Vec::new() };
        for (i, disk) in disks.iter().enumerate() {
            let real = disk.canonicalize().map_err(|e| Error::conflict(format!("disk[{i}] {}: {e}", disk.display())))?;
            let size = std::fs::metadata(&real).map_err(|e| Error::conflict(format!("disk[{i}] {}: {e}", real.display())))?.len();
            let dir = real.parent().unwrap_or(Path::new("/"));
            let placed = markers.files.iter().position(|f| f.parent() == Some(dir)).and_then(|at| {
                let name = markers.files[at].file_name()?.to_str()?;
                markers.claims.iter().find(|c| c.marker == name).cloned()
            });
            let claim = match placed {
                Some(same_dir) => DiskClaim { size, ..same_dir },
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
                    DiskClaim { size, marker, nonce }
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
}
