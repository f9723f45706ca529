//! The `transport` target: a guest driving one virtio device through virtio-mmio or virtio-pci.
//!
//! The input chooses the transport and the device, then holds a list of register accesses
//! (MMIO registers; for PCI the configuration space and BAR 0: common, notify, ISR and device
//! configuration, the MSI-X table and PBA) and, after them, the first bytes of guest memory, where
//! the queues the accesses set up find their descriptors and buffers. Whatever the accesses do
//! (features, queue addresses, status, kicks), the device's worker serves the queues from that
//! memory until the transport shuts the device down. The devices: rng, blk (on a raw file),
//! balloon, console (on a socket no client connects to) and vsock (no host sockets).

use ferro_devices::virtio::GuestMemoryMmap;
use ferro_devices::virtio::VirtioDevice;
use ferro_devices::virtio::balloon::Balloon;
use ferro_devices::virtio::block::Block;
use ferro_devices::virtio::console::{Console, ConsoleIo};
use ferro_devices::virtio::mmio::MmioTransport;
use ferro_devices::virtio::pci::{BAR_SIZE, IoEvents, PciResources, VirtioPciTransport};
use ferro_devices::virtio::rng::Rng;
use ferro_devices::virtio::vsock::Vsock;
use ferro_devices::pci::bus::{PciBus, PciEcam, PciMmioWindow, SharedFunction};
use ferro_devices::pci::msix::{MsiMessage, MsiRoutes, MsixVector};
use ferro_devices::{BusAction, BusDevice, IrqLine};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the target, and how much of it the input may fill.
const MEMORY: usize = 1 << 20;
const FILLED: usize = 64 << 10;
/// One access: kind, size, offset (u16), value (u64), little-endian.
const ACCESS: usize = 12;
/// The PCI function's BAR 0 and the host bridge window it decodes in.
const WINDOW_START: u64 = 0xc000_0000;

/// The disk behind the fuzzed virtio-blk: a 1 MiB raw file in /dev/shm made once per process
/// (the guest's writes land there; any content is a valid raw disk). The files of processes that
/// are gone are removed first, so runs do not pile them up.
fn disk() -> Option<&'static PathBuf> {
    static DISK: OnceLock<Option<PathBuf>> = OnceLock::new();
    DISK.get_or_init(|| crate::process_file("transport-", ".raw", &vec![0u8; 1 << 20])).as_ref()
}

/// A unix socket path of this process for `what` (the device binds it and removes it when
/// dropped; one left by a process that died is replaced).
fn socket(what: &str) -> Option<PathBuf> {
    let path = PathBuf::from(format!("/dev/shm/ferro-fuzz-{what}-{}.sock", std::process::id()));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => None,
        _ => Some(path),
    }
}

fn device(choice: u8) -> Option<Box<dyn VirtioDevice>> {
    Some(match choice % 5 {
        0 => Box::new(Rng::new(None)),
        1 => Box::new(Block::new(disk()?, None, false).ok()?),
        2 => Box::new(Balloon::new(4, true).ok()?),
        // Its output waits for a client of the socket, which never comes (kept up to a limit).
        3 => Box::new(Console::new(ConsoleIo::Socket(socket("console")?)).ok()?),
        // Connections the guest opens find no host socket (`{uds}_{port}`) and are reset.
        _ => Box::new(Vsock::new(3, &socket("vsock")?).ok()?),
    })
}

/// MSI routes and ioeventfds go nowhere (there is no KVM here).
struct Nowhere;

impl MsiRoutes for Nowhere {
    fn set_msi_route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> Result<(), String> {
        Ok(())
    }
}

impl IoEvents for Nowhere {
    fn register(&self, _fd: &EventFd, _addr: u64) -> Result<(), String> {
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, _addr: u64) -> Result<(), String> {
        Ok(())
    }
}

/// One guest access, decoded.
struct Access {
    kind: u8,
    offset: u64,
    bytes: [u8; 8],
    len: usize,
}

fn accesses(list: &[u8]) -> impl Iterator<Item = Access> + '_ {
    list.chunks_exact(ACCESS).map(|a| Access {
        kind: a[0] % 4,
        len: 1 << (a[1] % 4),
        offset: u64::from(u16::from_le_bytes([a[2], a[3]])),
        bytes: a[4..12].try_into().unwrap_or([0; 8]),
    })
}

/// Where the seeds put the used ring of queue 0 (the fuzzer may put it anywhere).
const SEED_USED_RING: u64 = 0x2000;

