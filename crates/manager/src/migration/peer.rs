//! The source ferrod's client of the destination ferrod: TLS to its `--listen` listener, trusting
//! only the CA the migration request names (else the system's bundle) and sending the
//! destination's token, JSON requests and the upgraded connection that carries the migration
//! stream. HTTP/1.1 by hand, one request per connection, as little as ferrod's own server needs.

use crate::error::{Error, Result};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The CAs trusted when the request names none: the system's bundle (Debian).
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to answer a request (an incoming migration's answer comes
/// once its VMM is started and listens).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: u64 = 1 << 20;

/// A destination ferrod: `tls://HOST:PORT`, its CA and its token.
pub struct Peer {
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    token: String,
}

impl Peer {
    /// From the destination URI (`tls://HOST:PORT`), the CA certificates (PEM text; None: the
    /// system's bundle) and the destination's API token.
    pub fn new(uri: &str, ca_pem: Option<&str>, token: &str) -> Result<Peer> {
        let bad = || Error::invalid(format!("destination: {uri:?}: expected tls://HOST:PORT (a ferrod started with --listen)"));
        let rest = uri.strip_prefix("tls://").ok_or_else(bad)?;
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':').ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        let token = token.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid("dest_token: must be one API token of the destination ferrod (no spaces)"));
        }
        let pem = match ca_pem {
            Some(pem) => pem.to_string(),
            None => std::fs::read_to_string(SYSTEM_CAS).map_err(|e| {
                Error::invalid(format!("dest_ca: not given, and the system's CA bundle {SYSTEM_CAS} cannot be read ({e})"))
            })?,
        };
        Ok(Peer { host: host.to_string(), port, tls: tokio_rustls::TlsConnector::from(client_config(&pem)?), token: token.to_string() })
    }

    /// `HOST:PORT`, for messages.
    pub fn shown(&self) -> String {
        if self.host.contains(':') { format!("[{}]:{}", self.host, self.port) } else { format!("{}:{}", self.host, self.port) }
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>> {
        let at = self.shown();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| Error::timeout(format!("destination ferrod at {at}: no connection within {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| Error::conflict(format!("cannot reach the destination ferrod at {at} ({e}); is it started with --listen?")))?;
        tcp.set_nodelay(true).map_err(|e| Error::internal(format!("destination {at}: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| Error::invalid(format!("destination: {}: not a valid host name or address", self.host)))?;
        tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp))
            .await
            .map_err(|_| Error::timeout(format!("destination ferrod at {at}: TLS handshake timed out")))?
            .map_err(|e| handshake_error(&e, &at, &self.host))
    }

    /// Sends one request (`upgrade`: asking for `Upgrade: ferro-migration`) and reads the answer's
    /// head: its status, its body when it is not a 101, and the connection.
    async fn exchange(&self, method: &str, path: &str, body: Option<&Value>, upgrade: bool) -> Result<(u16, Vec<u8>, TlsStream<TcpStream>)> {
        let at = self.shown();
        let io = |e: std::io::Error| Error::conflict(format!("destination ferrod at {at}: {e}"));
        let mut stream = self.connect().await?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let connection = if upgrade { "Connection: Upgrade\r\nUpgrade: ferro-migration\r\n" } else { "Connection: close\r\n" };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer {}\r\n{connection}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.token,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body.as_bytes()).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let answer = async {
            // Byte by byte up to the blank line: after a 101 the migration stream follows at once.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= MAX_HEAD {
                    return Err(Error::conflict(format!("destination ferrod at {at}: an answer head longer than {MAX_HEAD} bytes")));
                }
                let byte = stream.read_u8().await.map_err(io)?;
                head.push(byte);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| Error::conflict(format!("destination ferrod at {at}: a malformed answer")))?;
            if status == 101 {
                return Ok((status, Vec::new()));
            }
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<u64>().ok());
            let mut data = Vec::new();
            match length {
                Some(len) => {
                    (&mut stream).take(len.min(MAX_BODY)).read_to_end(&mut data).await.map_err(io)?;
                }
                None => {
                    (&mut stream).take(MAX_BODY).read_to_end(&mut data).await.map_err(io)?;
                }
            }
            Ok((status, data))
        };
        let (status, data) = tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| Error::timeout(format!("destination ferrod at {at} did not answer {method} {path} within {} s", ANSWER_TIMEOUT.as_secs())))??;
        Ok((status, data, stream))
    }

    /// A JSON request; the answer's JSON, or the destination's refusal as an error.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, data, _) = self.exchange(method, path, body, false).await?;
        if !(200..300).contains(&status) {
            return Err(self.refusal(status, &data));
        }
        if data.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&data).map_err(|e| Error::conflict(format!("destination ferrod at {}: invalid JSON: {e}", self.shown())))
    }

    /// A request the destination answers by upgrading the connection to a migration stream.
    pub async fn upgrade(&self, path: &str, body: &Value) -> Result<TlsStream<TcpStream>> {
        let (status, data, stream) = self.exchange("POST", path, Some(body), true).await?;
        if status != 101 {
            return Err(self.refusal(status, &data));
        }
        Ok(stream)
    }

    /// The destination's one-line message for a failed request, with the fix for a token it
    /// refused.
    fn refusal(&self, status: u16, data: &[u8]) -> Error {
        let message = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(data).trim()));
        let at = self.shown();
        match status {
            401 => Error::conflict(format!(
                "the destination ferrod at {at} refused the token: {message} (give one of its tokens with --dest-token-file)"
            )),
            403 => Error::conflict(format!("the destination ferrod at {at} refused: {message} (a migration needs an admin token)")),
            _ => Error::conflict(format!("the destination ferrod at {at} refused: {message}")),
        }
    }
}

/// TLS trusting exactly the CA certificates in `pem`.
fn client_config(pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("dest_ca: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::invalid("dest_ca: no usable CA certificate (PEM) in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a failed handshake means for the user.
fn handshake_error(e: &std::io::Error, at: &str, host: &str) -> Error {
    use rustls::CertificateError as C;
    let message = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            format!("refusing the destination ferrod at {at}: its certificate is not signed by the CA given (--dest-ca)")
        }
        Some(rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            format!("refusing the destination ferrod at {at}: its certificate is not made out to {host}")
        }
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            format!("refusing the destination ferrod at {at}: its certificate has expired")
        }
        Some(other) => format!("TLS handshake with the destination ferrod at {at} failed: {other}"),
        None => format!("TLS handshake with the destination ferrod at {at} failed: {e}"),
    };
    Error::conflict(message)
}
