//! `ferro vmm` with its control and serial sockets (docs/vmm-control.md), against the idle guest,
//! which echoes COM1 input: pausing really stops the guest, resuming lets it continue, bad
//! requests get errors without hurting the VM, quit ends the process.

use ferro_test_support::vm::Vmm;
use ferro_test_support::{TempDir, wait_for};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn read_until(s: &mut UnixStream, needle: &str, limit: Duration) -> Result<String, String> {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains(needle) {
            return Ok(String::from_utf8_lossy(&got).into_owned());
        }
    }
    Err(String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn pause_resume_console_and_quit_through_the_sockets() {
    let dir = TempDir::new("vmm-control");
    let ser_path = dir.join("serial.sock");
    let args = ["--guest", "idle", "--cpus", "2", "--memory", "64M", "--name", "t1", "--serial-socket", ser_path.to_str().unwrap()];
    let mut vmm = Vmm::start_with(dir, &args, |c| {
        c.stdout(Stdio::null());
    });
    let api_path = vmm.api_path();
    wait_for("the serial socket", Duration::from_secs(10), || ser_path.exists());

    let mut console = UnixStream::connect(&ser_path).unwrap();
    read_until(&mut console, "idle: up", Duration::from_secs(10)).expect("boot banner replayed to a late client");
    console.write_all(b"a").unwrap();
    read_until(&mut console, "echo: a", Duration::from_secs(5)).expect("input reaches the guest");

    let info = vmm.request(r#"{"op":"info"}"#);
    assert_eq!(info["state"], "running");
    assert_eq!(info["name"], "t1");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 64 << 20);

    assert_eq!(vmm.request(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(vmm.request(r#"{"op":"info"}"#)["state"], "paused");
    console.write_all(b"b").unwrap();
    let while_paused = read_until(&mut console, "echo: b", Duration::from_millis(500));
    assert!(while_paused.is_err(), "a paused guest answered: {while_paused:?}");
    assert_eq!(vmm.request(r#"{"op":"resume"}"#)["ok"], true);
    read_until(&mut console, "echo: b", Duration::from_secs(5)).expect("the guest continues after resume");

    let stats = vmm.request(r#"{"op":"stats"}"#);
    assert_eq!(stats["vcpu_time_ns"].as_array().unwrap().len(), 2);
    assert!(stats["exits"].as_u64().unwrap() > 0);
    assert!(stats["rss_bytes"].as_u64().unwrap() > 0);

    for bad in ["not json", r#"{"op":42}"#, r#"{"op":"explode"}"#, r#"{}"#] {
        let r = vmm.request(bad);
        assert_eq!(r["ok"], false, "{bad}");
        assert!(!r["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(vmm.request(r#"{"op":"info"}"#)["state"], "running", "bad requests must not hurt the VM");

    assert_eq!(vmm.request(r#"{"op":"quit"}"#)["ok"], true);
    let status = vmm.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(!api_path.exists() && !ser_path.exists(), "sockets are removed on exit");
}
