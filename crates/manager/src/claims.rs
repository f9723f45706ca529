//! Which files are in use, and by whom: a running domain holds its disks, a job the images it
//! reads and the ones it makes. Services claim files before they use them and check a claim
//! before they change a file, so that no request changes an image under its user. This is how
//! the pools service learns that a domain runs on a volume without knowing about domains.
//!
//! Files are compared by their resolved path (symlinks and `..` followed), so two spellings of one
//! file are one file. Writers exclude everybody; readers exclude writers only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Who holds a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A running (or paused) domain, by name.
    Domain(String),
    /// A job, by id and kind ("clone", ...).
    Job { id: u64, kind: String },
    /// A template's disks, for as long as it is a template: read, never written.
    Template(String),
    /// A request that changes a file while it runs (a volume upload, wipe or resize); `id` only
    /// tells two of them apart.
    Operation { id: u64, what: &'static str },
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Domain(name) => write!(f, "running domain {name}"),
            Holder::Template(name) => write!(f, "template {name} (a template's disks are read-only)"),
            Holder::Job { id, kind } => write!(f, "{kind} job {id} (see `ferro job-info {id}`)"),
            Holder::Operation { what, .. } => write!(f, "a volume {what} in progress"),
        }
    }
}

/// A refused claim: the file is held by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub path: PathBuf,
    pub holder: Holder,
}

#[derive(Default)]
pub struct Claims {
    held: Mutex<Vec<(PathBuf, Access, Holder)>>,
    operations: AtomicU64,
}

/// The claims of one operation, released when it is dropped (whichever way the operation ends).
pub struct Held {
    claims: Arc<Claims>,
    holder: Holder,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.claims.release(&self.holder);
    }
}

/// The path a claim is recorded under: the resolved file, or for a file not made yet, its
/// resolved directory plus its name.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent().and_then(|d| d.canonicalize().ok()), path.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

fn conflicts(a: Access, b: Access) -> bool {
    a == Access::Write || b == Access::Write
}

impl Claims {
    fn held(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, Access, Holder)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims every file of `uses` for `holder`, or none if one of them is held in a way that
    /// excludes the access asked for (claims of the same holder never conflict).
    pub fn claim(&self, uses: &[(PathBuf, Access)], holder: &Holder) -> Result<(), Busy> {
        let uses: Vec<(PathBuf, Access)> = uses.iter().map(|(p, a)| (resolved(p), *a)).collect();
        let mut held = self.held();
        for (path, access) in &uses {
            if let Some((_, _, other)) = held.iter().find(|(p, a, h)| p == path && h != holder && conflicts(*a, *access)) {
                return Err(Busy { path: path.clone(), holder: other.clone() });
            }
        }
        held.extend(uses.into_iter().map(|(p, a)| (p, a, holder.clone())));
        Ok(())
    }

    /// Whether `access` to `path` would be refused, and because of whom.
    pub fn check(&self, path: &Path, access: Access) -> Result<(), Busy> {
        let path = resolved(path);
        match self.held().iter().find(|(p, a, _)| *p == path && conflicts(*a, access)) {
            Some((_, _, holder)) => Err(Busy { path, holder: holder.clone() }),
            None => Ok(()),
        }
    }

    /// Claims `uses` for the operation `what` (an upload, a wipe) until the returned guard is
    /// dropped.
    pub fn hold(self: &Arc<Self>, uses: &[(PathBuf, Access)], what: &'static str) -> Result<Held, Busy> {
        let holder = Holder::Operation { id: self.operations.fetch_add(1, Ordering::Relaxed), what };
        self.claim(uses, &holder)?;
        Ok(Held { claims: self.clone(), holder })
    }

    /// Drops every claim of `holder`.
    pub fn release(&self, holder: &Holder) {
        self.held().retain(|(_, _, h)| h != holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everybody_and_readers_share() {
        let dir = std::env::temp_dir().join(format!("ferro-claims-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, b"").unwrap();
        let claims = Claims::default();
        let web = Holder::Domain("web".into());
        let copy = Holder::Job { id: 3, kind: "clone".into() };

        claims.claim(&[(disk.clone(), Access::Read)], &copy).unwrap();
        claims.claim(&[(disk.clone(), Access::Read)], &Holder::Domain("ro".into())).unwrap();
        // Another spelling of the same file is the same file.
        let other_spelling = dir.join("..").join(dir.file_name().unwrap()).join("disk.raw");
        let busy = claims.claim(&[(other_spelling, Access::Write)], &web).unwrap_err();
        assert_eq!(busy.holder, copy);
        assert_eq!(claims.check(&disk, Access::Write).unwrap_err().holder, copy);
        assert!(claims.check(&disk, Access::Read).is_ok());

        // All or nothing: the free file of a refused claim is not taken either.
        let new = dir.join("new.qcow2");
        assert!(claims.claim(&[(new.clone(), Access::Write), (disk.clone(), Access::Write)], &web).is_err());
        assert!(claims.check(&new, Access::Write).is_ok());

        claims.release(&copy);
        claims.release(&Holder::Domain("ro".into()));
        claims.claim(&[(disk.clone(), Access::Write), (new.clone(), Access::Write)], &web).unwrap();
        let busy = claims.check(&new, Access::Read).unwrap_err();
        assert_eq!(busy.holder.to_string(), "running domain web");
        claims.release(&web);
        assert!(claims.check(&disk, Access::Write).is_ok());

        // An operation holds its files until its guard goes, however it ends.
        let claims = Arc::new(claims);
        let upload = claims.hold(&[(disk.clone(), Access::Write)], "upload").unwrap();
        let busy = claims.hold(&[(disk.clone(), Access::Write)], "upload").err().unwrap();
        assert_eq!(busy.holder.to_string(), "a volume upload in progress");
        assert!(claims.claim(&[(disk.clone(), Access::Read)], &web).is_err());
        drop(upload);
        claims.claim(&[(disk.clone(), Access::Read)], &web).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
