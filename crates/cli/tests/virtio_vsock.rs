//! virtio-vsock with Firecracker's host-side convention, driven by the `virtio` test guest: the
//! guest's stream to host port P reaches a unix-socket echo server on `<uds>_P`, and a host
//! client that connects to `<uds>` and writes `CONNECT <port>` reaches the guest's listener.

use ferro_test_support::TempDir;
use ferro_test_support::vm::ferro_command;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

const ECHO_PORT: u32 = 5000;
const GUEST_PORT: u32 = 5001;
const UNBOUND_PORT: u32 = 5002;

/// The bytes the guest sends (guests/kit/virtio_vsock.c `msg_byte`).
fn guest_message() -> Vec<u8> {
    (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Accepts one stream, echoes it until EOF, and returns what it received.
fn echo_server(listener: UnixListener) -> Vec<u8> {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if s.write_all(&buf[..n]).is_err() {
                    return seen;
                }
            }
        }
    }
}

/// Connects to the device's socket and asks for guest port `port`; the reply line.
fn connect_line(uds: &Path, request: &str) -> (BufReader<UnixStream>, String) {
    let s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (&s).write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    (r, line)
}

#[test]
fn streams_both_ways_between_guest_and_host_unix_sockets_on_mmio() {
    streams_both_ways("mmio");
}

#[test]
fn streams_both_ways_between_guest_and_host_unix_sockets_on_pci() {
    streams_both_ways("pci");
}

fn streams_both_ways(transport: &str) {
    let dir = TempDir::new(&format!("vsock-{transport}"));
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_{ECHO_PORT}", uds.display())).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let seen = echo_server(listener);
        let _ = done_tx.send(());
        seen
    });

    let child = ferro_command()
        .args(["run", "--guest", "virtio", "--memory", "64M", "--transport", transport])
        .args(["--vsock", &format!("cid=7,uds={}", uds.display())])
        .args(["--cmdline", &format!("vsock.refused={UNBOUND_PORT} vsock.port={ECHO_PORT} vsock.listen={GUEST_PORT}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The guest's own stream first; then the host opens one to the guest's listener.
    done_rx.recv_timeout(Duration::from_secs(30)).expect("the guest's stream reached the echo server and closed");
    let (_, bad) = connect_line(&uds, "HELLO 5001\n");
    assert_eq!(bad, "", "a line that is not CONNECT closes the connection");
    let (mut r, ok) = connect_line(&uds, &format!("CONNECT {GUEST_PORT}\n"));
    let host_port: u32 = ok.strip_prefix("OK ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("reply {ok:?}"));
    assert!(host_port >= 1 << 30, "host ports of host-initiated streams start at 2^30: {host_port}");
    let msg = b"from the host, through CONNECT, to the guest and back";
    r.get_mut().write_all(msg).unwrap();
    let mut echo = vec![0u8; msg.len()];
    r.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, msg);
    drop(r);

    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(server.join().unwrap(), guest_message(), "the echo server got the guest's bytes");
    assert!(out.contains("virtio-vsock: cid 7"), "{out}");
    assert!(out.contains(&format!("connect to unbound host port {UNBOUND_PORT} refused with RST")), "{out}");
    assert!(out.contains(&format!("guest-initiated stream to host port {ECHO_PORT} echoed 3000 bytes, closed")), "{out}");
    assert!(
        out.contains(&format!("host-initiated stream from host port {host_port} to port {GUEST_PORT} echoed {} bytes, closed by the host", msg.len())),
        "{out}"
    );
    assert!(out.contains("virtio: all devices passed"), "{out}");
    assert!(!uds.exists(), "the VMM removes its vsock socket on exit");
}

#[test]
fn a_socket_path_in_use_is_refused() {
    let dir = TempDir::new("vsock-busy");
    let uds = dir.join("v.sock");
    let _other = UnixListener::bind(&uds).unwrap();
    let o = ferro_command()
        .args(["run", "--guest", "virtio", "--memory", "64M", "--transport", "mmio"])
        .args(["--vsock", &format!("cid=7,uds={}", uds.display())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("--vsock uds") && err.contains("in use"), "{err}");
}
