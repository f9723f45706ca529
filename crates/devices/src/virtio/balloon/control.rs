//! The balloon's state shared between its worker, its configuration space and the VMM's control
//! socket: the target (`num_pages`, set by the host at any time, announced with a configuration
//! interrupt), `actual` (written by the driver), the guest's latest statistics and counters.

use super::super::{InterruptReason, VirtioInterrupt};
use ferro_vmm_api::control::BalloonStats;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// Statistics tags (virtio 1.x 5.5.6.3) and the names we report them under. Swap counts are in
/// pages, faults are counts, memory figures are bytes.
pub const STAT_NAMES: &[(u16, &str)] = &[
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];

/// Raw statistics as the driver sent them: (tag, value), tags we do not know included.
pub type RawStats = Vec<(u16, u64)>;

#[derive(Default)]
pub(super) struct Inner {
    pub num_pages: u32,
    pub actual: u32,
    pub stats: RawStats,
    pub stats_time: Option<Instant>,
    /// The stats buffer the device holds until it wants fresh numbers (its head index).
    pub stats_head: Option<u16>,
    pub inflated: u64,
    pub deflated: u64,
    pub invalid: u64,
    /// Set while the device is active and not paused.
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// The target changed while nobody could be told.
    pub target_changed: bool,
}

/// Handle to a balloon, kept by the VMM for its control socket.
pub struct BalloonControl {
    inner: Mutex<Inner>,
    /// Written to ask the worker to hand the stats buffer back to the driver for a refill.
    pub(super) refresh: EventFd,
}

impl BalloonControl {
    pub(super) fn new(num_pages: u32) -> std::io::Result<Self> {
        Ok(BalloonControl {
            inner: Mutex::new(Inner { num_pages, ..Inner::default() }),
            refresh: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the target size of the balloon in 4 KiB pages; a running driver is told with a
    /// configuration interrupt and inflates or deflates to follow.
    pub fn set_target_pages(&self, pages: u32) {
        let mut inner = self.lock();
        if inner.num_pages == pages {
            return;
        }
        inner.num_pages = pages;
        match &inner.interrupt {
            Some(irq) => irq.trigger(InterruptReason::Config),
            None => inner.target_changed = true,
        }
    }

    /// The device runs: target changes reach the driver through `interrupt`, starting with one
    /// made while it did not run.
    pub(super) fn connect(&self, interrupt: Arc<dyn VirtioInterrupt>) {
        let mut inner = self.lock();
        if std::mem::take(&mut inner.target_changed) {
            interrupt.trigger(InterruptReason::Config);
        }
        inner.interrupt = Some(interrupt);
    }

    /// The device is paused or reset: target changes wait for [`connect`](Self::connect).
    pub(super) fn disconnect(&self) {
        self.lock().interrupt = None;
    }

    /// Asks the driver for fresh statistics (they arrive asynchronously; `stats` shows their age).
    pub fn request_stats(&self) {
        // A saturated counter already means "refresh pending".
        let _ = self.refresh.write(1);
    }

    /// What the control socket's `stats` reports about the balloon.
    pub fn stats(&self) -> BalloonStats {
        let inner = self.lock();
        let mib = |pages: u32| u64::from(pages) >> (20 - super::pages::PAGE_SHIFT);
        BalloonStats {
            target_pages: inner.num_pages,
            actual_pages: inner.actual,
            target_mib: mib(inner.num_pages),
            actual_mib: mib(inner.actual),
            inflated_pages_total: inner.inflated,
            deflated_pages_total: inner.deflated,
            invalid_pages_total: inner.invalid,
            guest_stats: inner
                .stats
                .iter()
                .filter_map(|(tag, v)| STAT_NAMES.iter().find(|(t, _)| t == tag).map(|(_, n)| ((*n).to_owned(), *v)))
                .collect(),
            guest_stats_age_ms: inner.stats_time.map(|t| t.elapsed().as_millis() as u64),
        }
    }

    /// The state to save in a snapshot.
    pub fn state(&self) -> super::state::BalloonState {
        let inner = self.lock();
        super::state::BalloonState {
            num_pages: inner.num_pages,
            actual: inner.actual,
            stats: inner.stats.clone(),
            stats_head: inner.stats_head,
            inflated: inner.inflated,
            deflated: inner.deflated,
            invalid: inner.invalid,
        }
    }

    /// Restores a saved state (before the device is activated).
    pub fn restore(&self, s: &super::state::BalloonState) {
        let mut inner = self.lock();
        inner.num_pages = s.num_pages;
        inner.actual = s.actual;
        inner.stats = s.stats.clone();
        inner.stats_time = (!s.stats.is_empty()).then(Instant::now);
        inner.stats_head = s.stats_head;
        inner.inflated = s.inflated;
        inner.deflated = s.deflated;
        inner.invalid = s.invalid;
    }
}

/// Parses a statistics buffer: packed `{le16 tag; le64 value}` entries; a later entry with the
/// same tag wins, a trailing partial entry is ignored, at most 64 entries are kept.
pub(super) fn parse_stats(bytes: &[u8], into: &mut RawStats) {
    for e in bytes.chunks_exact(10) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..10]);
        let value = u64::from_le_bytes(v);
        if let Some(slot) = into.iter_mut().find(|(t, _)| *t == tag) {
            slot.1 = value;
        } else if into.len() < 64 {
            into.push((tag, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chains::tests::InterruptLog;

    fn entry(tag: u16, v: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&v.to_le_bytes());
        e
    }

    #[test]
    fn stats_are_parsed_and_named() {
        let mut buf = [entry(4, 1000), entry(5, 4096), entry(99, 7), entry(4, 2000)].concat();
        buf.extend_from_slice(&[1, 2, 3]);
        let c = BalloonControl::new(256).unwrap();
        parse_stats(&buf, &mut c.lock().stats);
        c.lock().stats_time = Some(Instant::now());
        let info = c.stats();
        assert_eq!(info.guest_stats.get("free_memory"), Some(&2000));
        assert_eq!(info.guest_stats.get("total_memory"), Some(&4096));
        assert_eq!(info.guest_stats.len(), 2, "unknown tags are kept raw but not named");
        assert_eq!(c.lock().stats.len(), 3);
        assert_eq!((info.target_pages, info.target_mib), (256, 1));
    }

    #[test]
    fn a_new_target_raises_a_config_interrupt_only_when_it_changes() {
        let c = BalloonControl::new(0).unwrap();
        c.set_target_pages(10); // not active: nobody to tell
        let irq = Arc::new(InterruptLog::default());
        c.lock().interrupt = Some(irq.clone());
        c.set_target_pages(10);
        c.set_target_pages(20);
        assert_eq!(irq.reasons(), vec![InterruptReason::Config]);
        assert_eq!(c.stats().target_pages, 20);
    }
}
