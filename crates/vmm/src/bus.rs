//! An address bus (port I/O or MMIO): which device answers which range. Built once, then
//! read-only.

use ferro_devices::{BusAction, BusDevice};
use std::sync::{Arc, Mutex};

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default)]
pub struct Bus {
    devices: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// Adds a device at `base..base+size`. Ranges must not overlap (a VMM bug, not guest input).
    pub fn insert(&mut self, base: u64, size: u64, device: SharedDevice) {
        let end = base + size;
        assert!(
            self.devices.iter().all(|(b, s, _)| end <= *b || base >= *b + *s),
            "overlapping bus ranges at {base:#x}"
        );
        self.devices.push((base, size, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.devices.iter().find(|(b, s, _)| addr >= *b && addr - *b < *s).map(|(b, _, d)| (addr - b, d))
    }

    /// A guest read; unclaimed addresses read as all ones, like an empty ISA bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => lock(dev).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) -> BusAction {
        match self.find(addr) {
            Some((offset, dev)) => lock(dev).write(offset, data),
            None => BusAction::None,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic elsewhere must not take every
/// vCPU down with it.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_devices::legacy::{DebugExit, I8042};

    #[test]
    fn dispatches_by_range_and_defaults() {
        let mut bus = Bus::default();
        bus.insert(0xf4, 4, Arc::new(Mutex::new(DebugExit)));
        bus.insert(0x60, 5, Arc::new(Mutex::new(I8042)));
        assert_eq!(bus.write(0xf4, &[2]), BusAction::DebugExit(5));
        assert_eq!(bus.write(0x64, &[0xfe]), BusAction::Reset);
        assert_eq!(bus.write(0x70, &[1]), BusAction::None);
        let mut b = [0u8; 2];
        bus.read(0x1234, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
