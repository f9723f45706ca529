//! The per-VM monitor: a tiny process (`ferrod monitor ...`) that ferrod starts in its own session,
//! which runs the VMM as its child, restarts it after a guest reset, and writes the VMM's final
//! exit status to a report file.
//!
//! It exists so that the exit status of a VMM is known even when ferrod was restarted (or killed)
//! while the VM ran: a restarted ferrod is not the VMM's parent and could not `wait` for it.
//!
//! The monitor gives each VMM a pipe (`--event-fd N`, appended to the VMM's command) and reads
//! its typed events (`ferro_vmm_api::VmEvent`): the `exited` event says why the VM stopped, and
//! only an exit for a reset restarts it. A device that needs a reset is noted in the VMM's stderr
//! log. A VMM that dies without an `exited` event (killed, crashed) is described by its status and
//! its last stderr line.
//!
//! With `--jail SPEC` the monitor hands the VMM user the files it needs (given back at the end)
//! and starts each VMM run in a fresh jail (`ferro_jail::jail`, docs/isolation.md).

use ferro_jail::jail::{JailSpec, Prepared};
use ferro_vmm_api::control::MAX_LINE;
use ferro_vmm_api::{ExitReason, VmEvent};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

/// How long the monitor waits, after the VMM is gone, for the reader of its event pipe.
const EVENT_DRAIN: Duration = Duration::from_secs(2);

/// What the monitor reports when the VMM is gone for good.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitReport {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// One line: why the VM stopped as the VMM said it, else how it died.
    pub reason: String,
    /// How many guest resets the monitor handled during this run.
    pub resets: u32,
}

pub struct MonitorArgs {
    pub exit_report: PathBuf,
    /// The VMM's stdout (guest console output when it has no terminal).
    pub log: PathBuf,
    /// The VMM's stderr: its error lines, and the devices its events said need a reset.
    pub stderr: PathBuf,
    pub sockets: Vec<PathBuf>,
    /// The VMM command line, without `--event-fd` (the monitor adds it).
    pub command: Vec<String>,
    /// Added to the command for the first run only: a VM restored from a snapshot boots afresh
    /// after a guest reset.
    pub first_run_args: Vec<String>,
    /// The jail's description, if the VMM runs jailed.
    pub jail: Option<PathBuf>,
}

/// How one run of the VMM ended.
struct RunEnd {
    status: std::process::ExitStatus,
    /// The reason of its `exited` event, if it sent one.
    exited: Option<ExitReason>,
    last_line: Option<String>,
}

/// Runs the VMM until it exits for a reason other than a reset; never returns early on errors
/// without writing a report, so ferrod always learns why the domain stopped.
pub fn run(args: MonitorArgs) -> ExitCode {
    let jail = match args.jail.as_deref().map(grant_jail).transpose() {
        Ok(jail) => jail,
        Err(reason) => {
            let report = ExitReport { code: None, signal: None, reason, resets: 0 };
            return finish(&args, &report);
        }
    };
    let mut resets = 0;
    let report = loop {
        for socket in &args.sockets {
            let _ = std::fs::remove_file(socket);
        }
        let first_run = if resets == 0 { args.first_run_args.as_slice() } else { &[] };
        match run_once(&args, first_run, jail.as_ref().map(|(spec, _)| spec)) {
            Ok(RunEnd { exited: Some(ExitReason::Reset), status, .. }) if status.success() => {
                resets += 1;
            }
            Ok(end) => break ExitReport { code: end.status.code(), signal: end.status.signal(), reason: reason(&end), resets },
            Err(reason) => break ExitReport { code: None, signal: None, reason, resets },
        }
    };
    for failure in jail.map(|(_, owners)| ferro_jail::jail::restore_owners(&owners)).unwrap_or_default() {
        eprintln!("ferrod monitor: {failure}");
    }
    finish(&args, &report)
}

/// Reads the jail's description and hands the VMM user its files for the whole run.
fn grant_jail(path: &Path) -> Result<(JailSpec, Vec<ferro_jail::jail::Owner>), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read the VMM's jail {}: {e}", path.display()))?;
    let spec: JailSpec = serde_json::from_slice(&text).map_err(|e| format!("the VMM's jail {}: {e}", path.display()))?;
    let owners = ferro_jail::jail::grant(&spec)?;
    Ok((spec, owners))
}

