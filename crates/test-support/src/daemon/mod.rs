//! A real `ferrod` for tests: a private `FERRO_HOME` ([`Home`]), the daemon process ([`Daemon`]),
//! an HTTP client for its REST API over the unix socket that checks every answer against
//! `crates/manager/openapi.json` ([`Api`], [`openapi`]), and the `ferro` CLI pointed at it.

pub mod openapi;

use crate::{TempDir, ferro_bin, ferrod_bin};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A private FERRO_HOME; on drop, every process still running under it is killed (SIGKILL)
/// and the directory removed.
pub struct Home(TempDir);

impl Home {
    pub fn new(tag: &str) -> Home {
        Home(TempDir::new(&format!("home-{tag}")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.0.join("ferrod.sock")
    }

    /// Pids of live processes whose command line names a file in this home (monitors, VMMs).
    pub fn processes(&self) -> Vec<i32> {
        let needle = format!("{}/", self.path().display());
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                    && crate::alive(i64::from(*pid))
            })
            .collect()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Whatever a failed test left running under this home goes too.
        for pid in self.processes() {
            // SAFETY: kill(2) on a pid; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A running ferrod; on drop, the domains it runs are destroyed and it is killed (SIGKILL).
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub home: PathBuf,
}

impl Daemon {
    pub fn start(home: &Home) -> Daemon {
        Self::start_with(home, &[])
    }

    /// Starts ferrod with extra environment variables; waits for its socket (10 s at most).
    pub fn start_with(home: &Home, env: &[(&str, &str)]) -> Daemon {
        let socket = home.socket();
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(ferrod_bin());
        cmd.env("FERRO_HOME", home.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.path().join("ferrod.stderr")).map(Stdio::from).unwrap_or(Stdio::null()));
        if std::env::var_os("FERRO_BIN").is_none() {
            cmd.env("FERRO_BIN", ferro_bin());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn ferrod");
        let daemon = Daemon { child, socket, home: home.path().to_owned() };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&daemon.socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "ferrod did not open its socket: {}", daemon.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// What ferrod wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.home.join("ferrod.stderr")).unwrap_or_default()
    }

    pub fn api(&self) -> Api {
        Api { socket: self.socket.clone() }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs the `ferro` CLI against this daemon.
    pub fn ferro(&self, args: &[&str]) -> Output {
        Command::new(ferro_bin()).args(args).env("FERRO_HOME", &self.home).stdin(Stdio::null()).output().expect("run ferro")
    }

    /// Like [`Daemon::ferro`], asserting success and returning stdout.
    pub fn ferro_ok(&self, args: &[&str]) -> String {
        let out = self.ferro(args);
        assert!(out.status.success(), "ferro {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Destroys every active domain through the API (so no VMM outlives a test).
    pub fn cleanup(&self) {
        let api = self.api();
        let (_, list) = api.call("GET", "/v1/domains", None);
        for d in list.as_array().into_iter().flatten() {
            if matches!(d["state"].as_str(), Some("running" | "paused")) {
                api.call("POST", &format!("/v1/domains/{}/destroy", d["name"].as_str().unwrap_or_default()), None);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.cleanup();
        }
        self.kill9();
    }
}

/// HTTP/1.1 over the daemon's unix socket; every response is validated against the OpenAPI
/// document.
#[derive(Clone)]
pub struct Api {
    pub socket: PathBuf,
}

pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Api {
    /// Sends one request; returns the status and the parsed JSON body (Null if empty or not JSON).
    /// A body for `/v1/domains` is a TOML definition, any other a JSON document.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let ctype = if path == "/v1/domains" { "application/toml" } else { "application/json" };
        let raw = self.raw(method, path, ctype, body.map(str::as_bytes));
        let value = serde_json::from_slice(&raw.body).unwrap_or(Value::Null);
        (raw.status, value)
    }

    pub fn raw(&self, method: &str, path: &str, ctype: &str, body: Option<&[u8]>) -> RawResponse {
        let raw = http(&self.socket, method, path, ctype, body);
        openapi::check(method, path, raw.status, &raw.content_type, &raw.body);
        raw
    }

    /// Polls job `id` until it is no longer running (5 minutes at most) and returns it.
    pub fn wait_job(&self, id: u64) -> Value {
        let mut job = Value::Null;
        crate::wait_for(&format!("job {id} to end"), Duration::from_secs(300), || {
            job = self.expect("GET", &format!("/v1/jobs/{id}"), None, 200);
            job["state"] != "running"
        });
        job
    }

    /// Asserts the status and returns the JSON body.
    pub fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (got, value) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path} -> {got} {value}");
        value
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close), handling sized and chunked bodies; not
/// checked against the OpenAPI document (see [`Api::raw`]).
pub fn http(socket: &Path, method: &str, path: &str, ctype: &str, body: Option<&[u8]>) -> RawResponse {
    let mut stream = UnixStream::connect(socket).expect("connect to ferrod");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The daemon may answer (413) and close before reading a large body; the answer is still there.
    let _ = stream.write_all(body);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end().to_string();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut data = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v == "chunked") {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            data.extend_from_slice(&chunk[..n]);
        }
    } else {
        reader.read_to_end(&mut data).unwrap();
    }
    RawResponse { status, content_type: header("content-type").unwrap_or_default(), body: data }
}

/// A domain definition (TOML) booting a built-in test guest with 64 MiB and one vCPU.
pub fn guest_toml(name: &str, guest: &str) -> String {
    format!("name = \"{name}\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"{guest}\"\n")
}
