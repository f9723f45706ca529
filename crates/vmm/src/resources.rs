//! Where devices sit in the guest: virtio-mmio windows and their interrupt pins, PCI device
//! numbers, BAR addresses and MSI GSIs. Placement is handed out by device id from one allocator
//! whose state is part of the saved VM, so a restored VM puts every device exactly where the
//! guest found it, whatever order or count of devices the allocator would choose today.

use crate::acpi::MmioSlot;
use crate::pci::{FIRST_MSI_GSI, PCI_MMIO_WINDOW};
use crate::{Error, Result};
use ferro_devices::pci::bus::DEVICES;
use ferro_devices::virtio::mmio::MMIO_WINDOW;
use ferro_devices::virtio::pci::BAR_SIZE;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// First virtio-mmio window, inside the 32-bit device hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// GSIs 16..24 of the IOAPIC are free of ISA legacy; one per virtio-mmio device.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
pub const VIRTIO_MMIO_MAX: u32 = 8;
/// KVM's GSI routing table holds this many entries.
const MAX_GSI: u32 = 1024;

/// A PCI function's place: device number on bus 0, BAR 0, and one MSI GSI per vector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciPlacement {
    pub device: u8,
    pub bar: u64,
    pub gsis: Vec<u32>,
}

/// Where one device was put.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    Mmio(MmioSlot),
    Pci(PciPlacement),
}

/// The allocator's whole state: what comes next, and what every device got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    pub next_mmio_slot: u32,
    pub next_pci_device: u8,
    pub next_bar: u64,
    pub next_msi_gsi: u32,
    pub placements: BTreeMap<String, Placement>,
}

/// Hands out placements; a device that already has one (restored) gets it again.
pub struct ResourceAllocator {
    state: ResourceState,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceAllocator {
    pub fn new() -> Self {
        ResourceAllocator {
            state: ResourceState {
                next_mmio_slot: 0,
                next_pci_device: 1,
                next_bar: PCI_MMIO_WINDOW.start,
                next_msi_gsi: FIRST_MSI_GSI,
                placements: BTreeMap::new(),
            },
        }
    }

    /// The allocator as it was saved.
    pub fn restored(state: ResourceState) -> Self {
        ResourceAllocator { state }
    }

    pub fn state(&self) -> &ResourceState {
        &self.state
    }

    /// The virtio-mmio window and pin of device `id`.
    pub fn mmio(&mut self, id: &str) -> Result<MmioSlot> {
        match self.state.placements.get(id) {
            Some(Placement::Mmio(slot)) => return Ok(*slot),
            Some(Placement::Pci(_)) => return Err(Error::Config(format!("{id}: saved on PCI, configured on virtio-mmio"))),
            None => {}
        }
        let i = self.state.next_mmio_slot;
        if i >= VIRTIO_MMIO_MAX {
            return Err(Error::Config(format!("{id}: at most {VIRTIO_MMIO_MAX} virtio devices fit on virtio-mmio")));
        }
        let slot = MmioSlot { base: VIRTIO_MMIO_START + u64::from(i) * MMIO_WINDOW, size: MMIO_WINDOW, gsi: VIRTIO_MMIO_FIRST_GSI + i };
        self.state.next_mmio_slot += 1;
        self.state.placements.insert(id.to_owned(), Placement::Mmio(slot));
        Ok(slot)
    }

    /// The PCI device number, BAR 0 and `vectors` MSI GSIs of device `id`.
    pub fn pci(&mut self, id: &str, vectors: usize) -> Result<PciPlacement> {
        match self.state.placements.get(id) {
            Some(Placement::Pci(p)) if p.gsis.len() == vectors => return Ok(p.clone()),
            Some(Placement::Pci(p)) => {
                return Err(Error::Config(format!("{id}: saved with {} interrupt vectors, the device has {vectors}", p.gsis.len())));
            }
            Some(Placement::Mmio(_)) => return Err(Error::Config(format!("{id}: saved on virtio-mmio, configured on PCI"))),
            None => {}
        }
        let s = &mut self.state;
        if usize::from(s.next_pci_device) >= DEVICES {
            return Err(Error::Config(format!("{id}: PCI bus 0 has room for {} devices", DEVICES - 1)));
        }
        if s.next_bar + BAR_SIZE > PCI_MMIO_WINDOW.end {
            return Err(Error::Config(format!("{id}: the PCI memory window is full")));
        }
        let n = u32::try_from(vectors).unwrap_or(u32::MAX);
        if s.next_msi_gsi.saturating_add(n) > MAX_GSI {
            return Err(Error::Config(format!("{id}: no GSIs left for {vectors} interrupt vectors")));
        }
        let placement = PciPlacement { device: s.next_pci_device, bar: s.next_bar, gsis: (s.next_msi_gsi..s.next_msi_gsi + n).collect() };
        s.next_pci_device += 1;
        s.next_bar += BAR_SIZE;
        s.next_msi_gsi += n;
        s.placements.insert(id.to_owned(), Placement::Pci(placement.clone()));
        Ok(placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_follow_the_order_and_a_restored_allocator_repeats_them() {
        let mut a = ResourceAllocator::new();
        let vda = a.pci("vda", 2).unwrap();
        let net0 = a.pci("net0", 3).unwrap();
        assert_eq!((vda.device, vda.bar, vda.gsis.clone()), (1, PCI_MMIO_WINDOW.start, vec![24, 25]));
        assert_eq!((net0.device, net0.bar, net0.gsis.clone()), (2, PCI_MMIO_WINDOW.start + BAR_SIZE, vec![26, 27, 28]));

        let saved: ResourceState = serde_json::from_str(&serde_json::to_string(a.state()).unwrap()).unwrap();
        let mut b = ResourceAllocator::restored(saved);
        // Asked in another order, each device still gets its saved place.
        assert_eq!(b.pci("net0", 3).unwrap(), net0);
        assert_eq!(b.pci("vda", 2).unwrap(), vda);
        assert!(b.pci("vda", 3).unwrap_err().to_string().contains("saved with 2 interrupt vectors"));
        assert!(b.mmio("vda").unwrap_err().to_string().contains("saved on PCI"));
        assert_eq!(b.pci("rng0", 2).unwrap().device, 3, "a new device goes after the saved ones");
    }

    #[test]
    fn mmio_slots_run_out_after_eight() {
        let mut a = ResourceAllocator::new();
        for i in 0..8 {
            let slot = a.mmio(&format!("d{i}")).unwrap();
            assert_eq!((slot.base, slot.gsi), (VIRTIO_MMIO_START + i * MMIO_WINDOW, VIRTIO_MMIO_FIRST_GSI + i as u32));
        }
        assert!(a.mmio("d8").unwrap_err().to_string().contains("at most 8"));
        assert_eq!(a.mmio("d3").unwrap().base, VIRTIO_MMIO_START + 3 * MMIO_WINDOW, "an existing device keeps its slot");
    }
}
