//! A 16550A UART (vm-superio) on COM1, its interrupt an irqfd, its output any writer.

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

/// The UART registers and pending input, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
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

    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
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

    /// Rebuilds a UART from a snapshot. Fails if the snapshot's input exceeds the FIFO.
    pub fn restore(irq: IrqLine, out: Box<dyn Write + Send>, s: &SerialSnapshot) -> Result<Self, String> {
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
        let uart = vm_superio::Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("bad serial snapshot: {e:?}"))?;
        Ok(Serial { uart })
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
