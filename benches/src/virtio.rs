//! `ferro-bench virtio [reps]`: virtio-blk and virtio-net throughput under `ferro run` and QEMU,
//! with the same guest file (`virtio_bench`), the same devices on virtio-pci, in the same run,
//! beside what the host itself reaches on the same file or tap.
//!
//! - The VMMs: `ferro run` (virtio-pci, the default), and QEMU `-M q35` (SeaBIOS assigns the BARs)
//!   with `virtio-blk-pci` / `virtio-net-pci`, `disable-legacy=on`; both 1 vCPU, 64 MiB.
//!   QEMU's disk is `cache=writeback,aio=threads` (its defaults; like ours, through the page
//!   cache); its NIC a userspace tap backend (`vhost=off`; there is no /dev/vhost-net here).
//! - Block: a 256 MiB raw image with data in every sector, on tmpfs (/dev/shm) and on disk
//!   (`FERRO_BENCH_DISK_DIR`, default /var/tmp). Before every run the image is written back and
//!   its page cache dropped (fdatasync + POSIX_FADV_DONTNEED), so reads from the disk file start
//!   cold. Writes end with a FLUSH (guest) or fdatasync (host) inside the timed part. The host
//!   baseline is one thread doing buffered pread/pwrite (no O_DIRECT) of the same offsets.
//! - Net: the guest transmits frames (broadcast, ethertype 0x88b5) into a tap in a network
//!   namespace the bench creates and deletes; an AF_PACKET socket bound to that ethertype on the
//!   tap counts them (PACKET_STATISTICS, so no reader competes for the CPU). The host baseline
//!   writes the same frames (with the same 12-byte virtio-net header) into the tap's fd.
//! - Time: the guest reports TSC cycles from its first request to its last completion; guest
//!   TSC = host TSC on this KVM (no scaling), and the host measures the TSC frequency.

use crate::common::{QEMU_CPU, median, qemu_bin};
use ferro_test_support::net::Netns;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_SIZE: u64 = 256 << 20;
const MEMORY_MIB: u64 = 64;
const ETHERTYPE: u16 = 0x88b5;
const VNET_HDR: usize = 12;
const TAP: &str = "fbtap0";
/// The guest's random offsets: request index = (state >> 24) & mask after each LCG step.
const LCG_SEED: u64 = 0x243f_6a88_85a3_08d3;
const LCG_MUL: u64 = 6_364_136_223_846_793_005;
const LCG_ADD: u64 = 1_442_695_040_888_963_407;

#[derive(Clone, Copy)]
enum Vmm {
    Ferro,
    Qemu,
}

/// One measured workload.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    op: &'static str,
    size: u64,
    count: u64,
    random: bool,
}

impl Workload {
    fn cmdline(&self) -> String {
        format!("bench.op={} bench.size={} bench.count={} bench.random={}", self.op, self.size, self.count, u8::from(self.random))
    }
}

const BLOCK: [Workload; 4] = [
    Workload { name: "seq 1M read", op: "read", size: 1 << 20, count: 256, random: false },
    Workload { name: "seq 1M write", op: "write", size: 1 << 20, count: 256, random: false },
    Workload { name: "rand 4K read", op: "read", size: 4096, count: 20_000, random: true },
    Workload { name: "rand 4K write", op: "write", size: 4096, count: 20_000, random: true },
];

const NET: [Workload; 2] = [
    Workload { name: "tx 64B frames", op: "tx", size: 64, count: 50_000, random: false },
    Workload { name: "tx 1514B frames", op: "tx", size: 1514, count: 50_000, random: false },
];

fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; it has no memory effects.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// TSC ticks per second, against CLOCK_MONOTONIC over half a second.
fn tsc_hz() -> f64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(500));
    let (c1, t1) = (rdtsc(), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn ferro_command(ferro: &Path, guest: &Path, device: &[String], cmdline: &str) -> Command {
    let mut c = Command::new(ferro);
    c.args(["run", "--memory", &format!("{MEMORY_MIB}M"), "--debug-exit", "--kernel"]).arg(guest).args(device).args(["--cmdline", cmdline]);
    c
}

fn qemu_command(qemu: &Path, guest: &Path, device: &[String], cmdline: &str) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-accel", "kvm", "-M", "q35", "-cpu", QEMU_CPU, "-m", &MEMORY_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(device)
        .args(["-append", cmdline, "-kernel"])
        .arg(guest);
    c
}

