//! The console's snapshot state: the backend it was connected to, what the driver accepted, and
//! the bytes still in flight either way. Queues belong to the transport's state.

use super::{Console, ConsoleIo};
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
    /// The state to save in a snapshot (call with the worker paused or stopped).
    pub fn state(&self) -> ConsoleState {
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

    /// A console on `io` (the caller reconnects the backend: stdio fds and ptys do not survive
    /// a process) that carries on with the saved bytes.
    pub fn restore(io: ConsoleIo, state: &ConsoleState) -> Result<Console, String> {
        let console = Console::new(io)?;
        {
            let mut port = console.port.lock().unwrap_or_else(|p| p.into_inner());
            port.input.extend(&state.input);
            port.output.extend(&state.output);
        }
        Ok(Console { acked_features: state.acked_features, ..console })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_serde_and_a_new_device() {
        let path = std::env::temp_dir().join(format!("ferro-console-state-{}.sock", std::process::id()));
        let console = Console::new(ConsoleIo::Socket(path.clone())).unwrap();
        {
            let mut port = console.port.lock().unwrap();
            port.input.extend(b"typed, not yet read");
            port.output.extend(b"printed while nobody listened");
        }
        let state = Console { acked_features: 1 << 32, ..console }.state();
        assert_eq!(state.backend, "socket");
        assert_eq!(state.path.as_deref(), Some(path.as_path()));
        let text = serde_json::to_string(&state).unwrap();
        let back: ConsoleState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        let restored = Console::restore(ConsoleIo::Socket(path.clone()), &back).unwrap();
        assert_eq!(restored.state(), state);
    }
}
