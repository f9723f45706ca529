//! ACPI tables so guests find CPUs, interrupt controllers and devices without probing: RSDP,
//! XSDT, FADT (hardware-reduced, with sleep control/status registers for poweroff), MADT (one
//! local APIC per vCPU, the IOAPIC, ISA interrupt overrides), MCFG (ECAM of PCI bus 0) and a
//! DSDT describing COM1, the power button, the Generic Event Device that signals it, and the PCI
//! host bridge with its resources.

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START};
use crate::memory::GuestMemoryMmap;
use crate::pci::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_WINDOW};
use crate::{Error, Result};
use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use ferro_devices::pci::bus::{CONFIG_IO_PORT, CONFIG_IO_SIZE};
use acpi_tables::{Aml, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};
use ferro_devices::acpi::{GED_EVENT_PORT, GED_EVENT_POWER_BUTTON, GED_IRQ, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT};
use ferro_devices::legacy::serial::{COM1_IRQ, COM1_PORT, SERIAL_SIZE};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes, byteorder::LE, byteorder::U16, byteorder::U32};

const OEM_ID: [u8; 6] = *b"FERRO ";
const OEM_TABLE_ID: [u8; 8] = *b"FERROVSR";
const OEM_REVISION: u32 = 1;

/// MADT Interrupt Source Override (type 2): an ISA IRQ that arrives on another GSI or with
/// other polarity/trigger.
#[repr(C, packed)]
#[derive(IntoBytes, Immutable, Clone, Copy)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// AML already serialized, so devices can be built one statement at a time (the builders
/// borrow their children) and then placed together in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn com1() -> RawAml {
    RawAml(to_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, SERIAL_SIZE as u8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )))
}

fn power_button() -> RawAml {
    RawAml(to_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![&aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")), &aml::Name::new("_UID".into(), &aml::ZERO)],
    )))
}

/// The Generic Event Device: its interrupt runs `_EVT`, which reads (and so acknowledges) the
/// event register and notifies the power button on a power-button event.
fn ged() -> RawAml {
    let (event_bit, port, one_byte) = (GED_EVENT_POWER_BUTTON, u64::from(GED_EVENT_PORT), 1u64);
    RawAml(to_bytes(&aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(true, true, false, false, GED_IRQ)])),
            &aml::OpRegion::new("GDOR".into(), aml::OpRegionSpace::SystemIO, &port, &one_byte),
            &aml::Field::new(
                "GDOR".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &Path::new("GDAT")),
                    &aml::If::new(
                        &aml::Equal::new(&aml::And::new(&aml::Local(1), &aml::Local(0), &event_bit), &event_bit),
                        vec![&aml::Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )))
}

/// A virtio-mmio device as Linux's virtio_mmio driver finds it through ACPI (HID LNRO0005).
fn virtio_mmio(index: usize, slot: &MmioSlot) -> RawAml {
    let name = format!("VR{index:02X}");
    let uid = index as u32;
    RawAml(to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32),
                    &aml::Interrupt::new(true, true, false, false, slot.gsi),
                ]),
            ),
        ],
    )))
}

/// The PCI host bridge of segment 0: bus 0, the configuration ports it decodes, and the MMIO
/// window its BARs live in (a stock kernel enumerates it with no `pci=` option).
fn pci_host_bridge() -> RawAml {
    let (start, end) = (PCI_MMIO_WINDOW.start as u32, (PCI_MMIO_WINDOW.end - 1) as u32);
    RawAml(to_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(CONFIG_IO_PORT, CONFIG_IO_PORT, 1, CONFIG_IO_SIZE as u8),
                    &aml::AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, start, end, None),
                ]),
            ),
        ],
    )))
}

/// Reserves the ECAM window as a motherboard resource: Linux uses MCFG's area only when the
/// firmware reserved it.
fn ecam_reservation() -> RawAml {
    RawAml(to_bytes(&aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32)]),
            ),
        ],
    )))
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&m)
}

fn dsdt(mmio: &[MmioSlot]) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut devices = vec![com1(), power_button(), ged(), pci_host_bridge(), ecam_reservation()];
    devices.extend(mmio.iter().enumerate().map(|(i, slot)| virtio_mmio(i, slot)));
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut table);
    let s5_type = S5_SLEEP_TYPE;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type, &s5_type, &aml::ZERO, &aml::ZERO])).to_aml_bytes(&mut table);
    table.update_checksum();
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).dsdt_64(dsdt_addr).flag(Flags::HwReducedAcpi).flag(Flags::PwrButton);
    f.sleep_control_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(SLEEP_CONTROL_PORT));
    f.sleep_status_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(SLEEP_CONTROL_PORT + 1));
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERROVSR").into();
    to_bytes(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_START as u32));
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    // The PIT's IRQ 0 arrives on IOAPIC pin 2, as KVM routes it and as on every PC.
    m.add_structure(InterruptSourceOverride { kind: 2, length: 10, bus: 0, source: 0, gsi: 2.into(), flags: 0.into() });
    to_bytes(&m)
}

/// Where a virtio-mmio device sits, for the DSDT and the kernel command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// Writes every table into the reserved area below 1 MiB; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, mmio: &[MmioSlot]) -> Result<u64> {
    let mut next = ACPI_START + 0x100; // the RSDP takes the first slot
    let mut place = |bytes: &[u8]| -> Result<u64> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > ACPI_END {
            return Err(Error::Internal("ACPI tables do not fit below 1 MiB".into()));
        }
        mem.write_slice(bytes, GuestAddress(at)).map_err(|e| Error::Internal(format!("writing ACPI tables: {e}")))?;
        next = (end + 15) & !15;
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(mmio))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let mcfg_addr = place(&mcfg())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(ACPI_START)).map_err(|e| Error::Internal(format!("writing the RSDP: {e}")))?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_lengths_and_checksums() {
        for t in [dsdt(&[MmioSlot { base: 0xd000_0000, size: 0x1000, gsi: 16 }]), fadt(0x1000), madt(4), mcfg()] {
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
            assert!(checksum_ok(&t), "bad checksum in {}", String::from_utf8_lossy(&t[..4]));
        }
    }

    #[test]
    fn mcfg_describes_bus_0_ecam_and_the_dsdt_has_the_host_bridge() {
        let m = mcfg();
        assert_eq!(&m[..4], b"MCFG");
        assert_eq!(m.len(), 44 + 16);
        assert_eq!(u64::from_le_bytes(m[44..52].try_into().unwrap()), PCI_ECAM_START);
        assert_eq!((m[54], m[55]), (0, 0), "buses 0 to 0");
        let d = dsdt(&[]);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"MRES"));
        // PNP0A08 as an EISA id, and the window's first byte address in a DWord descriptor.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&(PCI_MMIO_WINDOW.start as u32).to_le_bytes()));
    }

    #[test]
    fn madt_lists_one_lapic_per_vcpu() {
        let m = madt(3);
        let mut p = 44;
        let mut lapics = 0;
        while p + 2 <= m.len() {
            if m[p] == 0 {
                lapics += 1;
            }
            p += m[p + 1] as usize;
        }
        assert_eq!(lapics, 3);
    }
}
