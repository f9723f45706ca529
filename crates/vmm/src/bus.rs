//! The port I/O bus: which device answers which port range. Built once, then read-only.

use ferro_devices::{BusAction, BusDevice};
use std::sync::{Arc, Mutex};

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default)]
pub struct PioBus {
    devices: Vec<(u16, u16, SharedDevice)>,
}

impl PioBus {
    /// Adds a device at `base..base+size`. Ranges must not overlap (a VMM bug, not guest input).
    pub fn insert(&mut self, base: u16, size: u16, device: SharedDevice) {
        let end = u32::from(base) + u32::from(size);
        assert!(
            self.devices.iter().all(|(b, s, _)| end <= u32::from(*b) || u32::from(base) >= u32::from(*b) + u32::from(*s)),
            "overlapping port ranges at {base:#x}"
        );
        self.devices.push((base, size, device));
    }

    fn find(&self, port: u16) -> Option<(u64, &SharedDevice)> {
        self.devices
            .iter()
            .find(|(b, s, _)| port >= *b && u32::from(port) < u32::from(*b) + u32::from(*s))
            .map(|(b, _, d)| (u64::from(port - b), d))
    }

    /// A guest read; unclaimed ports read as all ones, like an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, dev)) => lock(dev).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write; unclaimed ports ignore it.
    pub fn write(&self, port: u16, data: &[u8]) -> BusAction {
        match self.find(port) {
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
        let mut bus = PioBus::default();
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
