//! The virtio-pci transport, modern interface only (virtio 1.x section 4.1): a PCI function with
//! vendor 0x1af4 and device 0x1040 + type, whose registers sit in one 64-bit memory BAR placed by
//! the VMM and are found through vendor capabilities (common configuration, notifications, ISR,
//! device configuration, and the PCI-configuration access window). Interrupts are MSI-X, one
//! vector per queue plus one for configuration changes, each a KVM GSI fed by an irqfd; queue
//! notifications are KVM ioeventfds on the notify addresses, moved when the guest moves the BAR.
//!
//! BAR 0 layout (32 KiB): common configuration at 0x0000, ISR at 0x1000, device configuration
//! at 0x2000, notifications at 0x3000 (queue q at q * 4), MSI-X table at 0x4000, PBA at 0x6000.

use super::chains::NeedsResetReport;
use super::transport::{QueueRegister, VirtioCore, VirtioCoreState};
use crate::state::Persist;
use super::{GuestMemoryMmap, InterruptReason, VirtioDevice, VirtioInterrupt, device_type};
use crate::pci::PciFunction;
use crate::pci::config::{BAR0, COMMAND, COMMAND_MEMORY, ConfigSpace, ConfigSpaceState, Identity};
use crate::pci::msix::{self, Msix, MsixState, MsixVector, MsiRoutes};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const REGION: u64 = 0x1000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Most queues a device may have here: one MSI-X vector each plus config must fit the table.
pub const MAX_QUEUES: usize = ((MSIX_PBA - MSIX_TABLE) / msix::ENTRY_SIZE) as usize - 1;
/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Vendor capability types (virtio 1.x 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

/// Where ioeventfds are registered (KVM in the VMM).
pub trait IoEvents: Send {
    /// Makes any guest write to MMIO address `addr` signal `fd` without leaving the kernel.
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), String>;
    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), String>;
}

/// Everything the VMM provides for one function.
pub struct PciResources {
    /// Where BAR 0 starts (aligned to [`BAR_SIZE`], inside `window`).
    pub bar: u64,
    /// The host bridge's MMIO window: notifications are registered with KVM only while BAR 0
    /// decodes inside it.
    pub window: Range<u64>,
    /// One per queue, in queue order.
    pub kicks: Vec<EventFd>,
    /// Queue count + 1 MSI-X vectors: vector i is queue i's, the last is configuration's.
    pub vectors: Vec<MsixVector>,
    pub routes: Arc<dyn MsiRoutes>,
    pub ioevents: Box<dyn IoEvents>,
    /// Told when the driver breaks the device.
    pub report: NeedsResetReport,
}

/// ISR bits and the MSI-X vectors the driver chose; shared with the device's worker.
pub struct PciInterrupt {
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    msix: Mutex<Msix>,
}

impl PciInterrupt {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, reason: InterruptReason) {
        let (bit, vector) = match reason {
            InterruptReason::Queue(q) => (1, self.queue_vectors.get(usize::from(q)).map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))),
            InterruptReason::Config => (2, self.config_vector.load(Ordering::Acquire)),
        };
        self.isr.fetch_or(bit, Ordering::AcqRel);
        if vector != NO_VECTOR {
            self.msix().signal(vector);
        }
    }
}

/// What a virtio-pci device saves: the shared virtio state and the PCI side (configuration
/// space with the BAR and capabilities, MSI-X table, ISR, vector choices).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub core: VirtioCoreState,
    pub config: ConfigSpaceState,
    pub msix: MsixState,
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

pub struct VirtioPciTransport {
    core: VirtioCore,
    config: ConfigSpace,
    interrupt: Arc<PciInterrupt>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    window: Range<u64>,
    ioevents: Box<dyn IoEvents>,
    /// Where BAR 0 was when the notify ioeventfds were registered.
    notify_at: Option<u64>,
}

