//! Why a VM stopped, and the one-shot signal vCPU threads use to ask the main thread to stop it.

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// The guest reset (i8042, triple fault, KVM reset event).
    Reset,
    /// A test guest wrote to isa-debug-exit; the process status to exit with.
    DebugExit(i32),
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The user typed the console escape, or the control socket asked to quit.
    Quit,
    /// A fatal error; the message says what failed.
    Error(String),
}

impl ExitReason {
    /// The process exit status for `ferro run`.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Quit | ExitReason::Signal(_) => 0,
            ExitReason::DebugExit(s) => *s,
            ExitReason::Error(_) => 2,
        }
    }
}

/// The first reason wins; the eventfd wakes the main loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    pub event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal { reason: Mutex::new(None), event: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            let _ = self.event.write(1);
        }
    }

    pub fn take(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
