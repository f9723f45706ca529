//! Live migration between two VMMs (docs/migration.md): the sending side ([`send`], behind the
//! `migrate_send` control op) and the receiving side ([`receive`], behind `ferro vmm
//! --incoming`) of the version 3 stream, and the [`Tracker`] `migrate_info` reads.
//!
//! The sender turns on dirty logging (KVM's for what the vCPUs write, the memory bitmap for
//! what devices write), sends every page that may hold data, then the pages dirtied meanwhile
//! in rounds, each ending when the destination has applied it (a `sync` record), until the
//! remainder fits the downtime budget at the measured rate and stops shrinking. Then it pauses
//! the guest, sends the remainder, hands its writable disks over (closes them cleanly, which
//! releases their locks), and sends the saved VM followed by `go`; the destination builds the
//! VM, opens the disks, starts the guest and says so, and only then does the sender stop. A
//! refusal (the destination did not start the guest) takes the disks back (waiting while the
//! destination still holds them) and resumes the guest here; no answer at all leaves the guest
//! paused here with its disks let go (it may run there), and the state says so.
//!
//! With `copy_storage` the writable disks are not shared but copied along: the destination has
//! fresh images of the same format and size, open from the start. The sender marks what the
//! guest changes on each disk, sends every part of it that may hold data, then the changed parts
//! in rounds, the memory as above, and the last changes with the guest paused; its own disks stay
//! open (nothing is handed over), so a failure only has to resume the guest.

use crate::dirty;
use crate::memory::{self, GuestMemoryMmap, PAGE, PageMap};
use crate::resources::ResourceState;
use crate::snapshot::CpuFeatures;
use crate::state::SavedVm;
use crate::virtio::DiskOpening;
use ferro_devices::virtio::block::BlockDisk;
use ferro_vmm_api::{DeviceKind, DiskFormat};
use crate::vm::{Vm, VmControl};
use crate::{Error, Result, VmBuilder};
use ferro_vmm_api::VmConfig;
use ferro_vmm_api::control::{Done, MigrateReply, MigrationInfo, MigrationState, decode_reply, encode_reply};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory, WriteVolatile};

/// The first bytes of a migration stream.
pub const MAGIC: [u8; 8] = *b"FERROMIG";
/// The version of the stream: its framing, records and handshake.
pub const VERSION: u32 = 3;

/// Record tags (one byte before each record).
const RECORD_PAGES: u8 = 1;
const RECORD_ZEROS: u8 = 2;
const RECORD_STATE: u8 = 3;
const RECORD_GO: u8 = 4;
const RECORD_DISK: u8 = 5;
const RECORD_DISK_ZEROS: u8 = 6;
const RECORD_SYNC: u8 = 7;

/// Disk bytes in one `disk` record the sender makes; the receiver accepts up to
/// [`MAX_DISK_CHUNK`].
const DISK_CHUNK: u64 = 1 << 20;
const MAX_DISK_CHUNK: u32 = 4 << 20;
/// The disk rounds end once this little changed meanwhile (it goes again later), or after
/// [`DISK_ROUNDS`] rounds (a guest writing faster than the link: the rest goes at the end).
const DISK_SMALL: u64 = 4 << 20;
const DISK_ROUNDS: u32 = 10;

/// Pages in one `pages` record the sender makes; the receiver accepts up to [`MAX_RUN`].
const RUN: usize = 64;
const MAX_RUN: u32 = 1024;
/// The hello and the state are JSON; no real one is anywhere near these.
const MAX_HELLO: u64 = 16 << 20;
const MAX_STATE: u64 = 256 << 20;
/// A link silent this long fails the migration on either side.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source whose migration failed waits to take its disks back: a destination that
/// opened them lets go when it learns of the failure, at the latest when its link times out.
const TAKE_BACK_WAIT: Duration = Duration::from_secs(LINK_TIMEOUT.as_secs() + 15);
/// How long the destination tries to open the disks the source has just let go (a shared file
/// system may carry the lock release with a delay).
const ACTIVATE_WAIT: Duration = Duration::from_secs(2);
/// A dirty remainder this small always fits: it is one record.
const SMALL_REMAINDER: u64 = (RUN * PAGE) as u64;
/// The rounds go on, even once the remainder fits the downtime budget, while each leaves at most
/// this share (in quarters) of the one before: a guest that writes slower than the link lets
/// the remainder, and so the pause, shrink further. At most [`MAX_ROUNDS`] rounds.
const SHRINKING_QUARTERS: u64 = 3;
const MAX_ROUNDS: u32 = 30;
/// The sender's buffer: records and small runs of pages gather in it; a run of pages at least
/// this long goes from the page buffer straight to the link.
const SEND_BUFFER: usize = 64 << 10;
/// One auto-converge throttle period, and its steps.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
const THROTTLE_FIRST: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;

/// What the destination learns first: the VM it is to take over.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    config: VmConfig,
    cpu_features: CpuFeatures,
    /// Where the devices are placed, so the destination can build them before the state comes.
    resources: ResourceState,
    /// The disks copied along (empty: the writable disks are shared and handed over).
    #[serde(default)]
    copied_disks: Vec<CopiedDisk>,
}

/// A disk the stream carries: its device, and what the destination's copy must be.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CopiedDisk {
    id: String,
    format: DiskFormat,
    size: u64,
}

/// How `migrate_send` should go.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub max_downtime: Duration,
    /// Bytes per second the pre-copy may use; None: as fast as the link goes.
    pub bandwidth: Option<u64>,
    pub auto_converge: bool,
    /// Copy the writable disks along to the destination's own files instead of handing shared
    /// ones over.
    pub copy_storage: bool,
}

