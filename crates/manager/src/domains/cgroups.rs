//! The cgroup of each run: the limits a definition's `[limits]` asks for (memory is limited even
//! without it: guest RAM plus an overhead), the cgroup made for the run below ferrod's own
//! (`vm-<name>-<uuid>`), what the cgroup says about a VMM the kernel killed, and its removal
//! when the run is over. docs/isolation.md describes the placement.

use super::{Domains, lock};
use crate::domain::{DomainConfig, LimitsConfig};
use crate::error::{Error, Result};
use crate::monitor::ExitReport;
use crate::vmm::ResolvedDisk;
use ferro_jail::cgroup::{BlockDevice, CgroupStats, Controller, IoLimit, Limits, VmCgroup};

impl Domains {
    /// Makes the cgroup a new run of `name` goes into, with the definition's limits.
    pub(super) fn create_cgroup(&self, name: &str, uuid: &str, config: &DomainConfig, disks: &[ResolvedDisk]) -> Result<VmCgroup> {
        let limits = limits(config, disks, self.cgroups.usable(Controller::Memory))?;
        self.cgroups
            .create(&format!("vm-{name}-{uuid}"), &limits)
            .map_err(|e| Error::internal(format!("domain {name}: cannot set up its cgroup: {e}")))
    }

    /// The cgroup of the current run of `name`, if it has one.
    pub(super) fn run_cgroup(&self, name: &str) -> Option<VmCgroup> {
        lock(&self.domains).get(name).and_then(|d| d.rt.cgroup.clone())
    }

    /// Counters of the current run's cgroup, for `domstats`.
    pub(super) fn cgroup_stats(&self, name: &str) -> Option<CgroupStats> {
        self.run_cgroup(name).map(|c| c.stats())
    }
}

/// Names the memory limit as the reason of a run that the kernel's OOM killer ended.
pub(super) fn explain_oom(cgroup: &VmCgroup, report: &mut ExitReport) {
    if report.code == Some(0) {
        return;
    }
    let Some(memory) = cgroup.stats().memory.filter(|m| m.oom_kills > 0) else { return };
    let limit = memory.limit_bytes.map(|b| format!("{} MiB", b >> 20)).unwrap_or_else(|| "its limit".to_string());
    report.reason = format!(
        "out of memory: the kernel killed the VMM at the domain's memory limit of {limit} \
         (guest RAM plus [limits] memory_overhead)"
    );
}

/// Removes a finished run's cgroup; a failure (a process that outlived its monitor) is logged.
pub(super) fn remove(name: &str, cgroup: &VmCgroup) {
    if let Err(e) = cgroup.remove() {
        tracing::warn!(domain = name, "{e}");
    }
}

/// The cgroup limits of a domain: memory (guest RAM plus the overhead) whenever the host can
/// limit memory or the definition asks, the others only as `[limits]` asks. Disk limits apply to
/// each host disk the domain's images are on; an image on a file system without a block device
/// cannot be throttled, which is an error when a disk limit is asked for.
fn limits(config: &DomainConfig, disks: &[ResolvedDisk], memory_controller: bool) -> Result<Limits> {
    let asked = &config.limits;
    let overhead = asked.memory_overhead_bytes().map_err(|e| Error::invalid(format!("limits.{e}")))?;
    let memory_bytes = (memory_controller || asked.memory_overhead.is_some()).then(|| config.memory_bytes() + overhead);
    let read_bps = LimitsConfig::rate(&asked.disk_read_bps);
    let write_bps = LimitsConfig::rate(&asked.disk_write_bps);
    let mut io: Vec<IoLimit> = Vec::new();
    if read_bps.is_some() || write_bps.is_some() || asked.disk_iops.is_some() {
        for (i, disk) in disks.iter().enumerate() {
            let device = BlockDevice::of_file(&disk.path).map_err(|e| Error::invalid(format!("limits: disk[{i}] cannot be throttled: {e}")))?;
            if !io.iter().any(|l| l.device == device) {
                io.push(IoLimit { device, read_bps, write_bps, iops: asked.disk_iops });
            }
        }
    }
    Ok(Limits { cpu_percent: asked.cpu_percent, memory_bytes, pids: asked.pids, io })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_vmm_api::DiskFormat;

    #[test]
    fn memory_is_limited_by_default_and_disks_by_their_device() {
        let config = DomainConfig::parse("name = \"a\"\nmemory = \"256M\"\n[boot]\nguest = \"idle\"\n").unwrap();
        let l = limits(&config, &[], true).unwrap();
        assert_eq!(l, Limits { memory_bytes: Some((256 + 64) << 20), ..Limits::default() });
        assert_eq!(limits(&config, &[], false).unwrap().memory_bytes, None, "no memory controller, no default limit");

        let text = "name = \"a\"\nmemory = \"256M\"\n[boot]\nguest = \"idle\"\n[limits]\nmemory_overhead = \"16M\"\ndisk_write_bps = \"1M\"\n";
        let config = DomainConfig::parse(text).unwrap();
        let here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let disk = |path: &std::path::Path| ResolvedDisk { path: path.to_path_buf(), format: DiskFormat::Raw, readonly: false };
        let l = limits(&config, &[disk(&here), disk(&here)], false).unwrap();
        assert_eq!(l.memory_bytes, Some((256 + 16) << 20), "an explicit overhead is a limit even without the controller");
        assert_eq!(l.io.len(), 1, "two images on one device are one limit: {l:?}");
        assert_eq!((l.io[0].device, l.io[0].write_bps, l.io[0].read_bps), (BlockDevice::of_file(&here).unwrap(), Some(1 << 20), None));
        let e = limits(&config, &[disk(std::path::Path::new("/proc/self/status"))], true).unwrap_err();
        assert!(e.message.starts_with("limits: disk[0] cannot be throttled"), "{e:?}");
    }
}
