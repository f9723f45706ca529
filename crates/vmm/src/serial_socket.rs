//! The serial console over a unix socket: every connected client receives COM1's output (after a
//! replay of the last 64 KiB) and what a client sends becomes COM1 input.

use ferro_devices::legacy::Serial;
use ferro_jail::seccomp::{self, ThreadKind};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REPLAY_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct HubState {
    clients: Vec<UnixStream>,
    replay: VecDeque<u8>,
}

/// Fans serial output out to socket clients and, optionally, another writer (stdout or a log).
pub struct SerialHub {
    state: Mutex<HubState>,
    also: Mutex<Option<Box<dyn Write + Send>>>,
}

impl SerialHub {
    pub fn new(also: Option<Box<dyn Write + Send>>) -> Arc<Self> {
        Arc::new(SerialHub { state: Mutex::new(HubState::default()), also: Mutex::new(also) })
    }

    fn push(&self, bytes: &[u8]) {
        if let Some(w) = self.also.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = w.write_all(bytes);
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.replay.extend(bytes);
        let excess = s.replay.len().saturating_sub(REPLAY_BYTES);
        s.replay.drain(..excess);
        // A client that cannot keep up (or went away) is dropped rather than stalling the vCPU.
        s.clients.retain_mut(|c| c.write_all(bytes).is_ok());
    }

    /// A writer for the serial device's output.
    pub fn writer(self: &Arc<Self>) -> Box<dyn Write + Send> {
        Box::new(HubWriter(self.clone()))
    }

    /// Binds `path` and accepts console clients on a background thread.
    pub fn serve(self: &Arc<Self>, path: &Path, serial: Arc<Mutex<Serial>>) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let hub = self.clone();
        seccomp::spawn(ThreadKind::SerialListener, "serial-sock", move || {
            for stream in listener.incoming().flatten() {
                let Ok(reader) = stream.try_clone() else { continue };
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                {
                    let mut s = hub.state.lock().unwrap_or_else(|p| p.into_inner());
                    let (a, b) = s.replay.as_slices();
                    let mut writer = &stream;
                    if writer.write_all(a).is_err() || writer.write_all(b).is_err() {
                        continue;
                    }
                    s.clients.push(stream);
                }
                let serial = serial.clone();
                let _ = seccomp::spawn(ThreadKind::SerialInput, "serial-in", move || forward_input(reader, &serial));
            }
        })?;
        Ok(())
    }
}

fn forward_input(mut from: UnixStream, serial: &Mutex<Serial>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let took = serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(rest);
            rest = &rest[took..];
            if took == 0 {
                // The guest has not drained its receive FIFO yet.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

struct HubWriter(Arc<SerialHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