/// The migration under way or the last one's outcome, and the cancel flag.
#[derive(Default)]
pub struct Tracker {
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    throttle: AtomicU32,
}

impl Tracker {
    pub fn info(&self) -> MigrationInfo {
        let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        info.throttle_percent = self.throttle.load(Ordering::Relaxed);
        info
    }

    /// Asks the migration under way to stop before its switch-over.
    pub fn cancel(&self) -> std::result::Result<(), String> {
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        match info.state {
            MigrationState::Active => {
                self.cancel.store(true, Ordering::Release);
                Ok(())
            }
            MigrationState::SwitchingOver => Err("the migration is switching over and can no longer be cancelled".into()),
            _ => Err("no migration is under way".into()),
        }
    }

    fn begin(&self) -> std::result::Result<(), String> {
        let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(info.state, MigrationState::Active | MigrationState::SwitchingOver) {
            return Err("a migration is already under way".into());
        }
        *info = MigrationInfo { state: MigrationState::Active, ..Default::default() };
        self.cancel.store(false, Ordering::Release);
        self.throttle.store(0, Ordering::Relaxed);
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// A connected migration stream: a unix socket or TCP.
pub enum Link {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Link {
    /// Connects to `unix:PATH` or `tcp:HOST:PORT`.
    pub fn connect(to: &str) -> std::result::Result<Link, String> {
        let link = if let Some(path) = to.strip_prefix("unix:") {
            UnixStream::connect(path).map(Link::Unix)
        } else if let Some(addr) = to.strip_prefix("tcp:") {
            TcpStream::connect(addr).map(Link::Tcp)
        } else {
            return Err(format!("migration address {to:?}: expected unix:PATH or tcp:HOST:PORT"));
        };
        let link = link.map_err(|e| format!("connecting to {to}: {e}"))?;
        link.set_timeouts()?;
        Ok(link)
    }

    /// Waits for the source on `spec`: `unix:PATH` or `tcp:HOST:PORT` (listens there and
    /// accepts one connection), or `fd:N` (an inherited, connected unix socket).
    pub fn accept(spec: &str) -> std::result::Result<Link, String> {
        let link = if let Some(path) = spec.strip_prefix("unix:") {
            let _ = std::fs::remove_file(path);
            // Bound and listening under another name first, then renamed into place: a source
            // that finds the path finds it listening (between bind and listen a connect is
            // refused).
            let binding = format!("{path}.binding");
            let _ = std::fs::remove_file(&binding);
            let listener = UnixListener::bind(&binding).map_err(|e| format!("--incoming {spec}: {e}"))?;
            std::fs::rename(&binding, path).map_err(|e| format!("--incoming {spec}: {e}"))?;
            let accepted = listener.accept().map(|(s, _)| Link::Unix(s));
            let _ = std::fs::remove_file(path);
            accepted
        } else if let Some(addr) = spec.strip_prefix("tcp:") {
            let listener = TcpListener::bind(addr).map_err(|e| format!("--incoming {spec}: {e}"))?;
            listener.accept().map(|(s, _)| Link::Tcp(s))
        } else if let Some(fd) = spec.strip_prefix("fd:") {
            let fd: i32 = fd.parse().map_err(|_| format!("--incoming {spec}: fd:N needs a descriptor number"))?;
            // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("--incoming {spec}: descriptor {fd} is not an open inherited descriptor"));
            }
            // SAFETY: the descriptor is open and was handed to this process for this stream
            // alone; the Link owns it from here on.
            Ok(Link::Unix(unsafe { UnixStream::from_raw_fd(fd) }))
        } else {
            return Err(format!("--incoming {spec}: expected unix:PATH, tcp:HOST:PORT or fd:N"));
        };
        let link = link.map_err(|e| format!("--incoming {spec}: accepting the source: {e}"))?;
        link.set_timeouts()?;
        Ok(link)
    }

    fn set_timeouts(&self) -> std::result::Result<(), String> {
        let set = match self {
            Link::Unix(s) => s.set_read_timeout(Some(LINK_TIMEOUT)).and_then(|()| s.set_write_timeout(Some(LINK_TIMEOUT))),
            Link::Tcp(s) => s
                .set_read_timeout(Some(LINK_TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(LINK_TIMEOUT)))
                .and_then(|()| s.set_nodelay(true)),
        };
        set.map_err(|e| format!("migration link: {e}"))
    }

    fn try_clone(&self) -> std::result::Result<Link, String> {
        match self {
            Link::Unix(s) => s.try_clone().map(Link::Unix),
            Link::Tcp(s) => s.try_clone().map(Link::Tcp),
        }
        .map_err(|e| format!("migration link: {e}"))
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.read(buf),
            Link::Tcp(s) => s.read(buf),
        }
    }
}

impl std::os::fd::AsFd for Link {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Link::Unix(s) => s.as_fd(),
            Link::Tcp(s) => s.as_fd(),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.write(buf),
            Link::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A step the destination did not answer `ok`: it said no (and so does not run the guest), or
/// it said nothing (and may).
enum Answer {
    Refused(String),
    Silent(String),
}

/// Why a migration did not complete, and so what becomes of the guest here.
enum Failure {
    /// Before `go`: the destination will not run the guest; it runs on here.
    Before(String),
    /// After `go` without the destination's word: it may run there, so it stays paused here.
    Unconfirmed(String),
}

/// The `migrate_send` op: migrates `vm` to the VMM at `to`. On success the reply's numbers;
/// the caller then ends this VMM. On failure the VM runs here again (or, when the destination
/// was told to run it but did not confirm, stays paused) and the error says what failed.
pub fn send(vm: &VmControl, to: &str, opts: &SendOptions) -> std::result::Result<MigrateReply, String> {
    let _tracking = vm.claim_dirty_tracking("migrate")?;
    let tracker = vm.migration();
    tracker.begin()?;
    let started = Instant::now();
    let was_running = !vm.is_paused();
    let outcome = Link::connect(to).map_err(Failure::Before).and_then(|link| {
        memory::set_dirty_logging(vm.vm_fd(), vm.memory(), true).map_err(|e| Failure::Before(e.to_string()))?;
        let result = Sender::new(vm, link, opts, started).and_then(|mut s| s.run(was_running));
        for disk in vm.writable_disks() {
            disk.stop_mirror();
        }
        if let Err(e) = memory::set_dirty_logging(vm.vm_fd(), vm.memory(), false) {
            eprintln!("ferro: turning dirty logging off after the migration: {e}");
        }
        result
    });
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(reply) => {
            tracker.update(|i| {
                i.state = MigrationState::Completed;
                i.elapsed_ms = elapsed_ms;
                i.remaining_bytes = 0;
                i.result = Some(reply.clone());
            });
            Ok(reply)
        }
        Err(Failure::Before(e)) => {
            let cancelled = tracker.cancelled();
            // The disks first (the destination may hold them until it learns of the failure),
            // and the guest runs only with all of them back.
            let resumed = vm
                .activate_disks(TAKE_BACK_WAIT)
                .map_err(|r| format!("its disks could not be taken back ({r}), so the VM stays paused"))
                .and_then(|()| if was_running { vm.resume() } else { Ok(()) });
            let runs = was_running && resumed.is_ok();
            let e = match resumed {
                Ok(()) => e,
                Err(r) => format!("{e}; and the VM did not resume: {r}"),
            };
            tracker.update(|i| {
                i.state = if cancelled { MigrationState::Cancelled } else { MigrationState::Failed };
                i.elapsed_ms = elapsed_ms;
                i.error = Some(e.clone());
            });
            Err(format!("migration failed, the VM {} here: {e}", if runs { "runs on" } else { "stays paused" }))
        }
        Err(Failure::Unconfirmed(e)) => {
            let e = format!(
                "the destination was told to run the guest but did not confirm it ({e}); the guest stays paused here, its disks let go, since it may run there"
            );
            tracker.update(|i| {
                i.state = MigrationState::Unconfirmed;
                i.elapsed_ms = elapsed_ms;
                i.error = Some(e.clone());
            });
            Err(e)
        }
    }
}

/// The sending end of one migration.
struct Sender<'a> {
    vm: &'a VmControl,
    out: BufWriter<Link>,
    replies: BufReader<Link>,
    opts: &'a SendOptions,
    started: Instant,
    /// Bytes written to the stream so far.
    sent: u64,
    /// While the guest runs: the bandwidth cap applies, counted from `capped_since`.
    capped_since: Option<(Instant, u64)>,
    buf: Vec<u8>,
    iterations: u32,
    /// The disks copied along (`copy_storage`), with their device ids.
    disks: Vec<(String, BlockDisk)>,
    disk_buf: Vec<u8>,
}

