//! File operations that survive a crash or a power loss: a rename is only durable once the
//! directory holding the new name is synced, and a file written in place is only whole once its
//! data is synced before it takes its final name.

use std::io::Write;
use std::path::Path;

/// Syncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames `from` to `to` and syncs the directories involved, so that after a crash `to` is either
/// the old file or the new one, and stays the new one once this returned. `from`'s data must be
/// synced by the caller before (the rename does not order data writes).
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    crate::crashpoint::step("durable rename");
    std::fs::rename(from, to)?;
    sync_dir(parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(parent(from))?;
    }
    Ok(())
}

/// Replaces `path` with `data` atomically and durably: written to a hidden file beside it, synced,
/// renamed over it, directory synced. A crash leaves the old content or the new, never a mix.
pub fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    crate::crashpoint::step("durable write");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    match written.and_then(|()| rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferro-durable-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rename_moves_the_file_and_reports_failures() {
        let dir = temp_dir("rename");
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a"), b"new").unwrap();
        std::fs::write(dir.join("sub/b"), b"old").unwrap();
        rename(&dir.join("a"), &dir.join("sub/b")).unwrap();
        assert_eq!(std::fs::read(dir.join("sub/b")).unwrap(), b"new");
        assert!(!dir.join("a").exists());
        // A missing source, or a target directory that does not exist, is an error, not a no-op.
        assert!(rename(&dir.join("a"), &dir.join("c")).is_err());
        std::fs::write(dir.join("d"), b"x").unwrap();
        let e = rename(&dir.join("d"), &dir.join("nowhere/d")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(dir.join("d").exists(), "a failed rename leaves the source");
        assert!(sync_dir(&dir.join("nowhere")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_replaces_whole_and_leaves_no_temporary() {
        let dir = temp_dir("write");
        let path = dir.join("exit.json");
        write(&path, b"first").unwrap();
        write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["exit.json"]);
        // Into a directory that is not there: an error, and nothing is left behind.
        assert!(write(&dir.join("gone/exit.json"), b"x").is_err());
        // Over a directory: the rename fails and the temporary file is removed.
        std::fs::create_dir(dir.join("taken")).unwrap();
        assert!(write(&dir.join("taken"), b"x").is_err());
        assert!(!dir.join(".taken.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
