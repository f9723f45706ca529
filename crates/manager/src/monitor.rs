//! The per-VM monitor: a tiny process (`ferrod monitor ...`) that ferrod starts in its own session,
//! which runs the VMM as its child, restarts it after a guest reset, and writes the VMM's final
//! exit status to a report file.
//!
//! It exists so that the exit status of a VMM is known even when ferrod was restarted (or killed)
//! while the VM ran: a restarted ferrod is not the VMM's parent and could not `wait` for it.

use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// What the monitor reports when the VMM is gone for good.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitReport {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// One line: the VMM's last stderr line, or how it died.
    pub reason: String,
    /// How many guest resets the monitor handled during this run.
    pub resets: u32,
}

pub struct MonitorArgs {
    pub exit_report: PathBuf,
    /// The VMM's stdout (guest console output when it has no terminal).
    pub log: PathBuf,
    /// The VMM's stderr: its error and reset lines.
    pub stderr: PathBuf,
    pub sockets: Vec<PathBuf>,
    pub command: Vec<String>,
}

/// The VMM prints `reset` on stderr before exiting for a hard reset (docs/vmm-control.md); the
/// current VMM prefixes it ("ferro: guest reset"), so the last word is what counts.
fn is_reset_line(line: &str) -> bool {
    line == "reset" || line.ends_with(" reset")
}

/// Runs the VMM until it exits for a reason other than a reset; never returns early on errors
/// without writing a report, so ferrod always learns why the domain stopped.
pub fn run(args: MonitorArgs) -> ExitCode {
    let mut resets = 0;
    let report = loop {
        for socket in &args.sockets {
            let _ = std::fs::remove_file(socket);
        }
        match run_once(&args) {
            Ok((status, last_line)) => {
                if status.code() == Some(0) && last_line.as_deref().is_some_and(is_reset_line) {
                    resets += 1;
                    continue;
                }
                let reason = match (status.code(), status.signal(), last_line) {
                    (Some(0), _, _) => "guest powered off or VMM stopped".to_string(),
                    (_, _, Some(line)) => line,
                    (_, Some(sig), None) => format!("VMM killed by signal {sig} ({})", signal_name(sig)),
                    (Some(code), _, None) => format!("VMM exited with status {code} without a message"),
                    (None, None, None) => "VMM exited".to_string(),
                };
                break ExitReport { code: status.code(), signal: status.signal(), reason, resets };
            }
            Err(reason) => break ExitReport { code: None, signal: None, reason, resets },
        }
    };
    let failed = report.code != Some(0);
    if let Err(e) = write_report(&args.exit_report, &report) {
        eprintln!("ferrod monitor: cannot write {}: {e}", args.exit_report.display());
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn run_once(args: &MonitorArgs) -> Result<(std::process::ExitStatus, Option<String>), String> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open VMM log {}: {e}", path.display()))
    };
    let stdout = open(&args.log)?;
    let mut stderr = open(&args.stderr)?;
    let start = stderr.seek(SeekFrom::End(0)).unwrap_or(0);
    let (program, rest) = args.command.split_first().ok_or("no VMM command given")?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr.try_clone().map_err(|e| format!("cannot open VMM log: {e}"))?)
        .spawn()
        .map_err(|e| format!("cannot run VMM {program}: {e}"))?;
    let status = child.wait().map_err(|e| format!("cannot wait for VMM: {e}"))?;
    let _ = stderr.flush();
    Ok((status, last_line_since(&args.stderr, start)))
}

/// The last non-empty line written to `path` after byte offset `start` (at most 4 KiB back).
fn last_line_since(path: &Path, start: u64) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let end = file.seek(SeekFrom::End(0)).ok()?;
    let from = start.max(end.saturating_sub(4096));
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // Prefer an error line among the last few (clap, for one, ends with a "--help" hint).
    let recent = &lines[lines.len().saturating_sub(3)..];
    recent.iter().rev().find(|l| l.to_ascii_lowercase().contains("error")).or(recent.last()).map(|l| l.to_string())
}

/// Written whole and synced (see `durable`): ferrod, restarted after a power loss, reads either no
/// report (the VM was still running) or a complete one.
fn write_report(path: &Path, report: &ExitReport) -> std::io::Result<()> {
    crate::durable::write(path, &serde_json::to_vec(report).map_err(std::io::Error::other)?)
}

/// Reads a report written by a monitor, if there is one.
pub fn read_report(path: &Path) -> Option<ExitReport> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_how_the_vmm_ended() {
        let dir = std::env::temp_dir().join(format!("ferro-monitor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stale_socket = dir.join("api.sock");
        std::fs::write(&stale_socket, b"").unwrap();
        let args = MonitorArgs {
            exit_report: dir.join("exit.json"),
            log: dir.join("vmm.log"),
            stderr: dir.join("vmm.stderr"),
            sockets: vec![stale_socket.clone()],
            command: ["sh", "-c", "echo booting; echo 'error: no such kernel' >&2; exit 3"].map(String::from).to_vec(),
        };
        assert_eq!(run(args), ExitCode::FAILURE);
        let report = read_report(&dir.join("exit.json")).unwrap();
        assert_eq!(report, ExitReport { code: Some(3), signal: None, reason: "error: no such kernel".into(), resets: 0 });
        assert!(!stale_socket.exists(), "stale sockets are removed before the VMM starts");
        assert_eq!(std::fs::read_to_string(dir.join("vmm.log")).unwrap(), "booting\n");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
