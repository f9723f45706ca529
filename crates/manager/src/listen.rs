//! Where ferrod listens, all serving the same router: the local unix socket (created 0660 with a
//! group, or 0600; each client's credentials attached to its requests) and the TCP listeners
//! (`--listen`: TLS with rustls, or plain HTTP on a loopback address with `--insecure`).
//! The options are checked and the certificate, key and token file loaded before anything is
//! bound, so a wrong setup stops ferrod at once with one line saying what to fix.

use crate::access::tokens::Tokens;
use crate::access::{Access, Credentials, Peer};
use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};

/// Group that may use the unix socket when `--socket-group` is not given (if it exists).
pub const DEFAULT_SOCKET_GROUP: &str = "ferro";
/// Open TCP connections at most; further clients wait in the kernel's backlog.
const MAX_TCP_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    /// Also serve the API on this TCP address (repeatable), e.g. 0.0.0.0:8443 or [::1]:8443: TLS
    /// with --tls-cert and --tls-key, every request with a token from --token-file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<String>,
    /// Certificate chain (PEM) of the TCP listeners.
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert; must not be readable by others.
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub tls_key: Option<PathBuf>,
    /// API tokens, one per line: TOKEN [admin|readonly]; mode 0600 (see docs/remote.md).
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub token_file: Option<PathBuf>,
    /// Plain HTTP instead of TLS, allowed only on loopback addresses.
    #[arg(long, requires = "listen")]
    pub insecure: bool,
    /// Let every client in as an admin, without a token (demos; only with --insecure).
    #[arg(long, requires = "insecure")]
    pub no_auth: bool,
    /// Group whose members may use the unix socket (mode 0660); default `ferro` if that group
    /// exists, else the socket is for its owner only (0600).
    #[arg(long, value_name = "NAME")]
    pub socket_group: Option<String>,
}

/// The TCP side, checked and loaded.
pub struct TcpPlan {
    addrs: Vec<SocketAddr>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub access: Arc<Access>,
}

impl ListenArgs {
    /// Checks the TCP options against each other and loads the certificate, key and tokens.
    pub fn plan(&self) -> Result<TcpPlan, String> {
        let addrs = self
            .listen
            .iter()
            .map(|a| a.parse::<SocketAddr>().map_err(|_| format!("--listen {a}: expected ADDR:PORT, e.g. 0.0.0.0:8443 or [::1]:8443")))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = if self.insecure {
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err("--insecure serves plain HTTP: leave out --tls-cert and --tls-key, or --insecure".into());
            }
            if let Some(addr) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "--listen {addr} --insecure: plain TCP is allowed only on loopback addresses (127.0.0.1, ::1); \
                     use TLS (--tls-cert, --tls-key) for other addresses"
                ));
            }
            None
        } else if let Some(addr) = addrs.first() {
            let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
                return Err(format!(
                    "--listen {addr} serves TLS: give --tls-cert and --tls-key (plain TCP only with --insecure on a loopback address)"
                ));
            };
            Some(tokio_rustls::TlsAcceptor::from(tls_config(cert, key)?))
        } else {
            None
        };
        let tokens = match (&self.token_file, self.no_auth) {
            (Some(_), true) => return Err("--no-auth lets everyone in: leave out --token-file, or --no-auth".into()),
            (Some(file), false) => Tokens::load(file)?,
            (None, false) if !addrs.is_empty() => {
                return Err("--listen needs --token-file (API tokens, see docs/remote.md), or --insecure --no-auth on loopback".into());
            }
            (None, _) => Tokens::none(),
        };
        Ok(TcpPlan { addrs, tls, access: Arc::new(Access::new(tokens, self.no_auth)) })
    }
}