/// The PCI class a driver sees for each device type (as QEMU presents them).
fn class_of(device_type: u32) -> u32 {
    match device_type {
        device_type::NET => 0x02_00_00,
        device_type::BLOCK => 0x01_80_00,
        device_type::CONSOLE => 0x07_80_00,
        _ => 0xff_00_00,
    }
}

/// A virtio vendor capability body (after ID and next): length, type, BAR, id, offset, length.
fn vendor_cap(cfg_type: u8, offset: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(REGION as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, res: PciResources) -> Result<Self, String> {
        let nq = device.queue_max_sizes().len();
        if nq > MAX_QUEUES || res.vectors.len() != nq + 1 {
            return Err(format!("{nq} queues with {} MSI-X vectors (want one per queue plus one, at most {MAX_QUEUES} queues)", res.vectors.len()));
        }
        if res.bar % BAR_SIZE != 0 || res.bar < res.window.start || res.bar + BAR_SIZE > res.window.end {
            return Err(format!("BAR at {:#x} is not aligned inside the PCI window", res.bar));
        }
        let ty = device.device_type();
        let msix = Msix::new(res.vectors, res.routes);
        let mut config = ConfigSpace::new(Identity {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + ty as u16,
            revision: 1,
            class: class_of(ty),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x1100,
        });
        config.add_bar64(0, BAR_SIZE, res.bar);
        let ro = |body: &[u8]| vec![0u8; body.len()];
        for (ty, at, extra) in [
            (CAP_COMMON, COMMON, &[][..]),
            (CAP_NOTIFY, NOTIFY, &NOTIFY_MULTIPLIER.to_le_bytes()[..]),
            (CAP_ISR, ISR, &[][..]),
            (CAP_DEVICE, DEVICE_CONFIG, &[][..]),
        ] {
            let body = vendor_cap(ty, at, extra);
            config.add_capability(CAP_VENDOR, &body, &ro(&body));
        }
        // The configuration access window: bar, offset, length and data are the driver's.
        let body = vendor_cap(CAP_PCI_CFG, 0, &[0; 4]);
        let mut wmask = ro(&body);
        wmask[2] = 0xff;
        wmask[6..14].fill(0xff);
        wmask[14..18].fill(0xff);
        let pci_cfg_cap = config.add_capability(CAP_VENDOR, &body, &wmask);
        let (body, wmask) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &body, &wmask);

        let interrupt = Arc::new(PciInterrupt {
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix: Mutex::new(msix),
        });
        let core = VirtioCore::new(device, mem, interrupt.clone(), res.kicks, res.report)?;
        Ok(VirtioPciTransport { core, config, interrupt, msix_cap, pci_cfg_cap, window: res.window, ioevents: res.ioevents, notify_at: None })
    }

    /// Guest address of queue `q`'s notification register while BAR 0 is at `bar`.
    fn notify_addr(bar: u64, q: usize) -> u64 {
        bar + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    /// Keeps the kick ioeventfds on the notify addresses BAR 0 decodes now (none while memory
    /// decoding is off or the BAR sits outside the host bridge window).
    fn sync_notify(&mut self) {
        let decoding = self.config.command() & COMMAND_MEMORY != 0;
        let want = self
            .config
            .bar_address(0)
            .filter(|&a| decoding && a >= self.window.start && a.checked_add(BAR_SIZE).is_some_and(|end| end <= self.window.end));
        if want == self.notify_at {
            return;
        }
        for (q, kick) in self.core.kicks.iter().enumerate() {
            if let Some(old) = self.notify_at {
                if let Err(e) = self.ioevents.unregister(kick, Self::notify_addr(old, q)) {
                    eprintln!("ferro: virtio-pci: {e}");
                }
            }
            if let Some(new) = want {
                // On failure (another BAR placed on top of this one) kicks still arrive through
                // the MMIO exit path.
                if let Err(e) = self.ioevents.register(kick, Self::notify_addr(new, q)) {
                    eprintln!("ferro: virtio-pci: {e}");
                }
            }
        }
        self.notify_at = want;
    }

    /// The common configuration structure as the driver reads it now.
    fn common_image(&self) -> [u8; 0x38] {
        let mut img = [0u8; 0x38];
        let c = &self.core;
        let q = c.queue();
        let qv = self.interrupt.queue_vectors.get(c.queue_sel as usize).map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &c.device_features_sel.to_le_bytes());
        put(0x04, &c.device_features_word().to_le_bytes());
        put(0x08, &c.driver_features_sel.to_le_bytes());
        put(0x0c, &c.driver_features_word().to_le_bytes());
        put(0x10, &self.interrupt.config_vector.load(Ordering::Acquire).to_le_bytes());
        put(0x12, &(c.num_queues() as u16).to_le_bytes());
        put(0x14, &[c.status(), 0]);
        put(0x16, &(c.queue_sel as u16).to_le_bytes());
        put(0x1a, &qv.to_le_bytes());
        if let Some(q) = q {
            put(0x18, &q.size().to_le_bytes());
            put(0x1c, &u16::from(q.ready()).to_le_bytes());
            put(0x1e, &(c.queue_sel as u16).to_le_bytes());
            put(0x20, &q.desc_table().to_le_bytes());
            put(0x28, &q.avail_ring().to_le_bytes());
            put(0x30, &q.used_ring().to_le_bytes());
        }
        img
    }

    /// A vector number the driver asked for, or NO_VECTOR when the table has no such entry.
    fn vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.interrupt.msix().len() { v } else { NO_VECTOR }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut img = self.common_image();
        let Some(span) = (offset as usize).checked_add(data.len()).filter(|end| *end <= img.len()).map(|end| offset as usize..end) else {
            return;
        };
        img[span.clone()].copy_from_slice(data);
        const FIELDS: [(usize, usize); 15] = [
            (0x00, 4), (0x08, 4), (0x0c, 4), (0x10, 2), (0x14, 1), (0x16, 2), (0x18, 2), (0x1a, 2), (0x1c, 2),
            (0x20, 4), (0x24, 4), (0x28, 4), (0x2c, 4), (0x30, 4), (0x34, 4),
        ];
        for (at, len) in FIELDS {
            if at + len <= span.start || at >= span.end {
                continue;
            }
            let mut b = [0u8; 4];
            b[..len].copy_from_slice(&img[at..at + len]);
            self.apply_common(at, u32::from_le_bytes(b));
        }
    }

    fn apply_common(&mut self, field: usize, v: u32) {
        match field {
            0x00 => self.core.device_features_sel = v,
            0x08 => self.core.driver_features_sel = v,
            0x0c => self.core.set_driver_features_word(v),
            0x10 => {
                let v = self.vector(v as u16);
                self.interrupt.config_vector.store(v, Ordering::Release);
            }
            0x14 => {
                if v == 0 {
                    self.interrupt.reset();
                }
                self.core.set_status(v as u8);
            }
            0x16 => self.core.queue_sel = v,
            0x1a => {
                let v = self.vector(v as u16);
                if let Some(slot) = self.interrupt.queue_vectors.get(self.core.queue_sel as usize) {
                    slot.store(v, Ordering::Release);
                }
            }
            0x18 => self.core.write_queue(QueueRegister::Size, v),
            0x1c => self.core.write_queue(QueueRegister::Ready, v),
            0x20 => self.core.write_queue(QueueRegister::DescLo, v),
            0x24 => self.core.write_queue(QueueRegister::DescHi, v),
            0x28 => self.core.write_queue(QueueRegister::DriverLo, v),
            0x2c => self.core.write_queue(QueueRegister::DriverHi, v),
            0x30 => self.core.write_queue(QueueRegister::DeviceLo, v),
            0x34 => self.core.write_queue(QueueRegister::DeviceHi, v),
            _ => {} // read-only fields
        }
    }

    /// Performs the access the PCI-configuration window describes (bar, offset, length).
    fn pci_cfg_access(&mut self, write: bool) {
        let cap = self.pci_cfg_cap;
        let bar = self.config.u16_at(cap + 4) as u8;
        let offset = u64::from(self.config.u32_at(cap + 8));
        let len = self.config.u32_at(cap + 12) as usize;
        if bar != 0 || !matches!(len, 1 | 2 | 4) || offset % len as u64 != 0 {
            return;
        }
        let mut data = [0u8; 4];
        if write {
            data = self.config.u32_at(cap + 16).to_le_bytes();
            self.write_bar(0, offset, &data[..len]);
        } else {
            self.read_bar(0, offset, &mut data[..len]);
            self.config.set_bytes(cap + 16, &data);
        }
    }

    /// Stops the device for good (the VM is ending): its worker ends, its disk is closed.
    pub fn shutdown(&mut self) {
        self.core.shutdown();
    }
}

