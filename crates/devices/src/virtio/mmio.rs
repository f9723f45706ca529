//! The virtio-mmio transport (virtio 1.x section 4.2, version 2 registers): one 4 KiB window per
//! device, queue kicks through KVM ioeventfds on QueueNotify, interrupts through an irqfd. The
//! register semantics shared with virtio-pci live in `transport::VirtioCore`.

use super::chains::NeedsResetReport;
use super::transport::{QueueRegister, VirtioCore, VirtioCoreState};
use crate::state::Persist;
use serde::{Deserialize, Serialize};
use super::{GuestMemoryMmap, InterruptReason, VirtioDevice, VirtioInterrupt};
use crate::{BusAction, BusDevice, IrqLine};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where KVM ioeventfds listen (datamatch = queue index).
pub const QUEUE_NOTIFY: u64 = 0x50;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x4f52_4546; // "FERO"
const CONFIG_START: u64 = 0x100;

/// Interrupt status bits and the irqfd behind them.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, reason: InterruptReason) {
        let bit = match reason {
            InterruptReason::Queue(_) => 1,
            InterruptReason::Config => 2,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        // A failed eventfd write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.irq.trigger();
    }
}

pub struct MmioTransport {
    core: VirtioCore,
    interrupt: Arc<MmioInterrupt>,
}

/// What a virtio-mmio device saves: the shared virtio state and the interrupt status bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub core: VirtioCoreState,
    pub interrupt_status: u32,
}

impl Persist for MmioTransport {
    type State = MmioState;

    fn pause(&mut self) {
        self.core.pause();
    }

    fn resume(&mut self) -> Result<(), String> {
        self.core.resume()
    }

    fn save(&self) -> MmioState {
        MmioState { core: self.core.save(), interrupt_status: self.interrupt.status.load(Ordering::Acquire) }
    }

    fn restore(&mut self, state: &MmioState) -> Result<(), String> {
        self.core.restore(&state.core)?;
        self.interrupt.status.store(state.interrupt_status & 3, Ordering::Release);
        Ok(())
    }
}

impl MmioTransport {
    /// Wraps `device`; `kicks` must hold one eventfd per queue (registered with KVM by the
    /// caller), `irq` the device's interrupt line, `report` is told when the driver breaks it.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine, kicks: Vec<EventFd>, report: NeedsResetReport) -> Result<Self, String> {
        let interrupt = Arc::new(MmioInterrupt { status: AtomicU32::new(0), irq });
        let core = VirtioCore::new(device, mem, interrupt.clone(), kicks, report)?;
        Ok(MmioTransport { core, interrupt })
    }

    /// Stops the device for good (the VM is ending): its worker ends, its disk is closed.
    pub fn shutdown(&mut self) {
        self.core.shutdown();
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let queue = match offset {
            0x38 => Some(QueueRegister::Size),
            0x44 => Some(QueueRegister::Ready),
            0x80 => Some(QueueRegister::DescLo),
            0x84 => Some(QueueRegister::DescHi),
            0x90 => Some(QueueRegister::DriverLo),
            0x94 => Some(QueueRegister::DriverHi),
            0xa0 => Some(QueueRegister::DeviceLo),
            0xa4 => Some(QueueRegister::DeviceHi),
            _ => None,
        };
        if let Some(reg) = queue {
            return self.core.write_queue(reg, v);
        }
        match offset {
            0x14 => self.core.device_features_sel = v,
            0x20 => self.core.set_driver_features_word(v),
            0x24 => self.core.driver_features_sel = v,
            0x30 => self.core.queue_sel = v,
            // Normally KVM's ioeventfd catches this write; this path runs only if it did not.
            QUEUE_NOTIFY => self.core.kick(v as usize),
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => {
                if v == 0 {
                    self.interrupt.status.store(0, Ordering::Release);
                }
                self.core.set_status(v as u8);
            }
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.core.queue();
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.core.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => self.core.device_features_word(),
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => u32::from(self.core.status()),
            0xfc => 0, // config generation: no device changes its config on its own yet
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            return self.core.device.read_config(offset - CONFIG_START, data);
        }
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset >= CONFIG_START {
            self.core.device.write_config(offset - CONFIG_START, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::Block;
    use crate::virtio::chains::tests::F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn reg(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A virtio-blk disk on virtio-mmio over `mem`; returns the transport and its irq eventfd.
    fn disk_device(mem: &GuestMemoryMmap, image: &std::path::Path) -> (MmioTransport, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let block = Block::new(image, None, false).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(block), mem.clone(), IrqLine(irq.try_clone().unwrap()), vec![kick], Arc::new(|_| {})).unwrap();
        (t, irq)
    }

    /// The driver's side: VERSION_1, one 16-entry queue, DRIVER_OK.
    fn bring_up(t: &mut MmioTransport) {
        reg(t, 0x70, 1 | 2);
        reg(t, 0x24, 1);
        reg(t, 0x20, 1);
        reg(t, 0x70, 1 | 2 | 8);
        reg(t, 0x30, 0);
        reg(t, 0x38, 16);
        for (off, v) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            reg(t, off, v as u32);
            reg(t, off + 4, 0);
        }
        reg(t, 0x44, 1);
        reg(t, 0x70, 1 | 2 | 8 | 4);
    }

    /// A 512-byte write of `fill` to sector 3 as chain 0: header, data, status.
    fn post_write(mem: &GuestMemoryMmap, fill: u8) {
        let (hdr, data, status) = (0x8000u64, 0x9000u64, 0xa000u64);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_slice(&[fill; 512], GuestAddress(data)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        for (i, (addr, len, flags)) in [(hdr, 16u32, 1u16), (data, 512, 1), (status, 1, F_WRITE)].into_iter().enumerate() {
            let d = DESC + i as u64 * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj((i + 1) as u16, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn a_disk_write_in_flight_lands_after_a_round_trip_into_a_new_device() {
        let image = std::env::temp_dir().join(format!("ferro-mmio-state-{}.raw", std::process::id()));
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut t, _) = disk_device(&mem, &image);
        bring_up(&mut t);
        t.pause();
        post_write(&mem, 0x5a);
        reg(&mut t, QUEUE_NOTIFY, 0);
        let state = t.save();
        let wire = serde_json::to_string(&state).unwrap();
        t.shutdown();
        drop(t);
        assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0), "nothing was written while paused");

        let (mut fresh, irq) = disk_device(&mem, &image);
        fresh.restore(&serde_json::from_str(&wire).unwrap()).unwrap();
        assert_eq!(fresh.save(), state);
        assert_eq!(read_reg(&mut fresh, 0x70), 15, "the driver sees the device running");
        fresh.resume().unwrap();
        let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&irq), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1, "the new device raised its interrupt");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1, "the request in flight completed");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0, "with status OK");
        assert_eq!(read_reg(&mut fresh, 0x60) & 1, 1, "interrupt status says used buffer");
        fresh.shutdown();
        let bytes = std::fs::read(&image).unwrap();
        assert!(bytes[3 * 512..4 * 512].iter().all(|&b| b == 0x5a), "the write reached the image");
        std::fs::remove_file(&image).unwrap();
    }
}
