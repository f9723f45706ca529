//! The host side of the console port: where guest output goes and host input comes from.
//!
//! Every backend is a nonblocking fd in the port's own epoll set, which the device worker waits
//! on as one more fd (so a socket client can come and go without restarting the worker). Host
//! input waits in a bounded buffer until the guest posts receive buffers; while it is full the
//! port stops reading, leaving the rest in the kernel. Guest output that a pty or socket client
//! cannot take at once waits in a bounded buffer too (the oldest bytes go first when it
//! overflows), and a socket keeps what the guest printed while no client was connected.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Host input held for the guest at most.
pub const INPUT_CAP: usize = 64 * 1024;
/// Guest output held for a slow or absent reader at most.
pub const OUTPUT_CAP: usize = 64 * 1024;
const DATA: u64 = 0;
const LISTENER: u64 = 1;

/// Where a console port is connected.
pub enum ConsoleIo {
    /// Output to this process's stdout; input from `input`, which the VMM feeds from its stdin.
    Stdio { input: OwnedFd },
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
    /// A unix socket to listen on (one client at a time).
    Socket(PathBuf),
}

enum Io {
    Stdio { input: Option<File> },
    Pty { master: File, _slave: OwnedFd, path: PathBuf },
    Socket { listener: UnixListener, client: Option<UnixStream>, path: PathBuf },
}

pub struct Port {
    epoll: Epoll,
    io: Io,
    pub input: VecDeque<u8>,
    pub output: VecDeque<u8>,
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own change only its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new pty in raw mode (so guest bytes pass unchanged); returns master, slave and its path.
fn open_pty() -> std::io::Result<(File, OwnedFd, PathBuf)> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the integers we own; the other arguments may be null.
    if unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: FD_CLOEXEC on fds we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: termios is plain data; tcgetattr fills it for the terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid terminal fd and out pointer; cfmakeraw edits our struct; tcsetattr reads it.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?;
    set_nonblocking(master.as_raw_fd())?;
    Ok((master, slave, path))
}