impl<'a> Sender<'a> {
    fn new(vm: &'a VmControl, link: Link, opts: &'a SendOptions, started: Instant) -> std::result::Result<Sender<'a>, Failure> {
        let replies = BufReader::new(link.try_clone().map_err(Failure::Before)?);
        let disks = if opts.copy_storage {
            block_ids(vm.config()).into_iter().zip(vm.devices().handles().disk_images.iter().cloned()).filter(|(_, d)| !d.readonly()).collect()
        } else {
            Vec::new()
        };
        Ok(Sender {
            vm,
            out: BufWriter::with_capacity(SEND_BUFFER, link),
            replies,
            opts,
            started,
            sent: 0,
            capped_since: None,
            buf: vec![0; SEND_BUFFER],
            iterations: 0,
            disks,
            disk_buf: Vec::new(),
        })
    }

    fn run(&mut self, was_running: bool) -> std::result::Result<MigrateReply, Failure> {
        let before = |e: String| Failure::Before(e);
        self.hello().map_err(before)?;
        self.capped_since = Some((Instant::now(), self.sent));
        self.copy_disks().map_err(before)?;
        let mut remainder = self.precopy().map_err(before)?;

        // Switch-over: pause, send what is left and the state.
        self.vm.migration().update(|i| i.state = MigrationState::SwitchingOver);
        self.capped_since = None;
        // The hand-over below flushes each writable disk with the guest paused; flushed first,
        // while it runs, that flush finds only the last moments' writes.
        for d in self.vm.writable_disks() {
            d.flush().map_err(before)?;
        }
        // What the guest wrote to its disks during the memory rounds, while it still runs.
        self.send_disk_changes().map_err(before)?;
        let paused_at = Instant::now();
        self.vm.pause().map_err(before)?;
        self.iterations += 1;
        let last = memory::take_dirty(self.vm.vm_fd(), self.vm.memory()).map_err(|e| before(e.to_string()))?;
        dirty::merge(&mut remainder, &last);
        self.send_dirty(&remainder).map_err(before)?;
        if self.opts.copy_storage {
            // The copies get the disks' last changes; the disks here stay open, for a failure.
            self.send_disk_changes().map_err(before)?;
        } else {
            // The hand-over: the disks are consistent on disk and unlocked before the
            // destination hears the state, which is when it opens them.
            self.vm.inactivate_disks().map_err(before)?;
        }
        let saved: SavedVm = self.vm.save().map_err(before)?;
        let state = serde_json::to_vec(&saved).map_err(|e| before(format!("encoding the VM state: {e}")))?;
        // The state and `go` leave in one write, `go` last: if that write fails, `go` did not
        // leave, and the destination cannot run the guest.
        self.write(&[RECORD_STATE]).and_then(|()| self.write(&(state.len() as u64).to_le_bytes())).map_err(before)?;
        self.write(&state).and_then(|()| self.write(&[RECORD_GO, u8::from(was_running)])).and_then(|()| self.flush()).map_err(before)?;
        // The point of no return: the destination may run the guest from here. A refusal says it
        // did not (and will not: its VMM exits); silence does not.
        match self.answer("building the VM and starting the guest") {
            Ok(()) => {}
            Err(Answer::Refused(e)) => return Err(Failure::Before(e)),
            Err(Answer::Silent(e)) => return Err(Failure::Unconfirmed(e)),
        }
        Ok(MigrateReply {
            downtime_us: paused_at.elapsed().as_micros() as u64,
            total_ms: self.started.elapsed().as_millis() as u64,
            transferred_bytes: self.sent,
            iterations: self.iterations,
        })
    }

    fn hello(&mut self) -> std::result::Result<(), String> {
        let hello = Hello {
            config: self.vm.config().clone(),
            cpu_features: self.vm.cpu_features().clone(),
            resources: self.vm.devices().resources().clone(),
            copied_disks: self
                .disks
                .iter()
                .map(|(id, d)| Ok(CopiedDisk { id: id.clone(), format: d.format()?, size: d.size()? }))
                .collect::<std::result::Result<_, String>>()?,
        };
        let body = serde_json::to_vec(&hello).map_err(|e| format!("encoding the hello: {e}"))?;
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&(body.len() as u64).to_le_bytes());
        self.write(&header)?;
        self.write(&body)?;
        self.flush()?;
        self.reply("checking the VM")
    }

    /// Waits until the destination has applied every record sent so far: what is still on its
    /// way when the guest pauses would lengthen the pause, and the time a round takes to arrive,
    /// not to leave, is the rate the remainder will go at.
    fn sync(&mut self) -> std::result::Result<(), String> {
        self.write(&[RECORD_SYNC])?;
        self.flush()?;
        self.reply("catching up")
    }

    /// The destination's answer to the last step: `Ok` or its error.
    fn reply(&mut self, step: &str) -> std::result::Result<(), String> {
        self.answer(step).map_err(|(Answer::Refused(e) | Answer::Silent(e))| e)
    }

    /// The destination's answer to the last step, telling a refusal from no answer at all.
    fn answer(&mut self, step: &str) -> std::result::Result<(), Answer> {
        let mut line = String::new();
        match self.replies.by_ref().take(64 << 10).read_line(&mut line) {
            Ok(0) => Err(Answer::Silent(format!("the destination closed the link while {step}"))),
            Ok(_) if !line.ends_with('\n') => Err(Answer::Silent(format!("the destination's answer while {step} was cut off"))),
            Ok(_) => decode_reply::<Done>(line.trim_end()).map(drop).map_err(|e| Answer::Refused(format!("the destination refused while {step}: {e}"))),
            Err(e) => Err(Answer::Silent(format!("waiting for the destination while {step}: {e}"))),
        }
    }

    /// The disks copied along: marks on, every part that may hold data, then the parts the
    /// guest changed meanwhile, in rounds until little is left (that goes later).
    fn copy_disks(&mut self) -> std::result::Result<(), String> {
        for (_, d) in &self.disks {
            d.start_mirror()?;
        }
        for i in 0..self.disks.len() {
            let disk = self.disks[i].1.clone();
            let size = disk.size()?;
            let mut off = 0;
            while off < size {
                if self.vm.migration().cancelled() {
                    return Err("cancelled".into());
                }
                let (len, zero) = disk.extent(off, (size - off).min(DISK_CHUNK))?;
                // The destination's fresh copy reads zeroes wherever nothing was written.
                if !zero {
                    self.send_disk_range(i, off, len, false)?;
                }
                off += len;
            }
        }
        for _ in 0..DISK_ROUNDS {
            if self.vm.migration().cancelled() {
                return Err("cancelled".into());
            }
            if self.disks.iter().map(|(_, d)| d.mirror_bytes()).sum::<u64>() <= DISK_SMALL {
                break;
            }
            self.send_disk_changes()?;
        }
        Ok(())
    }

    /// The parts of the copied disks changed since the last look.
    fn send_disk_changes(&mut self) -> std::result::Result<(), String> {
        for i in 0..self.disks.len() {
            for (off, len) in self.disks[i].1.take_mirror() {
                self.send_disk_range(i, off, len, true)?;
            }
        }
        Ok(())
    }

    /// Sends `len` bytes of disk `index` from `off`, a chunk at a time: chunks with data as
    /// `disk` records, chunks of zeroes as `disk zeros` records when `zeros_matter` (the copy
    /// may hold older data there) or not at all.
    fn send_disk_range(&mut self, index: usize, off: u64, len: u64, zeros_matter: bool) -> std::result::Result<(), String> {
        let disk = self.disks[index].1.clone();
        let mut buf = std::mem::take(&mut self.disk_buf);
        let mut at = off;
        let mut result = Ok(());
        while at < off + len && result.is_ok() {
            let n = (off + len - at).min(DISK_CHUNK);
            buf.resize(n as usize, 0);
            result = disk.read_at(&mut buf, at).and_then(|()| {
                let mut header = Vec::with_capacity(21);
                header.extend_from_slice(&(index as u32).to_le_bytes());
                header.extend_from_slice(&at.to_le_bytes());
                if !is_zero(&buf) {
                    header.extend_from_slice(&(n as u32).to_le_bytes());
                    self.write(&[RECORD_DISK]).and_then(|()| self.write(&header)).and_then(|()| self.write(&buf))
                } else if zeros_matter {
                    header.extend_from_slice(&n.to_le_bytes());
                    self.write(&[RECORD_DISK_ZEROS]).and_then(|()| self.write(&header))
                } else {
                    Ok(())
                }
            });
            let sent = self.sent;
            self.vm.migration().update(|i| i.transferred_bytes = sent);
            self.keep_to_bandwidth();
            at += n;
        }
        self.disk_buf = buf;
        result
    }

    /// The first full pass and the dirty rounds; returns the dirty pages left for the pause.
    fn precopy(&mut self) -> std::result::Result<Vec<Vec<u64>>, String> {
        let stop = AtomicBool::new(false);
        let vm = self.vm;
        std::thread::scope(|scope| {
            let throttle = Throttle::start(scope, vm, self.opts.auto_converge, &stop);
            self.rounds(&throttle)
        })
    }

    /// The first full pass, then dirty rounds until the remainder fits the downtime budget and
    /// no longer shrinks by a quarter a round.
    fn rounds(&mut self, throttle: &Throttle) -> std::result::Result<Vec<Vec<u64>>, String> {
        let tracker = self.vm.migration();
        let mut round_start = Instant::now();
        let mut round_sent = self.sent;
        self.iterations = 1;
        tracker.update(|i| i.iteration = 1);
        self.send_all()?;
        self.sync()?;
        let mut rate = 0u64;
        let mut slow_rounds = 0;
        let mut before = self.sent - round_sent;
        loop {
            if tracker.cancelled() {
                return Err("cancelled".into());
            }
            let dirty = memory::take_dirty(self.vm.vm_fd(), self.vm.memory()).map_err(|e| e.to_string())?;
            let elapsed = round_start.elapsed().max(Duration::from_micros(1));
            let bytes_this_round = self.sent - round_sent;
            // A round of a few pages says little about the link: keep the last good measure.
            if bytes_this_round >= SMALL_REMAINDER || rate == 0 {
                rate = (bytes_this_round as f64 / elapsed.as_secs_f64()) as u64;
            }
            let remaining = dirty::count(&dirty) * PAGE as u64;
            let expected = if rate == 0 { Duration::MAX } else { Duration::from_secs_f64(remaining as f64 / rate as f64) };
            tracker.update(|i| {
                i.transferred_bytes = self.sent;
                i.remaining_bytes = remaining;
                i.dirty_rate_bytes_per_s = (remaining as f64 / elapsed.as_secs_f64()) as u64;
                i.transfer_rate_bytes_per_s = rate;
                i.expected_downtime_ms = expected.as_millis().min(u128::from(u64::MAX)) as u64;
                i.elapsed_ms = self.started.elapsed().as_millis() as u64;
            });
            let shrinking = remaining * 4 <= before * SHRINKING_QUARTERS && self.iterations < MAX_ROUNDS;
            if remaining <= SMALL_REMAINDER || (expected <= self.opts.max_downtime && !shrinking) {
                return Ok(dirty);
            }
            before = remaining;
            // The guest dirtied more than half of what went out meanwhile: it outruns the link.
            if remaining * 2 > bytes_this_round {
                slow_rounds += 1;
                if slow_rounds >= 2 {
                    throttle.step_up();
                    slow_rounds = 0;
                }
            }
            round_start = Instant::now();
            round_sent = self.sent;
            self.iterations += 1;
            tracker.update(|i| i.iteration = self.iterations);
            self.send_dirty(&dirty)?;
            self.sync()?;
        }
    }

    /// Every page that may hold data (anonymous pages never touched cannot, and are not read).
    fn send_all(&mut self) -> std::result::Result<(), String> {
        let mem = self.vm.memory();
        let pagemap = PageMap::open().map_err(|e| e.to_string())?;
        let regions: Vec<(u64, u64, Option<*const u8>)> = mem
            .iter()
            .map(|r| {
                let host = mem.get_host_address(r.start_addr()).ok().map(|h| h.cast_const());
                (r.start_addr().0, r.len(), if r.file_offset().is_none() { host } else { None })
            })
            .collect();
        for (start, len, anonymous_at) in regions {
            let pages = (len as usize) / PAGE;
            let mut page = 0;
            while page < pages {
                let n = RUN.min(pages - page);
                let touched = match anonymous_at {
                    // SAFETY: only the address is formed (inside the region's mapping), never read.
                    Some(host) => pagemap.touched(unsafe { host.add(page * PAGE) }, n * PAGE).map_err(|e| e.to_string())?.iter().any(|&t| t),
                    None => true,
                };
                if touched {
                    self.send_pages(start + (page * PAGE) as u64, n, false)?;
                }
                page += n;
            }
        }
        Ok(())
    }

    /// The pages set in `dirty` (one bitmap per region, in order).
    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> std::result::Result<(), String> {
        let starts: Vec<u64> = self.vm.memory().iter().map(|r| r.start_addr().0).collect();
        for (start, bits) in starts.into_iter().zip(dirty) {
            for (first, count) in dirty::runs(bits, RUN) {
                self.send_pages(start + (first * PAGE) as u64, count, true)?;
            }
        }
        Ok(())
    }

    /// Sends `count` (at most [`RUN`]) pages from `gpa`: runs of pages with data as `pages`
    /// records, and runs of zero pages as `zeros` records when `zeros_matter` (the destination
    /// may hold older data there) or not at all.
    ///
    /// The pages are read where they are in guest RAM, while the guest may still write them: a
    /// page it writes after the dirty log was fetched is in the next fetch and goes again.
    fn send_pages(&mut self, gpa: u64, count: usize, zeros_matter: bool) -> std::result::Result<(), String> {
        let memory = self.vm.memory();
        let unreadable = |e: vm_memory::VolatileMemoryError| format!("reading guest memory at {gpa:#x}: {e}");
        let run = memory.get_slice(GuestAddress(gpa), count * PAGE).map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
        let page = |i: usize| run.subslice(i * PAGE, PAGE).map_err(unreadable);
        let mut at = 0;
        let mut zero = count > 0 && page_is_zero(&page(0)?);
        while at < count {
            let mut end = at + 1;
            while end < count && page_is_zero(&page(end)?) == zero {
                end += 1;
            }
            let addr = gpa + (at * PAGE) as u64;
            let n = (end - at) as u32;
            if !zero {
                self.record_header(RECORD_PAGES, addr, n)?;
                self.write_guest(&run.subslice(at * PAGE, (end - at) * PAGE).map_err(unreadable)?)?;
            } else if zeros_matter {
                self.record_header(RECORD_ZEROS, addr, n)?;
            }
            // The run ended at a page of the other kind (or at the end): each page is read once.
            at = end;
            zero = !zero;
        }
        let sent = self.sent;
        self.vm.migration().update(|i| i.transferred_bytes = sent);
        self.keep_to_bandwidth();
        Ok(())
    }

    fn record_header(&mut self, tag: u8, gpa: u64, pages: u32) -> std::result::Result<(), String> {
        let mut header = [0u8; 13];
        header[0] = tag;
        header[1..9].copy_from_slice(&gpa.to_le_bytes());
        header[9..13].copy_from_slice(&pages.to_le_bytes());
        self.write(&header)
    }

    /// Pages of guest RAM onto the link: a long run straight from guest RAM (the kernel copies it
    /// once, into the socket), a short one through the send buffer with the records around it.
    fn write_guest(&mut self, pages: &GuestSlice<'_>) -> std::result::Result<(), String> {
        if pages.len() < SEND_BUFFER {
            let mut buf = std::mem::take(&mut self.buf);
            let n = pages.copy_to(&mut buf[..pages.len()]);
            let written = self.write(&buf[..n]);
            self.buf = buf;
            return written;
        }
        self.flush()?;
        let mut link = self.out.get_ref().as_fd();
        link.write_all_volatile(pages).map_err(|e| format!("sending to the destination: {e}"))?;
        self.sent += pages.len() as u64;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        self.out.write_all(bytes).map_err(|e| format!("sending to the destination: {e}"))?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::result::Result<(), String> {
        self.out.flush().map_err(|e| format!("sending to the destination: {e}"))
    }

    /// Sleeps as long as the pre-copy is ahead of its bandwidth cap.
    fn keep_to_bandwidth(&self) {
        let (Some(limit), Some((since, sent_then))) = (self.opts.bandwidth, self.capped_since) else { return };
        let due = Duration::from_secs_f64((self.sent - sent_then) as f64 / limit.max(1) as f64);
        if let Some(ahead) = due.checked_sub(since.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

/// Auto-converge: a thread that holds the vCPUs out of the guest for a share of each period,
/// the share raised step by step while the guest outruns the link. Dropping it stops the
/// thread (the scope it was spawned in joins it).
struct Throttle<'a> {
    percent: &'a AtomicU32,
    enabled: bool,
    stop: &'a AtomicBool,
}

impl<'env> Throttle<'env> {
    fn start<'scope>(scope: &'scope std::thread::Scope<'scope, 'env>, vm: &'env VmControl, enabled: bool, stop: &'env AtomicBool) -> Throttle<'env> {
        let percent = &vm.migration().throttle;
        if enabled {
            scope.spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let p = percent.load(Ordering::Relaxed);
                    let hold = THROTTLE_PERIOD * p / 100;
                    if p > 0
                        && let Err(e) = vm.hold_vcpus(hold)
                    {
                        eprintln!("ferro: auto-converge: {e}");
                        return;
                    }
                    std::thread::sleep(THROTTLE_PERIOD - hold);
                }
            });
        }
        Throttle { percent, enabled, stop }
    }

    fn step_up(&self) {
        if self.enabled {
            let p = self.percent.load(Ordering::Relaxed);
            let next = if p == 0 { THROTTLE_FIRST } else { (p + THROTTLE_STEP).min(THROTTLE_MAX) };
            self.percent.store(next, Ordering::Relaxed);
        }
    }
}

