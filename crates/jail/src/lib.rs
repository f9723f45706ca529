//! ferro-jail: what keeps one VMM process from reaching beyond its own VM.
//!
//! - [`cgroup`]: one cgroup per VM below the cgroup of the process that places it, with CPU,
//!   memory, block I/O and pid limits, on cgroup v2 or on the v1 controllers of hybrid hosts.
//!
//! Used by ferrod (placement and limits of each domain, counters for `domstats`) and by
//! `ferro host-check` (which controllers this host offers). docs/isolation.md tells the story.

pub mod cgroup;
