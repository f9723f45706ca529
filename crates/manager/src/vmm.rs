//! Talking to one VMM process: its command line and its control socket (docs/vmm-control.md).

use crate::domain::DomainConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Files of one running domain, under `$FERRO_HOME/run/<uuid>/` (the uuid keeps socket paths short).
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn new(run_root: &Path, uuid: &str) -> RunFiles {
        RunFiles { dir: run_root.join(uuid) }
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("vmm.stderr")
    }
    /// Written by the monitor when the VMM has finally exited (see `monitor`).
    pub fn exit_report(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
}

/// A disk as handed to the VMM, after pool volumes have been resolved to paths.
pub struct ResolvedDisk {
    pub path: String,
    pub format: String,
    pub readonly: bool,
}

/// The `ferro vmm` arguments for a domain (the same flags as `ferro run`, plus the control sockets).
pub fn vmm_args(config: &DomainConfig, disks: &[ResolvedDisk], files: &RunFiles) -> Vec<String> {
    let mut args = vec![
        "vmm".to_string(),
        "--name".to_string(),
        config.name.clone(),
        "--api-socket".to_string(),
        files.api_socket().display().to_string(),
        "--serial-socket".to_string(),
        files.serial_socket().display().to_string(),
        "--memory".to_string(),
        format!("{}M", config.memory_bytes() >> 20),
        "--cpus".to_string(),
        config.vcpus.to_string(),
    ];
    let boot = &config.boot;
    let mut push = |flag: &str, value: &Option<String>| {
        if let Some(v) = value {
            args.push(flag.to_string());
            args.push(v.clone());
        }
    };
    push("--guest", &boot.guest);
    push("--kernel", &boot.kernel);
    push("--initrd", &boot.initrd);
    push("--cmdline", &boot.cmdline);
    for disk in disks {
        args.push("--disk".to_string());
        let mut spec = format!("path={},format={}", disk.path, disk.format);
        if disk.readonly {
            spec.push_str(",readonly=on");
        }
        args.push(spec);
    }
    for nic in &config.nics {
        args.push("--net".to_string());
        let mut spec = format!("tap={}", nic.tap);
        if let Some(mac) = &nic.mac {
            spec.push_str(&format!(",mac={mac}"));
        }
        args.push(spec);
    }
    if let Some(balloon) = &config.balloon {
        // Empty at start; `setmem` sets the target through the control socket.
        let spec = if balloon.deflate_on_oom { "size=0,deflate_on_oom=on" } else { "size=0" };
        args.extend(["--balloon".to_string(), spec.to_string()]);
    }
    args
}

/// Sends one request on a fresh connection to the VMM's control socket and returns the response
/// object of an `ok: true` answer; anything else is an error line for the caller.
pub async fn request(socket: &Path, request: Value, timeout: Duration) -> Result<Value, String> {
    let op = request.get("op").and_then(Value::as_str).unwrap_or("?").to_string();
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| format!("cannot connect to VMM: {e}"))?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(|e| format!("VMM control socket: {e}"))?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        let n = reader.read_line(&mut answer).await.map_err(|e| format!("VMM control socket: {e}"))?;
        if n == 0 {
            return Err("VMM closed the control socket without answering".to_string());
        }
        serde_json::from_str::<Value>(&answer).map_err(|e| format!("VMM sent a malformed answer: {e}"))
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("VMM did not answer `{op}` within {} ms", timeout.as_millis()))??;
    if answer.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(answer)
    } else {
        let error = answer.get("error").and_then(Value::as_str).unwrap_or("no error message");
        Err(format!("VMM refused `{op}`: {error}"))
    }
}

/// Shorthand for an op without arguments.
pub async fn op(socket: &Path, name: &str, timeout: Duration) -> Result<Value, String> {
    request(socket, serde_json::json!({ "op": name }), timeout).await
}
