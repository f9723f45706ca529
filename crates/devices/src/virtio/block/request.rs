//! One virtio-blk request: a 16-byte header (type, reserved, sector) in the readable part, data
//! (readable for writes, writable for reads), and a status byte, the last writable byte.

use super::{ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::virtio::GuestMemoryMmap;
use crate::virtio::chains::{Chain, Segment, gather, scatter};
use ferro_block::DiskImage;
use ferro_vmm_api::control::DiskStats;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

const HEADER: u64 = 16;
/// One discard / write-zeroes segment: sector (8), num_sectors (4), flags (4).
const RANGE: u64 = 16;
/// Bounce buffer size: data moves between guest memory and the image in pieces this big.
const CHUNK: usize = 1 << 20;

/// What a request came to: the status byte, and the data bytes written into guest buffers.
type Outcome = (u8, u32);

fn status(s: u32) -> u8 {
    s as u8
}

fn ioerr() -> Outcome {
    (status(VIRTIO_BLK_S_IOERR), 0)
}

/// What one disk served since the device was created.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    errors: AtomicU64,
}

impl BlockCounters {
    /// The counters as the control socket reports them for the disk `id`.
    pub fn stats(&self, id: &str) -> DiskStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiskStats {
            id: id.to_owned(),
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            errors: get(&self.errors),
        }
    }

    /// Counts one request of `kind` that moved `bytes` and ended with `status`.
    fn count(&self, kind: u32, status: u8, bytes: u64) {
        let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        if u32::from(status) != VIRTIO_BLK_S_OK {
            add(&self.errors, 1);
            return;
        }
        match kind {
            VIRTIO_BLK_T_IN => {
                add(&self.read_ops, 1);
                add(&self.read_bytes, bytes);
            }
            VIRTIO_BLK_T_OUT => {
                add(&self.write_ops, 1);
                add(&self.write_bytes, bytes);
            }
            VIRTIO_BLK_T_FLUSH => {
                add(&self.flush_ops, 1);
            }
            _ => {}
        }
    }
}

/// Serves requests for one disk; owns the bounce buffer.
pub(super) struct Requests {
    readonly: bool,
    /// Bytes the guest may address (whole sectors).
    size: u64,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    counters: Arc<BlockCounters>,
}

impl Requests {
    pub(super) fn new(readonly: bool, size: u64, id: [u8; ID_BYTES], counters: Arc<BlockCounters>) -> Self {
        Requests { readonly, size, id, buf: Vec::new(), counters }
    }

    /// Executes one chain and returns the used length (bytes written to the driver, status
    /// included); zero when the chain has no status byte the device can write.
    pub(super) fn serve(&mut self, disk: &mut dyn DiskImage, mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
        let Some(last) = chain.writable.last().filter(|s| s.len > 0) else { return 0 };
        let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else { return 0 };
        if !mem.check_range(status_addr, 1) {
            return 0;
        }
        let mut data_in = chain.writable.clone();
        if let Some(l) = data_in.last_mut() {
            l.len -= 1;
        }
        let (st, written) = match chain.fault {
            Some(_) => {
                self.counters.count(0, status(VIRTIO_BLK_S_IOERR), 0);
                ioerr()
            }
            None => self.execute(disk, mem, &chain.readable, &data_in),
        };
        if mem.write_obj(st, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    fn execute(&mut self, disk: &mut dyn DiskImage, mem: &GuestMemoryMmap, out: &[Segment], data_in: &[Segment]) -> Outcome {
        let mut header = [0u8; HEADER as usize];
        if !gather(mem, out, 0, &mut header) {
            self.counters.count(0, status(VIRTIO_BLK_S_IOERR), 0);
            return ioerr();
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let out_len = out.iter().map(|s| u64::from(s.len)).sum::<u64>() - HEADER;
        let in_len: u64 = data_in.iter().map(|s| u64::from(s.len)).sum();
        // Data on the wrong side (a read-only buffer for a read, a writable one for a write) is
        // refused rather than ignored.
        let misdirected = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => out_len != 0,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => in_len != 0,
            _ => false,
        };
        let outcome = if misdirected { ioerr() } else { self.dispatch(disk, mem, kind, sector, out, out_len, data_in, in_len) };
        let bytes = if kind == VIRTIO_BLK_T_IN { in_len } else { out_len };
        self.counters.count(kind, outcome.0, bytes);
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        disk: &mut dyn DiskImage,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        out: &[Segment],
        out_len: u64,
        data_in: &[Segment],
        in_len: u64,
    ) -> Outcome {
        match kind {
            VIRTIO_BLK_T_IN => self.read(disk, mem, sector, data_in, in_len),
            VIRTIO_BLK_T_OUT if self.readonly => ioerr(),
            VIRTIO_BLK_T_OUT => self.write(disk, mem, sector, out, out_len),
            VIRTIO_BLK_T_FLUSH => match disk.flush() {
                Ok(()) => (status(VIRTIO_BLK_S_OK), 0),
                Err(_) => ioerr(),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(ID_BYTES);
                if scatter(mem, data_in, 0, &self.id[..n]) { (status(VIRTIO_BLK_S_OK), n as u32) } else { ioerr() }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.readonly => ioerr(),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.ranges(disk, mem, kind, out, out_len),
            _ => (status(VIRTIO_BLK_S_UNSUPP), 0),
        }
    }

    /// The byte range of `len` bytes at `sector`, if it is whole sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        (len % SECTOR_SIZE == 0 && off.checked_add(len)? <= self.size).then_some(off)
    }

    fn chunk(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        &mut self.buf[..n]
    }

    fn read(&mut self, disk: &mut dyn DiskImage, mem: &GuestMemoryMmap, sector: u64, data: &[Segment], len: u64) -> Outcome {
        let Some(off) = self.range(sector, len) else { return ioerr() };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = self.chunk(n);
            if disk.read_at(buf, off + done).is_err() || !scatter(mem, data, done, buf) {
                return (status(VIRTIO_BLK_S_IOERR), done as u32);
            }
            done += n as u64;
        }
        (status(VIRTIO_BLK_S_OK), len as u32)
    }

    fn write(&mut self, disk: &mut dyn DiskImage, mem: &GuestMemoryMmap, sector: u64, out: &[Segment], len: u64) -> Outcome {
        let Some(off) = self.range(sector, len) else { return ioerr() };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = self.chunk(n);
            if !gather(mem, out, HEADER + done, buf) || disk.write_at(buf, off + done).is_err() {
                return ioerr();
            }
            done += n as u64;
        }
        (status(VIRTIO_BLK_S_OK), 0)
    }

