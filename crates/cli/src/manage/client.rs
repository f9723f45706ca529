//! A small blocking HTTP/1.1 client for ferrod: over its unix socket, or over TCP to a `ferrod
//! --listen` listener (TLS with rustls, or plain HTTP to a loopback `--insecure` one) with the API
//! token. No runtime, nothing to initialize before a verb actually runs.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// ferrod's socket when FERRO_HOME is not set (the daemon's default).
const DEFAULT_SOCKET: &str = "/run/ferrovisor/ferrod.sock";
/// The CAs a TLS connection trusts when `--ca` is not given: the system's bundle (Debian).
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where ferrod is: its unix socket, or a TCP listener.
enum Target {
    Unix(PathBuf),
    /// `tcp://`: plain HTTP to a loopback `--insecure` listener.
    Tcp { host: String, port: u16 },
    /// `tls://`: checked against the CA certificates in `ca`.
    Tls { host: String, port: u16, ca: PathBuf, config: Arc<rustls::ClientConfig> },
}

pub struct Client {
    target: Target,
    /// Sent to TCP listeners as `Authorization: Bearer`.
    token: Option<String>,
}

impl Client {
    /// From `--connect` (a socket path, `unix://PATH`, `tls://HOST:PORT` or `tcp://HOST:PORT`),
    /// `--ca` and `--token-file`; the last two only matter over TCP.
    pub fn new(connect: Option<&str>, ca: Option<&Path>, token_file: Option<&Path>) -> Result<Client, String> {
        let target = match connect {
            None => Target::Unix(default_socket()),
            Some(uri) => {
                if let Some(rest) = uri.strip_prefix("tls://") {
                    let (host, port) = host_port(uri, rest)?;
                    let ca = match ca {
                        Some(ca) => ca.to_path_buf(),
                        None if Path::new(SYSTEM_CAS).exists() => PathBuf::from(SYSTEM_CAS),
                        None => return Err(format!("{uri}: give the CA certificate that signed ferrod's with --ca FILE (or FERRO_CA)")),
                    };
                    let config = tls_config(&ca)?;
                    Target::Tls { host, port, ca, config }
                } else if let Some(rest) = uri.strip_prefix("tcp://") {
                    let (host, port) = host_port(uri, rest)?;
                    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                    if !loopback {
                        return Err(format!("{uri}: tcp:// is plain text, only for a loopback address; use tls://{host}:{port}"));
                    }
                    Target::Tcp { host, port }
                } else if let Some(path) = uri.strip_prefix("unix://") {
                    Target::Unix(PathBuf::from(path))
                } else if uri.contains("://") {
                    return Err(format!("--connect {uri}: expected a socket path, unix://PATH, tls://HOST:PORT or tcp://HOST:PORT"));
                } else {
                    Target::Unix(PathBuf::from(uri))
                }
            }
        };
        let token = match (&target, token_file) {
            (Target::Unix(_), _) | (_, None) => None,
            (_, Some(file)) => Some(read_token(file)?),
        };
        Ok(Client { target, token })
    }

    /// How to name this daemon in messages.
    fn shown(&self) -> String {
        match &self.target {
            Target::Unix(path) => path.display().to_string(),
            Target::Tcp { host, port } => format!("tcp://{}", authority(host, *port)),
            Target::Tls { host, port, .. } => format!("tls://{}", authority(host, *port)),
        }
    }

