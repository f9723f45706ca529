//! The systemd notification protocol (sd_notify(3)): `READY=1` once ferrod serves, `STOPPING=1`
//! when it begins to stop. A datagram to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket); without that variable ferrod does not run under a `Type=notify` unit and nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where the service manager listens, taken from the environment once at start (and removed
/// from it, so the monitors and VMMs ferrod starts do not inherit it).
#[derive(Clone)]
pub struct Notifier {
    target: Option<SocketAddr>,
}

impl Notifier {
    /// Reads and removes `NOTIFY_SOCKET`.
    ///
    /// # Safety
    /// Changes the environment: call it while the process has a single thread.
    pub unsafe fn from_env() -> Result<Notifier, String> {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(Notifier { target: None }) };
        // SAFETY: the caller guarantees that no other thread reads or writes the environment.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let bytes = value.as_encoded_bytes();
        let target = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
            None if bytes.starts_with(b"/") => SocketAddr::from_pathname(&value),
            None => return Err(format!("NOTIFY_SOCKET={}: neither a path nor @name", value.to_string_lossy())),
        };
        target.map(|t| Notifier { target: Some(t) }).map_err(|e| format!("NOTIFY_SOCKET={}: {e}", value.to_string_lossy()))
    }

    /// Sends `state` (e.g. `READY=1`); a failure is logged, never fatal: the service manager
    /// decides what a missing notification means.
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else { return };
        let sent = UnixDatagram::unbound().and_then(|socket| socket.send_to_addr(state.as_bytes(), target));
        if let Err(e) = sent {
            tracing::warn!("cannot notify the service manager ({state}): {e}");
        }
    }
}
