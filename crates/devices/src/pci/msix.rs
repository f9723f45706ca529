//! MSI-X (PCI 3.0 section 6.8.2): the vector table and pending-bit array a function exposes in a
//! BAR, and the capability that enables and masks them. Each vector is a KVM GSI fed by an irqfd:
//! the table entry's message becomes that GSI's MSI route, so signalling a vector is one eventfd
//! write and the interrupt reaches the guest without a userspace exit. A masked vector records a
//! pending bit instead and fires when unmasked, as the specification requires.

use crate::IrqLine;
use crate::state::Persist;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message-control bits.
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Where MSI writes go on x86: the local APICs' window.
const MSI_ADDRESS_MASK: u32 = 0xfff0_0000;
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// An MSI message: the address the device writes and the data it writes there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where MSI routes live (KVM's GSI routing table in the VMM).
pub trait MsiRoutes: Send + Sync {
    /// Points `gsi` at `msg`, or takes its route away when None.
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String>;
}

/// A vector's delivery path: the GSI whose route carries its message and the irqfd on it.
pub struct MsixVector {
    pub gsi: u32,
    pub irq: IrqLine,
}

/// One table entry as the guest programs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn masked() -> Self {
        MsixEntry { control: VECTOR_MASKED, ..Default::default() }
    }

    fn message(&self) -> Option<MsiMessage> {
        (self.address_lo & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE)
            .then(|| MsiMessage { address: (u64::from(self.address_hi) << 32) | u64::from(self.address_lo), data: self.data })
    }
}

/// The guest-visible MSI-X state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// A function's MSI-X table, PBA and delivery.
pub struct Msix {
    state: MsixState,
    vectors: Vec<MsixVector>,
    routes: Arc<dyn MsiRoutes>,
    /// The message each vector's GSI is routed to now.
    installed: Vec<Option<MsiMessage>>,
}

impl Msix {
    /// A table with one entry per vector, all masked, MSI-X disabled.
    pub fn new(vectors: Vec<MsixVector>, routes: Arc<dyn MsiRoutes>) -> Self {
        let n = vectors.len();
        assert!((1..=2048).contains(&n), "MSI-X tables hold 1 to 2048 vectors");
        Msix {
            state: MsixState { entries: vec![MsixEntry::masked(); n], pending: vec![false; n], enabled: false, function_masked: false },
            vectors,
            routes,
            installed: vec![None; n],
        }
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Bytes of the table in its BAR.
    pub fn table_size(&self) -> u64 {
        self.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the pending-bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.len().div_ceil(64) as u64 * 8
    }

    /// The capability body (after ID and next pointer) for a table at `table_offset` and a PBA
    /// at `pba_offset` of BAR `bar`, with its write mask: only enable and function mask are
    /// writable.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&((self.len() - 1) as u16).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut wmask = [0u8; 10];
        wmask[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, wmask)
    }

