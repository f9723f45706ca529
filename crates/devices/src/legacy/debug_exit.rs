//! QEMU's `isa-debug-exit` device (iobase 0xf4, iosize 4): a write of `value` ends the VM with
//! process exit status `(value << 1) | 1`, so test guests can report a verdict the same way under
//! QEMU and under Ferrovisor.

use crate::state::Persist;
use crate::{BusAction, BusDevice};

/// The port QEMU uses by default.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Size of the port range.
pub const DEBUG_EXIT_SIZE: u16 = 4;

#[derive(Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        // Like QEMU, the status is truncated to what a process can return (8 bits).
        BusAction::DebugExit((((value << 1) | 1) & 0xff) as i32)
    }
}

/// Nothing to keep: the port has no state.
impl Persist for DebugExit {
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
        crate::state::tests::round_trip(&DebugExit, &mut DebugExit);
    }

    #[test]
    fn status_is_value_shifted_with_low_bit() {
        let mut d = DebugExit;
        assert_eq!(d.write(0, &[0]), BusAction::DebugExit(1));
        assert_eq!(d.write(0, &[0x10]), BusAction::DebugExit(0x21));
        assert_eq!(d.write(0, &0x1234_0003u32.to_le_bytes()), BusAction::DebugExit(7));
    }
}
