//! A type-0 PCI configuration space (256 bytes): the header, memory BARs with their sizing
//! semantics, and a capability list. Every guest write goes through a per-byte write mask, so
//! read-only fields stay put and a BAR written with all ones reads back its size mask, exactly as
//! on hardware. Offsets past 256 (the PCIe extended space, reachable through ECAM) read as zero.

use crate::state::Persist;
use serde::{Deserialize, Serialize};

/// Size of the conventional configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Size of one function's ECAM window (PCIe extended configuration space).
pub const EXTENDED_CONFIG_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const FIRST_CAPABILITY: usize = 0x40;
const BAR_COUNT: usize = 6;
const BAR_MEM_64: u32 = 0b100;

/// What identifies a function: IDs and class.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface: 0xCCSSPP.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 64-bit memory BAR: its index (the low half) and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Bar64 {
    index: usize,
    size: u64,
}

/// One function's configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: Vec<Bar64>,
    /// Offset of the last capability added (0: none), and where the next one goes.
    last_capability: usize,
    next_capability: usize,
}

/// What a configuration space saves: the guest-visible bytes. The layout (masks, BARs,
/// capabilities) is rebuilt by the device itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    pub bytes: Vec<u8>,
}

impl ConfigSpace {
    pub fn new(id: Identity) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bars: Vec::new(),
            last_capability: 0,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_u16(VENDOR_ID, id.vendor);
        c.set_u16(DEVICE_ID, id.device);
        c.bytes[REVISION] = id.revision;
        c.set_u32(CLASS_PROG_IF - 1, (id.class << 8) | u32::from(id.revision));
        c.bytes[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, id.subsystem);
        c.set_wmask(COMMAND, &(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes());
        // Cache line size and latency timer are plain storage; so is the interrupt line.
        c.set_wmask(0x0c, &[0xff, 0xff]);
        c.set_wmask(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Declares a 64-bit non-prefetchable memory BAR at `index` (and `index + 1`) of `size`
    /// bytes (a power of two, at least 16), initially at `address`.
    pub fn add_bar64(&mut self, index: usize, size: u64, address: u64) {
        assert!(index + 1 < BAR_COUNT && size.is_power_of_two() && size >= 16 && address % size == 0, "bad BAR layout");
        let reg = BAR0 + index * 4;
        let mask = !(size - 1);
        self.set_u32(reg, (address as u32) | BAR_MEM_64);
        self.set_u32(reg + 4, (address >> 32) as u32);
        self.set_wmask(reg, &((mask as u32) & !0xf).to_le_bytes());
        self.set_wmask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        self.bars.push(Bar64 { index, size });
    }

    /// Appends a capability with `id` whose bytes after the two-byte header are `body`;
    /// `body_wmask` (same length) says which of them the guest may write. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_wmask: &[u8]) -> usize {
        assert_eq!(body.len(), body_wmask.len());
        let at = self.next_capability;
        let len = 2 + body.len();
        assert!(at + len <= CONFIG_SIZE, "capabilities overflow the configuration space");
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        self.wmask[at + 2..at + len].copy_from_slice(body_wmask);
        if self.last_capability == 0 {
            self.bytes[CAPABILITIES_POINTER] = at as u8;
            let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
            self.set_u16(STATUS, status);
        } else {
            self.bytes[self.last_capability + 1] = at as u8;
        }
        self.last_capability = at;
        self.next_capability = (at + len + 3) & !3;
        at
    }

    /// A guest read of `data.len()` bytes at `offset` (any offset of the 4 KiB window).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i).and_then(|o| self.bytes.get(o)).copied().unwrap_or(0);
        }
    }

    /// A guest write: only the bits the write mask allows change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < CONFIG_SIZE) else { return };
            self.bytes[o] = (self.bytes[o] & !self.wmask[o]) | (v & self.wmask[o]);
        }
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap_or_default())
    }

    /// Sets bytes regardless of the write mask (device-owned fields).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    fn set_wmask(&mut self, offset: usize, mask: &[u8]) {
        self.wmask[offset..offset + mask.len()].copy_from_slice(mask);
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// The address BAR `index` holds now (meaningful only if it is a BAR this space declared).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let reg = BAR0 + bar.index * 4;
        let lo = u64::from(self.u32_at(reg) & !0xf);
        let hi = u64::from(self.u32_at(reg + 4));
        Some((hi << 32) | lo)
    }

    /// Which BAR decodes guest-physical `addr`, and the offset in it: memory decoding must be
    /// on and the BAR must not wrap around the address space.
    pub fn bar_hit(&self, addr: u64) -> Option<(usize, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        self.bars.iter().find_map(|b| {
            let base = self.bar_address(b.index)?;
            base.checked_add(b.size)?;
            (addr >= base && addr - base < b.size).then(|| (b.index, addr - base))
        })
    }
}

