//! `ferro vmm` with its control and serial sockets (docs/vmm-control.md), against the idle guest,
//! which echoes COM1 input: pausing really stops the guest, resuming lets it continue, bad
//! requests get errors without hurting the VM, quit ends the process.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_socket(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

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

fn request(api: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    api.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    api.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

#[test]
fn pause_resume_console_and_quit_through_the_sockets() {
    let dir = std::env::temp_dir().join(format!("ferro-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (api_path, ser_path) = (dir.join("api.sock"), dir.join("serial.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(["vmm", "--guest", "idle", "--cpus", "2", "--memory", "64M", "--name", "t1"])
        .arg("--api-socket")
        .arg(&api_path)
        .arg("--serial-socket")
        .arg(&ser_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut vmm = Vmm { child, dir };
    wait_for_socket(&api_path);
    wait_for_socket(&ser_path);

    let mut console = UnixStream::connect(&ser_path).unwrap();
    read_until(&mut console, "idle: up", Duration::from_secs(10)).expect("boot banner replayed to a late client");
    console.write_all(b"a").unwrap();
    read_until(&mut console, "echo: a", Duration::from_secs(5)).expect("input reaches the guest");

    let mut api = BufReader::new(UnixStream::connect(&api_path).unwrap());
    let info = request(&mut api, r#"{"op":"info"}"#);
    assert_eq!(info["state"], "running");
    assert_eq!(info["name"], "t1");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 64 << 20);

    assert_eq!(request(&mut api, r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(request(&mut api, r#"{"op":"info"}"#)["state"], "paused");
    console.write_all(b"b").unwrap();
    let while_paused = read_until(&mut console, "echo: b", Duration::from_millis(500));
    assert!(while_paused.is_err(), "a paused guest answered: {while_paused:?}");
    assert_eq!(request(&mut api, r#"{"op":"resume"}"#)["ok"], true);
    read_until(&mut console, "echo: b", Duration::from_secs(5)).expect("the guest continues after resume");

    let stats = request(&mut api, r#"{"op":"stats"}"#);
    assert_eq!(stats["vcpu_time_ns"].as_array().unwrap().len(), 2);
    assert!(stats["exits"].as_u64().unwrap() > 0);
    assert!(stats["rss_bytes"].as_u64().unwrap() > 0);

    for bad in ["not json", r#"{"op":42}"#, r#"{"op":"explode"}"#, r#"{}"#] {
        let r = request(&mut api, bad);
        assert_eq!(r["ok"], false, "{bad}");
        assert!(!r["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(request(&mut api, r#"{"op":"info"}"#)["state"], "running", "bad requests must not hurt the VM");

    assert_eq!(request(&mut api, r#"{"op":"quit"}"#)["ok"], true);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = vmm.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "vmm did not quit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!api_path.exists() && !ser_path.exists(), "sockets are removed on exit");
}
