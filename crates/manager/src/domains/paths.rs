//! Where the files a domain definition names may lie: with `allowed_image_paths` (ferrod's file)
//! or `--allow-path` set, every disk `path`, `boot.kernel` and `boot.initrd` must resolve (symlinks
//! followed, `..` applied) to a place under one of those directories or under a pool's target
//! directory; pool volumes are inside their pool by construction. Checked when a domain is defined
//! and again when it starts (a symlink planted later, or a list narrowed since); at the start,
//! every backing file of every disk (pool volumes too) must lie in those places as well. Without
//! the setting any path is allowed, as before.

use super::Domains;
use crate::vmm::ResolvedDisk;
use crate::domain::DomainConfig;
use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// `path` made absolute and free of `.`, `..` and symlinks as far as it exists: the longest
/// existing prefix is canonicalized, the rest applied lexically.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    // The components below the existing prefix, last first.
    let mut rest: Vec<Component> = Vec::new();
    for component in path.components().rev() {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(name) => out.push(name),
                    _ => {}
                }
            }
            return out;
        }
        rest.push(component);
        existing.pop();
    }
    path.to_path_buf()
}

/// The allowed directories as configured (for messages) and resolved (for the check).
struct Allowed {
    dirs: Vec<PathBuf>,
    resolved: Vec<PathBuf>,
}

impl Allowed {
    /// Refuses `path` (named by `key`) unless it resolves into an allowed directory.
    fn check(&self, key: &str, path: &Path) -> Result<()> {
        let real = resolve(path);
        if self.resolved.iter().any(|dir| real.starts_with(dir)) {
            return Ok(());
        }
        let shown = if real == path { String::new() } else { format!(" (resolving to {})", real.display()) };
        let list: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        Err(Error::invalid(format!(
            "{key}: {}{shown} is outside the directories domains may use ({}); put the file in a pool, or add its \
             directory to allowed_image_paths in ferrod's configuration (--allow-path)",
            path.display(),
            list.join(", ")
        )))
    }
}

impl Domains {
    /// The allowed directories then every pool's target; None when any place is allowed.
    fn allowed(&self) -> Option<Allowed> {
        if self.confinement.allowed_paths.is_empty() {
            return None;
        }
        let pools = self.pools.list().into_iter().map(|p| PathBuf::from(p.target));
        let dirs: Vec<PathBuf> = self.confinement.allowed_paths.iter().cloned().chain(pools).collect();
        let resolved = dirs.iter().map(|dir| resolve(dir)).collect();
        Some(Allowed { dirs, resolved })
    }

    /// Refuses a definition naming a file outside the allowed directories, naming the key.
    pub(super) fn check_paths(&self, config: &DomainConfig) -> Result<()> {
        let Some(allowed) = self.allowed() else { return Ok(()) };
        for (key, path) in [("boot.kernel", &config.boot.kernel), ("boot.initrd", &config.boot.initrd)] {
            if let Some(path) = path {
                allowed.check(key, Path::new(path))?;
            }
        }
        for (i, disk) in config.disks.iter().enumerate() {
            if let Some(path) = &disk.path {
                allowed.check(&format!("disk[{i}].path"), Path::new(path))?;
            }
        }
        Ok(())
    }

    /// Refuses a start whose disks (resolved, pool volumes too) have a backing file outside the
    /// allowed directories: an image's header, which whoever wrote the image chose, names it.
    /// Each backing file is checked before anything opens it (it could be a device or a FIFO).
    pub(super) fn check_backing_files(&self, disks: &[ResolvedDisk]) -> Result<()> {
        let Some(allowed) = self.allowed() else { return Ok(()) };
        for (i, disk) in disks.iter().enumerate() {
            let mut next = Some((disk.path.clone(), ferro_block::Format::from_name(disk.format.name())));
            let mut depth = 0;
            while let Some((path, format)) = next.take() {
                let key = format!("disk[{i}]: {}: backing file", path.display());
                let info = ferro_block::ops::info(&path, format, false, true)
                    .map_err(|e| Error::invalid(format!("disk[{i}]: {}: {e}", path.display())))?
                    .into_iter()
                    .next();
                let Some(backing) = info.as_ref().and_then(|i| i.full_backing_file.clone()) else { continue };
                allowed.check(&key, &backing)?;
                depth += 1;
                if depth >= ferro_block::MAX_CHAIN_DEPTH {
                    return Err(Error::invalid(format!("{key}: chain deeper than {} images", ferro_block::MAX_CHAIN_DEPTH)));
                }
                let format = info.and_then(|i| i.backing_format).and_then(|name| ferro_block::Format::from_name(&name));
                next = Some((backing, format));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;
    use std::path::Path;

    #[test]
    fn resolve_applies_dotdot_and_symlinks_beyond_what_exists() {
        let dir = std::env::temp_dir().join(format!("ferro-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let real = dir.canonicalize().unwrap();
        assert_eq!(resolve(&dir.join("images/../images/a.qcow2")), real.join("images/a.qcow2"));
        assert_eq!(resolve(&dir.join("images/new/../../escape.img")), real.join("escape.img"));
        std::os::unix::fs::symlink("/etc", dir.join("images/etc")).unwrap();
        assert_eq!(resolve(&dir.join("images/etc/passwd")), Path::new("/etc/passwd"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
