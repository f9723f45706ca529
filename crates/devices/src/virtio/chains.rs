//! Walking the driver's queues without trusting them, for the device workers.
//!
//! A descriptor chain is turned into two lists of guest-memory segments (what the device reads,
//! then what it writes) with every fault the driver can cause recorded instead of acted on: a
//! chain cut short (a `next` loop, a `next` past the table, a bad or nested indirect table), a
//! buffer outside guest memory, a readable buffer after a writable one, too many descriptors.
//! Each device decides how to answer a faulty chain (an error status, a zero-length completion).
//! Faults of the queue itself (an available index that runs ahead of the ring, a head outside
//! it) cannot be answered per request: the worker marks the device broken, which the transport
//! shows as NEEDS_RESET until the driver resets the device.

use super::{GuestMemoryMmap, InterruptReason, VirtioInterrupt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Longest chain a device accepts (the spec's limit for indirect tables is the queue size; this
/// bounds the work one request can cause).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What was wrong with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainFault {
    /// The chain ended early: a loop, a `next` outside the table, or a bad indirect table.
    Truncated,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    TooLong,
    /// A buffer lies (partly) outside guest memory.
    OutsideMemory,
    /// A device-readable buffer follows a device-writable one.
    Order,
}

/// A chain split into what the device reads and what it writes, in order.
#[derive(Debug, Default)]
pub struct Chain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// The first thing found wrong, if anything.
    pub fault: Option<ChainFault>,
}

impl Chain {
    /// Collects a chain's descriptors (all of them, even after a fault, up to the limit).
    pub fn parse(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Chain {
        let mut out = Chain::default();
        let mut last_has_next = true;
        let mut count = 0;
        for desc in chain {
            count += 1;
            if count > MAX_CHAIN_DESCRIPTORS {
                out.fault.get_or_insert(ChainFault::TooLong);
                last_has_next = false;
                break;
            }
            last_has_next = desc.has_next();
            let seg = Segment { addr: desc.addr(), len: desc.len() };
            if !mem.check_range(seg.addr, seg.len as usize) {
                out.fault.get_or_insert(ChainFault::OutsideMemory);
            }
            if desc.is_write_only() {
                out.writable.push(seg);
            } else {
                if !out.writable.is_empty() {
                    out.fault.get_or_insert(ChainFault::Order);
                }
                out.readable.push(seg);
            }
        }
        // The iterator stops silently on loops and bad tables; the last descriptor it gave then
        // still promised a successor (and an empty chain is never valid).
        if last_has_next {
            out.fault.get_or_insert(ChainFault::Truncated);
        }
        out
    }

    /// Total bytes of the readable segments.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable segments.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Walks `len` bytes of `segs` starting `skip` bytes in, calling `f(address, range of the
/// caller's buffer)` piece by piece; false if the segments end first or `f` fails.
fn walk(segs: &[Segment], mut skip: u64, len: usize, mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool) -> bool {
    let mut done = 0;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(len - done);
        if !f(seg.addr.unchecked_add(skip), done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

/// Reads `buf.len()` bytes starting `skip` bytes into `segs`; false if they do not hold that many
/// or memory fails.
pub fn gather(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, buf: &mut [u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| mem.read_slice(&mut buf[r], addr).is_ok())
}

/// Writes `buf` starting `skip` bytes into `segs`; false if they do not hold that many or memory
/// fails.
pub fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, buf: &[u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| mem.write_slice(&buf[r], addr).is_ok())
}

/// Told why, when the driver broke a device beyond a per-request answer; the VMM turns it into
/// a `DeviceNeedsReset` event for its supervisor (or a log line).
pub type NeedsResetReport = Arc<dyn Fn(&str) + Send + Sync>;

/// Set when the driver broke a queue; read by the transport as NEEDS_RESET until the driver
/// resets the device. The transport owns it and hands a clone to the device's worker.
#[derive(Clone)]
pub struct Broken {
    flag: Arc<AtomicBool>,
    report: NeedsResetReport,
}

impl Broken {
    pub fn new(report: NeedsResetReport) -> Broken {
        Broken { flag: Arc::new(AtomicBool::new(false)), report }
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub fn clear(&self) {
        self.flag.store(false, Ordering::Release);
    }

    /// Marks the device broken without telling anyone: a restored device that was broken when
    /// saved (its driver already knows).
    pub fn mark(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Marks the device broken, reports why (once, naming the `device` kind), and tells the
    /// driver (a configuration-change interrupt, after which it reads the status and finds
    /// NEEDS_RESET).
    pub fn set(&self, device: &str, why: &str, interrupt: &dyn VirtioInterrupt) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            (self.report)(&format!("{device}: {why}"));
            interrupt.trigger(InterruptReason::Config);
        }
    }
}

/// Takes the next available chain, or None when the queue is empty; Err when the driver broke
/// the ring (available index ahead by more than the queue size).
pub fn next_chain<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, String> {
    let mut iter = queue.iter(mem).map_err(|e| format!("available ring: {e}"))?;
    Ok(iter.next())
}

/// Serves every available chain of `queue` with `handle` (which returns the used length),
/// re-checking after notifications are re-enabled so no kick is lost. Returns whether the driver
/// wants an interrupt; Err when the queue is broken (see [`next_chain`], and heads outside the
/// ring that `add_used` refuses).
pub fn drain<F>(queue: &mut Queue, mem: &GuestMemoryMmap, mut handle: F) -> Result<bool, String>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    if !queue.ready() {
        return Ok(false);
    }
    let mut used = false;
    loop {
        queue.disable_notification(mem).map_err(|e| format!("used ring: {e}"))?;
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len).map_err(|e| format!("descriptor head {head}: {e}"))?;
            used = true;
        }
        if !queue.enable_notification(mem).map_err(|e| format!("used ring: {e}"))? {
            break;
        }
    }
    Ok(used && queue.needs_notification(mem).unwrap_or(true))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const F_INDIRECT: u16 = 4;