    fn connect(&self) -> Result<Stream, String> {
        let tcp = |host: &str, port: u16| -> Result<TcpStream, String> {
            use std::net::ToSocketAddrs;
            let shown = authority(host, port);
            let addrs = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {shown}: {e}"))?;
            let mut last = format!("{shown} has no address");
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = format!("cannot reach ferrod at {shown} ({e}); is it started with --listen?"),
                }
            }
            Err(last)
        };
        match &self.target {
            Target::Unix(path) => UnixStream::connect(path).map(Stream::Unix).map_err(|e| {
                format!("cannot reach ferrod at {} ({e}); is ferrod running? (set FERRO_HOME or --connect)", path.display())
            }),
            Target::Tcp { host, port } => tcp(host, *port).map(Stream::Tcp),
            Target::Tls { host, port, ca, config } => {
                let mut sock = tcp(host, *port)?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| format!("tls://{host}: not a valid host name or address"))?;
                let mut conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| format!("TLS setup: {e}"))?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut sock).map_err(|e| handshake_error(&e, host, *port, ca))?;
                }
                Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
            }
        }
    }

    /// Sends a request head plus `body` (if any) and reads the response head.
    pub fn send(&self, method: &str, path: &str, extra_headers: &str, body: Body<'_>) -> Result<Pending, String> {
        let mut stream = self.connect()?;
        let (len, content_type) = match &body {
            Body::None => (0, None),
            Body::Bytes(b, ctype) => (b.len() as u64, Some(*ctype)),
            Body::File(_, len) => (*len, Some("application/octet-stream")),
        };
        let host = match &self.target {
            Target::Unix(_) => "ferrod".to_string(),
            Target::Tcp { host, port } | Target::Tls { host, port, .. } => authority(host, *port),
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra_headers}");
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if extra_headers.is_empty() {
            head.push_str("Connection: close\r\n");
        }
        if let Some(ctype) = content_type {
            head.push_str(&format!("Content-Type: {ctype}\r\n"));
        }
        head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
        let io = |e: std::io::Error| format!("talking to ferrod: {e}");
        stream.write_all(head.as_bytes()).map_err(io)?;
        match body {
            Body::None => {}
            Body::Bytes(b, _) => stream.write_all(b).map_err(io)?,
            Body::File(file, _) => {
                std::io::copy(&mut std::io::BufReader::with_capacity(256 << 10, file), &mut stream).map_err(io)?;
            }
        }
        stream.flush().map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).map_err(io)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("ferrod sent a malformed response: {:?}", status_line.trim()))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(io)? == 0 {
                break;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok(Pending { status, headers, reader })
    }

    /// A request whose whole response body is read; non-2xx statuses become the server's message.
    pub fn call(&self, method: &str, path: &str, body: Body<'_>) -> Result<(u16, Vec<u8>), String> {
        let mut pending = self.send(method, path, "", body)?;
        let mut data = Vec::new();
        while let Some(chunk) = pending.next_chunk()? {
            data.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&pending.status) {
            return Err(self.refusal(pending.status, &data));
        }
        Ok((pending.status, data))
    }

    /// The one-line message of an error response, with what to do about a missing or wrong token.
    pub fn refusal(&self, status: u16, data: &[u8]) -> String {
        let message = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| format!("ferrod answered HTTP {status}: {}", String::from_utf8_lossy(data).trim()));
        if status == 401 {
            let sent = if self.token.is_some() { "the token sent" } else { "no token sent" };
            return format!("{message} ({sent} to {}; give its token file with --token-file or FERRO_TOKEN_FILE)", self.shown());
        }
        message
    }

    /// A JSON request/response.
    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let text = body.map(|b| b.to_string());
        let body = match &text {
            Some(t) => Body::Bytes(t.as_bytes(), "application/json"),
            None => Body::None,
        };
        let (_, data) = self.call(method, path, body)?;
        if data.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&data).map_err(|e| format!("ferrod sent invalid JSON: {e}"))
    }

    pub fn get(&self, path: &str) -> Result<Value, String> {
        self.json("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, String> {
        self.json("POST", path, body)
    }
}

