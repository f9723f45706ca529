//! The nouns ferrod's services, its store and its API share: where things live, object states,
//! the infos the API shows, job records. A leaf: it uses no other module of this crate except the
//! definition model (`domain`), which is a leaf too, and ferro-net's network definition.

use crate::domain::DomainConfig;
use ferro_jail::cgroup::CgroupStats;
use ferro_vmm_api::control::StatsReply;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new random uuid for a domain or a pool.
pub fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid").map(|s| s.trim().to_string()).unwrap_or_else(|_| {
        let t = now_ms();
        format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), t & 0xffff_ffff_ffff)
    })
}

/// Where things live and which binaries to run.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub db: PathBuf,
    /// `$home/run`: one directory per running domain.
    pub run: PathBuf,
    /// The `ferro` binary whose hidden `vmm` subcommand runs a VM.
    pub ferro_bin: PathBuf,
    /// The `ferrod` binary, run as `ferrod monitor` for each VM.
    pub monitor_bin: PathBuf,
}

impl Paths {
    /// `$home/snapshots`: one directory per domain uuid, with its snapshots' memory and state.
    pub fn snapshots(&self) -> PathBuf {
        self.home.join("snapshots")
    }
}

/// How ferrod confines the VMMs it starts (docs/isolation.md); set by the host's administrator
/// (ferrod's flags and file), never by a domain definition.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// Every VMM thread under its seccomp allowlist (`ferro vmm --seccomp`).
    pub seccomp: bool,
    /// Each VMM in a jail of its own as this user (`jail = false`: none).
    pub jail: Option<Jailer>,
    /// Directories the files a definition names must lie under, besides pool targets
    /// (`allowed_image_paths`, `--allow-path`); empty: anywhere (domains/paths.rs).
    pub allowed_paths: Vec<PathBuf>,
}

/// What every VMM jail has in common: the user it runs as and the files of the VMM program.
#[derive(Debug, Clone)]
pub struct Jailer {
    pub user: ferro_jail::jail::User,
    /// The `ferro` binary, its ELF interpreter and its shared libraries.
    pub program: Vec<PathBuf>,
}

impl Jailer {
    /// The jail of VMMs that run `ferro_bin` as the user `user`; ferrod must be root to jail.
    pub fn new(user: &str, ferro_bin: &Path) -> Result<Jailer, String> {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("jailing VMMs needs ferrod to run as root: run it as root or set jail = false (--no-jail)".to_string());
        }
        Ok(Jailer { user: ferro_jail::jail::User::lookup(user)?, program: ferro_jail::jail::program_files(ferro_bin)? })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    #[default]
    Shutoff,
    Running,
    Paused,
    Crashed,
}

impl DomainState {
    /// Whether a VMM runs for the domain (running or paused).
    pub fn is_active(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Paused)
    }

    /// The name in JSON and in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            DomainState::Shutoff => "shutoff",
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Crashed => "crashed",
        }
    }

    /// The human word, as virsh prints it.
    pub fn word(self) -> &'static str {
        match self {
            DomainState::Shutoff => "shut off",
            other => other.name(),
        }
    }
}

/// Why the last run of a domain ended badly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Crash {
    pub reason: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub time_ms: u64,
}

/// A domain as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// A template: never started, the read-only base of linked clones.
    pub template: bool,
    pub autostart: bool,
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Pid of the VMM process while the domain runs.
    pub pid: Option<i32>,
    pub started_ms: Option<u64>,
    pub log: String,
    pub crash: Option<Crash>,
    /// Set when the stored definition no longer validates.
    pub error: Option<String>,
    pub config: Option<DomainConfig>,
}

/// Counters of a running domain: what its VMM reports plus the configured sizes.
#[derive(Debug, Clone, Serialize)]
pub struct DomainStats {
    pub name: String,
    pub state: DomainState,
    pub memory_bytes: u64,
    pub vcpus: u32,
    #[serde(flatten)]
    pub vmm: StatsReply,
    /// The limits of the domain's cgroup and how often they held it back; None when the host
    /// has no cgroup hierarchy ferrod can use.
    pub cgroup: Option<CgroupStats>,
}

/// The host as `nodeinfo` shows it (virsh nodeinfo and nodememstats in one).
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// Online CPUs, as a count and as a list.
    pub cpus: u32,
    pub cpu_list: String,
    /// RAM (MemTotal) and what the kernel could give without swapping (MemAvailable).
    pub ram_bytes: u64,
    pub available_bytes: u64,
    /// Memory committed to running domains: guest RAM minus balloon targets, plus each VMM's
    /// measured overhead.
    pub committed_bytes: u64,
    pub running_domains: u32,
    /// A start that would commit more than `overcommit_ratio` x RAM (`commit_limit_bytes`) is
    /// refused.
    pub overcommit_ratio: f64,
    pub commit_limit_bytes: u64,
    /// The 2 MiB huge page pool; None where the kernel has none.
    pub hugepages: Option<ferro_hypervisor::host_memory::HugePagePool>,
    /// KSM; None where the kernel has none.
    pub ksm: Option<ferro_hypervisor::host_memory::Ksm>,
    /// The transparent huge page mode; None where the kernel has none.
    pub thp: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub target: String,
    pub active: bool,
    pub autostart: bool,
    /// Filesystem sizes in bytes; absent while the pool is inactive.
    pub capacity: Option<u64>,
    pub allocation: Option<u64>,
    pub available: Option<u64>,
    pub volumes: Option<usize>,
}