/// Writes the report; the monitor's exit status says whether the VMM ended well.
fn finish(args: &MonitorArgs, report: &ExitReport) -> ExitCode {
    let failed = report.code != Some(0);
    if let Err(e) = write_report(&args.exit_report, report) {
        eprintln!("ferrod monitor: cannot write {}: {e}", args.exit_report.display());
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// One line saying why a run ended: the VMM's own word when it sent one, else what its status
/// and stderr show.
fn reason(end: &RunEnd) -> String {
    match &end.exited {
        Some(ExitReason::PowerOff) => "guest powered off".to_string(),
        Some(ExitReason::Quit) => "VMM stopped (quit)".to_string(),
        Some(ExitReason::Migrated) => "migrated away: the guest runs on the destination".to_string(),
        Some(ExitReason::Reset) => "guest reset, but the VMM did not exit cleanly".to_string(),
        Some(ExitReason::Signal(sig)) => format!("VMM stopped by signal {sig} ({})", signal_name(*sig)),
        Some(ExitReason::DebugExit(status)) => format!("guest exited with status {status} (debug-exit port)"),
        Some(ExitReason::Error(message)) => message.clone(),
        None => match (end.status.code(), end.status.signal(), &end.last_line) {
            (_, Some(libc::SIGSYS), last_line) => seccomp_reason(last_line.as_deref()),
            (Some(0), _, _) => "VMM exited without saying why".to_string(),
            (_, _, Some(line)) => line.clone(),
            (_, Some(sig), None) => format!("VMM killed by signal {sig} ({})", signal_name(sig)),
            (Some(code), _, None) => format!("VMM exited with status {code} without a message"),
            (None, None, None) => "VMM exited".to_string(),
        },
    }
}

/// Why a VMM died of SIGSYS: its seccomp filter caught a call outside its thread's allowlist.
/// The VMM's SIGSYS handler names the thread kind and the call in its last stderr line.
fn seccomp_reason(last_line: Option<&str>) -> String {
    match last_line.and_then(ferro_jail::seccomp::forbidden_call_in) {
        Some((kind, call)) => {
            format!("seccomp: the VMM's {kind} thread made the forbidden system call {call}; killed by SIGSYS")
        }
        None => "seccomp: VMM killed by SIGSYS (a system call outside its seccomp allowlist)".to_string(),
    }
}

fn run_once(args: &MonitorArgs, first_run: &[String], jail: Option<&JailSpec>) -> Result<RunEnd, String> {
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
    let (events, event_writer) = event_pipe()?;
    let writer_fd = event_writer.as_raw_fd();
    let jail = jail.map(Prepared::new).transpose()?;
    let mut command = Command::new(program);
    command
        .args(rest)
        .args(first_run)
        .arg("--event-fd")
        .arg(writer_fd.to_string())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr.try_clone().map_err(|e| format!("cannot open VMM log: {e}"))?);
    // SAFETY: runs in the forked child before exec and only calls fcntl(2), which is
    // async-signal-safe, on a descriptor the child inherited (the VMM keeps the pipe's write
    // end), then enters the jail, which only makes system calls on memory prepared before the
    // fork (`Prepared::enter`).
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(writer_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            jail.as_ref().map_or(Ok(()), Prepared::enter)
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        // A jail step that failed named itself on the VMM's stderr.
        Err(e) => return Err(match last_line_since(&args.stderr, start) {
            Some(step) => format!("cannot run VMM {program}: {step}: {e}"),
            None => format!("cannot run VMM {program}: {e}"),
        }),
    };
    // Only the VMM holds the write end now, so the reader sees the end of the pipe when it exits.
    drop(event_writer);
    let notes = stderr.try_clone().map_err(|e| format!("cannot open VMM log: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || read_events(events, notes, tx));
    let status = child.wait().map_err(|e| format!("cannot wait for VMM: {e}"))?;
    // The events were written before the VMM exited; the reader has them, or the pipe's end, soon.
    let mut exited = None;
    while let Ok(reason) = rx.recv_timeout(EVENT_DRAIN) {
        exited = Some(reason);
    }
    let _ = stderr.flush();
    Ok(RunEnd { status, exited, last_line: last_line_since(&args.stderr, start) })
}

/// A pipe for the VMM's events: (read end, write end), both close-on-exec.
fn event_pipe() -> Result<(std::fs::File, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("cannot make the VMM's event pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these descriptors to us and nothing else owns them.
    unsafe { Ok((std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Reads the VMM's event lines until the pipe ends: sends the reason of `exited` events to the
/// monitor and notes devices that need a reset in the stderr log. Lines that are not events, or
/// longer than a control line may be, are skipped.
fn read_events(events: std::fs::File, mut notes: std::fs::File, exited: std::sync::mpsc::Sender<ExitReason>) {
    let mut reader = BufReader::new(events);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match serde_json::from_slice::<VmEvent>(&line) {
            Ok(VmEvent::Exited { reason }) => {
                let _ = exited.send(reason);
            }
            Ok(VmEvent::DeviceNeedsReset { device, reason }) => {
                let _ = writeln!(notes, "ferrod monitor: device {device} stopped until its driver resets it: {reason}");
            }
            Ok(VmEvent::Started { .. }) | Err(_) => {}
        }
    }
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
    // Prefer a seccomp report, then an error line among the last few (clap, for one, ends with a
    // "--help" hint).
    let recent = &lines[lines.len().saturating_sub(3)..];
    let report = recent.iter().rev().find(|l| ferro_jail::seccomp::forbidden_call_in(l).is_some());
    report.or_else(|| recent.iter().rev().find(|l| l.to_ascii_lowercase().contains("error"))).or(recent.last()).map(|l| l.to_string())
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
            first_run_args: Vec::new(),
            jail: None,
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

    /// Resets are known by the VMM's `exited` event, not by its stderr: a run that ends for a
    /// reset is started again (without the first run's extra arguments: a restored VM boots
    /// afresh after a reset); a later run whose last stderr line ends in "reset" (a broken
    /// queue, say) but that powered off is not.
    #[test]
    fn only_an_exited_event_for_a_reset_restarts_the_vmm() {
        let dir = std::env::temp_dir().join(format!("ferro-monitor-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The pipe's descriptor may be above 9, which sh cannot name in a redirection.
        let script = format!(
            r#"eval fd=\${{$#}}
            echo "$@" >> {dir}/runs
            if [ ! -e {dir}/reset-done ]; then
                touch {dir}/reset-done
                echo '{{"event":"started","pid":1}}' > /proc/self/fd/$fd
                echo '{{"event":"exited","reason":"reset"}}' > /proc/self/fd/$fd
                exit 0
            fi
            echo 'not an event' > /proc/self/fd/$fd
            echo '{{"event":"device_needs_reset","device":"vda","reason":"queue 0 is broken"}}' > /proc/self/fd/$fd
            echo 'virtio-blk vda: the driver broke queue 0; the device needs a reset' >&2
            echo '{{"event":"exited","reason":"power_off"}}' > /proc/self/fd/$fd
            exit 0"#,
            dir = dir.display()
        );
        let args = MonitorArgs {
            exit_report: dir.join("exit.json"),
            log: dir.join("vmm.log"),
            stderr: dir.join("vmm.stderr"),
            sockets: Vec::new(),
            command: vec!["sh".into(), "-c".into(), script, "vmm".into()],
            first_run_args: vec!["--restore".into(), "/snap".into()],
            jail: None,
        };
        assert_eq!(run(args), ExitCode::SUCCESS);
        let report = read_report(&dir.join("exit.json")).unwrap();
        assert_eq!(report, ExitReport { code: Some(0), signal: None, reason: "guest powered off".into(), resets: 1 });
        let runs = std::fs::read_to_string(dir.join("runs")).unwrap();
        let runs: Vec<&str> = runs.lines().collect();
        assert!(runs.len() == 2 && runs[0].starts_with("--restore /snap --event-fd ") && runs[1].starts_with("--event-fd "), "{runs:?}");
        let log = std::fs::read_to_string(dir.join("vmm.stderr")).unwrap();
        assert!(log.contains("device vda stopped until its driver resets it: queue 0 is broken"), "{log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A VMM that dies of SIGSYS was stopped by its seccomp filter: the report says so, with the
    /// thread kind and call number its SIGSYS handler wrote, or without them if it wrote none.
    #[test]
    fn a_sigsys_death_is_reported_as_seccomp_with_the_call() {
        let dir = std::env::temp_dir().join(format!("ferro-monitor-sigsys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let run_script = |name: &str, script: &str| {
            let args = MonitorArgs {
                exit_report: dir.join(format!("{name}.json")),
                log: dir.join("vmm.log"),
                stderr: dir.join(format!("{name}.stderr")),
                sockets: Vec::new(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                first_run_args: Vec::new(),
                jail: None,
            };
            assert_eq!(run(args), ExitCode::FAILURE);
            read_report(&dir.join(format!("{name}.json"))).unwrap()
        };
        let report = run_script(
            "named",
            "echo 'error: a line before' >&2; echo 'ferro: seccomp: vcpu thread made the forbidden system call 110' >&2; kill -SYS $$",
        );
        assert_eq!(
            report,
            ExitReport {
                code: None,
                signal: Some(libc::SIGSYS),
                reason: "seccomp: the VMM's vcpu thread made the forbidden system call 110; killed by SIGSYS".into(),
                resets: 0
            }
        );
        let report = run_script("unnamed", "kill -SYS $$");
        assert_eq!(report.reason, "seccomp: VMM killed by SIGSYS (a system call outside its seccomp allowlist)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
