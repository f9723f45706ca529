//! ferrod, the Ferrovisor management daemon: persistent domain and pool definitions in SQLite,
//! one supervised VMM process per running domain, jobs, and a REST API on a unix socket and on
//! TLS listeners.
//!
//! Module map (docs/ferrod.md tells the story):
//! - leaves: `model` (shared types), `error` (the services' error), `domain` (the TOML domain
//!   definition), `events`, `claims` (files in use), `durable` (crash-safe file writes), `access`
//!   (roles, peers, API tokens, browser sessions), `process_identity` (which processes are a
//!   run's, and signals only to those);
//! - `store`: SQLite rows and schema migrations, over `model` only;
//! - services: `jobs` (the runner), `pools` (pools, volumes, copies, imports), `networks`
//!   (virtual networks on the host), `domains` (definitions and supervision), with `vmm` (VM config and control socket) and `monitor` (the
//!   per-VM process), `ovf` (OVF/OVA import and export, over pools and domains) and `snapshots`
//!   (the domain snapshot tree, over domains and jobs) and `backups` (checkpoints
//!   and backups of domain disks, over domains and jobs), `clones` (domain clones, over
//!   domains, pools and jobs; templates are the domains service's) and `migration` (moving a
//!   running domain to another ferrod, over domains and jobs);
//! - `daemon` wires the services together; `api` maps HTTP to them and checks who may call;
//!   `listen` opens the unix socket and the TCP/TLS listeners that serve `api`;
//! - running as a service: `config` (the configuration file), `notify` (systemd notifications).

pub mod access;
pub mod api;
pub mod backups;
pub mod claims;
pub mod clones;
pub mod config;
pub mod crashpoint;
pub mod daemon;
pub mod domain;
pub mod domains;
pub mod durable;
pub mod error;
pub mod events;
pub mod jobs;
pub mod listen;
pub mod migration;
pub mod model;
pub mod monitor;
pub mod networks;
pub mod notify;
pub mod ovf;
pub mod pools;
pub mod process_identity;
pub mod snapshots;
pub mod store;
pub mod vmm;

/// State directory when FERRO_HOME is not set.
pub const DEFAULT_HOME: &str = "/var/lib/ferrovisor";
/// The unprivileged user jailed VMMs run as, unless ferrod's configuration names another (the
/// package and scripts/setup.sh create it).
pub const DEFAULT_JAIL_USER: &str = "ferro-vmm";
/// API socket when FERRO_HOME is not set.
pub const DEFAULT_SOCKET: &str = "/run/ferrovisor/ferrod.sock";

/// The daemon's socket for a given FERRO_HOME (None: the system default).
pub fn socket_for_home(home: Option<&std::path::Path>) -> std::path::PathBuf {
    match home {
        Some(home) => home.join("ferrod.sock"),
        None => std::path::PathBuf::from(DEFAULT_SOCKET),
    }
}
