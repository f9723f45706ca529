//! OVF packages: an OVA (one tar archive: the descriptor first, then the manifest, then the disks)
//! or an unpacked OVF (the descriptor beside its files). [`Package::open`] reads the descriptor and
//! manifest and checks the archive's shape; [`Package::verify`] checks every digest of the
//! manifest, and that each file the descriptor references is there with the size it claims,
//! before anything is written. [`write_ova`] packs an export.
//!
//! Archives come from strangers: members must be plain regular files with plain names (no
//! directories, no `..`, no absolute paths, no links or devices), the count and the sizes are
//! bounded and checked against the archive's real length, and nothing is ever extracted under a
//! name from the archive: callers copy a member to a path of their own choosing.

use crate::Error;
use crate::ovf::{self, Algorithm, Digest, Envelope};
use sha1::Digest as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Most members an OVA may have.
const MAX_MEMBERS: usize = 256;
/// Largest manifest read.
const MAX_MANIFEST: u64 = 64 << 10;

/// A file of the package: where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    name: String,
    /// The file holding the bytes (the archive, or the file beside the descriptor) and where.
    file: PathBuf,
    offset: u64,
    size: u64,
}

/// An opened package: its descriptor, parsed, and its files.
#[derive(Debug)]
pub struct Package {
    pub envelope: Envelope,
    pub descriptor_name: String,
    manifest: Option<Vec<Digest>>,
    members: Vec<Member>,
}

/// A name usable as a package member: one plain path component.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && name.len() <= 255
}

fn read_exact_at(file: &Path, offset: u64, size: u64) -> Result<Vec<u8>, Error> {
    let f = File::open(file).map_err(|e| Error::new(format!("cannot open {}: {e}", file.display())))?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact_at(&mut buf, offset).map_err(|e| Error::new(format!("reading {}: {e}", file.display())))?;
    Ok(buf)
}

