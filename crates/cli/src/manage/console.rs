//! `ferro console`: the domain's serial console through ferrod (an upgraded HTTP connection, over
//! the unix socket or TLS alike). Ctrl-] detaches, as in virsh.

use super::client::{Body, Client};
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
        return Err(client.refusal(pending.status, &data));
    }
    let (buffered, mut stream) = pending.into_stream();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r");
    }
    let _raw = if interactive { RawTerminal::enter() } else { None };

    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(&buffered);
    let _ = stdout.flush();
    let mut stdin = std::io::stdin().lock();
    let mut stdin_open = true;
    // At least std's stdin buffer size, so reads bypass it and poll() sees all pending input.
    let mut buf = [0u8; 16 << 10];
    // One thread moves both ways: a TLS connection cannot be split between two.
    loop {
        let from_vm_waiting = stream.has_buffered();
        let (stdin_ready, vm_ready) = wait(stdin_open.then(|| stdin.as_raw_fd()), stream.fd(), !from_vm_waiting);
        if vm_ready || from_vm_waiting {
            match stream.read_available(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        if !stdin_ready {
            continue;
        }
        let n = match stdin.read(&mut buf) {
            // No more input (a pipe): keep showing output until the VM side closes.
            Ok(0) | Err(_) => {
                stdin_open = false;
                stream.finish_sending();
                continue;
            }
            Ok(n) => n,
        };
        let input = &buf[..n];
        let (send, detach) = match input.iter().position(|&b| b == ESCAPE) {
            Some(i) => (&input[..i], true),
            None => (input, false),
        };
        if stream.write_all(send).and_then(|()| stream.flush()).is_err() || detach {
            break;
        }
    }
    if interactive {
        eprintln!("\r");
    }
    Ok(())
}

/// Waits until stdin (if still open) or the connection has something; with `block` false it
/// only looks. Returns (stdin ready, connection ready); hang-ups and errors count as ready, so the
/// read that follows sees them.
fn wait(stdin: Option<i32>, conn: i32, block: bool) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd: conn, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stdin.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `fds` is an array of two valid pollfds and the count passed is 2; poll ignores the
    // entry whose fd is -1.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, if block { -1 } else { 0 }) };
    if n <= 0 {
        return (false, false);
    }
    (fds[1].revents != 0, fds[0].revents != 0)
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