/// Runs a VMM with the bench guest (inside `netns` if given); returns the guest's TSC cycles.
fn run_guest(vmm: Vmm, ctx: &Ctx, devices: (&[String], &[String]), w: &Workload, netns: Option<&Netns>) -> u64 {
    let cmdline = w.cmdline();
    let inner = match vmm {
        Vmm::Ferro => ferro_command(&ctx.ferro, &ctx.guest, devices.0, &cmdline),
        Vmm::Qemu => qemu_command(&ctx.qemu, &ctx.guest, devices.1, &cmdline),
    };
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = ns.command(inner.get_program());
            c.args(inner.get_args());
            c
        }
        None => inner,
    };
    let o = cmd.stdin(Stdio::null()).output().expect("run the VMM");
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("bench: ") && l.contains(" cycles "));
    let field = |key: &str| -> Option<u64> {
        let rest = &line?[line?.find(&format!(" {key} "))? + key.len() + 2..];
        rest.split_whitespace().next()?.parse().ok()
    };
    match (o.status.code(), field("cycles"), field("errors")) {
        (Some(1), Some(cycles), Some(0)) => cycles,
        _ => panic!("{cmd:?} failed ({}):\n{out}{}", o.status, String::from_utf8_lossy(&o.stderr)),
    }
}

struct Ctx {
    ferro: PathBuf,
    qemu: PathBuf,
    guest: PathBuf,
    tsc_hz: f64,
    reps: usize,
    /// Divides every count (FERRO_BENCH_SHRINK, for a quick check that the section works).
    shrink: u64,
}

impl Ctx {
    fn shrunk(&self, w: &Workload) -> Workload {
        Workload { count: (w.count / self.shrink).max(1), ..*w }
    }
}

/// The rates of ferro, qemu and the host for one row (one sample per run), in units/s.
struct Row {
    ferro: Vec<f64>,
    qemu: Vec<f64>,
    host: Vec<f64>,
}

impl Row {
    fn scaled(&self, k: f64) -> Row {
        let s = |v: &[f64]| v.iter().map(|x| x * k).collect();
        Row { ferro: s(&self.ferro), qemu: s(&self.qemu), host: s(&self.host) }
    }
}

