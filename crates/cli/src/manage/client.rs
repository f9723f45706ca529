//! A small blocking HTTP/1.1 client for ferrod's unix socket: no runtime, no TLS, nothing to
//! initialize before a manage verb actually runs.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// ferrod's socket when FERRO_HOME is not set (the daemon's default).
const DEFAULT_SOCKET: &str = "/run/ferrovisor/ferrod.sock";

/// Which socket to talk to: `--connect`, else `$FERRO_HOME/ferrod.sock`, else the system socket.
pub fn socket_path(connect: Option<&Path>) -> PathBuf {
    if let Some(path) = connect {
        return path.to_path_buf();
    }
    match std::env::var_os("FERRO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("ferrod.sock"),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

pub struct Client {
    socket: PathBuf,
}

/// A response whose headers have been read; the body is still on the wire.
pub struct Pending {
    pub status: u16,
    headers: Vec<(String, String)>,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    fn connect(&self) -> Result<UnixStream, String> {
        UnixStream::connect(&self.socket).map_err(|e| {
            format!(
                "cannot reach ferrod at {} ({e}); is ferrod running? (set FERRO_HOME or --connect)",
                self.socket.display()
            )
        })
    }

    /// Sends a request head plus `body` (if any) and reads the response head.
    pub fn send(&self, method: &str, path: &str, extra_headers: &str, body: Body<'_>) -> Result<Pending, String> {
        let mut stream = self.connect()?;
        let (len, content_type) = match &body {
            Body::None => (0, None),
            Body::Bytes(b, ctype) => (b.len() as u64, Some(*ctype)),
            Body::File(_, len) => (*len, Some("application/octet-stream")),
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: ferrod\r\n{extra_headers}");
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
            return Err(error_message(pending.status, &data));
        }
        Ok((pending.status, data))
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

pub enum Body<'a> {
    None,
    Bytes(&'a [u8], &'static str),
    File(&'a std::fs::File, u64),
}

/// The one-line message of an error response.
pub fn error_message(status: u16, data: &[u8]) -> String {
    serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("ferrod answered HTTP {status}: {}", String::from_utf8_lossy(data).trim()))
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
    pub fn into_stream(self) -> (Vec<u8>, UnixStream) {
        let buffered = self.reader.buffer().to_vec();
        (buffered, self.reader.into_inner())
    }
}
