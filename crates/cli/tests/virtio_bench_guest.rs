//! The `virtio_bench` guest (guests/src/virtio_bench.c) that ferro-bench times beside QEMU,
//! checked for correctness with small counts: its reads find the bytes the host put in the
//! image, its writes land at the offsets its sequential and random patterns promise (recomputed
//! here, also across rounds and inside a span), a read of the wrong data is reported as an
//! error, and the frames it transmits come out of a tap, every sequence number once, as a raw
//! socket on the host side sees them.

use ferro_test_support::TempDir;
use ferro_test_support::net::{Netns, read_frames};
use ferro_test_support::vm::ferro_command;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const IMAGE: u64 = 1 << 20;
const ETHERTYPE: u16 = 0x88b5;

/// Runs the bench guest with `devices` and `cmdline` through `ferro` (a `ferro_command()`, or
/// one inside a namespace); returns (exit code, console output).
fn bench_guest(mut ferro: Command, devices: &[&str], cmdline: &str) -> (Option<i32>, String) {
    ferro.args(["run", "--guest", "virtio_bench", "--memory", "64M", "--cmdline", cmdline]).args(devices);
    let o = ferro.output().expect("run ferro");
    (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// Asserts the guest passed with `count` requests and no errors.
fn assert_passed((code, out): &(Option<i32>, String), count: u64) {
    assert_eq!(*code, Some(1), "the bench guest passes through debug-exit 0: {out}");
    assert!(out.contains(&format!(" count {count} ")) && out.contains(" errors 0\n"), "{out}");
}

/// A raw image in a scratch directory of its own.
struct Image {
    path: PathBuf,
    _dir: TempDir,
}

impl Image {
    /// `fill(offset of a 512-byte sector)` gives the first 8 bytes of each sector; zeros after.
    fn new(name: &str, fill: impl Fn(u64) -> u64) -> Image {
        let dir = TempDir::new(&format!("vbench-{name}"));
        let path = dir.join("disk.img");
        let mut bytes = vec![0u8; IMAGE as usize];
        for (i, sector) in bytes.chunks_mut(512).enumerate() {
            sector[..8].copy_from_slice(&fill(i as u64 * 512).to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        Image { path, _dir: dir }
    }

    fn disk(&self, transport: &str) -> Vec<String> {
        vec!["--transport".into(), transport.into(), "--disk".into(), format!("path={}", self.path.display())]
    }

    /// The first 8 bytes of each `size`-byte block.
    fn stamps(&self, size: u64) -> Vec<u64> {
        let bytes = std::fs::read(&self.path).unwrap();
        bytes.chunks(size as usize).map(|b| u64::from_le_bytes(b[..8].try_into().unwrap())).collect()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn reads_find_what_the_host_wrote_on_both_transports() {
    let image = Image::new("read", |off| off);
    for transport in ["pci", "mmio"] {
        for (size, count, random) in [(4096, 100, 1), (512, 40, 0), (256 << 10, 9, 0)] {
            let cmdline = format!("bench.op=read bench.size={size} bench.count={count} bench.random={random} bench.verify=1");
            let r = bench_guest(ferro_command(), &strs(&image.disk(transport)), &cmdline);
            assert_passed(&r, count);
        }
    }
}

#[test]
fn a_read_of_the_wrong_data_fails_the_run() {
    let image = Image::new("wrong", |off| off + 1);
    let (code, out) = bench_guest(ferro_command(), &strs(&image.disk("pci")), "bench.op=read bench.size=4096 bench.count=20 bench.verify=1");
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains(" errors 20\n"), "{out}");
}

#[test]
fn sequential_writes_land_in_order_and_wrap() {
    let image = Image::new("seq", |_| u64::MAX);
    // 300 requests of 4 KiB over a 256-block disk: blocks 0..255, then 0..43 again.
    let r = bench_guest(ferro_command(), &strs(&image.disk("pci")), "bench.op=write bench.size=4096 bench.count=300 bench.depth=7");
    assert_passed(&r, 300);
    let stamps = image.stamps(4096);
    assert!(stamps.iter().enumerate().all(|(i, &s)| s == i as u64 * 4096), "every block holds its offset");
}

#[test]
fn random_writes_land_where_the_guest_generator_says() {
    let image = Image::new("rand", |_| u64::MAX);
    let count = 50;
    let r = bench_guest(ferro_command(), &strs(&image.disk("pci")), &format!("bench.op=write bench.size=4096 bench.count={count} bench.random=1"));
    assert_passed(&r, count);
    // The guest's generator (and ferro-bench's host loop): a 64-bit LCG, block = (state >> 24)
    // masked to the largest power of two of blocks.
    let mut expect = vec![u64::MAX; (IMAGE / 4096) as usize];
    let mut state: u64 = 0x243f_6a88_85a3_08d3;
    for _ in 0..count {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let block = (state >> 24) & 255;
        expect[block as usize] = block * 4096;
    }
    assert!(expect.iter().filter(|&&s| s != u64::MAX).count() > 30, "the offsets spread");
    assert_eq!(image.stamps(4096), expect);
}

#[test]
fn rounds_go_on_where_the_last_stopped_and_stay_in_the_span() {
    let image = Image::new("rounds", |_| u64::MAX);
    // Three rounds of 20 random 4 KiB writes in the first 128 KiB (32 blocks): 60 steps of one
    // generator, a line after each round but the last (ferro-bench backup-running reads them).
    let cmdline = "bench.op=write bench.size=4096 bench.count=20 bench.random=1 bench.span=131072 bench.rounds=3";
    let r = bench_guest(ferro_command(), &strs(&image.disk("pci")), cmdline);
    assert_passed(&r, 20);
    for round in [1, 2] {
        assert!(r.1.contains(&format!("bench: round {round} cycles ")), "round {round} reported: {}", r.1);
    }
    assert!(!r.1.contains("bench: round 3"), "the last round ends with the summary line: {}", r.1);
    let mut state: u64 = 0x243f_6a88_85a3_08d3;
    let mut steps = |n: usize, expect: &mut Vec<u64>| {
        for _ in 0..n {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let block = (state >> 24) & 31;
            expect[block as usize] = block * 4096;
        }
    };
    let mut first_round = vec![u64::MAX; (IMAGE / 4096) as usize];
    steps(20, &mut first_round);
    let mut expect = first_round.clone();
    steps(40, &mut expect);
    assert_ne!(expect, first_round, "the later rounds write blocks the first did not");
    assert_eq!(image.stamps(4096), expect, "every write in the first 128 KiB, the generator going on across rounds");
}

#[test]
fn transmitted_frames_come_out_of_the_tap_each_once() {
    let ns = Netns::with_tap("vbench", "vbtap0", None);
    let sock = ns.packet_socket("vbtap0", ETHERTYPE);
    let mac = [0x52, 0x54, 0, 0xbe, 0x4c, 0x01];
    for (size, count) in [(64usize, 100u64), (1514, 60)] {
        let cmdline = format!("bench.op=tx bench.size={size} bench.count={count} bench.depth=5");
        let mut ferro = ns.command(ferro_test_support::ferro_bin());
        ferro.stdin(Stdio::null());
        let r = bench_guest(ferro, &["--net", "tap=vbtap0,mac=52:54:00:be:4c:01"], &cmdline);
        assert_passed(&r, count);
        let mut seen = vec![0u32; count as usize];
        for buf in read_frames(&sock) {
            assert_eq!(buf.len(), size, "frame length");
            assert_eq!(&buf[..6], &[0xff; 6], "broadcast");
            assert_eq!(buf[6..12], mac, "from the device's MAC");
            assert_eq!(buf[12..14], ETHERTYPE.to_be_bytes());
            let seq = u64::from_le_bytes(buf[14..22].try_into().unwrap());
            seen[seq as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 1), "{size}-byte frames seen per sequence number: {seen:?}");
    }
}