impl Drop for Throttle<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The ids of the configuration's disks, in its order (the order of the VM's disk handles).
fn block_ids(config: &VmConfig) -> Vec<String> {
    config.devices.iter().filter(|d| matches!(d.kind, DeviceKind::Block { .. })).map(|d| d.id.clone()).collect()
}

/// The destination's disks that the stream fills, by their index in `copied`, with their sizes:
/// each must be a writable disk of the configuration whose image here has the source's format
/// and size.
fn copies(copied: &[CopiedDisk], block_ids: &[String], disks: Vec<BlockDisk>) -> Result<Vec<(BlockDisk, u64)>> {
    copied
        .iter()
        .map(|c| {
            let at = block_ids.iter().position(|id| *id == c.id);
            let disk = at.and_then(|at| disks.get(at)).filter(|d| !d.readonly()).ok_or_else(|| {
                Error::Config(format!("the source copies disk {:?}, which is no writable disk of this VM", c.id))
            })?;
            let (format, size) = (disk.format().map_err(Error::Config)?, disk.size().map_err(Error::Config)?);
            if format != c.format || size != c.size {
                return Err(Error::Config(format!(
                    "disk {} ({}): the copy here is {} of {size} bytes, the source's disk {} of {} bytes",
                    c.id,
                    disk.path().display(),
                    format.name(),
                    c.format.name(),
                    c.size
                )));
            }
            Ok((disk.clone(), size))
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// A stretch of guest RAM as the sender reads it.
type GuestSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::MS<'a, GuestMemoryMmap>>;

/// Whether a page of guest RAM (exactly [`PAGE`] bytes) holds only zeros, read a word at a time
/// as volatile loads (the guest may be writing it); a page with data usually says so at its
/// first word.
fn page_is_zero(page: &GuestSlice<'_>) -> bool {
    match page.get_array_ref::<u64>(0, PAGE / 8) {
        Ok(words) => (0..PAGE / 8).all(|i| words.load(i) == 0),
        Err(_) => false,
    }
}

/// The destination: a VM received on `spec` (see [`Link::accept`]), built and, when the source
/// ran it, running; wired to this host by `wiring` when given (see [`VmConfig::rewired`]).
/// The returned VM's vCPUs are in the state the source had them in: run it with
/// `RunOptions::paused` so `run` leaves them so.
pub fn receive(builder: VmBuilder, spec: &str, wiring: Option<&VmConfig>) -> Result<Vm> {
    let link = Link::accept(spec).map_err(Error::Config)?;
    let replies = link.try_clone().map_err(Error::Config)?;
    let mut receiver = Receiver { input: BufReader::with_capacity(1 << 20, link), replies, may_have_run: false };
    let received = receiver.receive(builder, wiring);
    if let Err(e) = &received
        && !receiver.may_have_run
    {
        // Tell the source why, so it resumes the guest at once; it may be gone already.
        receiver.answer(Err(e.to_string()));
    }
    received
}

struct Receiver {
    input: BufReader<Link>,
    replies: Link,
    /// The guest may have run here: from then on a failure is not answered.
    may_have_run: bool,
}

impl Receiver {
    fn answer(&mut self, result: std::result::Result<(), String>) {
        let _ = writeln!(self.replies, "{}", encode_reply(&result.map(|()| Done {})));
    }

    fn receive(&mut self, builder: VmBuilder, wiring: Option<&VmConfig>) -> Result<Vm> {
        let hello = self.hello()?;
        let copied: Vec<&str> = hello.copied_disks.iter().map(|c| c.id.as_str()).collect();
        let config = match wiring {
            Some(given) => hello.config.rewired_with_disks(given, &copied).map_err(|e| Error::Config(format!("the incoming VM: {e}")))?,
            None => hello.config,
        };
        let block_ids = block_ids(&config);
        // Everything but the state is built now, while the guest still runs on the source.
        let mem = memory::create(&config.memory, memory::Source::Fresh)?;
        // Shared writable disks stay closed (the source holds them) until the state has come;
        // copies are this host's own files, written from the start.
        let opening = if hello.copied_disks.is_empty() { DiskOpening::Later } else { DiskOpening::Now };
        let unrestored = builder.prepare_restore(config, hello.cpu_features, hello.resources, mem, opening)?;
        let copies = copies(&hello.copied_disks, &block_ids, unrestored.disks())?;
        self.answer(Ok(()));
        let saved = self.memory(unrestored.memory(), &copies)?;
        // `go` follows the state at once: whether the guest runs once it is built.
        let mut go = [0u8; 2];
        self.input.read_exact(&mut go).map_err(|e| Error::Config(format!("the source did not say go: {e}")))?;
        if go[0] != RECORD_GO || go[1] > 1 {
            return Err(Error::Config(format!("the source sent record {} where go was due", go[0])));
        }
        // The copies are durable before the source hears the VM is built: it may stop then.
        for (disk, _) in &copies {
            disk.flush().map_err(Error::Config)?;
        }
        let vm = unrestored.restore(saved)?;
        // The source let go of the writable disks before it sent the state: open them now, so
        // that the source hears of any trouble before the guest runs anywhere, and takes them back.
        vm.control().activate_disks(ACTIVATE_WAIT).map_err(|e| Error::Config(format!("opening the disks the source handed over: {e}")))?;
        if go[1] == 1 {
            // A resume that fails half way may have let a vCPU run: no refusal goes out then
            // (the source must not resume on it), only silence.
            self.may_have_run = true;
            vm.control().resume().map_err(Error::Internal)?;
        }
        self.answer(Ok(()));
        Ok(vm)
    }

    fn hello(&mut self) -> Result<Hello> {
        let mut header = [0u8; 24];
        self.input.read_exact(&mut header).map_err(|e| Error::Config(format!("reading the migration header: {e}")))?;
        if header[..8] != MAGIC {
            return Err(Error::Config("the source did not send a Ferrovisor migration stream (bad magic)".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Error::Config(format!("the source speaks migration protocol version {version}, this VMM version {VERSION}")));
        }
        let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if len > MAX_HELLO {
            return Err(Error::Config(format!("the migration hello claims {len} bytes (at most {MAX_HELLO})")));
        }
        let body = self.read_vec(len, "the migration hello")?;
        serde_json::from_slice(&body).map_err(|e| Error::Config(format!("the migration hello: {e}")))
    }

    fn read_vec(&mut self, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut body = vec![0u8; len as usize];
        self.input.read_exact(&mut body).map_err(|e| Error::Config(format!("reading {what}: {e}")))?;
        Ok(body)
    }

    /// A `pages` record's data, `bytes` of it, into guest memory at `gpa` (checked to lie in
    /// it): what the input buffer holds already, then the rest straight from the link, so the
    /// pages are copied once on their way in.
    fn read_pages(&mut self, mem: &GuestMemoryMmap, gpa: u64, bytes: usize) -> Result<()> {
        let failed = |e: &dyn std::fmt::Display| Error::Config(format!("reading the migration stream: {e}"));
        let buffered = self.input.buffer();
        let n = buffered.len().min(bytes);
        mem.write_slice(&buffered[..n], GuestAddress(gpa)).map_err(|e| failed(&e))?;
        self.input.consume(n);
        // The input buffer is empty now, so reading past it keeps the stream in order.
        let mut fd = self.input.get_ref().as_fd();
        let mut done = n;
        while done < bytes {
            match mem.read_volatile_from(GuestAddress(gpa + done as u64), &mut fd, bytes - done) {
                Ok(0) => return Err(failed(&"the source closed the link inside a record")),
                Ok(read) => done += read,
                Err(e) => return Err(failed(&e)),
            }
        }
        Ok(())
    }

    /// Memory records into `mem`, disk records into `copies`, until the state record, which
    /// it returns.
    fn memory(&mut self, mem: &GuestMemoryMmap, copies: &[(BlockDisk, u64)]) -> Result<SavedVm> {
        let mut chunk = Vec::new();
        let zeros = vec![0u8; MAX_RUN as usize * PAGE];
        loop {
            let mut tag = [0u8; 1];
            self.input.read_exact(&mut tag).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
            match tag[0] {
                RECORD_PAGES | RECORD_ZEROS => {
                    let mut header = [0u8; 12];
                    self.input.read_exact(&mut header).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                    let gpa = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
                    let pages = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
                    if pages == 0 || pages > MAX_RUN || gpa % PAGE as u64 != 0 {
                        return Err(Error::Config(format!("migration record at {gpa:#x} with {pages} pages: not page aligned or not 1 to {MAX_RUN} pages")));
                    }
                    let bytes = pages as usize * PAGE;
                    let outside = |e| Error::Config(format!("migration record at {gpa:#x} with {pages} pages is outside guest RAM: {e}"));
                    if !mem.check_range(GuestAddress(gpa), bytes) {
                        return Err(outside(vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa))));
                    }
                    if tag[0] == RECORD_PAGES {
                        self.read_pages(mem, gpa, bytes)?;
                    } else {
                        mem.write_slice(&zeros[..bytes], GuestAddress(gpa)).map_err(outside)?;
                    }
                }
                RECORD_DISK | RECORD_DISK_ZEROS => {
                    let mut header = [0u8; 12];
                    self.input.read_exact(&mut header).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                    let index = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
                    let off = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
                    let len = if tag[0] == RECORD_DISK {
                        let mut len = [0u8; 4];
                        self.input.read_exact(&mut len).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                        let len = u32::from_le_bytes(len);
                        if len == 0 || len > MAX_DISK_CHUNK {
                            return Err(Error::Config(format!("disk record of {len} bytes: 1 to {MAX_DISK_CHUNK} bytes allowed")));
                        }
                        u64::from(len)
                    } else {
                        let mut len = [0u8; 8];
                        self.input.read_exact(&mut len).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                        u64::from_le_bytes(len)
                    };
                    let Some((disk, size)) = copies.get(index) else {
                        return Err(Error::Config(format!("disk record for disk {index}: the source announced {} copied disks", copies.len())));
                    };
                    if len == 0 || off.checked_add(len).is_none_or(|end| end > *size) {
                        return Err(Error::Config(format!("disk record for disk {index} at {off} of {len} bytes: outside its {size} bytes")));
                    }
                    let written = if tag[0] == RECORD_DISK {
                        chunk.resize(len as usize, 0);
                        self.input.read_exact(&mut chunk).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                        disk.write_at(&chunk, off)
                    } else {
                        disk.write_zeroes(off, len)
                    };
                    written.map_err(|e| Error::Config(format!("writing the disk copy: {e}")))?;
                }
                RECORD_STATE => {
                    let mut len = [0u8; 8];
                    self.input.read_exact(&mut len).map_err(|e| Error::Config(format!("reading the migration stream: {e}")))?;
                    let len = u64::from_le_bytes(len);
                    if len > MAX_STATE {
                        return Err(Error::Config(format!("the migrated VM state claims {len} bytes (at most {MAX_STATE})")));
                    }
                    let body = self.read_vec(len, "the migrated VM state")?;
                    return serde_json::from_slice(&body).map_err(|e| Error::Config(format!("the migrated VM state: {e}")));
                }
                RECORD_SYNC => self.answer(Ok(())),
                other => return Err(Error::Config(format!("unknown migration record {other}"))),
            }
        }
    }
}