    /// Applies the capability's message-control word after the guest wrote it.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, masked) != (self.state.enabled, self.state.function_masked) {
            self.state.enabled = enabled;
            self.state.function_masked = masked;
            for v in 0..self.len() {
                self.sync(v);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// A guest read of the table; only aligned 4- and 8-byte accesses inside it return data.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, field)) = self.entry_field(offset, data.len()) else { return };
        let e = &self.state.entries[index];
        let fields = [e.address_lo, e.address_hi, e.data, e.control];
        let value = match data.len() {
            4 => u64::from(fields[field]),
            _ => u64::from(fields[field]) | (u64::from(fields[field + 1]) << 32),
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// A guest write to the table; other widths and offsets are ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.entry_field(offset, data.len()) else { return };
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let words = if data.len() == 8 { 2 } else { 1 };
        for w in 0..words {
            let v = (value >> (32 * w)) as u32;
            let e = &mut self.state.entries[index];
            match field + w {
                0 => e.address_lo = v,
                1 => e.address_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        self.sync(index);
    }

    /// A guest read of the pending-bit array (read-only); 4- or 8-byte aligned accesses.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let width = data.len() as u64;
        if !(width == 4 || width == 8) || offset % width != 0 || offset >= self.pba_size() {
            return;
        }
        let mut value = 0u64;
        for bit in 0..width * 8 {
            let v = (offset * 8 + bit) as usize;
            if self.state.pending.get(v).copied().unwrap_or(false) {
                value |= 1 << bit;
            }
        }
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// Signals `vector`: fires it, or marks it pending while it (or the function) is masked.
    /// Nothing happens for a vector out of range or while MSI-X is disabled.
    pub fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.len() || !self.state.enabled {
            return;
        }
        if self.deliverable(v) {
            self.fire(v);
        } else {
            self.state.pending[v] = true;
        }
    }

    /// Maps an access to (entry, first 32-bit field) if it is aligned and inside the table.
    fn entry_field(&self, offset: u64, width: usize) -> Option<(usize, usize)> {
        if !(width == 4 || width == 8) || offset % width as u64 != 0 || offset >= self.table_size() {
            return None;
        }
        Some(((offset / ENTRY_SIZE) as usize, ((offset % ENTRY_SIZE) / 4) as usize))
    }

    fn deliverable(&self, v: usize) -> bool {
        self.state.enabled && !self.state.function_masked && self.state.entries[v].control & VECTOR_MASKED == 0
    }

    /// Brings vector `v`'s route up to date when it can deliver, and fires it if it was pending.
    fn sync(&mut self, v: usize) {
        if !self.deliverable(v) {
            return;
        }
        let msg = self.state.entries[v].message();
        if msg != self.installed[v] {
            match self.routes.set_msi_route(self.vectors[v].gsi, msg) {
                Ok(()) => self.installed[v] = msg,
                Err(e) => eprintln!("ferro: MSI-X vector {v}: {e}"),
            }
        }
        if std::mem::take(&mut self.state.pending[v]) {
            self.fire(v);
        }
    }

    fn fire(&self, v: usize) {
        // No valid message (the guest programmed garbage): the interrupt goes nowhere.
        if self.installed[v].is_some() {
            // A failed eventfd write means its counter is saturated: an interrupt is pending.
            let _ = self.vectors[v].irq.trigger();
        }
    }
}

impl Persist for Msix {
    type State = MsixState;

    fn save(&self) -> MsixState {
        self.state.clone()
    }

    /// Takes a table of the same size over and re-installs the routes of its deliverable
    /// vectors (KVM's routing table is not part of the saved state).
    fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        if state.entries.len() != self.len() || state.pending.len() != self.len() {
            return Err(format!("saved MSI-X table has {} vectors, this device {}", state.entries.len(), self.len()));
        }
        self.state = state.clone();
        for e in &mut self.state.entries {
            e.control &= VECTOR_MASKED;
        }
        self.installed.fill(None);
        for v in 0..self.len() {
            self.sync(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, Option<MsiMessage>)>>);

    impl MsiRoutes for Recorder {
        fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn msix(n: u32) -> (Msix, Arc<Recorder>, Vec<EventFd>) {
        let routes = Arc::new(Recorder::default());
        let mut fds = Vec::new();
        let vectors = (0..n)
            .map(|i| {
                let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                fds.push(fd.try_clone().unwrap());
                MsixVector { gsi: 24 + i, irq: IrqLine(fd) }
            })
            .collect();
        (Msix::new(vectors, routes.clone()), routes, fds)
    }

    fn fired(fd: &EventFd) -> bool {
        fd.read().is_ok()
    }

    fn program(m: &mut Msix, v: u64, address: u32, data: u32, masked: bool) {
        let base = v * ENTRY_SIZE;
        m.write_table(base, &address.to_le_bytes());
        m.write_table(base + 4, &0u32.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn entries_start_masked_and_read_back_what_was_written() {
        let (mut m, routes, _) = msix(3);
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        program(&mut m, 1, 0xfee0_0000, 0x41, true);
        let mut q = [0u8; 8];
        m.read_table(ENTRY_SIZE, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        m.read_table(ENTRY_SIZE + 8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_0041);
        // Reserved vector-control bits read as zero.
        m.write_table(ENTRY_SIZE + 12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(ENTRY_SIZE + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        // Disabled MSI-X: nothing routed yet.
        assert!(routes.0.lock().unwrap().is_empty());
    }

    #[test]
    fn masked_vector_sets_pending_and_fires_on_unmask() {
        let (mut m, routes, fds) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x40, true);
        m.signal(0);
        assert!(!fired(&fds[0]));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&fds[0]), "pending vector fires when unmasked");
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        assert_eq!(routes.0.lock().unwrap().as_slice(), &[(24, Some(MsiMessage { address: 0xfee0_0000, data: 0x40 }))]);
        m.signal(0);
        assert!(fired(&fds[0]));
        // The function mask holds every vector back.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(0);
        assert!(!fired(&fds[0]));
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&fds[0]));
    }

    #[test]
    fn disabled_msix_and_bad_vectors_deliver_nothing() {
        let (mut m, _, fds) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x40, false);
        m.signal(0);
        m.signal(7);
        m.signal(u16::MAX);
        assert!(!fired(&fds[0]));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8], "no pending bit while disabled");
    }

    #[test]
    fn garbage_messages_are_not_routed_and_odd_accesses_ignored() {
        let (mut m, routes, fds) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x1234_5678, 0xdead, false);
        m.signal(0);
        assert!(!fired(&fds[0]), "a message outside the APIC window goes nowhere");
        assert!(routes.0.lock().unwrap().is_empty());
        let before = m.save();
        for (off, len) in [(1u64, 4usize), (2, 2), (0, 1), (6, 4), (4, 8), (2 * ENTRY_SIZE, 4), (u64::MAX - 3, 4)] {
            m.write_table(off, &vec![0xff; len]);
            let mut b = vec![0xaa; len];
            m.read_table(off, &mut b);
            m.read_pba(off, &mut b);
        }
        assert_eq!(m.save(), before);
        // Reprogramming it properly routes it.
        program(&mut m, 0, 0xfee0_1000, 0x41, false);
        assert_eq!(routes.0.lock().unwrap().last(), Some(&(24, Some(MsiMessage { address: 0xfee0_1000, data: 0x41 }))));
        m.signal(0);
        assert!(fired(&fds[0]));
    }

    #[test]
    fn capability_layout() {
        let (m, _, _) = msix(5);
        let (body, wmask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(wmask, [0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(m.table_size(), 80);
        assert_eq!(m.pba_size(), 8);
    }

    #[test]
    fn state_round_trips_and_reinstalls_routes() {
        let (mut m, _, _) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x42, false);
        program(&mut m, 0, 0xfee0_0000, 0x41, true);
        m.signal(0);
        let json = serde_json::to_string(&m.save()).unwrap();
        let state: MsixState = serde_json::from_str(&json).unwrap();
        let (mut restored, routes, _) = msix(2);
        restored.restore(&state).unwrap();
        assert_eq!(restored.save(), m.save());
        assert_eq!(routes.0.lock().unwrap().as_slice(), &[(25, Some(MsiMessage { address: 0xfee0_0000, data: 0x42 }))]);
        let (mut small, _, _) = msix(1);
        assert!(small.restore(&state).is_err());
    }
}