impl Port {
    pub fn new(io: ConsoleIo) -> Result<Port, String> {
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let io = match io {
            ConsoleIo::Stdio { input } => {
                set_nonblocking(input.as_raw_fd()).map_err(io_err("console input"))?;
                Io::Stdio { input: Some(File::from(input)) }
            }
            ConsoleIo::Pty => {
                let (master, slave, path) = open_pty().map_err(io_err("openpty"))?;
                eprintln!("ferro: virtio console on {}", path.display());
                Io::Pty { master, _slave: slave, path }
            }
            ConsoleIo::Socket(path) => {
                // A socket file left by an earlier run is replaced; any other file is not.
                if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                    let _ = std::fs::remove_file(&path);
                }
                let listener = UnixListener::bind(&path).map_err(|e| format!("console socket {}: {e}", path.display()))?;
                listener.set_nonblocking(true).map_err(io_err("console socket"))?;
                Io::Socket { listener, client: None, path }
            }
        };
        let port = Port { epoll, io, input: VecDeque::new(), output: VecDeque::new() };
        if let Some(fd) = port.data_fd() {
            port.ctl(ControlOperation::Add, fd, DATA, EventSet::IN)?;
        }
        if let Io::Socket { listener, .. } = &port.io {
            port.ctl(ControlOperation::Add, listener.as_raw_fd(), LISTENER, EventSet::IN)?;
        }
        Ok(port)
    }

    /// The fd the device worker waits on: readable when the backend has something to do.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// What the backend is, for the snapshot state.
    pub fn describe(&self) -> (&'static str, Option<PathBuf>) {
        match &self.io {
            Io::Stdio { .. } => ("stdio", None),
            Io::Pty { path, .. } => ("pty", Some(path.clone())),
            Io::Socket { path, .. } => ("socket", Some(path.clone())),
        }
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, token: u64, events: EventSet) -> Result<(), String> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token)).map_err(io_err("console epoll"))
    }

    /// The fd that carries data both ways (stdio: only input).
    fn data_fd(&self) -> Option<RawFd> {
        match &self.io {
            Io::Stdio { input } => input.as_ref().map(|f| f.as_raw_fd()),
            Io::Pty { master, .. } => Some(master.as_raw_fd()),
            Io::Socket { client, .. } => client.as_ref().map(|c| c.as_raw_fd()),
        }
    }

    /// Handles whatever the backend reported: a new client, input, room for output, hang-ups.
    pub fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 2];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let set = ev.event_set();
            if ev.data() == LISTENER {
                self.accept();
                continue;
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
                self.read_input();
            }
            if set.contains(EventSet::OUT) {
                self.flush_output();
            }
        }
    }

    fn accept(&mut self) {
        let Io::Socket { listener, client, .. } = &mut self.io else { return };
        if client.is_some() {
            return;
        }
        let Ok((stream, _)) = listener.accept() else { return };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        *client = Some(stream);
        if self.ctl(ControlOperation::Add, fd, DATA, EventSet::IN).is_err() {
            self.drop_data_fd();
            return;
        }
        // What the guest printed while nobody was connected.
        self.flush_output();
    }

    /// Closes the input or client after end of file or an error (a pty's master stays).
    fn drop_data_fd(&mut self) {
        if let Some(fd) = self.data_fd() {
            let _ = self.ctl(ControlOperation::Delete, fd, DATA, EventSet::empty());
        }
        match &mut self.io {
            Io::Stdio { input } => *input = None,
            Io::Socket { client, .. } => *client = None,
            Io::Pty { .. } => {}
        }
    }

    fn reader(&mut self) -> Option<&mut dyn Read> {
        match &mut self.io {
            Io::Stdio { input } => input.as_mut().map(|f| f as &mut dyn Read),
            Io::Pty { master, .. } => Some(master),
            Io::Socket { client, .. } => client.as_mut().map(|c| c as &mut dyn Read),
        }
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 4096];
        while self.input.len() < INPUT_CAP {
            let room = (INPUT_CAP - self.input.len()).min(buf.len());
            let Some(r) = self.reader() else { return };
            match r.read(&mut buf[..room]) {
                Ok(0) => return self.hang_up(),
                Ok(n) => self.input.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.hang_up(),
            }
        }
    }

    fn hang_up(&mut self) {
        // A pty master reads EIO only while no slave is open; we hold one, so keep it.
        if !matches!(self.io, Io::Pty { .. }) {
            self.drop_data_fd();
        }
    }

    /// Takes guest output.
    pub fn write_output(&mut self, bytes: &[u8]) {
        if let Io::Stdio { .. } = self.io {
            // Stdout is the terminal or a pipe a supervisor drains; like COM1 it is written as is.
            let _ = std::io::stdout().lock().write_all(bytes);
            let _ = std::io::stdout().lock().flush();
            return;
        }
        self.output.extend(bytes);
        let excess = self.output.len().saturating_sub(OUTPUT_CAP);
        self.output.drain(..excess);
        self.flush_output();
    }

    fn flush_output(&mut self) {
        while !self.output.is_empty() {
            let (front, _) = self.output.as_slices();
            let r = match &mut self.io {
                Io::Stdio { .. } => return,
                Io::Pty { master, .. } => master.write(front),
                Io::Socket { client: Some(c), .. } => c.write(front),
                Io::Socket { client: None, .. } => return,
            };
            match r {
                Ok(n) if n > 0 => drop(self.output.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => {
                    self.output.clear();
                    return self.hang_up();
                }
            }
        }
    }

    /// Waits for input only while there is room for it, and for output room only while output
    /// waits; accepts a new socket client only while none is connected.
    pub fn rearm(&mut self) {
        let mut want = EventSet::empty();
        if self.input.len() < INPUT_CAP {
            want |= EventSet::IN;
        }
        if !self.output.is_empty() && !matches!(self.io, Io::Stdio { .. }) {
            want |= EventSet::OUT;
        }
        if let Some(fd) = self.data_fd() {
            let _ = self.ctl(ControlOperation::Modify, fd, DATA, want);
        }
        if let Io::Socket { listener, client, .. } = &self.io {
            let events = if client.is_none() { EventSet::IN } else { EventSet::empty() };
            let _ = self.ctl(ControlOperation::Modify, listener.as_raw_fd(), LISTENER, events);
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Io::Socket { path, .. } = &self.io {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn poll_until(port: &mut Port, done: impl Fn(&Port) -> bool) {
        let start = Instant::now();
        while !done(port) {
            assert!(start.elapsed() < Duration::from_secs(5), "port never got there");
            port.poll();
            port.rearm();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn socket_keeps_output_for_the_next_client_and_takes_its_input() {
        let path = std::env::temp_dir().join(format!("ferro-console-port-{}.sock", std::process::id()));
        let mut port = Port::new(ConsoleIo::Socket(path.clone())).unwrap();
        port.write_output(b"before anyone came\n");
        let mut client = UnixStream::connect(&path).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        poll_until(&mut port, |p| p.output.is_empty());
        let mut got = [0u8; 19];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"before anyone came\n");
        client.write_all(b"typed").unwrap();
        poll_until(&mut port, |p| p.input.len() == 5);
        assert_eq!(port.input.iter().copied().collect::<Vec<_>>(), b"typed");
        // A second client waits until the first leaves.
        let mut second = UnixStream::connect(&path).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        drop(client);
        poll_until(&mut port, |p| p.data_fd().is_none());
        poll_until(&mut port, |p| p.data_fd().is_some());
        port.write_output(b"hi 2");
        let mut got = [0u8; 4];
        second.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi 2");
        drop(port);
        assert!(!path.exists(), "the socket file is removed with the port");
    }

    #[test]
    fn pty_passes_bytes_both_ways_unchanged() {
        let mut port = Port::new(ConsoleIo::Pty).unwrap();
        let Io::Pty { path, .. } = &port.io else { unreachable!() };
        let mut user = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        port.write_output(b"a\nb");
        let mut got = [0u8; 3];
        user.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\nb", "raw mode: no newline translation");
        user.write_all(b"xyz").unwrap();
        poll_until(&mut port, |p| p.input.len() == 3);
    }

    #[test]
    fn input_stops_being_read_when_the_buffer_is_full() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        set_nonblocking(w.as_raw_fd()).unwrap();
        let mut w = w;
        let mut port = Port::new(ConsoleIo::Stdio { input: r }).unwrap();
        let chunk = vec![b'x'; 4096];
        let mut sent = 0;
        while sent < INPUT_CAP + 8192 {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => {
                    port.poll();
                    port.rearm();
                }
            }
        }
        poll_until(&mut port, |p| p.input.len() == INPUT_CAP);
        port.poll();
        assert_eq!(port.input.len(), INPUT_CAP, "nothing read past the cap");
        drop(w);
        port.input.clear();
        port.rearm();
        poll_until(&mut port, |p| p.data_fd().is_none());
        assert_eq!(port.input.len(), sent - INPUT_CAP, "the rest, then end of file");
    }
}