/// A domain's NIC as the API shows it (domiflist, domifaddr).
#[derive(Debug, Clone, Serialize)]
pub struct InterfaceInfo {
    /// network, bridge or ethernet (a tap of the user's).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The network, bridge or tap name.
    pub source: String,
    pub mac: Option<String>,
    /// The tap on the host: a tap of the user's always, one ferrod made while the domain runs.
    pub tap: Option<String>,
    /// The IPv4 address the network's DHCP server leased to the MAC (network NICs).
    pub address: Option<String>,
}

/// A virtual network as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInfo {
    pub name: String,
    pub uuid: String,
    /// nat, isolated or bridge (absent when the stored definition no longer validates).
    pub mode: Option<&'static str>,
    pub bridge: Option<String>,
    /// Whether it runs on the host now.
    pub active: bool,
    pub autostart: bool,
    /// The network's dnsmasq while it runs (nat and isolated networks).
    pub dnsmasq_pid: Option<u32>,
    /// Set when the stored definition no longer validates.
    pub error: Option<String>,
    pub config: Option<ferro_net::NetworkConfig>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: String,
    pub format: &'static str,
    /// Virtual size in bytes (what the guest sees).
    pub capacity: u64,
    /// Bytes the file occupies on the host.
    pub allocation: u64,
    pub backing: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<JobState> {
        [JobState::Running, JobState::Completed, JobState::Failed, JobState::Cancelled].into_iter().find(|s| s.name() == name)
    }
}

/// How far a job is, in the unit its kind counts: bytes (copies, backups, migrations) or steps
/// (work made of a few distinct parts). The JSON field names carry the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Progress {
    Bytes { done_bytes: u64, total_bytes: u64 },
    Steps { done_steps: u64, total_steps: u64 },
}

impl Progress {
    /// Nothing done yet, out of a total not known yet.
    pub fn start(unit: ProgressUnit) -> Progress {
        Progress::new(unit, 0, 0)
    }

    pub fn new(unit: ProgressUnit, done: u64, total: u64) -> Progress {
        match unit {
            ProgressUnit::Bytes => Progress::Bytes { done_bytes: done, total_bytes: total },
            ProgressUnit::Steps => Progress::Steps { done_steps: done, total_steps: total },
        }
    }

    pub fn unit(self) -> ProgressUnit {
        match self {
            Progress::Bytes { .. } => ProgressUnit::Bytes,
            Progress::Steps { .. } => ProgressUnit::Steps,
        }
    }

    /// (done, total) in the job's unit.
    pub fn counts(self) -> (u64, u64) {
        match self {
            Progress::Bytes { done_bytes, total_bytes } => (done_bytes, total_bytes),
            Progress::Steps { done_steps, total_steps } => (done_steps, total_steps),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressUnit {
    Bytes,
    Steps,
}

impl ProgressUnit {
    pub fn name(self) -> &'static str {
        match self {
            ProgressUnit::Bytes => "bytes",
            ProgressUnit::Steps => "steps",
        }
    }

    pub fn from_name(name: &str) -> Option<ProgressUnit> {
        [ProgressUnit::Bytes, ProgressUnit::Steps].into_iter().find(|u| u.name() == name)
    }
}

/// A domain snapshot as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub domain: String,
    pub name: String,
    /// The snapshot it was taken after (the domain's current one then); None for a root.
    pub parent: Option<String>,
    /// The snapshots taken after it, oldest first.
    pub children: Vec<String>,
    /// The domain's state when it was taken: running or paused (memory, devices and disks
    /// saved) or shutoff (disks only).
    pub state: DomainState,
    /// When it was taken, RFC 3339 in UTC.
    pub created: String,
    pub created_ms: u64,
    /// The one the domain was last snapshotted as or reverted to.
    pub current: bool,
    pub description: Option<String>,
    /// How long the guest was paused while its memory and devices were saved (microseconds).
    pub pause_us: Option<u64>,
    /// Guest memory written to the snapshot's memory file (zero pages are holes, not counted).
    pub memory_bytes: Option<u64>,
    /// The disk files that hold an internal snapshot of this name.
    pub disks: Vec<String>,
}

/// `ms` since the Unix epoch as RFC 3339 in UTC, to the millisecond (`2026-11-30T23:58:14.123Z`).
pub fn rfc3339(ms: u64) -> String {
    format!("{}.{:03}Z", ferro_block::ops::utc_date(ms / 1000).replacen(' ', "T", 1), ms % 1000)
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: u64,
    /// What the job does: "clone", "convert", ... (one name per job kind).
    pub kind: String,
    /// What the job reads, as the API names it ("pool/volume" for copies).
    pub source: String,
    /// What the job makes.
    pub target: String,
    pub state: JobState,
    #[serde(flatten)]
    pub progress: Progress,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why the job failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_083_094_123), "2026-11-30T23:58:14.123Z");
        assert_eq!(rfc3339(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn state_names_round_trip() {
        for state in [JobState::Running, JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert_eq!(JobState::from_name(state.name()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
        assert_eq!(JobState::from_name("paused"), None);
        for state in [DomainState::Shutoff, DomainState::Running, DomainState::Paused, DomainState::Crashed] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }

    #[test]
    fn progress_fields_name_their_unit() {
        let bytes = serde_json::to_value(Progress::new(ProgressUnit::Bytes, 3, 9)).unwrap();
        assert_eq!(bytes, serde_json::json!({"done_bytes": 3, "total_bytes": 9}));
        let steps = serde_json::to_value(Progress::new(ProgressUnit::Steps, 1, 4)).unwrap();
        assert_eq!(steps, serde_json::json!({"done_steps": 1, "total_steps": 4}));
        assert_eq!(ProgressUnit::from_name("steps"), Some(ProgressUnit::Steps));
        assert_eq!(Progress::new(ProgressUnit::Steps, 1, 4).counts(), (1, 4));
    }
}
