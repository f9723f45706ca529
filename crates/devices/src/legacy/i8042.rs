//! The reset line of the i8042 keyboard controller: writing 0xfe (pulse reset) to the command
//! port 0x64 resets the machine, which is how Linux's `reboot=k` and many firmwares reboot.
//! There is no keyboard behind it: the data port reads 0 and the status port reads "empty".

use crate::state::Persist;
use crate::{BusAction, BusDevice};

pub const I8042_DATA_PORT: u16 = 0x60;
/// The device covers 0x60..=0x64 (data at offset 0, command/status at offset 4).
pub const I8042_SIZE: u16 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_PULSE_RESET: u8 = 0xfe;

#[derive(Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_PULSE_RESET) {
            BusAction::Reset
        } else {
            BusAction::None
        }
    }
}

/// Nothing to keep: the reset line has no state.
impl Persist for I8042 {
    type State = ();

    fn save(&self) {}

    fn restore(&mut self, _: &()) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn its_state_is_empty_and_round_trips() {
        crate::state::tests::round_trip(&I8042, &mut I8042);
    }

    #[test]
    fn only_pulse_reset_on_command_port_resets() {
        let mut d = I8042;
        assert_eq!(d.write(4, &[0xfe]), BusAction::Reset);
        assert_eq!(d.write(0, &[0xfe]), BusAction::None);
        assert_eq!(d.write(4, &[0xd1]), BusAction::None);
    }
}
