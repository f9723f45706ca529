//! What the host's kernel says about its memory, for the VMM (is a huge page pool big enough?),
//! `ferro host-check` and ferrod's `nodeinfo`: RAM from /proc/meminfo, the 2 MiB huge page
//! pool, transparent huge pages and KSM from sysfs.

use serde::{Deserialize, Serialize};

/// Size of the huge pages guest RAM uses (the x86 PMD size).
pub const HUGE_PAGE: u64 = 2 << 20;

/// RAM in bytes: (`MemTotal`, `MemAvailable`) from /proc/meminfo.
pub fn ram() -> Result<(u64, u64), String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        let line = meminfo.lines().find(|l| l.starts_with(name)).ok_or_else(|| format!("/proc/meminfo has no {name}"))?;
        let kib: u64 = line[name.len()..].split_whitespace().next().and_then(|n| n.parse().ok()).ok_or_else(|| format!("/proc/meminfo: {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The host's pool of 2 MiB huge pages, from `/sys/kernel/mm/hugepages/hugepages-2048kB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePagePool {
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages no process has faulted in (`free_hugepages`); some may be reserved.
    pub free: u64,
    /// Free pages already promised to a mapping (`resv_hugepages`).
    pub reserved: u64,
}

impl HugePagePool {
    /// The kernel's counters of 2 MiB huge pages.
    pub const DIR: &'static str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

    pub fn read() -> Result<HugePagePool, String> {
        let field = |name: &str| read_number(&format!("{}/{name}", Self::DIR), "does the kernel have 2 MiB huge pages?");
        Ok(HugePagePool { total: field("nr_hugepages")?, free: field("free_hugepages")?, reserved: field("resv_hugepages")? })
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// What to tell a user whose guest needs `needed` pages the pool does not have.
    pub fn shortage_message(&self, needed: u64) -> String {
        format!(
            "hugepages=on needs {needed} free 2 MiB huge pages ({} MiB), the host has {} free of {} \
             (reserve more, e.g. echo {} > /proc/sys/vm/nr_hugepages)",
            (needed * HUGE_PAGE) >> 20,
            self.available(),
            self.total,
            self.total + needed.saturating_sub(self.available()),
        )
    }
}

/// Kernel samepage merging, from `/sys/kernel/mm/ksm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ksm {
    /// ksmd scans mergeable memory (`run` is 1).
    pub running: bool,
    /// Pages that share another page's memory (`pages_sharing`): what KSM saves.
    pub pages_sharing: u64,
}

impl Ksm {
    const DIR: &'static str = "/sys/kernel/mm/ksm";

    /// Err when the kernel has no KSM.
    pub fn read() -> Result<Ksm, String> {
        let field = |name: &str| read_number(&format!("{}/{name}", Self::DIR), "is the kernel built with CONFIG_KSM?");
        Ok(Ksm { running: field("run")? == 1, pages_sharing: field("pages_sharing")? })
    }
}

/// Pages of process `pid` KSM has merged (`/proc/PID/ksm_merging_pages`, Linux 6.1 and later);
/// Err saying so where the kernel does not report it.
pub fn ksm_merging_pages(pid: u32) -> Result<u64, String> {
    read_number(&format!("/proc/{pid}/ksm_merging_pages"), "the kernel reports merged pages per process from Linux 6.1")
}

/// The transparent huge page mode (`always`, `madvise` or `never`), the one in brackets in
/// `/sys/kernel/mm/transparent_hugepage/enabled`.
pub fn thp_mode() -> Result<String, String> {
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e} (is the kernel built with THP?)"))?;
    let mode = text.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
    mode.map(str::to_owned).ok_or_else(|| format!("{path}: no mode in brackets in {:?}", text.trim()))
}

fn read_number(path: &str, hint: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e} ({hint})"))?;
    text.trim().parse().map_err(|_| format!("{path}: {:?} is not a number", text.trim()))
}