/// Prints one row of medians, their ratios, the time per request and the spread of the runs;
/// `requests_per_unit` turns a rate into requests per second.
fn print_row(label: &str, unit: &str, requests_per_unit: f64, r: &Row) {
    let (f, q, h) = (median(r.ferro.clone()), median(r.qemu.clone()), median(r.host.clone()));
    let per_req = |rate: f64| 1e6 / (rate * requests_per_unit);
    let range = |v: &[f64]| format!("{:.1}-{:.1}", v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
    println!(
        "  {label:<27} ferro {f:8.1} {unit}  qemu {q:8.1} {unit}  ferro/qemu {:5.2}  host {h:8.1} {unit}  ferro/host {:5.2}  qemu/host {:5.2}",
        f / q, f / h, q / h
    );
    println!(
        "  {:<27} us per request: ferro {:.1}, qemu {:.1}, host {:.1}; runs: ferro {}, qemu {}, host {}",
        "", per_req(f), per_req(q), per_req(h), range(&r.ferro), range(&r.qemu), range(&r.host)
    );
}

// ---------------------------------------------------------------------------------------------
// Block

/// A backing image, removed when dropped.
struct Image(PathBuf);

impl Image {
    /// A raw image whose every 512-byte sector starts with its byte offset (what the guest's
    /// verify mode checks), the rest of the sector a fill byte.
    fn create(path: PathBuf) -> Image {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut chunk = vec![0x5au8; 1 << 20];
        for base in (0..IMAGE_SIZE).step_by(chunk.len()) {
            for (i, sector) in chunk.chunks_mut(512).enumerate() {
                sector[..8].copy_from_slice(&(base + i as u64 * 512).to_le_bytes());
            }
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        Image(path)
    }

    /// Writes dirty pages back and drops the image's page cache (no effect on tmpfs, where the
    /// cache is the storage).
    fn settle(&self) {
        let f = std::fs::File::open(&self.0).unwrap();
        f.sync_data().unwrap();
        // SAFETY: posix_fadvise only takes integers; the fd is open for the call.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The host doing the guest's requests itself: one thread, buffered pread/pwrite of the same
/// offsets, fdatasync at the end of writes. Returns seconds.
fn host_block(path: &Path, w: &Workload) -> f64 {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut buf = vec![0x5au8; w.size as usize];
    let blocks = IMAGE_SIZE / w.size;
    let mask = (1u64 << (63 - blocks.leading_zeros())) - 1;
    let (mut rng, mut next) = (LCG_SEED, 0u64);
    let t = Instant::now();
    for _ in 0..w.count {
        let off = if w.random {
            rng = rng.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            ((rng >> 24) & mask) * w.size
        } else {
            let off = next;
            next = if off + w.size >= blocks * w.size { 0 } else { off + w.size };
            off
        };
        if w.op == "write" {
            buf[..8].copy_from_slice(&off.to_le_bytes());
            f.write_all_at(&buf, off).unwrap();
        } else {
            f.read_exact_at(&mut buf, off).unwrap();
        }
    }
    if w.op == "write" {
        f.sync_data().unwrap();
    }
    t.elapsed().as_secs_f64()
}

fn bench_block(ctx: &Ctx, place: &str, dir: &Path) {
    let image = Image::create(dir.join(format!("ferro-bench-{}.img", std::process::id())));
    let path = image.0.display().to_string();
    let ours = vec!["--disk".to_owned(), format!("path={path},format=raw")];
    let qemu = vec![
        "-drive".to_owned(),
        format!("id=d0,file={path},format=raw,if=none,cache=writeback,aio=threads"),
        "-device".to_owned(),
        "virtio-blk-pci,drive=d0,disable-legacy=on".to_owned(),
    ];
    for w in &BLOCK.map(|w| ctx.shrunk(&w)) {
        let bytes = (w.count * w.size) as f64;
        let (mut f, mut q, mut h) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ctx.reps {
            image.settle();
            f.push(bytes / (run_guest(Vmm::Ferro, ctx, (&ours, &qemu), w, None) as f64 / ctx.tsc_hz));
            image.settle();
            q.push(bytes / (run_guest(Vmm::Qemu, ctx, (&ours, &qemu), w, None) as f64 / ctx.tsc_hz));
            image.settle();
            h.push(bytes / host_block(&image.0, w));
        }
        let mib = (1u64 << 20) as f64;
        let row = Row { ferro: f, qemu: q, host: h }.scaled(1.0 / mib);
        print_row(&format!("blk {place} {}", w.name), "MiB/s", mib / w.size as f64, &row);
    }
}

// ---------------------------------------------------------------------------------------------
// Net

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

/// Frames the socket saw since the last call (delivered and dropped for a full buffer alike).
fn frames_seen(sock: &OwnedFd) -> u64 {
    let mut st = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
    let mut len = size_of::<libc::tpacket_stats>() as u32;
    // SAFETY: PACKET_STATISTICS fills a tpacket_stats of the given length.
    let r = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_STATISTICS, (&raw mut st).cast(), &mut len) };
    assert_eq!(r, 0, "PACKET_STATISTICS");
    u64::from(st.tp_packets)
}

/// Opens the tap with the header the VMMs use (call inside the netns).
fn open_tap() -> std::fs::File {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut req = ifreq(TAP);
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let hdr = VNET_HDR as libc::c_int;
    // SAFETY: TUNSETIFF and TUNSETVNETHDRSZ read/write the argument, which lives for the call.
    unsafe {
        assert!(libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        assert!(libc::ioctl(f.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) >= 0, "TUNSETVNETHDRSZ");
    }
    f
}

/// The host writing the guest's frames into the tap: one write per frame. Returns seconds.
fn host_tx(tap: &std::fs::File, w: &Workload) -> f64 {
    let mut frame = vec![0u8; VNET_HDR + w.size as usize];
    frame[VNET_HDR..VNET_HDR + 6].fill(0xff);
    frame[VNET_HDR + 6..VNET_HDR + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[VNET_HDR + 12..VNET_HDR + 14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let t = Instant::now();
    for seq in 0..w.count {
        frame[VNET_HDR + 14..VNET_HDR + 22].copy_from_slice(&seq.to_le_bytes());
        let mut tap = tap;
        tap.write_all(&frame).expect("write to the tap");
    }
    t.elapsed().as_secs_f64()
}

fn bench_net(ctx: &Ctx) {
    let ns = Netns::with_tap("bench", TAP, None);
    // Only counted (PACKET_STATISTICS), never read, so no reader competes for the CPU.
    let sock = ns.packet_socket(TAP, ETHERTYPE);
    let ours = vec!["--net".to_owned(), format!("tap={TAP}")];
    let qemu = vec![
        "-netdev".to_owned(),
        format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
        "-device".to_owned(),
        "virtio-net-pci,netdev=n0,disable-legacy=on".to_owned(),
    ];
    for w in &NET.map(|w| ctx.shrunk(&w)) {
        let (mut f, mut q, mut h) = (Vec::new(), Vec::new(), Vec::new());
        let mut lost = [0u64; 3];
        // Frames per second counted on the host side of the tap.
        let mut rate = |secs: f64, which: usize, out: &mut Vec<f64>| {
            let seen = frames_seen(&sock);
            lost[which] += w.count.saturating_sub(seen);
            out.push(seen as f64 / secs);
        };
        frames_seen(&sock);
        for _ in 0..ctx.reps {
            let secs = run_guest(Vmm::Ferro, ctx, (&ours, &qemu), w, Some(&ns)) as f64 / ctx.tsc_hz;
            rate(secs, 0, &mut f);
            let secs = run_guest(Vmm::Qemu, ctx, (&ours, &qemu), w, Some(&ns)) as f64 / ctx.tsc_hz;
            rate(secs, 1, &mut q);
            let tap = ns.enter(open_tap);
            let secs = host_tx(&tap, w);
            drop(tap);
            rate(secs, 2, &mut h);
        }
        let pps = Row { ferro: f, qemu: q, host: h };
        print_row(&format!("net {} (kpps)", w.name), "k/s  ", 1e3, &pps.scaled(1e-3));
        let mib = (1u64 << 20) as f64;
        print_row(&format!("net {} (MiB/s)", w.name), "MiB/s", mib / w.size as f64, &pps.scaled(w.size as f64 / mib));
        if lost.iter().any(|&l| l > 0) {
            println!("  ({} frames not seen on the tap: ferro {}, qemu {}, host {})", w.name, lost[0], lost[1], lost[2]);
        }
    }
}

pub fn run(ferro: &Path, reps: usize, scratch: &Path) {
    let guest = scratch.join("virtio_bench.elf");
    std::fs::write(&guest, ferro_guests::get("virtio_bench").expect("the virtio_bench guest")).unwrap();
    let shrink = std::env::var("FERRO_BENCH_SHRINK").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let Some(qemu) = qemu_bin() else {
        println!("== virtio throughput: no QEMU peer (see scripts/qemu-peer.sh); nothing measured");
        return;
    };
    let ctx = Ctx { ferro: ferro.to_owned(), qemu, guest, tsc_hz: tsc_hz(), reps, shrink };
    println!("== virtio throughput, virtio_bench guest on virtio-pci, {reps} runs each, medians (TSC {:.0} MHz)", ctx.tsc_hz / 1e6);
    println!("  ferro run --disk/--net    vs  qemu -M q35 virtio-*-pci,disable-legacy=on (cache=writeback,aio=threads; tap vhost=off)");
    println!("  guest: depth 16 (indirect descriptors), polled completions, no interrupts; host: one thread, buffered pread/pwrite, write(2) per frame");
    let disk_dir = std::env::var_os("FERRO_BENCH_DISK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    bench_block(&ctx, "tmpfs", Path::new("/dev/shm"));
    bench_block(&ctx, "disk", &disk_dir);
    bench_net(&ctx);
}