impl Persist for VirtioPciTransport {
    type State = VirtioPciState;

    fn pause(&mut self) {
        self.core.pause();
    }

    fn resume(&mut self) -> Result<(), String> {
        self.core.resume()
    }

    fn save(&self) -> VirtioPciState {
        let i = &self.interrupt;
        VirtioPciState {
            core: self.core.save(),
            config: self.config.save(),
            msix: i.msix().save(),
            isr: i.isr.load(Ordering::Acquire),
            config_vector: i.config_vector.load(Ordering::Acquire),
            queue_vectors: i.queue_vectors.iter().map(|v| v.load(Ordering::Acquire)).collect(),
        }
    }

    /// Restores a state saved from a device of the same kind and layout.
    fn restore(&mut self, s: &VirtioPciState) -> Result<(), String> {
        if s.queue_vectors.len() != self.interrupt.queue_vectors.len() {
            return Err(format!("saved {} queue vectors, this device has {} queues", s.queue_vectors.len(), self.interrupt.queue_vectors.len()));
        }
        self.core.restore(&s.core)?;
        self.config.restore(&s.config)?;
        self.interrupt.msix().restore(&s.msix)?;
        self.interrupt.isr.store(s.isr & 3, Ordering::Release);
        self.interrupt.config_vector.store(self.vector(s.config_vector), Ordering::Release);
        for (slot, v) in self.interrupt.queue_vectors.iter().zip(&s.queue_vectors) {
            slot.store(self.vector(*v), Ordering::Release);
        }
        self.sync_notify();
        Ok(())
    }
}

