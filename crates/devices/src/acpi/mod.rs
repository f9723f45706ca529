//! ACPI hardware-reduced power management: the sleep control register (a guest writing S5 powers
//! the VM off) and a Generic Event Device whose interrupt tells the guest the power button was
//! pressed. The DSDT that describes them is built in the vmm crate from the constants here.

use crate::state::Persist;
use crate::{BusAction, BusDevice, IrqLine};
use serde::{Deserialize, Serialize};

/// Port of the FADT sleep control register (1 byte) and, right after it, the sleep status register.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// Port of the GED event register the DSDT's `_EVT` method reads (1 byte).
pub const GED_EVENT_PORT: u16 = 0x3c4;
/// The whole range, 0x3c0..0x3c8.
pub const PM_BASE: u16 = SLEEP_CONTROL_PORT;
pub const PM_SIZE: u16 = 8;
/// The GSI the GED interrupt is wired to.
pub const GED_IRQ: u32 = 9;
/// The S5 sleep type the DSDT's `\_S5` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Bit in the GED event register: power button pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1;

const SLP_EN: u8 = 1 << 5;

pub struct AcpiPm {
    ged_irq: IrqLine,
    pending_events: u8,
}

/// GED events raised and not yet read by the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub pending_events: u8,
}

impl Persist for AcpiPm {
    type State = AcpiPmState;

    fn save(&self) -> AcpiPmState {
        AcpiPmState { pending_events: self.pending_events }
    }

    fn restore(&mut self, state: &AcpiPmState) -> Result<(), String> {
        self.pending_events = state.pending_events & GED_EVENT_POWER_BUTTON;
        Ok(())
    }
}

impl AcpiPm {
    pub fn new(ged_irq: IrqLine) -> Self {
        AcpiPm { ged_irq, pending_events: 0 }
    }

    /// Presses the power button: the guest's GED handler reads the event and notifies its
    /// power-button device.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.pending_events |= GED_EVENT_POWER_BUTTON;
        self.ged_irq.trigger()
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == u64::from(GED_EVENT_PORT - PM_BASE) {
            // Reading the event register acknowledges the events it reports.
            data[0] = std::mem::take(&mut self.pending_events);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let value = data.first().copied().unwrap_or(0);
        if offset == 0 && value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            return BusAction::PowerOff;
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let mut pm = AcpiPm::new(IrqLine(EventFd::new(0).unwrap()));
        assert_eq!(pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]), BusAction::PowerOff);
        assert_eq!(pm.write(0, &[S5_SLEEP_TYPE << 2]), BusAction::None);
        assert_eq!(pm.write(0, &[(3 << 2) | SLP_EN]), BusAction::None);
    }

    #[test]
    fn power_button_raises_irq_and_is_read_once() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(IrqLine(irq.try_clone().unwrap()));
        pm.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        pm.read(u64::from(GED_EVENT_PORT - PM_BASE), &mut b);
        assert_eq!(b[0], GED_EVENT_POWER_BUTTON);
        pm.read(u64::from(GED_EVENT_PORT - PM_BASE), &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn a_pending_power_button_survives_a_round_trip() {
        let mut pm = AcpiPm::new(IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        pm.press_power_button().unwrap();
        let mut fresh = AcpiPm::new(IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        crate::state::tests::round_trip(&pm, &mut fresh);
        let mut b = [0u8];
        fresh.read(u64::from(GED_EVENT_PORT - PM_BASE), &mut b);
        assert_eq!(b[0], GED_EVENT_POWER_BUTTON, "the restored guest still finds the press");
    }
}
