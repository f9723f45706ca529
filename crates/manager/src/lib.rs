//! ferrod, the Ferrovisor management daemon: persistent domain and pool definitions in SQLite,
//! one supervised VMM process per running domain, volume jobs, and a REST API on a unix socket.

pub mod api;
pub mod domain;
pub mod error;
pub mod events;
pub mod jobs;
pub mod manager;
pub mod monitor;
pub mod pools;
pub mod store;
pub mod vmm;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// State directory when FERRO_HOME is not set.
pub const DEFAULT_HOME: &str = "/var/lib/ferrovisor";
/// API socket when FERRO_HOME is not set.
pub const DEFAULT_SOCKET: &str = "/run/ferrovisor/ferrod.sock";

/// The daemon's socket for a given FERRO_HOME (None: the system default).
pub fn socket_for_home(home: Option<&std::path::Path>) -> std::path::PathBuf {
    match home {
        Some(home) => home.join("ferrod.sock"),
        None => std::path::PathBuf::from(DEFAULT_SOCKET),
    }
}