impl Persist for ConfigSpace {
    type State = ConfigSpaceState;

    fn save(&self) -> ConfigSpaceState {
        ConfigSpaceState { bytes: self.bytes.to_vec() }
    }

    /// Takes the guest-visible bytes into a space with the same layout; only writable bits come
    /// from the saved state, so IDs, capabilities and BAR sizes stay this device's.
    fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), String> {
        if state.bytes.len() != CONFIG_SIZE {
            return Err(format!("saved PCI configuration space has {} bytes, not {CONFIG_SIZE}", state.bytes.len()));
        }
        self.write(0, &state.bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let mut c = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0x00ff00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        c.add_bar64(0, 0x8000, 0xc000_8000);
        c
    }

    fn read32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_ids_and_read_only_fields() {
        let mut c = space();
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, 8), 0x00ff_0001);
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, 8), 0x00ff_0001);
        // Only the memory, bus-master and INTx-disable command bits stick.
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_restores() {
        let mut c = space();
        assert_eq!(read32(&c, BAR0), 0xc000_8004);
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0), 0xffff_8004, "size 32 KiB, 64-bit memory");
        assert_eq!(read32(&c, BAR0 + 4), 0xffff_ffff);
        c.write(BAR0, &0xc001_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc001_0000));
        // Unused BARs and the expansion ROM stay zero: sizing them says "absent".
        for reg in [BAR0 + 8, BAR0 + 12, BAR0 + 16, BAR0 + 20, 0x30] {
            c.write(reg, &[0xff; 4]);
            assert_eq!(read32(&c, reg), 0, "register {reg:#x}");
        }
    }

    #[test]
    fn bar_decodes_only_with_memory_enabled_and_in_range() {
        let mut c = space();
        assert_eq!(c.bar_hit(0xc000_8010), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_hit(0xc000_8010), Some((0, 0x10)));
        assert_eq!(c.bar_hit(0xc001_0000), None);
        assert_eq!(c.bar_hit(0xc000_7fff), None);
        // A BAR moved to the very top of the address space must not wrap.
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.bar_hit(0), None);
        assert_eq!(c.bar_hit(u64::MAX), None);
    }

    #[test]
    fn capability_list_links_and_masks() {
        let mut c = space();
        let a = c.add_capability(0x09, &[14, 1, 0, 0], &[0, 0, 0xff, 0]);
        let b = c.add_capability(0x11, &[3, 0], &[0, 0xc0]);
        assert_eq!(c.bytes[CAPABILITIES_POINTER] as usize, a);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.bytes[a + 1] as usize, b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_eq!(b % 4, 0);
        c.write(a, &[0xff; 6]);
        assert_eq!(&c.bytes[a..a + 6], &[0x09, b as u8, 14, 1, 0xff, 0]);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(b + 2), 0xc003);
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut c = space();
        let before = c.clone();
        c.write(CONFIG_SIZE - 2, &[0xff; 4]);
        c.write(usize::MAX - 1, &[0xff; 4]);
        c.write(EXTENDED_CONFIG_SIZE - 1, &[0xff]);
        assert_eq!(c, before);
        let mut b = [0xaa; 4];
        c.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
        c.read(usize::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut c = space();
        c.write(COMMAND, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
        c.write(BAR0, &0xc002_0000u32.to_le_bytes());
        let json = serde_json::to_string(&c.save()).unwrap();
        let state: ConfigSpaceState = serde_json::from_str(&json).unwrap();
        let mut fresh = space();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh, c);
        assert!(fresh.restore(&ConfigSpaceState { bytes: vec![0; 3] }).is_err());
    }
}