impl Package {
    /// Opens an `.ova` archive or an `.ovf` descriptor (with its files beside it).
    pub fn open(path: &Path) -> Result<Package, Error> {
        let is_ovf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("ovf"));
        let members = if is_ovf { Self::dir_members(path)? } else { Self::ova_members(path)? };
        let descriptors: Vec<&Member> = members.iter().filter(|m| m.name.to_ascii_lowercase().ends_with(".ovf")).collect();
        let descriptor = match descriptors.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(Error::new(format!("{}: no .ovf descriptor in the package", path.display()))),
            _ => return Err(Error::new(format!("{}: more than one .ovf descriptor in the package", path.display()))),
        };
        if descriptor.size > ovf::MAX_DESCRIPTOR as u64 {
            return Err(Error::new(format!("{}: descriptor of {} bytes (at most {})", descriptor.name, descriptor.size, ovf::MAX_DESCRIPTOR)));
        }
        let text = read_exact_at(&descriptor.file, descriptor.offset, descriptor.size)?;
        let text = String::from_utf8(text).map_err(|_| Error::new(format!("{}: the descriptor is not UTF-8", descriptor.name)))?;
        let envelope = ovf::parse(&text).map_err(|e| Error::new(format!("{}: {e}", descriptor.name)))?;
        let stem = descriptor.name[..descriptor.name.len() - 4].to_string();
        let manifest = match members.iter().find(|m| m.name == format!("{stem}.mf")) {
            Some(m) if m.size > MAX_MANIFEST => return Err(Error::new(format!("{}: manifest of {} bytes", m.name, m.size))),
            Some(m) => {
                let text = read_exact_at(&m.file, m.offset, m.size)?;
                Some(ovf::parse_manifest(&String::from_utf8_lossy(&text)).map_err(|e| Error::new(format!("{}: {e}", m.name)))?)
            }
            None => None,
        };
        Ok(Package { envelope, descriptor_name: descriptor.name, manifest, members })
    }

    /// The members of an OVA: every tar entry, checked.
    fn ova_members(path: &Path) -> Result<Vec<Member>, Error> {
        let file = File::open(path).map_err(|e| Error::new(format!("cannot open {}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| Error::new(format!("{}: {e}", path.display())))?.len();
        let mut archive = tar::Archive::new(file);
        let mut members: Vec<Member> = Vec::new();
        let bad = |what: String| Error::new(format!("{}: {what}", path.display()));
        for entry in archive.entries().map_err(|e| bad(format!("not a tar archive: {e}")))? {
            let entry = entry.map_err(|e| bad(format!("broken tar archive: {e}")))?;
            if members.len() >= MAX_MEMBERS {
                return Err(bad(format!("more than {MAX_MEMBERS} files in the archive")));
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                return Err(bad(format!("member {name:?} is not a regular file ({kind:?}); links, directories and devices are refused")));
            }
            if !plain_name(&name) {
                return Err(bad(format!("member name {name:?} is not a plain file name (paths, '..' and absolute names are refused)")));
            }
            if members.iter().any(|m| m.name == name) {
                return Err(bad(format!("member {name:?} appears twice")));
            }
            let size = entry.size();
            let offset = entry.raw_file_position();
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(bad(format!("member {name:?} claims {size} bytes, past the end of the archive")));
            }
            members.push(Member { name, file: path.to_path_buf(), offset, size });
        }
        Ok(members)
    }

    /// The members of an unpacked OVF: the descriptor, its manifest, and the files it references,
    /// each a regular file (not a link) beside the descriptor.
    fn dir_members(descriptor: &Path) -> Result<Vec<Member>, Error> {
        let dir = descriptor.parent().unwrap_or(Path::new("."));
        let name = descriptor.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read(descriptor).map_err(|e| Error::new(format!("cannot read {}: {e}", descriptor.display())))?;
        let envelope = ovf::parse(&String::from_utf8_lossy(&text)).map_err(|e| Error::new(format!("{name}: {e}")))?;
        let stem = name[..name.len().saturating_sub(4)].to_string();
        let mut names = vec![name.clone(), format!("{stem}.mf")];
        names.extend(envelope.files.iter().map(|f| f.href.clone()));
        let mut members = Vec::new();
        for n in names {
            if !plain_name(&n) {
                return Err(Error::new(format!("{name}: file name {n:?} is not a plain name beside the descriptor")));
            }
            let path = dir.join(&n);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => members.push(Member { name: n, file: path, offset: 0, size: m.len() }),
                Ok(_) => return Err(Error::new(format!("{}: not a regular file (links are refused)", path.display()))),
                Err(_) => {}
            }
        }
        Ok(members)
    }

    fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Bytes [`Package::verify`] reads (for progress).
    pub fn verify_bytes(&self) -> u64 {
        self.manifest.iter().flatten().filter_map(|d| self.member(&d.file)).map(|m| m.size).sum()
    }

    /// Checks the package before anything is written: each file the descriptor references is
    /// there with the size it declares, and (when there is a manifest) each digest matches and
    /// every referenced file is listed. `progress` gets the bytes hashed.
    pub fn verify(&self, progress: &mut dyn FnMut(u64) -> Result<(), Error>) -> Result<(), Error> {
        for f in &self.envelope.files {
            let m = self.member(&f.href).ok_or_else(|| Error::new(format!("the descriptor references {}, which the package lacks", f.href)))?;
            if let Some(size) = f.size
                && size != m.size
            {
                return Err(Error::new(format!("{} is {} bytes but the descriptor says {size}", f.href, m.size)));
            }
        }
        let Some(manifest) = &self.manifest else { return Ok(()) };
        for f in &self.envelope.files {
            if !manifest.iter().any(|d| d.file == f.href) {
                return Err(Error::new(format!("the manifest does not list {}", f.href)));
            }
        }
        for digest in manifest {
            let m = self.member(&digest.file).ok_or_else(|| Error::new(format!("the manifest lists {}, which the package lacks", digest.file)))?;
            let got = hash_range(&m.file, m.offset, m.size, digest.algorithm, progress)?;
            if got != digest.hex {
                return Err(Error::new(format!("{}: {:?} digest {got} does not match the manifest's {}", m.name, digest.algorithm, digest.hex)));
            }
        }
        Ok(())
    }

    /// Whether the package has a manifest.
    pub fn has_manifest(&self) -> bool {
        self.manifest.is_some()
    }

    /// Copies member `name` to `dest` (a path the caller chose, never one from the archive).
    pub fn copy_member(&self, name: &str, dest: &Path) -> Result<(), Error> {
        let m = self.member(name).ok_or_else(|| Error::new(format!("the package has no file {name}")))?;
        let src = File::open(&m.file).map_err(|e| Error::new(format!("cannot open {}: {e}", m.file.display())))?;
        let mut out = File::create(dest).map_err(|e| Error::new(format!("cannot create {}: {e}", dest.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < m.size {
            let n = (m.size - done).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], m.offset + done).map_err(|e| Error::new(format!("reading {name}: {e}")))?;
            out.write_all(&buf[..n]).map_err(|e| Error::new(format!("writing {}: {e}", dest.display())))?;
            done += n as u64;
        }
        out.sync_all().map_err(|e| Error::new(format!("writing {}: {e}", dest.display())))
    }
}

/// The digest of `size` bytes of `file` at `offset`, as lower-case hex.
fn hash_range(file: &Path, offset: u64, size: u64, algorithm: Algorithm, progress: &mut dyn FnMut(u64) -> Result<(), Error>) -> Result<String, Error> {
    let f = File::open(file).map_err(|e| Error::new(format!("cannot open {}: {e}", file.display())))?;
    let mut sha1 = sha1::Sha1::new();
    let mut sha256 = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + done).map_err(|e| Error::new(format!("reading {}: {e}", file.display())))?;
        match algorithm {
            Algorithm::Sha1 => sha1.update(&buf[..n]),
            Algorithm::Sha256 => sha256.update(&buf[..n]),
        }
        done += n as u64;
        progress(n as u64)?;
    }
    let bytes: Vec<u8> = match algorithm {
        Algorithm::Sha1 => sha1.finalize().to_vec(),
        Algorithm::Sha256 => sha256.finalize().to_vec(),
    };
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The SHA-256 of a whole file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let len = std::fs::metadata(path).map_err(|e| Error::new(format!("{}: {e}", path.display())))?.len();
    hash_range(path, 0, len, Algorithm::Sha256, &mut |_| Ok(()))
}