    /// DISCARD and WRITE_ZEROES: a list of ranges, all checked before any is applied.
    fn ranges(&mut self, disk: &mut dyn DiskImage, mem: &GuestMemoryMmap, kind: u32, out: &[Segment], len: u64) -> Outcome {
        let count = len / RANGE;
        if len % RANGE != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEG) {
            return ioerr();
        }
        let mut todo = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut r = [0u8; RANGE as usize];
            if !gather(mem, out, HEADER + i * RANGE, &mut r) {
                return ioerr();
            }
            let sector = u64::from_le_bytes(r[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(r[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(r[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && kind == VIRTIO_BLK_T_DISCARD) {
                return (status(VIRTIO_BLK_S_UNSUPP), 0);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return ioerr();
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(off) = self.range(sector, bytes) else { return ioerr() };
            todo.push((off, bytes));
        }
        for (off, bytes) in todo {
            // write_zeroes never unmaps: the image's discard does not promise zeroes.
            let r = if kind == VIRTIO_BLK_T_DISCARD { disk.discard(off, bytes) } else { disk.write_zeroes(off, bytes) };
            if r.is_err() {
                return ioerr();
            }
        }
        (status(VIRTIO_BLK_S_OK), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chains::ChainFault;
    use crate::virtio::chains::tests::memory;
    use std::path::PathBuf;
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr: GuestAddress(addr), len }
    }

    struct Disk {
        path: PathBuf,
        image: Box<dyn DiskImage>,
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn disk(name: &str, readonly: bool) -> Disk {
        let path = std::env::temp_dir().join(format!("ferro-blk-{}-{name}.raw", std::process::id()));
        ferro_block::create(&path, &ferro_block::CreateOptions::new(ferro_block::Format::Raw, Some(64 * 1024))).unwrap();
        let image = ferro_block::open(&path, None, readonly).unwrap();
        Disk { path, image }
    }

    /// Runs a request with header (kind, sector), `extra` readable segments after the header and
    /// `data_in` writable ones before a 1-byte status; returns (status byte, used length).
    fn run(d: &mut Disk, readonly: bool, mem: &GuestMemoryMmap, kind: u32, sector: u64, extra: &[Segment], data_in: &[Segment]) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = Chain::default();
        chain.readable.push(seg(HDR, 16));
        chain.readable.extend_from_slice(extra);
        chain.writable.extend_from_slice(data_in);
        chain.writable.push(seg(STATUS, 1));
        let mut r = Requests::new(readonly, d.image.size(), *b"disk.raw\0\0\0\0\0\0\0\0\0\0\0\0", Arc::default());
        let used = r.serve(d.image.as_mut(), mem, &chain);
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn writes_land_in_the_image_and_read_back() {
        let mem = memory();
        let mut d = disk("rw", false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        // The data split over two segments of odd sizes.
        let out = [seg(DATA, 100), seg(DATA + 100, 924)];
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_OUT, 3, &out, &[]), (OK, 1));
        let on_disk = std::fs::read(&d.path).unwrap();
        assert_eq!(&on_disk[3 * 512..5 * 512], &pattern[..]);
        let back = [seg(0x20000, 512), seg(0x30000, 512)];
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_IN, 3, &[], &back), (OK, 1025));
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert_eq!(&got[..], &pattern[512..]);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_FLUSH, 0, &[], &[]), (OK, 1));
    }