/// What one input did: the accesses made, and the index of the used ring at the seeds' address
/// once the device stopped (how many buffers the device gave back there).
#[derive(Debug, PartialEq, Eq)]
pub struct TransportRun {
    pub accesses: usize,
    pub used_index: u16,
}

/// Runs one input as the fuzzer does: the device is shut down right after the last access,
/// whether or not its worker got to the queues.
pub fn transport(data: &[u8]) -> TransportRun {
    run(data, Duration::ZERO)
}

/// Runs one input and gives the device's worker up to `settle` to serve what was kicked before
/// it is shut down (to check that the seeds reach the device's request handling).
pub fn transport_settled(data: &[u8], settle: Duration) -> TransportRun {
    run(data, settle)
}

fn run(data: &[u8], settle: Duration) -> TransportRun {
    let none = TransportRun { accesses: 0, used_index: 0 };
    let used_index = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(SEED_USED_RING + 2)).unwrap_or(0);
    let settled = |mem: &GuestMemoryMmap| {
        let until = Instant::now() + settle;
        let avail_index = mem.read_obj::<u16>(GuestAddress(0x1002)).unwrap_or(0);
        while Instant::now() < until && used_index(mem) != avail_index {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let [choice, n_lo, n_hi, rest @ ..] = data else { return none };
    let list_len = (usize::from(u16::from_le_bytes([*n_lo, *n_hi])) * ACCESS).min(rest.len() / ACCESS * ACCESS);
    let (list, memory) = rest.split_at(list_len);
    // Declared first, so dropped (cleared and given back) after the device and its worker.
    let Some(lease) = crate::guest_memory::Lease::new(MEMORY) else { return none };
    let mem = lease.mem().clone();
    if mem.write_slice(&memory[..memory.len().min(FILLED)], GuestAddress(0)).is_err() {
        return none;
    }
    let guest = mem.clone();
    let Some(device) = device(choice >> 1) else { return none };
    let Ok(kicks) = device.queue_max_sizes().iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>() else {
        return none;
    };
    let report: ferro_devices::virtio::chains::NeedsResetReport = Arc::new(|_| {});
    let mut done = 0;
    if choice & 1 == 0 {
        let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else { return none };
        let Ok(mut t) = MmioTransport::new(device, mem, IrqLine(irq), kicks, report) else { return none };
        for a in accesses(list) {
            let offset = a.offset % 0x1000;
            if a.kind % 2 == 0 {
                t.read(offset, &mut [0u8; 8][..a.len]);
            } else {
                let _ = t.write(offset, &a.bytes[..a.len]);
            }
            done += 1;
        }
        settled(&guest);
        t.shutdown();
    } else {
        let queues = kicks.len();
        let Ok(vectors) = (0..=queues)
            .map(|i| EventFd::new(libc::EFD_NONBLOCK).map(|fd| MsixVector { gsi: 24 + i as u32, irq: IrqLine(fd) }))
            .collect::<Result<Vec<_>, _>>()
        else {
            return none;
        };
        let res = PciResources {
            bar: WINDOW_START + BAR_SIZE,
            window: WINDOW_START..WINDOW_START + 0x1000_0000,
            kicks,
            vectors,
            routes: Arc::new(Nowhere),
            ioevents: Box::new(Nowhere),
            report,
        };
        let Ok(t) = VirtioPciTransport::new(device, mem, res) else { return none };
        // The accesses go through the bus as a guest's do: ECAM (device 0 is the host bridge,
        // 1 this function; malformed accesses are the bus's to refuse) and the BAR window.
        let function = Arc::new(Mutex::new(t));
        let mut bus = PciBus::default();
        let shared: SharedFunction = function.clone();
        if bus.insert(1, shared).is_err() {
            return none;
        }
        let bus = Arc::new(bus);
        let (mut ecam, mut window) = (PciEcam::new(bus.clone()), PciMmioWindow::new(bus, WINDOW_START));
        for a in accesses(list) {
            let mut buf = [0u8; 8];
            let _ = match a.kind {
                0 => {
                    ecam.read(a.offset, &mut buf[..a.len]);
                    BusAction::None
                }
                1 => ecam.write(a.offset, &a.bytes[..a.len]),
                2 => {
                    window.read(BAR_SIZE + a.offset, &mut buf[..a.len]);
                    BusAction::None
                }
                _ => window.write(BAR_SIZE + a.offset, &a.bytes[..a.len]),
            };
            done += 1;
        }
        settled(&guest);
        function.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    }
    TransportRun { accesses: done, used_index: used_index(&guest) }
}
