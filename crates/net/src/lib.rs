//! Host networking for ferrod: virtual networks the way libvirt builds them, out of Linux bridges,
//! taps, nftables and dnsmasq.
//!
//! - [`config`]: the human-edited TOML network definition and its validation.
//! - [`link`]: bridges, links, addresses and routes over rtnetlink (no `ip` command).
//! - [`tap`]: persistent taps created with `TUNSETIFF`, opened so ferrod can hand the fd to a VMM.
//! - [`firewall`]: forwarding and NAT rules in ferrod's own nftables table, one pair of chains per
//!   network, never touching other tables.
//! - [`dnsmasq`]: one DHCP/DNS server per network: its files, start, identity check and leases.
//! - [`host`]: [`HostNetworks`], which starts, adopts, supervises and destroys networks on this host
//!   and switches IPv4 forwarding on only while a NAT network runs.
//!
//! Everything here is synchronous and acts in the network namespace of the calling thread (child
//! processes inherit it), which is how the tests run it inside namespaces they create.

pub mod config;
pub mod dnsmasq;
pub mod firewall;
pub mod host;
pub mod link;
pub mod tap;

pub use config::{ConfigError, Mode, NetworkConfig};
pub use dnsmasq::Lease;
pub use host::HostNetworks;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The host or another network is in the way (a bridge name in use, an overlapping subnet, a
    /// missing host bridge): nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// A program the network needs is not installed.
    #[error("{program} not found: install the Debian package {package}")]
    MissingTool { program: &'static str, package: &'static str },
    /// The kernel or a helper program refused an operation; the message says which and why.
    #[error("{0}")]
    Host(String),
}

impl NetError {
    /// A [`NetError::Host`] from an I/O error and what was being done (`"create bridge ferbr0"`).
    pub(crate) fn host(what: impl std::fmt::Display, e: impl std::fmt::Display) -> NetError {
        NetError::Host(format!("{what}: {e}"))
    }
}

/// Finds `program` in the usual system directories (ferrod may run with a minimal PATH).
pub(crate) fn find_program(program: &'static str, package: &'static str) -> Result<std::path::PathBuf, NetError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(std::path::PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(NetError::MissingTool { program, package })
}

/// Whether `nft` and `dnsmasq` are installed, and the kernel has bridges: for `ferro host-check`.
/// Each entry is (what, Ok(detail) or Err(why not)).
pub fn host_support() -> Vec<(&'static str, Result<String, String>)> {
    let tool = |program, package| find_program(program, package).map(|p| p.display().to_string()).map_err(|e| e.to_string());
    vec![
        ("nft", tool("nft", "nftables")),
        ("dnsmasq", tool("dnsmasq", "dnsmasq-base")),
        ("kernel bridges", link::bridge_support()),
    ]
}