/// The server side of TLS: the certificate chain and key, TLS 1.2 and 1.3, HTTP/1.1.
fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {}: no PEM certificate in it", cert.display()));
    }
    let mode = std::fs::metadata(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(format!("--tls-key {0}: readable by everyone (mode {1:03o}); run: chmod 600 {0}", key.display(), mode & 0o777));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A bound TCP listener, not yet accepting.
pub struct TcpServer {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl TcpPlan {
    /// Binds every `--listen` address (port 0 picks a free port; the log says which).
    pub async fn bind(&self) -> Result<Vec<TcpServer>, String> {
        let mut servers = Vec::new();
        for addr in &self.addrs {
            let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let address = listener.local_addr().map_err(|e| format!("{addr}: {e}"))?;
            tracing::info!(%address, tls = self.tls.is_some(), open = self.access.open, "listening");
            servers.push(TcpServer { listener, tls: self.tls.clone() });
        }
        Ok(servers)
    }
}

impl TcpServer {
    /// Accepts clients until the task is aborted; each connection is served on its own task.
    pub fn spawn(self, app: Router) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (stream, addr) = match self.listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("accepting a TCP connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let tls = self.tls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let peer = Peer::Tcp { addr, tls: tls.is_some() };
                    let Some(acceptor) = tls else {
                        return serve_connection(stream, peer, app).await;
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, app).await,
                        Ok(Err(e)) => tracing::info!(peer = %addr, "TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        })
    }
}

/// HTTP/1.1 on one connection, upgrades (the console) included; every request carries the peer.
async fn serve_connection<S>(stream: S, peer: Peer, app: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(?peer, "connection ended: {e}");
    }
}

/// Binds the unix socket: mode 0660 with `group` (default `ferro` if it exists), else 0600. The
/// socket never exists with a wider mode, not even for an instant.
pub fn bind_unix(socket: &Path, group: Option<&str>) -> Result<UnixListener, String> {
    let gid = socket_group(group)?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // The home lock is held, so a socket file left here belongs to a daemon that is gone.
    let _ = std::fs::remove_file(socket);
    // SAFETY: umask(2) only changes this process's file creation mask; nothing else creates files
    // while ferrod starts, and the old mask is put back right after the bind.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let shown = socket.display();
    match gid {
        Some((name, gid)) => {
            std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| format!("cannot give {shown} to group {name}: {e}"))?;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
            tracing::info!(socket = %shown, group = name, "API socket: mode 0660, members of the group may use it");
        }
        None => tracing::info!(
            socket = %shown,
            "API socket: mode 0600, for its owner only (no group `{DEFAULT_SOCKET_GROUP}`; create it or pass --socket-group)"
        ),
    }
    Ok(listener)
}

/// The unix socket's group and its id: `group` (which must exist), else `ferro` if it exists.
pub fn socket_group(group: Option<&str>) -> Result<Option<(&str, u32)>, String> {
    Ok(match group {
        Some(name) => Some((name, group_id(name)?.ok_or_else(|| format!("--socket-group {name}: no such group"))?)),
        None => group_id(DEFAULT_SOCKET_GROUP)?.map(|gid| (DEFAULT_SOCKET_GROUP, gid)),
    })
}

/// A group's id by name (None: no such group).
fn group_id(name: &str) -> Result<Option<u32>, String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("group name {name:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero `group` is a valid value of this plain C struct; getgrnam_r fills it.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the struct, the buffer
    // with its true length, and the result pointer; the strings it sets point into `buf`, which we
    // do not read.
    let rc = unsafe { libc::getgrnam_r(c_name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    match rc {
        0 if found.is_null() => Ok(None),
        0 => Ok(Some(group.gr_gid)),
        libc::ENOENT | libc::ESRCH => Ok(None),
        errno => Err(format!("cannot look up group {name}: {}", std::io::Error::from_raw_os_error(errno))),
    }
}

/// Each unix-socket client's credentials, read once when it connects.
impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        let credentials = stream.io().peer_cred().ok().map(|c| Credentials { pid: c.pid().unwrap_or(0), uid: c.uid(), gid: c.gid() });
        Peer::Unix(credentials)
    }
}
