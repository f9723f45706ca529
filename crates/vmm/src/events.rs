//! What the VMM tells its supervisor: [`VmEvent`]s as JSON lines on a file descriptor the
//! supervisor handed over (`ferro vmm --event-fd N`), or, without one, log lines on stderr.

use ferro_devices::virtio::chains::NeedsResetReport;
use ferro_vmm_api::VmEvent;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

/// Where events go. Writes never block: a supervisor that stops reading loses events, not the VM.
#[derive(Debug, Default)]
pub struct EventSink {
    out: Option<Mutex<File>>,
}

impl EventSink {
    /// No supervisor: events that matter to a person become stderr lines.
    pub fn none() -> Arc<EventSink> {
        Arc::new(EventSink::default())
    }

    /// Takes ownership of `fd` (inherited from the supervisor), which must be open for writing.
    pub fn from_fd(fd: RawFd) -> Result<Arc<EventSink>, String> {
        // SAFETY: F_GETFL only reads the descriptor's flags; a closed fd fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fd < 3 || flags < 0 {
            return Err(format!("--event-fd {fd}: not an open file descriptor (3 or above) inherited from the caller"));
        }
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(format!("--event-fd {fd}: open for reading only; the VMM writes events to it"));
        }
        // SAFETY: fcntl on the fd checked above; non-blocking writes and close-on-exec keep a
        // stalled reader from stalling us and children from holding the pipe open.
        unsafe {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller gave us this descriptor; nothing else in the process uses it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Arc::new(EventSink { out: Some(Mutex::new(file)) }))
    }

    /// Whether events reach a supervisor.
    pub fn connected(&self) -> bool {
        self.out.is_some()
    }

    /// Writes one event line (dropped if the pipe is full or closed).
    pub fn emit(&self, event: &VmEvent) {
        let Some(out) = &self.out else { return };
        let Ok(mut line) = serde_json::to_vec(event) else { return };
        line.push(b'\n');
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(&line) {
            eprintln!("ferro: event not delivered to the supervisor ({e}): {}", String::from_utf8_lossy(&line).trim_end());
        }
    }

    /// What the virtio device `id` calls when its driver broke it: a `DeviceNeedsReset` event,
    /// or a log line (worded so no supervisor takes it for the guest resetting).
    pub fn needs_reset_report(self: &Arc<Self>, id: &str) -> NeedsResetReport {
        let (sink, id) = (self.clone(), id.to_owned());
        Arc::new(move |reason: &str| {
            if sink.connected() {
                sink.emit(&VmEvent::DeviceNeedsReset { device: id.clone(), reason: reason.to_owned() });
            } else {
                eprintln!("ferro: {id}: {reason}; the device stays broken until its driver resets it");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    #[test]
    fn events_are_json_lines_on_the_fd() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the read end is ours alone.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        let sink = EventSink::from_fd(fds[1]).unwrap();
        sink.emit(&VmEvent::Started { pid: 7 });
        (sink.needs_reset_report("vda"))("available ring: bad index");
        drop(sink);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let events: Vec<VmEvent> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            events,
            [
                VmEvent::Started { pid: 7 },
                VmEvent::DeviceNeedsReset { device: "vda".into(), reason: "available ring: bad index".into() }
            ]
        );
    }

    #[test]
    fn bad_fds_are_refused() {
        assert!(EventSink::from_fd(1000).unwrap_err().contains("not an open file descriptor"));
        assert!(EventSink::from_fd(1).is_err(), "stdout is not an event fd");
        let reader = File::open("/dev/null").unwrap().into_raw_fd();
        assert!(EventSink::from_fd(reader).unwrap_err().contains("reading only"));
        // SAFETY: closing the fd we opened above.
        unsafe { libc::close(reader) };
    }
}
