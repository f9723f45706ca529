//! A real `ferrod` for tests: a private `FERRO_HOME` ([`Home`]), the daemon process ([`Daemon`]),
//! an HTTP client for its REST API over the unix socket, plain TCP or TLS that checks every answer
//! against `crates/manager/openapi.json` ([`Api`], [`openapi`]), the `ferro` CLI pointed at it, and
//! certificates and tokens for its TLS listeners ([`pki`]).

pub mod openapi;
pub mod pki;

use crate::{TempDir, ferro_bin, ferrod_bin};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
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
        Self::start_args(home, &[], env)
    }

    /// Starts ferrod with arguments and extra environment variables; waits for its socket. It
    /// runs in the host's network namespace, so it defines no default network (which would make
    /// a bridge and rules on the host): see [`Daemon::start_in`].
    pub fn start_args(home: &Home, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(ferrod_bin());
        cmd.arg("--no-default-network").args(args);
        Self::spawn(home, env, cmd)
    }

    /// Starts ferrod inside the network namespace `ns` (`ip netns exec`, which execs ferrod in
    /// place, so the child is ferrod itself): the bridges, rules and dnsmasq of its networks live
    /// there, and so does the default network it defines on its first start. Its socket is a
    /// file, reachable from any namespace.
    pub fn start_in(home: &Home, ns: &crate::net::Netns, args: &[&str]) -> Daemon {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(ferrod_bin()).args(args);
        Self::spawn(home, &[], cmd)
    }

    /// Starts `cmd` (ferrod, or something that execs it in place) as the daemon of `home`, with
    /// extra environment variables; waits for its socket.
    pub fn spawn(home: &Home, env: &[(&str, &str)], mut cmd: Command) -> Daemon {
        let socket = home.socket();
        let _ = std::fs::remove_file(&socket);
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
        let mut daemon = Daemon { child, socket, home: home.path().to_owned() };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&daemon.socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "ferrod did not open its socket: {}", daemon.stderr());
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("ferrod ended ({status}) before opening its socket: {}", daemon.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// What ferrod wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.home.join("ferrod.stderr")).unwrap_or_default()
    }

    pub fn api(&self) -> Api {
        Api::unix(&self.socket)
    }

    /// The addresses of its `--listen` listeners, from its log (start it with `RUST_LOG=info`);
    /// they are bound before the unix socket, so they are known once [`Daemon::start_args`] returns.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let log = self.stderr();
        let found: Vec<SocketAddr> = log
            .lines()
            .filter_map(|line| line.split("listening address=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        assert!(!found.is_empty(), "no `listening address=` line in ferrod's log (RUST_LOG=info?): {log}");
        found
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

    /// Opens a domain's serial console through ferrod (the HTTP upgrade on its socket) and returns
    /// the upgraded stream.
    pub fn console(&self, name: &str) -> UnixStream {
        let mut s = UnixStream::connect(&self.socket).expect("connect to ferrod");
        write!(s, "GET /v1/domains/{name}/console HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: ferro-console\r\n\r\n").expect("upgrade request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).expect("read the upgrade answer"), 1, "console closed during the upgrade");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        openapi::check("GET", &format!("/v1/domains/{name}/console"), 101, "", b"");
        s
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

/// HTTP/1.1 to the daemon (its unix socket, or a TCP listener in plain text or TLS), with extra
/// headers of our choosing; every response is validated against the OpenAPI document.
#[derive(Clone)]
pub struct Api {
    target: Target,
    headers: Vec<(String, String)>,
}

#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Tls(SocketAddr, Arc<rustls::ClientConfig>),
}

pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Every value of a header (lower-case name).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }
}

impl Api {
    pub fn unix(socket: &Path) -> Api {
        Api { target: Target::Unix(socket.to_path_buf()), headers: Vec::new() }
    }

    /// Plain HTTP to a loopback `--insecure` listener.
    pub fn tcp(addr: SocketAddr) -> Api {
        Api { target: Target::Tcp(addr), headers: Vec::new() }
    }

    /// TLS to a listener whose certificate the CA in `ca_pem` signed, for its IP address.
    pub fn tls(addr: SocketAddr, ca_pem: &Path) -> Api {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).expect("read the CA file") {
            roots.add(cert.expect("a PEM certificate")).expect("a CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Api { target: Target::Tls(addr, Arc::new(config)), headers: Vec::new() }
    }

    /// The same client, sending one more header with every request.
    pub fn with_header(&self, name: &str, value: &str) -> Api {
        let mut api = self.clone();
        api.headers.push((name.to_string(), value.to_string()));
        api
    }

    /// Sends one request; returns the status and the parsed JSON body (Null if empty or not JSON).
    /// A body for `/v1/domains` or `/v1/networks` is a TOML definition, any other a JSON document.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let ctype = if path == "/v1/domains" || path == "/v1/networks" { "application/toml" } else { "application/json" };
        let raw = self.raw(method, path, ctype, body.map(str::as_bytes));
        let value = serde_json::from_slice(&raw.body).unwrap_or(Value::Null);
        (raw.status, value)
    }

    pub fn raw(&self, method: &str, path: &str, ctype: &str, body: Option<&[u8]>) -> RawResponse {
        let raw = match &self.target {
            Target::Unix(socket) => {
                exchange(UnixStream::connect(socket).expect("connect to ferrod"), "t", &self.headers, method, path, ctype, body)
            }
            Target::Tcp(addr) => {
                exchange(TcpStream::connect(addr).expect("connect to ferrod"), &addr.to_string(), &self.headers, method, path, ctype, body)
            }
            Target::Tls(addr, config) => {
                let tcp = TcpStream::connect(addr).expect("connect to ferrod");
                let name = rustls::pki_types::ServerName::from(addr.ip());
                let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
                let stream = rustls::StreamOwned::new(conn, tcp);
                exchange(stream, &addr.to_string(), &self.headers, method, path, ctype, body)
            }
        };
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

/// A minimal HTTP/1.1 exchange over the unix socket (Connection: close), handling sized and
/// chunked bodies; not checked against the OpenAPI document (see [`Api::raw`]).
pub fn http(socket: &Path, method: &str, path: &str, ctype: &str, body: Option<&[u8]>) -> RawResponse {
    exchange(UnixStream::connect(socket).expect("connect to ferrod"), "t", &[], method, path, ctype, body)
}

fn exchange<S: Read + Write>(
    mut stream: S,
    host: &str,
    headers: &[(String, String)],
    method: &str,
    path: &str,
    ctype: &str,
    body: Option<&[u8]>,
) -> RawResponse {
    let body = body.unwrap_or_default();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The daemon may answer (413) and close before reading a large body; the answer is still there.
    let _ = stream.write_all(body);
    let _ = stream.flush();
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
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        data.resize(len, 0);
        reader.read_exact(&mut data).unwrap();
    } else if status != 101 && status != 204 {
        reader.read_to_end(&mut data).unwrap();
    }
    RawResponse { status, content_type: header("content-type").unwrap_or_default(), headers, body: data }
}

/// A domain definition (TOML) booting a built-in test guest with 64 MiB and one vCPU.
pub fn guest_toml(name: &str, guest: &str) -> String {
    format!("name = \"{name}\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"{guest}\"\n")
}

/// Reads a console stream until `needle` appears; panics with what it saw when the stream ends or
/// `limit` passes first.
pub fn read_console(s: &mut UnixStream, needle: &str, limit: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("set a read timeout");
    let deadline = std::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if String::from_utf8_lossy(&got).contains(needle) {
            return String::from_utf8_lossy(&got).into_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the console never showed {needle:?} within {limit:?}; got {:?}", String::from_utf8_lossy(&got));
        match s.read(&mut buf) {
            Ok(0) => panic!("the console closed before {needle:?}; got {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
            Err(e) => panic!("reading the console for {needle:?}: {e}"),
        }
    }
}
