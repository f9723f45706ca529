//! Which processes belong to a domain's run, proven rather than assumed, so that ferrod never
//! signals a stranger. A pid alone proves nothing after a crash or a power loss: the recorded
//! monitor may be long gone and its pid reused, possibly within the same clock tick (so that even
//! the start time matches), possibly by a process group leader that a group kill would take down
//! with its whole group.
//!
//! Every run gets a random token, recorded in the domain's runtime record before any process
//! carries it; the monitor is started with it in its environment (`FERRO_RUN_TOKEN`) and the VMM
//! inherits it. A process is one of the run's only if all of these hold:
//! - a pidfd was opened for it (so later signals reach that very process or nobody),
//! - its start time is the recorded one (for the monitor, whose start time ferrod records),
//! - its initial environment (`/proc/PID/environ`, which the process cannot rewrite through
//!   `exec` and strangers cannot guess) holds the run's token.
//!
//! Signals go through the pidfd (`pidfd_send_signal`), never through `kill(2)` on a pid or a
//! process group.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The environment variable carrying a run's token into the monitor and its VMM.
pub const TOKEN_VAR: &str = "FERRO_RUN_TOKEN";

/// Start time (clock ticks since boot) of a live, non-zombie process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 22 overall is the 20th after the command name (field 3 is the state just read).
    fields.nth(18)?.parse().ok()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall just returned this descriptor to us and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process now holding `pid` was started with `TOKEN_VAR=token` in its environment.
fn carries_token(pid: i32, token: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
    let wanted = format!("{TOKEN_VAR}={token}");
    environ.split(|&b| b == 0).any(|var| var == wanted.as_bytes())
}

/// A pidfd for `pid` if it is the run's process that started at `start`: the pidfd is opened
/// first, then the start time and token are checked, so a pid reused in between fails the checks
/// and a pid reused afterwards leaves the pidfd pointing at the process that was checked.
pub fn prove(pid: i32, start: u64, token: &str) -> Option<OwnedFd> {
    let fd = pidfd_open(pid)?;
    (start_time(pid) == Some(start) && carries_token(pid, token)).then_some(fd)
}

/// Sends `signal` to the process behind a pidfd; false if it is gone.
pub fn signal(pidfd: &OwnedFd, signal: i32) -> bool {
    // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number, a null siginfo and no
    // flags; no memory is passed.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) == 0 }
}

/// The pids of live processes that carry the run's token.
fn marked(token: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| carries_token(pid, token))
        .collect()
}

/// SIGKILLs every process of a run (the monitor and its VMM, whoever their parent is now) and
/// returns how many were signalled. Each is proven through a pidfd opened before its token is
/// read: if the pid changed hands in between, the signal goes to the (dead) process the pidfd
/// names, never to the newcomer.
pub fn kill_run(token: &str) -> usize {
    let mut killed = 0;
    // A process that is being killed still shows its environment until it is a zombie: a few
    // rounds see every process of the run dead or dying, without spinning on one that lingers.
    for _ in 0..3 {
        let pids = marked(token);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if let Some(fd) = pidfd_open(pid)
                && carries_token(pid, token)
                && signal(&fd, libc::SIGKILL)
            {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn only_processes_carrying_the_token_are_proven_and_killed() {
        let token = crate::model::new_uuid();
        let mut ours = Command::new("sleep").arg("600").env(TOKEN_VAR, &token).spawn().unwrap();
        let mut stranger = Command::new("sleep").arg("600").env(TOKEN_VAR, "someone-else").spawn().unwrap();
        let (our_pid, their_pid) = (ours.id() as i32, stranger.id() as i32);
        let (our_start, their_start) = (start_time(our_pid).unwrap(), start_time(their_pid).unwrap());

        assert!(prove(our_pid, our_start, &token).is_some());
        assert!(prove(our_pid, our_start + 1, &token).is_none(), "another start time is another process");
        assert!(prove(their_pid, their_start, &token).is_none(), "the right pid and start time are not enough");
        assert_eq!(marked(&token), [our_pid]);

        assert_eq!(kill_run(&token), 1);
        assert_eq!(ours.wait().unwrap().code(), None, "ours was killed");
        assert!(stranger.try_wait().unwrap().is_none(), "the stranger lives on");
        assert!(start_time(their_pid).is_some());
        assert_eq!(kill_run(&token), 0);
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        assert!(start_time(i32::MAX).is_none());
    }
}
