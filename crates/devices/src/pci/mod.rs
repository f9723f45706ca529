//! PCI: segment 0, bus 0, as guests find it through ECAM (an MMIO window described by the ACPI
//! MCFG table) or the legacy 0xcf8/0xcfc ports. `config` is a function's configuration space
//! (header, BAR sizing, capability list), `msix` the MSI-X table and its KVM routing, `bus` the
//! bus itself with the bus devices the VMM maps (config ports, ECAM, the BAR window). Device 0
//! is the host bridge; other functions (virtio-pci) implement [`PciFunction`].

pub mod bus;
pub mod config;
pub mod msix;

use crate::state::Persist;
use config::{ConfigSpace, ConfigSpaceState, Identity};

/// A PCI function on the bus.
pub trait PciFunction: Send {
    fn config(&self) -> &ConfigSpace;
    /// A guest read at `offset` of the 4 KiB configuration window (aligned, 1, 2 or 4 bytes).
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest write at `offset` of the configuration window (aligned, 1, 2 or 4 bytes).
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// A guest access at `offset` of BAR `bar` (a BAR [`ConfigSpace::bar_hit`] reported).
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0: IDs and class only (Red Hat's generic PCIe host bridge ID).
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: ConfigSpace::new(Identity {
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: 0x06_00_00,
                subsystem_vendor: 0x1b36,
                subsystem: 0x1100,
            }),
        }
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The host bridge saves its configuration space (command bits, interrupt line).
impl Persist for HostBridge {
    type State = ConfigSpaceState;

    fn save(&self) -> ConfigSpaceState {
        self.config.save()
    }

    fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), String> {
        self.config.restore(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_config_round_trips() {
        let mut bridge = HostBridge::default();
        bridge.write_config(config::COMMAND, &config::COMMAND_MEMORY.to_le_bytes());
        bridge.write_config(config::INTERRUPT_LINE, &[11]);
        let mut fresh = HostBridge::default();
        crate::state::tests::round_trip(&bridge, &mut fresh);
        assert_eq!(fresh.config().command(), config::COMMAND_MEMORY);
    }
}