/// `$FERRO_HOME/ferrod.sock`, else the system socket.
fn default_socket() -> PathBuf {
    match std::env::var_os("FERRO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("ferrod.sock"),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// `HOST:PORT` (an IPv6 address in brackets) of a tls:// or tcp:// URI.
fn host_port(uri: &str, rest: &str) -> Result<(String, u16), String> {
    let bad = || format!("--connect {uri}: expected HOST:PORT after the scheme, e.g. tls://ferro1.example:8443");
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// The token a token file gives first: the first word of its first line that is neither blank
/// nor a `#` comment (ferrod's own token file works as it is).
pub fn read_token(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read the token file {}: {e}", file.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| format!("the token file {} holds no token", file.display()))
}

/// TLS trusting exactly the CA certificates in `ca`.
fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let shown = ca.display();
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--ca {shown}: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("--ca {shown}: no usable CA certificate (PEM) in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a failed handshake means for the user.
fn handshake_error(e: &std::io::Error, host: &str, port: u16, ca: &Path) -> String {
    use rustls::{CertificateError, Error};
    let at = authority(host, port);
    let ca = ca.display();
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => format!(
            "refusing ferrod at {at}: its certificate is not signed by a CA in {ca}; pass the CA that signed it with --ca (FERRO_CA)"
        ),
        Some(Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
            format!("refusing ferrod at {at}: its certificate is not made out to {host}")
        }
        Some(Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            format!("refusing ferrod at {at}: its certificate has expired")
        }
        Some(other) => format!("TLS handshake with ferrod at {at} failed: {other}"),
        None => format!("TLS handshake with ferrod at {at} failed: {e}"),
    }
}

pub enum Body<'a> {
    None,
    Bytes(&'a [u8], &'static str),
    File(&'a std::fs::File, u64),
}

/// A connection to ferrod: unix socket, plain TCP or TLS.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Stream {
    /// The socket, for poll().
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.sock.as_raw_fd(),
        }
    }

    /// Whether bytes already received wait to be read (TLS decrypts whole records, so poll() on
    /// the socket does not show them).
    pub fn has_buffered(&mut self) -> bool {
        match self {
            Stream::Tls(s) => s.conn.process_new_packets().is_ok_and(|state| state.plaintext_bytes_to_read() > 0),
            _ => false,
        }
    }

    /// Reads once the socket is readable (or [`Stream::has_buffered`]): the bytes, 0 at the end,
    /// or `WouldBlock` when only part of a TLS record came.
    pub fn read_available(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Stream::Tls(s) = self else {
            return self.read(buf);
        };
        match s.conn.reader().read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        if s.conn.read_tls(&mut s.sock)? == 0 {
            return Ok(0);
        }
        s.conn.process_new_packets().map_err(std::io::Error::other)?;
        while s.conn.wants_write() {
            s.conn.write_tls(&mut s.sock)?;
        }
        s.conn.reader().read(buf)
    }

    /// Tells ferrod nothing more will be sent (the answer may still come).
    pub fn finish_sending(&mut self) {
        match self {
            Stream::Unix(s) => drop(s.shutdown(std::net::Shutdown::Write)),
            Stream::Tcp(s) => drop(s.shutdown(std::net::Shutdown::Write)),
            Stream::Tls(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
    }
}

/// A response whose headers have been read; the body is still on the wire.
pub struct Pending {
    pub status: u16,
    headers: Vec<(String, String)>,
    reader: BufReader<Stream>,
}

impl Pending {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Reads the body's next piece (a chunk, or everything for a sized body); None at the end.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let io = |e: std::io::Error| format!("reading from ferrod: {e}");
        if self.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line).map_err(io)? == 0 {
                return Ok(None);
            }
            let size_text = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?} from ferrod"))?;
            let mut chunk = vec![0u8; size];
            self.reader.read_exact(&mut chunk).map_err(io)?;
            let mut crlf = String::new();
            self.reader.read_line(&mut crlf).map_err(io)?;
            return Ok(if size == 0 { None } else { Some(chunk) });
        }
        let mut data = Vec::new();
        match self.header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            Some(0) => return Ok(None),
            Some(len) => {
                let mut limited = (&mut self.reader).take(len.min(1 << 20));
                limited.read_to_end(&mut data).map_err(io)?;
                let remaining = len - data.len() as u64;
                self.headers.retain(|(k, _)| k != "content-length");
                self.headers.push(("content-length".into(), remaining.to_string()));
                if data.is_empty() {
                    return Err("ferrod closed the connection early".to_string());
                }
            }
            None => {
                self.reader.read_to_end(&mut data).map_err(io)?;
                self.headers.push(("content-length".into(), "0".into()));
            }
        }
        Ok(Some(data))
    }

    /// The raw connection (after a protocol upgrade), with anything already buffered.
    pub fn into_stream(self) -> (Vec<u8>, Stream) {
        let buffered = self.reader.buffer().to_vec();
        (buffered, self.reader.into_inner())
    }
}
