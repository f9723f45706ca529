//! Records the git revision being built (`git rev-parse --short=12 HEAD`) for `--version`. Outside
//! a git checkout (a source tarball) or without git, the version says so instead. The script runs
//! again when this checkout's HEAD moves (a commit, checkout or rebase step): it watches HEAD and
//! the HEAD reflog of the worktree's git directory.

use std::path::Path;
use std::process::Command;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(&manifest).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
    };
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for file in ["HEAD", "logs/HEAD"] {
            let path = Path::new(&git_dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let described = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(revision) => format!("{version} (git {revision})"),
        None => format!("{version} (not built from a git checkout)"),
    };
    println!("cargo:rustc-env=FERRO_VERSION={described}");
}