    /// A broken flag whose reports go nowhere.
    pub fn broken() -> Broken {
        Broken::new(Arc::new(|_| {}))
    }

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// An interrupt line for device tests: records every interrupt raised, in order.
    #[derive(Default)]
    pub struct InterruptLog(std::sync::Mutex<Vec<InterruptReason>>);

    impl InterruptLog {
        pub fn reasons(&self) -> Vec<InterruptReason> {
            self.0.lock().unwrap().clone()
        }

        pub fn count(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    impl VirtioInterrupt for InterruptLog {
        fn trigger(&self, reason: InterruptReason) {
            self.0.lock().unwrap().push(reason);
        }
    }

    /// Puts `descs` in a 16-entry queue's table with one chain starting at 0, and parses it.
    fn parse(descs: &[(u64, u32, u16, u16)]) -> Chain {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, RawDescriptor::from(Descriptor::new(addr, len, flags, next))).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = next_chain(&mut q, &mem).unwrap().unwrap();
        Chain::parse(chain, &mem)
    }

    #[test]
    fn a_plain_chain_splits_into_readable_then_writable() {
        let c = parse(&[(0x8000, 16, F_NEXT, 1), (0x9000, 512, F_NEXT | F_WRITE, 2), (0xa000, 1, F_WRITE, 0)]);
        assert_eq!(c.fault, None);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
    }

    #[test]
    fn faults_are_recorded_not_acted_on() {
        assert_eq!(parse(&[(0x8000, 16, F_NEXT, 1), (0x9000, 16, F_NEXT, 0)]).fault, Some(ChainFault::Truncated));
        assert_eq!(parse(&[(0x8000, 16, F_NEXT, 40)]).fault, Some(ChainFault::Truncated));
        assert_eq!(parse(&[(0xff_0000_0000, 16, 0, 0)]).fault, Some(ChainFault::OutsideMemory));
        assert_eq!(parse(&[(0x8000, u32::MAX, 0, 0)]).fault, Some(ChainFault::OutsideMemory));
        assert_eq!(parse(&[(0x8000, 1, F_WRITE | F_NEXT, 1), (0x9000, 1, 0, 0)]).fault, Some(ChainFault::Order));
        // An indirect table whose length is not a whole number of descriptors.
        assert_eq!(parse(&[(0x8000, 17, F_INDIRECT, 0)]).fault, Some(ChainFault::Truncated));
    }

    #[test]
    fn gather_and_scatter_cross_segments() {
        let mem = memory();
        let segs = [Segment { addr: GuestAddress(0x1000), len: 3 }, Segment { addr: GuestAddress(0x2000), len: 5 }];
        assert!(scatter(&mem, &segs, 1, b"abcdef"));
        let mut back = [0u8; 6];
        assert!(gather(&mem, &segs, 1, &mut back));
        assert_eq!(&back, b"abcdef");
        assert!(!gather(&mem, &segs, 4, &mut back), "only 4 bytes remain past offset 4");
    }
}
