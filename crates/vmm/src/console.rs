//! The terminal side of the serial console: guest output to stdout, and, when stdin is a
//! terminal, raw-mode input with QEMU's escape (Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A).

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};

pub const ESCAPE: u8 = 0x01; // Ctrl-A

/// Writes guest output straight to a file descriptor, unbuffered, so partial lines (prompts)
/// appear at once.
pub struct FdWriter(pub i32);

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: the fd stays open for the process lifetime (stdout or a fd the caller owns)
        // and the buffer is valid for its length.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; None otherwise.
    pub fn enable(fd: BorrowedFd) -> Option<Self> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `saved` is a valid out pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag |= libc::OPOST | libc::ONLCR; // keep "\n" -> "\r\n" on output
        // SAFETY: valid fd and a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Decodes console input: returns the bytes for the guest and whether the user asked to quit.
#[derive(Default)]
pub struct EscapeDecoder {
    pending_escape: bool,
}

impl EscapeDecoder {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut d = EscapeDecoder::default();
        let mut out = Vec::new();
        assert!(!d.feed(b"ab\x01\x01c\x01", &mut out));
        assert_eq!(out, b"ab\x01c");
        assert!(d.feed(b"x", &mut out));
        let mut d = EscapeDecoder::default();
        out.clear();
        assert!(!d.feed(b"\x01q", &mut out));
        assert_eq!(out, b"\x01q");
    }
}
