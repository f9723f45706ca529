//! `ferro-bench`: Ferrovisor's numbers beside a peer measured in the same run.
//!
//! - launch: process start -> first guest output -> exit, and peak RSS, for `ferro run` and
//!   QEMU `-M microvm` booting the same PVH test guest (128 MiB).
//! - first instruction: process start -> first guest output, against the raw-ioctl floor
//!   (`boottime` from ../shared/reference/pvm, C, no VMM at all).
//! - exits: the cost of one PIO and one MMIO exit round trip, against the same floor harness.
//! - `ferro-bench virtio [runs]` (a separate section, default 3 runs): virtio-blk and virtio-net
//!   throughput beside QEMU and the host itself (see `virtio.rs`).
//!
//! Run on an idle machine: `cargo build --release -p ferro-cli -p ferro-bench &&
//! target/release/ferro-bench [runs]`. Numbers are medians; ratios are ours / peer.

mod virtio;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Launch {
    first_output_ms: f64,
    exit_ms: f64,
    max_rss_kib: i64,
}

/// Spawns `cmd`, timing the first byte on stdout and the exit; peak RSS from wait4.
#[allow(clippy::zombie_processes)] // reaped with wait4 (for its rusage), which clippy cannot see
fn launch(cmd: &mut Command, expect_status: i32) -> Launch {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    let first = match out.read(&mut byte) {
        Ok(1) => start.elapsed(),
        _ => panic!("{cmd:?} printed nothing"),
    };
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for the child we spawned, with valid out pointers.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let exit = start.elapsed();
    let code = libc::WEXITSTATUS(status);
    assert_eq!(code, expect_status, "{cmd:?} exited {code}");
    Launch { first_output_ms: first.as_secs_f64() * 1e3, exit_ms: exit.as_secs_f64() * 1e3, max_rss_kib: usage.ru_maxrss }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn summarize(name: &str, runs: &[Launch]) -> (f64, f64, f64) {
    let first = median(runs.iter().map(|r| r.first_output_ms).collect());
    let exit = median(runs.iter().map(|r| r.exit_ms).collect());
    let rss = median(runs.iter().map(|r| r.max_rss_kib as f64 / 1024.0).collect());
    println!("  {name:<28} first output {first:7.2} ms   exit {exit:7.2} ms   peak RSS {rss:6.1} MiB");
    (first, exit, rss)
}

/// $FERRO_BIN, or the `ferro` built beside this binary.
fn ferro_bin() -> PathBuf {
    std::env::var_os("FERRO_BIN").map(PathBuf::from).unwrap_or_else(ferro_test_support::ferro_bin)
}

/// Builds the reference C harness into a scratch directory; None when it cannot.
fn build_floor(scratch: &Path) -> Option<PathBuf> {
    let reference = std::env::var_os("FERRO_PVM_REF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/pvm")));
    let ok = Command::new("sh")
        .arg(reference.join("build.sh"))
        .env("OUT", scratch)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok { Some(scratch.to_owned()) } else {
        println!("  (raw-ioctl floor unavailable: could not build {}/build.sh)", reference.display());
        None
    }
}

/// Runs `cmd` and returns the first number (in the unit given) on the line containing `key`.
fn number_after(output: &str, key: &str, unit: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains(key))?;
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.trim_start_matches('(').parse().ok()
}

fn main() {
    let virtio = std::env::args().nth(1).is_some_and(|a| a == "virtio");
    let runs: usize = std::env::args().nth(1 + usize::from(virtio)).and_then(|s| s.parse().ok()).unwrap_or(if virtio { 3 } else { 20 });
    let ferro = ferro_bin();
    assert!(ferro.exists(), "{} not found: cargo build --release -p ferro-cli", ferro.display());
    let scratch = std::env::temp_dir().join(format!("ferro-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    if virtio {
        virtio::run(&ferro, runs, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    let hello = scratch.join("hello.elf");
    std::fs::write(&hello, ferro_guests::get("hello").unwrap()).unwrap();

    println!("== launch -> first output -> exit, hello guest (PVH ELF), 128 MiB, {runs} runs, medians");
    let ours: Vec<Launch> = (0..runs)
        .map(|_| launch(Command::new(&ferro).args(["run", "--memory", "128M", "--cmdline", "exit=0", "--kernel"]).arg(&hello), 1))
        .collect();
    let (our_first, our_exit, our_rss) = summarize("ferro run", &ours);
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    if qemu {
        let theirs: Vec<Launch> = (0..runs)
            .map(|_| {
                launch(
                    Command::new("qemu-system-x86_64")
                        .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"])
                        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
                        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-append", "exit=0", "-kernel"])
                        .arg(&hello),
                    1,
                )
            })
            .collect();
        let (q_first, q_exit, q_rss) = summarize("qemu -M microvm", &theirs);
        println!(
            "  ratio ferro/qemu: first output {:.3}, exit {:.3} (qemu is {:.1}x slower to exit), RSS {:.3}",
            our_first / q_first,
            our_exit / q_exit,
            q_exit / our_exit,
            our_rss / q_rss
        );
    } else {
        println!("  (qemu-system-x86_64 not installed: apt-get install qemu-system-x86 for the peer)");
    }

    println!("== VM creation -> first guest instruction");
    let floor = build_floor(&scratch.join("floor"));
    if let Some(dir) = &floor {
        let out = Command::new(dir.join("boottime")).arg(runs.to_string()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(floor_us) = number_after(&text, "TOTAL", "us") {
            println!("  raw ioctls (boottime.c)      {:7.2} ms to the first guest PIO exit", floor_us / 1e3);
            println!("  ferro run                    {our_first:7.2} ms to the first serial byte (includes ~60 emulated ring-0 instructions of the guest)");
            println!("  ratio ferro/floor: {:.2}", our_first / (floor_us / 1e3));
        }
    }

    println!("== exit round trips (ferro: exitbench guest, N exits vs 0; floor: pvmtest bench; 3 interleaved rounds, medians)");
    // The same three-instruction guest loop on both sides; rounds alternate so that drift in this
    // nested host's speed (it moves by 20% within minutes) hits both alike.
    let timed = |args: &str| -> f64 {
        median(
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let s = Command::new(&ferro).args(["run", "--guest", "exitbench", "--cmdline", args]).stdout(Stdio::null()).status().unwrap();
                    assert!(s.success());
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let n = 100_000f64;
    let (mut ours_pio, mut ours_mmio, mut floor_pio, mut floor_mmio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let base = timed("pio=0 mmio=0");
        ours_pio.push((timed("pio=100000") - base) / n * 1e6);
        ours_mmio.push((timed("mmio=100000") - base) / n * 1e6);
        if let Some(dir) = &floor {
            let out = Command::new(dir.join("pvmtest")).arg("bench").output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if let (Some(fp), Some(fm)) = (number_after(&text, "PIO out exit loop", "us per"), number_after(&text, "MMIO write exit loop", "us per")) {
                floor_pio.push(fp);
                floor_mmio.push(fm);
            }
        }
    }
    let (pio_us, mmio_us) = (median(ours_pio), median(ours_mmio));
    println!("  ferro: PIO {pio_us:.2} us per exit, MMIO {mmio_us:.2} us per exit");
    if !floor_pio.is_empty() {
        let (fp, fm) = (median(floor_pio), median(floor_mmio));
        println!("  raw ioctls (pvmtest bench): PIO {fp:.2} us, MMIO {fm:.2} us");
        println!("  ratio ferro/floor: PIO {:.2}, MMIO {:.2}", pio_us / fp, mmio_us / fm);
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
