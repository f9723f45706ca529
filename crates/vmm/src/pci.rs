//! The VM's PCI segment: where ECAM and the BAR window sit in the guest address map, the KVM
//! GSI routing table that turns MSI-X messages into interrupts, and KVM ioeventfds for the
//! virtio-pci notify registers.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so [`GsiRoutes`] keeps every MSI route it
//! installed and always re-sends KVM's default IRQCHIP routes for GSIs 0-23 (PIC and IOAPIC pins)
//! with them: the serial port, the GED and virtio-mmio keep their interrupts.

use crate::bus::Bus;
use ferro_devices::pci::bus::{CONFIG_IO_PORT, CONFIG_IO_SIZE, ECAM_BUS_SIZE, PciBus, PciConfigIo, PciEcam, PciMmioWindow};
use ferro_devices::pci::msix::{MsiMessage, MsiRoutes};
use ferro_devices::virtio::pci::IoEvents;
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting,
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// The 32-bit MMIO window of the host bridge, where the VMM places BARs (below virtio-mmio).
pub const PCI_MMIO_WINDOW: Range<u64> = 0xc000_0000..0xd000_0000;
/// ECAM for bus 0 (described by MCFG and reserved as a motherboard resource in the DSDT).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = ECAM_BUS_SIZE;
/// GSIs 0-23 are the IOAPIC's (and the PICs'); MSI-X vectors get GSIs from here on.
pub const FIRST_MSI_GSI: u32 = 24;
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

/// KVM's GSI routing table, shared by every MSI-X function.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRoutes { vm, msi: Mutex::new(BTreeMap::new()) }
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 { irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin } },
        ..Default::default()
    }
}

/// The routes KVM installs by default with an in-kernel irqchip (arch/x86/kvm/irq_comm.c):
/// GSI n to IOAPIC pin n, and GSIs 0-15 also to the PIC pin n % 8.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let pic = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(irqchip(gsi, pic, gsi % 8));
        }
    }
    v
}

fn msi(gsi: u32, m: &MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi { address_lo: m.address as u32, address_hi: (m.address >> 32) as u32, data: m.data, ..Default::default() },
        },
        ..Default::default()
    }
}

impl MsiRoutes for GsiRoutes {
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
        let mut table = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let previous = match msg {
            Some(m) => table.insert(gsi, m),
            None => table.remove(&gsi),
        };
        let mut entries = default_routes();
        entries.extend(table.iter().map(|(gsi, m)| msi(*gsi, m)));
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("GSI routing table: {e:?}"))
            .and_then(|routing| self.vm.set_gsi_routing(&routing).map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}")));
        if result.is_err() {
            // Keep our copy equal to what KVM has.
            match previous {
                Some(m) => table.insert(gsi, m),
                None => table.remove(&gsi),
            };
        }
        result
    }
}

/// KVM ioeventfds on MMIO addresses, any write width, any value.
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEvents for KvmIoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), String> {
        self.0.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(|e| format!("KVM_IOEVENTFD at {addr:#x}: {e}"))
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), String> {
        self.0.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(|e| format!("KVM_IOEVENTFD deassign at {addr:#x}: {e}"))
    }
}

/// Maps bus 0 into the guest: the 0xcf8 ports, ECAM, and the BAR window. Returns the ports'
/// device, whose address latch is guest state.
pub fn install(bus: PciBus, pio: &mut Bus, mmio: &mut Bus) -> Arc<Mutex<PciConfigIo>> {
    let bus = Arc::new(bus);
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(bus.clone())));
    pio.insert(u64::from(CONFIG_IO_PORT), u64::from(CONFIG_IO_SIZE), config_io.clone());
    mmio.insert(PCI_ECAM_START, PCI_ECAM_SIZE, Arc::new(Mutex::new(PciEcam::new(bus.clone()))));
    let window = PCI_MMIO_WINDOW;
    mmio.insert(window.start, window.end - window.start, Arc::new(Mutex::new(PciMmioWindow::new(bus, window.start))));
    config_io
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms_irqchip_table() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        // SAFETY: every entry built by `irqchip` holds the irqchip member of the union.
        let pins: Vec<(u32, u32, u32)> = r.iter().map(|e| (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe { e.u.irqchip.pin })).collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 >= 16 && p.1 != KVM_IRQCHIP_IOAPIC));
    }
}
