//! The one-shot signal vCPU threads and the control socket use to ask the main thread to stop
//! the VM, with why ([`ExitReason`], from the control protocol).

pub use ferro_vmm_api::ExitReason;
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

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
