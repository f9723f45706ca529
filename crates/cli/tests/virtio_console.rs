//! virtio-console driven by the `virtio` test guest (guests/kit/virtio_console.c): the guest
//! sends a line on the transmit queue, waits for a line from the host on the receive queue,
//! reports it on COM1 and echoes it back. Each backend is checked from the outside: a unix
//! socket client, a pty the VMM created, and this process's terminal (a pty as stdin/stdout).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HELLO: &str = "virtio-console: hello from the guest\n";

fn ferro(console: &str) -> Command {
    ferro_on("mmio", console)
}

fn ferro_on(transport: &str, console: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferro"));
    c.args(["run", "--guest", "virtio", "--memory", "64M", "--transport", transport, "--cmdline", "console.rx=1", "--console", console]);
    c
}

/// Reads from `r` until `seen` contains `what` (10 s at most).
fn read_until(r: &mut dyn Read, seen: &mut String, what: &str) {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while !seen.contains(what) {
        assert!(start.elapsed() < Duration::from_secs(10), "never saw {what:?}: {seen:?}");
        match r.read(&mut buf) {
            Ok(0) => panic!("end of stream before {what:?}: {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading for {what:?}: {e}; saw {seen:?}"),
        }
    }
}

fn finish(child: Child) -> String {
    let o = child.wait_with_output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{out}");
    out
}

#[test]
fn socket_client_reads_the_guest_line_and_its_input_comes_back_on_mmio() {
    socket_client_reads_the_guest_line_and_its_input_comes_back("mmio");
}

#[test]
fn socket_client_reads_the_guest_line_and_its_input_comes_back_on_pci() {
    socket_client_reads_the_guest_line_and_its_input_comes_back("pci");
}

fn socket_client_reads_the_guest_line_and_its_input_comes_back(transport: &str) {
    let path = std::env::temp_dir().join(format!("ferro-console-{transport}-{}.sock", std::process::id()));
    let child = ferro_on(transport, &format!("socket={}", path.display())).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let mut client = loop {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&path) {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "console socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = String::new();
    // Printed whether or not we were connected yet: the port keeps it for the first client.
    read_until(&mut client, &mut seen, HELLO);
    client.write_all(b"ping from the host\n").unwrap();
    read_until(&mut client, &mut seen, "echo: ping from the host\n");
    let out = finish(child);
    assert!(out.contains("virtio-console: received 'ping from the host'"), "{out}");
    assert!(out.contains("virtio: all devices passed"), "{out}");
    assert!(!out.contains("hello from the guest"), "guest console output goes to the socket only: {out}");
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[test]
fn pty_backend_prints_its_path_and_carries_bytes_both_ways() {
    let mut child = ferro("pty").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let path = line.trim().strip_prefix("ferro: virtio console on ").unwrap_or_else(|| panic!("no pty path: {line:?}")).to_owned();
    let mut pty = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut seen = String::new();
    read_until(&mut pty, &mut seen, HELLO);
    pty.write_all(b"pong\r").unwrap();
    read_until(&mut pty, &mut seen, "echo: pong\n");
    let out = finish(child);
    assert!(out.contains("virtio-console: received 'pong'"), "{out}");
}

/// `--console` alone: the terminal's input goes to the virtio console instead of COM1, and both
/// consoles print on the terminal.
#[test]
fn stdio_backend_takes_the_terminal_input_instead_of_com1() {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the integers we own; the other arguments may be null.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: each File takes ownership of its own dup of the slave fd.
    let (sin, sout) = unsafe { (std::fs::File::from_raw_fd(libc::dup(slave)), std::fs::File::from_raw_fd(libc::dup(slave))) };
    let child = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(["run", "--guest", "virtio", "--memory", "64M", "--transport", "mmio", "--cmdline", "console.rx=1", "--console"])
        .stdin(Stdio::from(sin))
        .stdout(Stdio::from(sout))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SAFETY: closing our copy of the slave; the child holds its own.
    unsafe { libc::close(slave) };
    // SAFETY: the master fd is ours alone from here on.
    let mut m = unsafe { std::fs::File::from_raw_fd(master) };
    let mut seen = String::new();
    read_until(&mut m, &mut seen, "hello from the guest");
    m.write_all(b"typed\r").unwrap();
    read_until(&mut m, &mut seen, "echo: typed");
    read_until(&mut m, &mut seen, "virtio-console: received 'typed'");
    read_until(&mut m, &mut seen, "virtio: all devices passed");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{seen}{err}");
    assert!(err.contains("console attached to the virtio console"), "{err}");
}
