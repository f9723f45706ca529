//! The console's saved state: the backend it was connected to (for messages: the configuration
//! says where the restored port goes, and stdio fds and ptys do not outlive a process), what the
//! driver accepted, and the bytes still in flight either way. Queues belong to the transport.

use super::Console;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// "stdio", "pty" or "socket".
    pub backend: String,
    /// The pty or socket path.
    pub path: Option<PathBuf>,
    pub acked_features: u64,
    /// Host input not yet delivered to the guest.
    pub input: Vec<u8>,
    /// Guest output not yet taken by the host side.
    pub output: Vec<u8>,
}

impl Console {
    pub(super) fn state(&self) -> ConsoleState {
        let port = self.port.lock().unwrap_or_else(|p| p.into_inner());
        let (backend, path) = port.describe();
        ConsoleState {
            backend: backend.to_owned(),
            path,
            acked_features: self.acked_features,
            input: port.input.iter().copied().collect(),
            output: port.output.iter().copied().collect(),
        }
    }

    /// Carries on with the saved bytes on this console's own backend.
    pub(super) fn restore_state(&mut self, state: &ConsoleState) {
        let mut port = self.port.lock().unwrap_or_else(|p| p.into_inner());
        port.input = state.input.iter().copied().collect();
        port.output = state.output.iter().copied().collect();
        self.acked_features = state.acked_features;
    }
}

#[cfg(test)]
mod tests {
    use super::super::ConsoleIo;
    use super::*;
    use crate::virtio::VirtioDevice;

    #[test]
    fn state_round_trips_through_serde_into_a_new_device() {
        let path = std::env::temp_dir().join(format!("ferro-console-state-{}.sock", std::process::id()));
        let mut console = Console::new(ConsoleIo::Socket(path.clone())).unwrap();
        {
            let mut port = console.port.lock().unwrap();
            port.input.extend(b"typed, not yet read");
            port.output.extend(b"printed while nobody listened");
        }
        console.acked_features = 1 << 32;
        let state = console.save();
        let crate::virtio::VirtioDeviceState::Console(s) = &state else { panic!("{state:?}") };
        assert_eq!((s.backend.as_str(), s.path.as_deref()), ("socket", Some(path.as_path())));
        let text = serde_json::to_string(&state).unwrap();
        drop(console);
        let mut restored = Console::new(ConsoleIo::Socket(path.clone())).unwrap();
        restored.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(restored.save(), state);
    }
}
