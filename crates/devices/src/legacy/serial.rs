//! A 16550A UART (vm-superio) on COM1, its interrupt an irqfd, its output any writer.

use crate::state::Persist;
use crate::{BusAction, BusDevice, IrqLine};
use serde::{Deserialize, Serialize};
use std::io::Write;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const SERIAL_SIZE: u16 = 8;

type Uart = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
}

/// The UART's registers and the input the guest has not read yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The receive FIFO's size in vm-superio's 16550A.
const FIFO_SIZE: usize = 64;

impl Serial {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Serial { uart: vm_superio::Serial::new(irq, out) }
    }

    /// Queues bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // The only error is a failed interrupt trigger; the bytes are queued either way.
        let room = self.uart.fifo_capacity();
        let take = bytes.len().min(room);
        if take > 0 {
            let _ = self.uart.enqueue_raw_bytes(&bytes[..take]);
        }
        take
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl Persist for Serial {
    type State = SerialState;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the registers and pending input back; the interrupt line and output stay this
    /// device's.
    fn restore(&mut self, s: &SerialState) -> Result<(), String> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(format!("saved serial input of {} bytes does not fit the {FIFO_SIZE}-byte FIFO", s.in_buffer.len()));
        }
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| format!("serial interrupt eventfd: {e}"))?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        // The output writer moves from the old UART to the new one; a sink stands in meanwhile.
        let placeholder = vm_superio::Serial::new(IrqLine(irq.try_clone().map_err(|e| format!("serial interrupt eventfd: {e}"))?), Box::new(std::io::sink()) as Box<dyn Write + Send>);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = vm_superio::Serial::from_state(&state, IrqLine(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("saved serial state: {e:?}"))?;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            // Errors are a failed output write or interrupt: the guest cannot be told, and the
            // VM must keep running, so they are dropped like a disconnected line.
            let _ = self.uart.write(off, value);
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::round_trip;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn registers_and_pending_input_round_trip() {
        let irq = || IrqLine(EventFd::new(0).unwrap());
        let mut s = Serial::new(irq(), Box::new(std::io::sink()));
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1
        s.write(7, &[0x5a]); // scratch
        s.enqueue_input(b"typed");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut fresh = Serial::new(irq(), Box::new(SharedOut(out.clone())));
        let state = round_trip(&s, &mut fresh);
        assert_eq!((state.baud_divisor_low, state.scratch, state.line_control), (0x0c, 0x5a, 0x03));
        let mut b = [0u8];
        fresh.read(0, &mut b);
        assert_eq!(b[0], b't', "the guest reads on where it was");
        fresh.write(0, b"x");
        assert_eq!(*out.lock().unwrap(), b"x", "output still goes to the restored device's writer");
        let too_much = SerialState { in_buffer: vec![0; 65], ..state };
        assert!(fresh.restore(&too_much).unwrap_err().contains("64-byte FIFO"));
    }

    struct SharedOut(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
