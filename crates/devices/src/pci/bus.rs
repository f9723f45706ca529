//! PCI bus 0 and the three windows onto it the VMM maps: the 0xcf8/0xcfc configuration ports,
//! the ECAM window (one 4 KiB page per function), and the MMIO window in which BARs decode.
//! BAR addresses are read from each function's configuration space on every access, so a guest
//! that moves a BAR is obeyed without rebuilding anything.

use super::config::EXTENDED_CONFIG_SIZE;
use super::{HostBridge, PciFunction};
use crate::state::Persist;
use crate::{BusAction, BusDevice};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Devices per bus.
pub const DEVICES: usize = 32;
/// Bytes of ECAM per bus.
pub const ECAM_BUS_SIZE: u64 = (DEVICES * 8 * EXTENDED_CONFIG_SIZE) as u64;
/// The legacy configuration mechanism #1: address at 0xcf8, data at 0xcfc..0xcff.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_SIZE: u16 = 8;
const CONFIG_ENABLE: u32 = 1 << 31;

/// Bus 0: the host bridge at device 0, single-function devices after it.
pub struct PciBus {
    slots: Vec<Option<SharedFunction>>,
    host_bridge: Arc<Mutex<HostBridge>>,
}

impl Default for PciBus {
    fn default() -> Self {
        let host_bridge = Arc::new(Mutex::new(HostBridge::default()));
        let mut slots: Vec<Option<SharedFunction>> = vec![None; DEVICES];
        slots[0] = Some(host_bridge.clone());
        PciBus { slots, host_bridge }
    }
}

fn lock(f: &SharedFunction) -> MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a configuration access is one a function sees: 1, 2 or 4 bytes, naturally aligned.
fn config_access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset % len == 0 && offset + len <= EXTENDED_CONFIG_SIZE
}

impl PciBus {
    /// Puts `function` at device number `device` (1 to 31; 0 is the host bridge).
    pub fn insert(&mut self, device: u8, function: SharedFunction) -> Result<(), String> {
        match self.slots.get_mut(usize::from(device)) {
            Some(slot @ None) => {
                *slot = Some(function);
                Ok(())
            }
            Some(Some(_)) => Err(format!("PCI device 00:{device:02x}.0 is taken")),
            None => Err(format!("PCI bus 0 has no device {device}")),
        }
    }

    /// The host bridge at 00:00.0.
    pub fn host_bridge(&self) -> Arc<Mutex<HostBridge>> {
        self.host_bridge.clone()
    }

    fn function(&self, device: usize, function: usize) -> Option<&SharedFunction> {
        if function != 0 {
            return None;
        }
        self.slots.get(device)?.as_ref()
    }

