//! Power-loss simulation for the block layer: a [`Recorder`] stands in for the image file
//! (ferro_block::storage::Storage), logs every write (cut at 4 KiB page boundaries, the unit a
//! page cache writes back), every size change and every sync, and can rebuild the file as a
//! power cut would leave it: everything up to the last completed sync, plus any subset of the
//! writes after it.
//!
//! [`check_every_crash`] walks a log interval by interval (between two syncs) and hands each
//! chosen crash state to a checker. The workloads and checks live in tests/powerloss.rs.
use ferro_block::storage::Storage;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Page size of the write-back model: a write may reach the disk in any subset of its pages.
pub const PAGE: u64 = 4096;

/// Something the workload did, logged between the I/O it caused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Guest write number `n` (an index into the workload's own list) starts.
    WriteStart(usize),
    /// Guest flush number `n` has returned: everything written before it must survive.
    FlushDone(usize),
    /// A resize to this many bytes starts.
    Resize(u64),
}

/// One entry of the log.
#[derive(Clone, Debug)]
pub enum Op {
    /// A page (or less) of a write.
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
    Mark(Mark),
}

/// The file's start state, what happened to it, and its current contents.
pub struct Log {
    pub start: Vec<u8>,
    pub ops: Vec<Op>,
    current: Vec<u8>,
}

fn apply(file: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { off, data } => {
            let end = *off as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => file.resize(*len as usize, 0),
        Op::Sync | Op::Mark(_) => {}
    }
}

/// A recording stand-in for an image file. Clones share one log.
#[derive(Clone)]
pub struct Recorder(Arc<Mutex<Log>>);

impl Recorder {
    pub fn new(start: Vec<u8>) -> Recorder {
        Recorder(Arc::new(Mutex::new(Log { current: start.clone(), start, ops: Vec::new() })))
    }

    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.0.lock().expect("recorder lock")
    }

    pub fn mark(&self, m: Mark) {
        self.log().ops.push(Op::Mark(m));
    }

    /// The file as it is now (as if every write had reached the disk).
    pub fn current(&self) -> Vec<u8> {
        self.log().current.clone()
    }

    fn record(&mut self, op: Op) {
        let mut log = self.log();
        let Log { current, ops, .. } = &mut *log;
        apply(current, &op);
        ops.push(op);
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let log = self.log();
        let start = (off as usize).min(log.current.len());
        let n = (log.current.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&log.current[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let n = ((PAGE - at % PAGE) as usize).min(buf.len() - pos);
            self.record(Op::Write { off: at, data: buf[pos..pos + n].to_vec() });
            pos += n;
        }
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.record(Op::Sync);
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.log().current.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.record(Op::SetLen(len));
        Ok(())
    }

    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0u8; len as usize], off)
    }

    fn discard(&mut self, _off: u64, _len: u64) {}

    fn data_and_hole(&self, off: u64) -> (Option<u64>, Option<u64>) {
        let len = self.log().current.len() as u64;
        ((off < len).then_some(off), Some(len))
    }
}

/// One interval between two syncs: the file as the first sync left it, the I/O issued until
/// the next sync returned, and the workload marks logged up to then.
pub struct Interval<'a> {
    /// Which interval (0: before the first sync).
    pub index: usize,
    pub durable: &'a [u8],
    /// Writes and size changes that may or may not have reached the disk.
    pub pending: Vec<&'a Op>,
    /// Every mark logged before the interval's closing sync returned.
    pub marks: Vec<Mark>,
}

impl Interval<'_> {
    /// The file after a power cut in this interval, with the pending ops `keep` selects.
    pub fn crash(&self, keep: &[bool]) -> Vec<u8> {
        let mut file = self.durable.to_vec();
        for (op, &k) in self.pending.iter().zip(keep) {
            if k {
                apply(&mut file, op);
            }
        }
        file
    }
}

/// Calls `visit` for every interval of the log, in order.
pub fn for_each_interval(log: &Log, mut visit: impl FnMut(&Interval)) {
    let mut durable = log.start.clone();
    let mut marks = Vec::new();
    let mut pending: Vec<&Op> = Vec::new();
    let mut index = 0;
    for op in &log.ops {
        match op {
            Op::Mark(m) => marks.push(*m),
            Op::Sync => {
                visit(&Interval { index, durable: &durable, pending: pending.clone(), marks: marks.clone() });
                for p in pending.drain(..) {
                    apply(&mut durable, p);
                }
                index += 1;
            }
            _ => pending.push(op),
        }
    }
    visit(&Interval { index, durable: &durable, pending, marks });
}

/// Which subsets of an interval's `n` pending ops to try, about `budget` of them: none, all,
/// prefixes (a crash without reordering), single ops alone, single ops left out, and random
/// subsets. Small intervals get every prefix, single and leave-one-out subset.
pub fn subsets(n: usize, budget: usize, rng: &mut impl FnMut() -> u64) -> Vec<Vec<bool>> {
    let mut out = vec![vec![false; n], vec![true; n]];
    let quarter = (budget / 4).max(1);
    let picks = |rng: &mut dyn FnMut() -> u64| -> Vec<usize> {
        if n <= quarter { (0..n).collect() } else { (0..quarter).map(|_| (rng() % n as u64) as usize).collect() }
    };
    for cut in picks(rng) {
        out.push((0..n).map(|j| j < cut).collect());
    }
    for i in picks(rng) {
        out.push((0..n).map(|j| j == i).collect());
    }
    for i in picks(rng) {
        out.push((0..n).map(|j| j != i).collect());
    }
    if n > 2 {
        for _ in 0..quarter {
            out.push((0..n).map(|_| rng() % 2 == 0).collect());
        }
    }
    out.sort();
    out.dedup();
    out
}
