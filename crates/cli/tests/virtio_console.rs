//! virtio-console driven by the `virtio` test guest (guests/kit/virtio_console.c): the guest
//! sends a line on the transmit queue, waits for a line from the host on the receive queue,
//! reports it on COM1 and echoes it back. Each backend is checked from the outside: a unix
//! socket client, a pty the VMM created, and this process's terminal (a pty as stdin/stdout).

use ferro_test_support::vm::{ferro_command, read_until};
use ferro_test_support::{TempDir, wait_for};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const HELLO: &str = "virtio-console: hello from the guest\n";

fn ferro(console: &str) -> Command {
    ferro_on("mmio", console)
}

fn ferro_on(transport: &str, console: &str) -> Command {
    let mut c = ferro_command();
    c.args(["run", "--guest", "virtio", "--memory", "64M", "--transport", transport, "--cmdline", "console.rx=1", "--console", console]);
    c
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
    let dir = TempDir::new(&format!("console-{transport}"));
    let path = dir.join("console.sock");
    let child = ferro_on(transport, &format!("socket={}", path.display())).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut client = None;
    wait_for("the console socket", Duration::from_secs(10), || {
        client = std::os::unix::net::UnixStream::connect(&path).ok();
        client.is_some()
    });
    let mut client = client.expect("connected");
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
    let mut child = ferro("pty").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
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
    let child = ferro_command()
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