    #[test]
    fn bad_requests_get_the_status_the_spec_gives() {
        let mem = memory();
        let mut d = disk("bad", false);
        // Past the end (128 sectors), partial sectors, an overflowing sector number.
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_IN, 128, &[], &[seg(DATA, 512)]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_IN, 127, &[], &[seg(DATA, 1024)]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_OUT, 0, &[seg(DATA, 100)], &[]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_OUT, u64::MAX / 256, &[seg(DATA, 512)], &[]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, 77, 0, &[], &[]).0, UNSUPP);
        // Data buffers on the wrong side.
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_IN, 0, &[seg(DATA, 512)], &[]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_OUT, 0, &[], &[seg(DATA, 512)]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_FLUSH, 0, &[], &[seg(DATA, 512)]).0, IOERR);
        // A header shorter than 16 bytes.
        let mut chain = Chain { readable: vec![seg(HDR, 8)], writable: vec![seg(STATUS, 1)], fault: None };
        let mut r = Requests::new(false, 65536, [0; 20], Arc::default());
        assert_eq!(r.serve(d.image.as_mut(), &mem, &chain), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
        // A faulty chain is refused without touching the disk; no status byte means no answer.
        chain.readable = vec![seg(HDR, 16)];
        chain.fault = Some(ChainFault::OutsideMemory);
        assert_eq!(r.serve(d.image.as_mut(), &mem, &chain), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
        chain.writable.clear();
        assert_eq!(r.serve(d.image.as_mut(), &mem, &chain), 0);
        chain.writable = vec![seg(0xfff_0000_0000, 1)];
        assert_eq!(r.serve(d.image.as_mut(), &mem, &chain), 0);
    }

    #[test]
    fn counters_follow_the_requests() {
        let mem = memory();
        let mut d = disk("count", false);
        let counters = Arc::new(BlockCounters::default());
        let mut r = Requests::new(false, d.image.size(), [0; ID_BYTES], counters.clone());
        let mut request = |kind: u32, sector: u64, readable: Vec<Segment>, writable: Vec<Segment>| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            let mut chain = Chain { readable: vec![seg(HDR, 16)], writable, fault: None };
            chain.readable.extend(readable);
            chain.writable.push(seg(STATUS, 1));
            r.serve(d.image.as_mut(), &mem, &chain)
        };
        request(VIRTIO_BLK_T_OUT, 0, vec![seg(DATA, 1024)], vec![]);
        request(VIRTIO_BLK_T_IN, 0, vec![], vec![seg(DATA, 512)]);
        request(VIRTIO_BLK_T_IN, 2, vec![], vec![seg(DATA, 1536)]);
        request(VIRTIO_BLK_T_FLUSH, 0, vec![], vec![]);
        request(VIRTIO_BLK_T_IN, 1 << 40, vec![], vec![seg(DATA, 512)]);
        request(77, 0, vec![], vec![]);
        let s = counters.stats("vda");
        assert_eq!((s.write_ops, s.write_bytes), (1, 1024));
        assert_eq!((s.read_ops, s.read_bytes), (2, 2048));
        assert_eq!((s.flush_ops, s.errors), (1, 2), "a read past the end and an unknown type are errors");
        assert_eq!(s.id, "vda");
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mem = memory();
        let mut d = disk("ro", true);
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(run(&mut d, true, &mem, VIRTIO_BLK_T_OUT, 0, &[seg(DATA, 512)], &[]).0, IOERR);
        assert!(std::fs::read(&d.path).unwrap().iter().all(|&b| b == 0));
        assert_eq!(run(&mut d, true, &mem, VIRTIO_BLK_T_IN, 0, &[], &[seg(DATA, 512)]).0, OK);
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let mem = memory();
        let mut d = disk("dz", false);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_GET_ID, 0, &[], &[seg(DATA, 20)]), (OK, 21));
        let mut id = [0u8; 8];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk.raw");

        mem.write_slice(&[0x55; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_OUT, 8, &[seg(DATA, 4096)], &[]).0, OK);
        let range = |sector: u64, n: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&r, GuestAddress(0x5000)).unwrap();
            [seg(0x5000, 16)]
        };
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(9, 2, 0), &[]).0, OK);
        let on_disk = std::fs::read(&d.path).unwrap();
        assert!(on_disk[8 * 512..9 * 512].iter().all(|&b| b == 0x55));
        assert!(on_disk[9 * 512..11 * 512].iter().all(|&b| b == 0));
        assert!(on_disk[11 * 512..16 * 512].iter().all(|&b| b == 0x55));
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_DISCARD, 0, &range(8, 8, 0), &[]).0, OK);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_DISCARD, 0, &range(8, 8, 1), &[]).0, UNSUPP);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(8, 8, 2), &[]).0, UNSUPP);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(120, 9, 0), &[]).0, IOERR);
        assert_eq!(run(&mut d, false, &mem, VIRTIO_BLK_T_DISCARD, 0, &range(0, MAX_DISCARD_SECTORS + 1, 0), &[]).0, IOERR);
        assert_eq!(run(&mut d, true, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(0, 1, 0), &[]).0, IOERR);
    }
}
