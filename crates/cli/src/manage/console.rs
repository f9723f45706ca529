//! `ferro console`: the domain's serial console through ferrod (an upgraded HTTP connection).
//! Ctrl-] detaches, as in virsh.

use super::client::{Body, Client, error_message};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

/// Ctrl-]
const ESCAPE: u8 = 0x1d;

pub fn attach(client: &Client, name: &str) -> Result<(), String> {
    let mut pending = client.send(
        "GET",
        &format!("/v1/domains/{name}/console"),
        "Connection: Upgrade\r\nUpgrade: ferro-console\r\n",
        Body::None,
    )?;
    if pending.status != 101 {
        let mut data = Vec::new();
        while let Ok(Some(chunk)) = pending.next_chunk() {
            data.extend_from_slice(&chunk);
        }
        return Err(error_message(pending.status, &data));
    }
    let (buffered, stream) = pending.into_stream();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r");
    }
    let _raw = if interactive { RawTerminal::enter() } else { None };

    let mut from_vm = stream.try_clone().map_err(|e| format!("console: {e}"))?;
    let output = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(&buffered);
        let _ = stdout.flush();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
        }
    });

    let mut to_vm = stream;
    let mut stdin = std::io::stdin().lock();
    // At least std's stdin buffer size, so reads bypass it and poll() sees all pending input.
    let mut buf = [0u8; 16 << 10];
    loop {
        if output.is_finished() {
            break;
        }
        if !stdin_ready(200) {
            continue;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // No more input (a pipe): keep showing output until the VM side closes.
                let _ = to_vm.shutdown(std::net::Shutdown::Write);
                let _ = output.join();
                return Ok(());
            }
            Ok(n) => n,
        };
        let input = &buf[..n];
        let (send, detach) = match input.iter().position(|&b| b == ESCAPE) {
            Some(i) => (&input[..i], true),
            None => (input, false),
        };
        if to_vm.write_all(send).is_err() || detach {
            break;
        }
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    if interactive {
        eprintln!("\r");
    }
    Ok(())
}

/// Waits up to `timeout_ms` for input on stdin (so the loop notices a console that closed).
fn stdin_ready(timeout_ms: i32) -> bool {
    let mut fds = libc::pollfd { fd: std::io::stdin().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `fds` is one valid pollfd and the count passed is 1.
    unsafe { libc::poll(&mut fds, 1, timeout_ms) != 0 }
}

/// Puts the terminal on stdin in raw mode and restores it when dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: an all-zero termios is a valid value of this plain C struct; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is stdin and `saved` a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the termios value it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is stdin and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}