/// Whether an access of `len` bytes at `offset` touches `at..at + size`.
fn overlaps(offset: usize, len: usize, at: usize, size: usize) -> bool {
    offset < at + size && at < offset + len
}

impl PciFunction for VirtioPciTransport {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if overlaps(offset, data.len(), self.pci_cfg_cap + 16, 4) {
            self.pci_cfg_access(false);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let len = data.len();
        if overlaps(offset, len, self.pci_cfg_cap + 16, 4) {
            self.pci_cfg_access(true);
        }
        if overlaps(offset, len, self.msix_cap + 2, 2) {
            let control = self.config.u16_at(self.msix_cap + 2);
            self.interrupt.msix().set_control(control);
        }
        if overlaps(offset, len, COMMAND, 2) || overlaps(offset, len, BAR0, 8) {
            self.sync_notify();
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let (region, at) = (offset / REGION * REGION, offset % REGION);
        match region {
            COMMON => {
                let img = self.common_image();
                let at = at as usize;
                if let Some(src) = img.get(at..at + data.len()) {
                    data.copy_from_slice(src);
                }
            }
            // Reading the ISR acknowledges it.
            ISR if at == 0 => data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel),
            DEVICE_CONFIG => self.core.device.read_config(at, data),
            MSIX_TABLE..MSIX_PBA => self.interrupt.msix().read_table(offset - MSIX_TABLE, data),
            MSIX_PBA => self.interrupt.msix().read_pba(at, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let (region, at) = (offset / REGION * REGION, offset % REGION);
        match region {
            COMMON => self.write_common(at, data),
            DEVICE_CONFIG => self.core.device.write_config(at, data),
            // Normally KVM's ioeventfd catches this write; this path runs only if it did not.
            NOTIFY if at % u64::from(NOTIFY_MULTIPLIER) == 0 => self.core.kick((at / u64::from(NOTIFY_MULTIPLIER)) as usize),
            MSIX_TABLE..MSIX_PBA => self.interrupt.msix().write_table(offset - MSIX_TABLE, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IrqLine;
    use crate::pci::msix::MsiMessage;
    use crate::virtio::rng::Rng;
    use std::os::fd::AsRawFd;
    use vm_memory::{Bytes, GuestAddress};

    const WINDOW: Range<u64> = 0xc000_0000..0xd000_0000;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Log {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl MsiRoutes for Log {
        fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("route {gsi} {msg:x?}"));
            Ok(())
        }
    }

    struct Events(Arc<Log>);

    impl IoEvents for Events {
        fn register(&self, _fd: &EventFd, addr: u64) -> Result<(), String> {
            self.0.0.lock().unwrap().push(format!("+{addr:#x}"));
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> Result<(), String> {
            self.0.0.lock().unwrap().push(format!("-{addr:#x}"));
            Ok(())
        }
    }

    struct Rig {
        t: VirtioPciTransport,
        mem: GuestMemoryMmap,
        log: Arc<Log>,
        vectors: Vec<EventFd>,
    }

    fn rig() -> Rig {
        rig_on(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
    }

    /// A virtio-rng function on `mem` (a restored VM's memory is the saved VM's).
    fn rig_on(mem: GuestMemoryMmap) -> Rig {
        let log = Arc::new(Log::default());
        let fds: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let vectors = fds.iter().enumerate().map(|(i, f)| MsixVector { gsi: 24 + i as u32, irq: IrqLine(f.try_clone().unwrap()) }).collect();
        let res = PciResources {
            bar: WINDOW.start + BAR_SIZE,
            window: WINDOW,
            kicks: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            vectors,
            routes: log.clone(),
            ioevents: Box::new(Events(log.clone())),
            report: Arc::new(|_| {}),
        };
        let t = VirtioPciTransport::new(Box::new(Rng::new(None)), mem.clone(), res).unwrap();
        Rig { t, mem, log, vectors: fds }
    }

    fn cfg32(t: &mut VirtioPciTransport, off: usize) -> u32 {
        let mut b = [0u8; 4];
        t.read_config(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_read(t: &mut VirtioPciTransport, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn bar_write(t: &mut VirtioPciTransport, off: u64, len: usize, v: u64) {
        t.write_bar(0, off, &v.to_le_bytes()[..len]);
    }

    /// (cfg_type, offset, extra dword) of every virtio capability, and the MSI-X one's offset.
    fn capabilities(t: &mut VirtioPciTransport) -> (Vec<(u8, u32, u32)>, usize) {
        let (mut caps, mut msix) = (Vec::new(), 0);
        let mut p = cfg32(t, 0x34) as usize & 0xff;
        while p != 0 {
            let head = cfg32(t, p);
            match head & 0xff {
                0x09 => caps.push(((head >> 24) as u8, cfg32(t, p + 8), cfg32(t, p + 16))),
                0x11 => msix = p,
                other => panic!("unexpected capability {other:#x}"),
            }
            p = (head >> 8) as usize & 0xff;
        }
        (caps, msix)
    }

    #[test]
    fn identity_capabilities_and_bar() {
        let Rig { mut t, .. } = rig();
        assert_eq!(cfg32(&mut t, 0), 0x1044_1af4);
        assert_eq!(cfg32(&mut t, 8) >> 8, 0xff_0000);
        let (caps, msix) = capabilities(&mut t);
        let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
        assert_eq!(types, [CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG]);
        assert_eq!(caps[1], (CAP_NOTIFY, NOTIFY as u32, NOTIFY_MULTIPLIER));
        assert_eq!(cfg32(&mut t, msix) >> 16, 1, "two vectors: table size - 1");
        assert_eq!(cfg32(&mut t, msix + 4), MSIX_TABLE as u32);
        assert_eq!(cfg32(&mut t, msix + 8), MSIX_PBA as u32);
        assert_eq!(cfg32(&mut t, BAR0), (WINDOW.start + BAR_SIZE) as u32 | 0b100);
        t.write_config(BAR0, &[0xff; 4]);
        assert_eq!(cfg32(&mut t, BAR0), !(BAR_SIZE as u32 - 1) | 0b100);
    }

    #[test]
    fn notify_ioeventfds_follow_memory_decoding_and_bar_moves() {
        let Rig { mut t, log, .. } = rig();
        let bar = WINDOW.start + BAR_SIZE;
        t.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(log.take(), [format!("+{:#x}", bar + NOTIFY)]);
        t.write_config(BAR0, &((WINDOW.start + 4 * BAR_SIZE) as u32).to_le_bytes());
        assert_eq!(log.take(), [format!("-{:#x}", bar + NOTIFY), format!("+{:#x}", WINDOW.start + 4 * BAR_SIZE + NOTIFY)]);
        // Sizing with decoding on sends the BAR outside the window: nothing stays registered.
        t.write_config(BAR0, &[0xff; 4]);
        t.write_config(BAR0 + 4, &[0xff; 4]);
        assert_eq!(log.take(), [format!("-{:#x}", WINDOW.start + 4 * BAR_SIZE + NOTIFY)]);
        t.write_config(BAR0, &(bar as u32).to_le_bytes());
        assert_eq!(log.take(), Vec::<String>::new(), "high half still all ones");
        t.write_config(BAR0 + 4, &[0; 4]);
        assert_eq!(log.take(), [format!("+{:#x}", bar + NOTIFY)]);
        t.write_config(COMMAND, &[0, 0]);
        assert_eq!(log.take(), [format!("-{:#x}", bar + NOTIFY)]);
    }

    #[test]
    fn vector_registers_refuse_vectors_outside_the_table() {
        let Rig { mut t, .. } = rig();
        bar_write(&mut t, 0x10, 2, 1);
        assert_eq!(bar_read(&mut t, 0x10, 2), 1);
        bar_write(&mut t, 0x10, 2, 2);
        assert_eq!(bar_read(&mut t, 0x10, 2), u64::from(NO_VECTOR));
        bar_write(&mut t, 0x16, 2, 7);
        bar_write(&mut t, 0x1a, 2, 0);
        assert_eq!(bar_read(&mut t, 0x1a, 2), u64::from(NO_VECTOR), "queue 7 does not exist");
        assert_eq!(bar_read(&mut t, 0x18, 2), 0);
        // Writes that run past the structure, and odd regions, are ignored.
        bar_write(&mut t, 0x36, 4, u64::MAX);
        bar_write(&mut t, 0x7ff8, 8, u64::MAX);
        assert_eq!(bar_read(&mut t, 0x12, 2), 1, "one queue");
    }

    #[test]
    fn pci_cfg_window_reads_the_common_configuration() {
        let Rig { mut t, .. } = rig();
        let (caps, _) = capabilities(&mut t);
        assert_eq!(caps[4].0, CAP_PCI_CFG);
        let cap = t.pci_cfg_cap;
        t.write_config(cap + 4, &[0]);
        t.write_config(cap + 8, &0x12u32.to_le_bytes());
        t.write_config(cap + 12, &2u32.to_le_bytes());
        assert_eq!(cfg32(&mut t, cap + 16) & 0xffff, 1, "num_queues through the window");
        // A bad BAR or length does nothing.
        t.write_config(cap + 4, &[3]);
        t.write_config(cap + 16, &[0xff; 4]);
        t.write_config(cap + 12, &3u32.to_le_bytes());
        t.read_config(cap + 16, &mut [0u8; 4]);
    }

    fn wait_readable(fd: &EventFd) -> bool {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 }
    }

    /// The driver's side of bringing the rng up: features, MSI-X (vector 0 for the queue,
    /// vector 1 for configuration), a 16-entry queue at `desc`, `avail`, `used`, DRIVER_OK.
    fn bring_up(t: &mut VirtioPciTransport, (desc, avail, used): (u64, u64, u64)) {
        let (_, msix) = capabilities(t);
        t.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        bar_write(t, 0x14, 1, 1 | 2);
        bar_write(t, 0x08, 4, 1);
        bar_write(t, 0x0c, 4, 1);
        bar_write(t, 0x14, 1, 1 | 2 | 8);
        for v in 0..2 {
            bar_write(t, MSIX_TABLE + v * 16, 8, 0xfee0_0000);
            bar_write(t, MSIX_TABLE + v * 16 + 8, 8, 0x41);
        }
        t.write_config(msix + 2, &0x8000u16.to_le_bytes());
        bar_write(t, 0x10, 2, 1);
        bar_write(t, 0x1a, 2, 0);
        bar_write(t, 0x18, 2, 16);
        for (off, v) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            bar_write(t, off, 4, v);
            bar_write(t, off + 4, 4, 0);
        }
        bar_write(t, 0x1c, 2, 1);
        bar_write(t, 0x14, 1, 1 | 2 | 8 | 4);
    }

    /// Puts request `n` (descriptor `n`, one 32-byte device-writable buffer) in the ring.
    fn post(mem: &GuestMemoryMmap, (desc, avail): (u64, u64), n: u16) {
        let d = desc + u64::from(n) * 16;
        mem.write_obj(0x8000u64 + u64::from(n) * 0x100, GuestAddress(d)).unwrap();
        mem.write_obj(32u32, GuestAddress(d + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(n, GuestAddress(avail + 4 + u64::from(n) * 2)).unwrap();
        mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
    }

    #[test]
    fn a_request_posted_while_paused_is_served_after_a_round_trip_into_a_new_device() {
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        let Rig { mut t, mem, .. } = rig();
        bring_up(&mut t, (desc, avail, used));
        post(&mem, (desc, avail), 0);
        bar_write(&mut t, NOTIFY, 2, 0);
        let used_idx = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        let start = std::time::Instant::now();
        while used_idx(&mem) != 1 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "the first request was never served");
            std::thread::yield_now();
        }
        t.pause();
        // Posted and kicked while the device is paused: nobody serves it (the worker is gone,
        // joined by pause), and it is in flight when the state is saved.
        post(&mem, (desc, avail), 1);
        bar_write(&mut t, NOTIFY, 2, 0);
        assert_eq!(used_idx(&mem), 1);
        let state = t.save();
        assert_eq!((state.core.queues[0].next_avail, state.core.queues[0].next_used), (1, 1));
        let wire = serde_json::to_string(&state).unwrap();
        drop(t);

        let Rig { t: mut fresh, log, vectors, .. } = rig_on(mem.clone());
        fresh.restore(&serde_json::from_str(&wire).unwrap()).unwrap();
        assert_eq!(fresh.save(), state, "the new device saves what the old one did");
        assert!(log.take().contains(&"route 24 Some(MsiMessage { address: fee00000, data: 41 })".to_string()), "MSI-X routes re-installed");
        fresh.resume().unwrap();
        assert!(wait_readable(&vectors[0]), "the queue vector fired on the new device");
        assert_eq!(used_idx(&mem), 2, "the request in flight was served");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 4 + 8)).unwrap(), 1, "descriptor 1 came back");
        assert_eq!(bar_read(&mut fresh, 0x14, 1), 15, "the driver sees the device running");
    }

    /// A driver that breaks the rng's ring sees NEEDS_RESET; its reset clears it, and the device
    /// serves again (the rng used to keep NEEDS_RESET through a reset, hanging the guest).
    #[test]
    fn a_driver_reset_clears_needs_reset() {
        let rings = (0x1000u64, 0x2000u64, 0x3000u64);
        let Rig { mut t, mem, vectors, .. } = rig();
        bring_up(&mut t, rings);
        mem.write_obj(40u16, GuestAddress(rings.1 + 2)).unwrap();
        bar_write(&mut t, NOTIFY, 2, 0);
        assert!(wait_readable(&vectors[1]), "a configuration interrupt announces the broken device");
        assert_eq!(bar_read(&mut t, 0x14, 1), 15 | 64, "NEEDS_RESET");
        bar_write(&mut t, 0x14, 1, 0);
        assert_eq!(bar_read(&mut t, 0x14, 1), 0, "a reset clears NEEDS_RESET");
        mem.write_obj(0u16, GuestAddress(rings.1 + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(rings.2 + 2)).unwrap();
        bring_up(&mut t, rings);
        assert_eq!(bar_read(&mut t, 0x14, 1), 15);
        post(&mem, (rings.0, rings.1), 0);
        bar_write(&mut t, NOTIFY, 2, 0);
        assert!(wait_readable(&vectors[0]), "the device serves again");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(rings.2 + 2)).unwrap(), 1);
    }

    #[test]
    fn driver_brings_rng_up_and_gets_an_msix_interrupt() {
        let Rig { mut t, mem, log, vectors } = rig();
        let (_, msix) = capabilities(&mut t);
        t.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        bar_write(&mut t, 0x14, 1, 1 | 2);
        bar_write(&mut t, 0x08, 4, 1);
        bar_write(&mut t, 0x0c, 4, 1);
        bar_write(&mut t, 0x14, 1, 1 | 2 | 8);
        assert_eq!(bar_read(&mut t, 0x14, 1) & 8, 8, "FEATURES_OK kept");
        for v in 0..2 {
            bar_write(&mut t, MSIX_TABLE + v * 16, 8, 0xfee0_0000);
            bar_write(&mut t, MSIX_TABLE + v * 16 + 8, 8, 0x41);
        }
        t.write_config(msix + 2, &0x8000u16.to_le_bytes());
        bar_write(&mut t, 0x10, 2, 1);
        bar_write(&mut t, 0x1a, 2, 0);
        bar_write(&mut t, 0x18, 2, 16);
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        for (off, v) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            bar_write(&mut t, off, 4, v);
            bar_write(&mut t, off + 4, 4, 0);
        }
        bar_write(&mut t, 0x1c, 2, 1);
        bar_write(&mut t, 0x14, 1, 1 | 2 | 8 | 4);
        assert_eq!(bar_read(&mut t, 0x14, 1), 15);
        // One 32-byte device-writable buffer at 0x8000.
        mem.write_obj(0x8000u64, GuestAddress(desc)).unwrap();
        mem.write_obj(32u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        bar_write(&mut t, NOTIFY, 2, 0);
        assert!(wait_readable(&vectors[0]), "queue vector fired");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 32);
        assert_eq!(bar_read(&mut t, ISR, 1), 1, "ISR says queue");
        assert_eq!(bar_read(&mut t, ISR, 1), 0, "and reading cleared it");
        assert!(log.take().contains(&"route 24 Some(MsiMessage { address: fee00000, data: 41 })".to_string()));
        // Reset clears the vectors and the status.
        bar_write(&mut t, 0x14, 1, 0);
        assert_eq!(bar_read(&mut t, 0x14, 1), 0);
        assert_eq!(bar_read(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn state_round_trips() {
        let Rig { mut t, .. } = rig();
        let (_, msix) = capabilities(&mut t);
        t.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        bar_write(&mut t, MSIX_TABLE, 8, 0xfee0_0000);
        t.write_config(msix + 2, &0x8000u16.to_le_bytes());
        bar_write(&mut t, 0x10, 2, 1);
        let state = t.save();
        let back: VirtioPciState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let Rig { t: mut fresh, log, .. } = rig();
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), state);
        assert!(log.take().contains(&format!("+{:#x}", WINDOW.start + BAR_SIZE + NOTIFY)));
    }
}
