//! What the VMM, `ferro` and `ferrod` say to each other, as types.
//!
//! - [`config`]: the one serde description of a VM ([`VmConfig`]) that `ferro run` builds from its
//!   flags, `ferrod` builds from a domain definition, and the VMM boots from.
//! - [`control`]: requests and replies on the per-VM control socket, and the events a VMM reports
//!   to its supervisor (docs/vmm-control.md describes the wire form).
//! - [`size`], [`mac`] and [`cpulist`]: the one grammar for sizes (`512M`, `1.5G`, `2TiB`), MAC
//!   addresses and host CPU lists (`0,2-3`) used by every command-line flag and definition file.
//! - [`snapshot_file`]: the checked frame of a snapshot's state file, which the VMM writes and
//!   reads and ferrod checks before a revert.
//!
//! This crate has no dependency beyond serde and sha2, so every other crate can use it.

pub mod config;
pub mod control;
pub mod cpulist;
pub mod mac;
pub mod size;
pub mod snapshot_file;
pub mod vmm_file;

pub use config::{BootConfig, ConsoleBackend, DeviceConfig, DeviceKind, DiskFormat, Kernel, MemoryConfig, Pinning, Transport, VmConfig};
pub use control::{ExitReason, Request, VmEvent};
pub use cpulist::CpuList;
pub use mac::MacAddr;
pub use size::parse_size;
