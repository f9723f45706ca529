//! Memory committed to running domains against the host's RAM: what `nodeinfo` shows and what
//! a start is checked against. A running domain commits its guest RAM minus its balloon's
//! target plus its VMM's measured overhead (resident memory beyond guest RAM, from its `stats`);
//! a domain about to start commits all of its RAM plus its `[limits] memory_overhead`. A start
//! that would take the total past `overcommit_ratio` times the host's RAM is refused with the
//! numbers. A start that passes holds a reservation until it ends, so that a second start
//! checked meanwhile counts it even before its VMM runs.

use super::{Domains, lock};
use crate::domain::DomainConfig;
use crate::error::{Error, Result};
use crate::model::NodeInfo;
use ferro_hypervisor::host_memory::{self, HugePagePool, Ksm};
use ferro_vmm_api::CpuList;
use std::collections::HashSet;
use std::sync::Arc;

/// The overcommit ratio ferrod uses unless told otherwise.
pub const DEFAULT_OVERCOMMIT_RATIO: f64 = 1.5;

const MIB: u64 = 1 << 20;

impl Domains {
    /// Bytes committed to the running domains other than `except` and how many there are; and
    /// the names counted, which reservations of starting domains must not count again.
    async fn committed_running(&self, except: Option<&str>) -> (u64, u32, HashSet<String>) {
        let mut bytes = 0;
        let mut running = 0;
        let mut counted = HashSet::new();
        for (info, stats) in self.all_stats().await {
            if !info.state.is_active() || Some(info.name.as_str()) == except {
                continue;
            }
            running += 1;
            counted.insert(info.name.clone());
            let ram = info.memory_bytes.unwrap_or(0);
            let (balloon, overhead) = match &stats {
                Some(s) => (s.vmm.balloon.as_ref().map_or(0, |b| b.target_mib * MIB), s.vmm.overhead_bytes),
                // A VMM that did not answer: count what its definition allows.
                None => (0, info.config.as_ref().and_then(|c| c.limits.memory_overhead_bytes().ok()).unwrap_or(0)),
            };
            bytes += ram.saturating_sub(balloon) + overhead;
        }
        (bytes, running, counted)
    }

    /// Bytes reserved by domains being started, other than `except` and those in `counted`.
    fn reserved(starting: &std::collections::HashMap<String, u64>, except: Option<&str>, counted: &HashSet<String>) -> u64 {
        starting.iter().filter(|(name, _)| Some(name.as_str()) != except && !counted.contains(*name)).map(|(_, bytes)| bytes).sum()
    }

    /// Bytes committed to running and starting domains other than `except`, and how many run.
    async fn committed(&self, except: Option<&str>) -> (u64, u32) {
        let (bytes, running, counted) = self.committed_running(except).await;
        (bytes + Self::reserved(&lock(&self.starting), except, &counted), running)
    }

    /// Refuses to start `name` (defined as `config`) when the memory committed to running and
    /// starting domains plus its own would pass the overcommit ratio; otherwise reserves its
    /// memory until the returned guard is dropped (when the start has ended either way).
    pub(super) async fn check_commitment(self: &Arc<Self>, name: &str, config: &DomainConfig) -> Result<StartReservation> {
        let (total, _) = host_memory::ram().map_err(Error::internal)?;
        let ram = config.memory_bytes();
        let overhead = config.limits.memory_overhead_bytes().map_err(|e| Error::invalid(e.to_string()))?;
        let limit = (total as f64 * self.overcommit_ratio) as u64;
        let (running_bytes, running, counted) = self.committed_running(Some(name)).await;
        // Checked and reserved under one lock: a start checked after this one counts it.
        let mut starting = lock(&self.starting);
        let committed = running_bytes + Self::reserved(&starting, Some(name), &counted);
        if committed + ram + overhead > limit {
            return Err(Error::conflict(format!(
                "starting {name} would commit {} MiB of memory, more than {} times the host's {} MiB of RAM ({} MiB): \
                 {} MiB are committed to {running} running domains and starts under way, {name} needs {} MiB of RAM and {} MiB of VMM overhead \
                 (stop a domain, give {name} less memory, or start ferrod with a higher --overcommit-ratio / overcommit_ratio)",
                (committed + ram + overhead) / MIB,
                self.overcommit_ratio,
                total / MIB,
                limit / MIB,
                committed / MIB,
                ram / MIB,
                overhead / MIB,
            )));
        }
        starting.insert(name.to_string(), ram + overhead);
        Ok(StartReservation { domains: self.clone(), name: name.to_string() })
    }

    /// The host as ferrod sees it: CPUs, RAM, memory committed to domains, huge pages, KSM.
    pub async fn nodeinfo(&self) -> Result<NodeInfo> {
        let cpus = CpuList::host_online().map_err(Error::internal)?;
        let (ram_bytes, available_bytes) = host_memory::ram().map_err(Error::internal)?;
        let (committed_bytes, running_domains) = self.committed(None).await;
        Ok(NodeInfo {
            cpus: cpus.cpus().len() as u32,
            cpu_list: cpus.to_string(),
            ram_bytes,
            available_bytes,
            committed_bytes,
            running_domains,
            overcommit_ratio: self.overcommit_ratio,
            commit_limit_bytes: (ram_bytes as f64 * self.overcommit_ratio) as u64,
            hugepages: HugePagePool::read().ok(),
            ksm: Ksm::read().ok(),
            thp: host_memory::thp_mode().ok(),
        })
    }
}

/// The memory of a domain being started, counted against the overcommit limit until dropped.
pub(super) struct StartReservation {
    domains: Arc<Domains>,
    name: String,
}

impl Drop for StartReservation {
    fn drop(&mut self) {
        lock(&self.domains.starting).remove(&self.name);
    }
}