    /// A configuration read; absent functions and malformed accesses read as all ones.
    pub fn config_read(&self, device: usize, function: usize, offset: usize, data: &mut [u8]) {
        match self.function(device, function) {
            Some(f) if config_access_ok(offset, data.len()) => lock(f).read_config(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; absent functions and malformed accesses ignore it.
    pub fn config_write(&self, device: usize, function: usize, offset: usize, data: &[u8]) {
        if let Some(f) = self.function(device, function) {
            if config_access_ok(offset, data.len()) {
                lock(f).write_config(offset, data);
            }
        }
    }

    /// An access at guest-physical `addr` in the BAR window: the function whose BAR decodes it
    /// answers; nobody means all ones (reads) or nothing (writes).
    fn bar_access(&self, addr: u64, access: impl FnOnce(&mut dyn PciFunction, usize, u64)) -> bool {
        for f in self.slots.iter().flatten() {
            let mut f = lock(f);
            if let Some((bar, offset)) = f.config().bar_hit(addr) {
                access(&mut *f, bar, offset);
                return true;
            }
        }
        false
    }
}

/// Ports 0xcf8-0xcff.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

/// The address register a guest wrote to 0xcf8 before its access at 0xcfc.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = PciConfigIoState;

    fn save(&self) -> PciConfigIoState {
        PciConfigIoState { address: self.address }
    }

    fn restore(&mut self, state: &PciConfigIoState) -> Result<(), String> {
        self.address = state.address & 0x80ff_fffc;
        Ok(())
    }
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    /// (device, function, register offset) the address register selects, if enabled on bus 0.
    fn target(&self, data_offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        let byte = data_offset as usize;
        if self.address & CONFIG_ENABLE == 0 || (self.address >> 16) & 0xff != 0 || byte + len > 4 {
            return None;
        }
        let device = ((self.address >> 11) & 0x1f) as usize;
        let function = ((self.address >> 8) & 0x7) as usize;
        Some((device, function, (self.address & 0xfc) as usize + byte))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target(offset - 4, data.len()) {
            Some((d, f, reg)) => self.bus.config_read(d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset == 0 {
            // Only whole-register writes set the address (byte writes to 0xcfb are how old
            // probes look for mechanism #2; they must not disturb it).
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(v) & 0x80ff_fffc;
            }
        } else if offset >= 4 {
            if let Some((d, f, reg)) = self.target(offset - 4, data.len()) {
                self.bus.config_write(d, f, reg, data);
            }
        }
        BusAction::None
    }
}

/// The ECAM window of bus 0 (MCFG): device << 15 | function << 12 | register.
pub struct PciEcam {
    bus: Arc<PciBus>,
}

impl PciEcam {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciEcam { bus }
    }
}

fn ecam_decode(offset: u64) -> (usize, usize, usize) {
    (((offset >> 15) & 0x1f) as usize, ((offset >> 12) & 0x7) as usize, (offset & 0xfff) as usize)
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (d, f, reg) = ecam_decode(offset);
        self.bus.config_read(d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let (d, f, reg) = ecam_decode(offset);
        self.bus.config_write(d, f, reg, data);
        BusAction::None
    }
}

/// The MMIO window in which BARs live, mapped at `base`.
pub struct PciMmioWindow {
    bus: Arc<PciBus>,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        PciMmioWindow { bus, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        if !self.bus.bar_access(addr, |f, bar, off| f.read_bar(bar, off, data)) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        self.bus.bar_access(self.base + offset, |f, bar, off| f.write_bar(bar, off, data));
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{BAR0, COMMAND, COMMAND_MEMORY, ConfigSpace, Identity};
    use super::*;

    /// A function with one 4 KiB BAR that remembers the last write.
    struct Probe {
        config: ConfigSpace,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciFunction for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
    }

    fn bus_with_probe() -> (Arc<PciBus>, Arc<Mutex<Probe>>) {
        let id = Identity { vendor: 0x1234, device: 0x5678, revision: 0, class: 0xff0000, subsystem_vendor: 0, subsystem: 0 };
        let mut config = ConfigSpace::new(id);
        config.add_bar64(0, 0x1000, 0xc000_1000);
        let probe = Arc::new(Mutex::new(Probe { config, last: None }));
        let mut bus = PciBus::default();
        bus.insert(1, probe.clone()).unwrap();
        assert!(bus.insert(1, probe.clone()).unwrap_err().contains("taken"));
        assert!(bus.insert(32, probe.clone()).is_err());
        (Arc::new(bus), probe)
    }

    fn io_read32(io: &mut PciConfigIo, address: u32) -> u32 {
        io.write(0, &address.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_ports_reach_functions_and_absent_ones_read_ones() {
        let (bus, _) = bus_with_probe();
        let mut io = PciConfigIo::new(bus);
        assert_eq!(io_read32(&mut io, 0x8000_0000), 0x0008_1b36, "host bridge");
        assert_eq!(io_read32(&mut io, 0x8000_0800), 0x5678_1234, "device 1");
        assert_eq!(io_read32(&mut io, 0x8000_1000), 0xffff_ffff, "device 2 is absent");
        assert_eq!(io_read32(&mut io, 0x8000_0900), 0xffff_ffff, "function 1 is absent");
        assert_eq!(io_read32(&mut io, 0x8001_0800), 0xffff_ffff, "bus 1 is absent");
        assert_eq!(io_read32(&mut io, 0x0000_0800), 0xffff_ffff, "enable bit clear");
        // Byte and word reads at 0xcfc + n.
        io.write(0, &0x8000_0800u32.to_le_bytes());
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        let mut b = [0u8; 1];
        io.read(5, &mut b);
        assert_eq!(b[0], 0x12);
        // A dword straddling the data register is refused.
        let mut d = [0u8; 4];
        io.read(6, &mut d);
        assert_eq!(d, [0xff; 4]);
        // The type-1 probe: a byte write to 0xcfb leaves the address register alone.
        io.write(3, &[1]);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0800);
        // A latched address survives a round trip: the data access after it reaches device 1.
        let mut restored = PciConfigIo::new(io.bus.clone());
        crate::state::tests::round_trip(&io, &mut restored);
        restored.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    }

    #[test]
    fn ecam_and_bar_window_follow_the_programmed_bar() {
        let (bus, probe) = bus_with_probe();
        let mut ecam = PciEcam::new(bus.clone());
        let mut window = PciMmioWindow::new(bus, 0xc000_0000);
        let dev1 = 1 << 15;
        let mut d = [0u8; 4];
        ecam.read(dev1, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
        // Memory decoding off: the BAR does not answer.
        window.read(0x1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.write(dev1 + COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        window.read(0x1004, &mut d);
        assert_eq!(d, [4; 4]);
        // Move the BAR: the old address goes dead, the new one answers.
        ecam.write(dev1 + BAR0 as u64, &0xc000_3000u32.to_le_bytes());
        window.read(0x1004, &mut d);
        assert_eq!(d, [0xff; 4]);
        window.write(0x3008, &[9, 9]);
        assert_eq!(probe.lock().unwrap().last, Some((0, 8, vec![9, 9])));
        // Misaligned or odd-sized ECAM accesses are ignored.
        ecam.write(dev1 + COMMAND as u64 + 1, &[0xff, 0xff]);
        ecam.read(dev1 + 1, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        ecam.read(dev1, &mut q);
        assert_eq!(q, [0xff; 8]);
    }
}
