//! ferro-jail: what keeps one VMM process from reaching beyond its own VM.
//!
//! - [`cgroup`]: one cgroup per VM below the cgroup of the process that places it, with CPU,
//!   memory, block I/O and pid limits, on cgroup v2 or on the v1 controllers of hybrid hosts.
//! - [`affinity`]: which host CPUs each VMM thread runs on (vCPU and emulator pinning).
//! - [`jail`]: the namespaces, root directory, user and limits a VMM runs in.
//! - [`seccomp`]: an allowlist of system calls per VMM thread kind, installed by the one helper
//!   that starts the VMM's threads.
//!
//! Used by ferrod (placement and limits of each domain, counters for `domstats`) and by
//! `ferro host-check` (which controllers this host offers). docs/isolation.md tells the story.

pub mod affinity;
pub mod cgroup;
pub mod jail;
pub mod seccomp;
