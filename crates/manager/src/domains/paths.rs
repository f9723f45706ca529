//! Where the files a domain definition names may lie: with `allowed_image_paths` (ferrod's file)
//! or `--allow-path` set, every disk `path`, `boot.kernel` and `boot.initrd` must resolve (symlinks
//! followed, `..` applied) to a place under one of those directories or under a pool's target
//! directory; pool volumes are inside their pool by construction. Checked when a domain is defined
//! and again when it starts (a symlink planted later, or a list narrowed since). Without the
//! setting any path is allowed, as before.

use super::Domains;
use crate::domain::DomainConfig;
use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// `path` made absolute and free of `.`, `..` and symlinks as far as it exists: the longest
/// existing prefix is canonicalized, the rest applied lexically.
fn resolve(path: &Path) -> PathBuf {
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

impl Domains {
    /// Refuses a definition naming a file outside the allowed directories, naming the key.
    pub(super) fn check_paths(&self, config: &DomainConfig) -> Result<()> {
        if self.confinement.allowed_paths.is_empty() {
            return Ok(());
        }
        let pools = self.pools.list().into_iter().map(|p| PathBuf::from(p.target));
        let dirs: Vec<PathBuf> = self.confinement.allowed_paths.iter().cloned().chain(pools).collect();
        let allowed: Vec<PathBuf> = dirs.iter().map(|dir| resolve(dir)).collect();
        let mut named: Vec<(String, &str)> = Vec::new();
        named.extend(config.boot.kernel.as_deref().map(|p| ("boot.kernel".to_string(), p)));
        named.extend(config.boot.initrd.as_deref().map(|p| ("boot.initrd".to_string(), p)));
        for (i, disk) in config.disks.iter().enumerate() {
            named.extend(disk.path.as_deref().map(|p| (format!("disk[{i}].path"), p)));
        }
        for (key, path) in named {
            let real = resolve(Path::new(path));
            if !allowed.iter().any(|dir| real.starts_with(dir)) {
                let shown = if real == Path::new(path) { String::new() } else { format!(" (resolving to {})", real.display()) };
                let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(Error::invalid(format!(
                    "{key}: {path}{shown} is outside the directories domains may use ({}); put the file in a pool, or add its \
                     directory to allowed_image_paths in ferrod's configuration (--allow-path)",
                    list.join(", ")
                )));
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