/// Packs `files` (name in the archive, file) into an OVA at `dest`, in the order given (the
/// descriptor first, then the manifest, then the disks), as a POSIX ustar archive with fixed
/// owners and times.
pub fn write_ova(dest: &Path, files: &[(String, PathBuf)]) -> Result<(), Error> {
    let out = File::create(dest).map_err(|e| Error::new(format!("cannot create {}: {e}", dest.display())))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    for (name, path) in files {
        let mut f = File::open(path).map_err(|e| Error::new(format!("cannot open {}: {e}", path.display())))?;
        let size = f.metadata().map_err(|e| Error::new(format!("{}: {e}", path.display())))?.len();
        let mut header = tar::Header::new_ustar();
        header.set_path(name).map_err(|e| Error::new(format!("{name}: {e}")))?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut limited = (&mut f).take(size);
        builder.append(&header, &mut limited).map_err(|e| Error::new(format!("writing {}: {e}", dest.display())))?;
    }
    let out = builder.into_inner().map_err(|e| Error::new(format!("writing {}: {e}", dest.display())))?;
    let out = out.into_inner().map_err(|e| Error::new(format!("writing {}: {}", dest.display(), e.error())))?;
    out.sync_all().map_err(|e| Error::new(format!("writing {}: {e}", dest.display())))
}
