//! Emulated devices the guest reaches through port I/O or MMIO exits.
//!
//! `legacy/` holds the PC devices (16550 serial, i8042 reset line, QEMU's isa-debug-exit);
//! `acpi/` the ACPI power-management registers (sleep control for poweroff, the GED that
//! delivers the power button). Every device implements [`BusDevice`]; a write may ask the VMM to
//! stop the VM through the returned [`BusAction`], and the state contract of `state`
//! ([`state::Persist`]): pause, save, restore.

pub mod acpi;
pub mod legacy;
pub mod pci;
pub mod state;
pub mod virtio;

/// What the VMM must do after a device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing: the vCPU continues.
    None,
    /// The guest powered the machine off.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// A test guest wrote to the debug-exit port: stop with this process exit status.
    DebugExit(i32),
}

/// A device on the port I/O or MMIO bus. `offset` is relative to the device's base address.
/// `data` has the access width (1, 2, 4 or 8 bytes); a read fills all of it.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

/// An interrupt line a device raises: an eventfd registered with KVM as an irqfd.
pub struct IrqLine(pub vmm_sys_util::eventfd::EventFd);

impl IrqLine {
    /// Pulses the line (edge-triggered on the IOAPIC pin KVM routes it to).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
