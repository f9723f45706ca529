//! Crash points: ferrod's durable steps (every state store commit, every durable file write or
//! rename, volume delete, the spawn of a VMM monitor) call [`step`]. Normally that does nothing. With
//! `FERRO_CRASH_AT=N` in ferrod's environment, the N-th step since ferrod became ready ([`arm`];
//! steps of its start-up and of other processes, such as VMM monitors, are not counted) kills ferrod
//! with SIGKILL before the step happens (printing which step on stderr), which is how
//! crates/manager/tests/crash_steps.rs stops ferrod at every step of an operation in turn and
//! checks that a restarted ferrod finds a consistent state and can finish or redo the operation.
//! `FERRO_CRASH_TRACE=1` prints every step instead, numbered, without killing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);

/// ferrod is ready (its socket is up): count steps from here on.
pub fn arm() {
    ARMED.store(true, Ordering::SeqCst);
}

enum Mode {
    Off,
    KillAt(u64),
    Trace,
}

fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        if let Some(n) = std::env::var("FERRO_CRASH_AT").ok().and_then(|v| v.parse().ok()) {
            Mode::KillAt(n)
        } else if std::env::var_os("FERRO_CRASH_TRACE").is_some() {
            Mode::Trace
        } else {
            Mode::Off
        }
    })
}

/// A durable step is about to happen (`what` names it for the log).
pub fn step(what: &str) {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    if !ARMED.load(Ordering::SeqCst) {
        return;
    }
    match mode() {
        Mode::Off => {}
        Mode::Trace => eprintln!("crash point {}: {what}", COUNT.fetch_add(1, Ordering::SeqCst) + 1),
        Mode::KillAt(n) => {
            if COUNT.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                eprintln!("crash point {n}: killed before {what}");
                // SAFETY: kill(2) on our own pid with a signal number; SIGKILL ends the process
                // here, like a crash, without running destructors or flushing anything.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
}
