//! Builds the web UI (`ui/` at the top of the repository) with npm into OUT_DIR and writes
//! `ui_assets.rs`: the built files as `(path, bytes)` pairs that `api/ui.rs` embeds into ferrod.
//! npm runs only when something under `ui/` changed; `npm ci` only when `package-lock.json` is
//! newer than what `ui/node_modules` holds. Without npm the build stops saying how to get it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ui = manifest.join("../../ui");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ui");
    for input in ["index.html", "package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "src"] {
        println!("cargo:rerun-if-changed={}", ui.join(input).display());
    }
    if let Err(e) = build(&ui, &out) {
        eprintln!("error: building the web UI (ui/): {e}");
        std::process::exit(1);
    }
}

fn build(ui: &Path, out: &Path) -> Result<(), String> {
    let lock = ui.join("package-lock.json");
    let installed = ui.join("node_modules/.package-lock.json");
    if modified(&installed).is_none() || modified(&installed) < modified(&lock) {
        npm(ui, &["ci", "--no-audit", "--no-fund"], out)?;
    }
    npm(ui, &["run", "build"], out)?;
    let mut files = Vec::new();
    list_files(out, out, &mut files)?;
    files.sort();
    if !files.iter().any(|(path, _)| path == "/index.html") {
        return Err(format!("npm run build made no index.html in {}", out.display()));
    }
    let mut code = String::from("/// The web UI's files: (path under `/`, contents).\npub static UI_FILES: &[(&str, &[u8])] = &[\n");
    for (path, file) in &files {
        code.push_str(&format!("    ({path:?}, include_bytes!({:?})),\n", file.display().to_string()));
    }
    code.push_str("];\n");
    let target = out.parent().ok_or("OUT_DIR has no parent")?.join("ui_assets.rs");
    std::fs::write(&target, code).map_err(|e| format!("cannot write {}: {e}", target.display()))
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn npm(ui: &Path, args: &[&str], out: &Path) -> Result<(), String> {
    let shown = format!("npm {}", args.join(" "));
    let status = Command::new("npm")
        .args(args)
        .current_dir(ui)
        .env("FERRO_UI_OUT", out)
        // npm's progress and vite's report go to cargo's build log, never to our stdout (cargo reads that).
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "npm not found: install Node.js 18 or newer with npm (scripts/setup.sh does: apt-get install nodejs npm)".to_string()
            } else {
                format!("cannot run {shown}: {e}")
            }
        })?;
    if !status.success() {
        return Err(format!("{shown} in {} failed ({status}); its output is above", ui.display()));
    }
    Ok(())
}

fn list_files(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?.path();
        if path.is_dir() {
            list_files(root, &path, files)?;
        } else {
            let relative = path.strip_prefix(root).map_err(|e| e.to_string())?;
            files.push((format!("/{}", relative.display()), path.clone()));
        }
    }
    Ok(())
}
