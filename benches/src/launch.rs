//! `ferro-bench launch`: process start -> first guest output -> exit, and peak RSS, for `ferro
//! run` and QEMU `-M microvm` booting the same PVH test guest (128 MiB); and VM creation -> first
//! guest instruction against the raw-ioctl floor.

use crate::common::{QEMU_CPU, Scratch, ferro_bin, median, qemu_bin};
use crate::floor;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

pub struct Launch {
    pub first_output_ms: f64,
    pub exit_ms: f64,
    pub max_rss_kib: i64,
    /// Everything the guest printed.
    pub output: String,
}

/// Spawns `cmd`, timing the first byte on stdout and the exit; peak RSS from wait4.
#[allow(clippy::zombie_processes)] // reaped with wait4 (for its rusage), which clippy cannot see
pub fn launch(cmd: &mut Command, expect_status: &[i32]) -> Launch {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("piped stdout");
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
    assert!(expect_status.contains(&code), "{cmd:?} exited {code}, not one of {expect_status:?}");
    rest.insert(0, byte[0]);
    Launch {
        first_output_ms: first.as_secs_f64() * 1e3,
        exit_ms: exit.as_secs_f64() * 1e3,
        max_rss_kib: usage.ru_maxrss,
        output: String::from_utf8_lossy(&rest).into_owned(),
    }
}

fn summarize(name: &str, runs: &[Launch]) -> (f64, f64, f64) {
    let first = median(runs.iter().map(|r| r.first_output_ms).collect());
    let exit = median(runs.iter().map(|r| r.exit_ms).collect());
    let rss = median(runs.iter().map(|r| r.max_rss_kib as f64 / 1024.0).collect());
    println!("  {name:<28} first output {first:7.2} ms   exit {exit:7.2} ms   peak RSS {rss:6.1} MiB");
    (first, exit, rss)
}

pub fn run(runs: usize) {
    let ferro = ferro_bin();
    let scratch = Scratch::new();
    let hello = scratch.0.join("hello.elf");
    std::fs::write(&hello, ferro_guests::get("hello").expect("built-in hello guest")).expect("write the guest");

    println!("== launch -> first output -> exit, hello guest (PVH ELF), 128 MiB, {runs} runs, medians");
    let ours: Vec<Launch> = (0..runs)
        .map(|_| launch(Command::new(&ferro).args(["run", "--memory", "128M", "--debug-exit", "--cmdline", "exit=0", "--kernel"]).arg(&hello), &[1]))
        .collect();
    let (our_first, our_exit, our_rss) = summarize("ferro run", &ours);
    match qemu_bin() {
        Some(qemu) => {
            let theirs: Vec<Launch> = (0..runs)
                .map(|_| {
                    launch(
                        Command::new(&qemu)
                            .args(["-M", "microvm", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", "128", "-smp", "1"])
                            .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
                            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-append", "exit=0", "-kernel"])
                            .arg(&hello),
                        &[1],
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
        }
        None => println!("  (no QEMU peer: see scripts/qemu-peer.sh)"),
    }

    println!("== VM creation -> first guest instruction");
    let floor_ms = median(floor::first_exit_ms(runs));
    println!("  raw ioctls (floor)           {floor_ms:7.2} ms to the first guest PIO exit (spawn, 256 MiB, 1 vCPU, real mode)");
    println!("  ferro run                    {our_first:7.2} ms to the first serial byte (includes ~60 emulated ring-0 instructions of the guest)");
    println!("  ratio ferro/floor: {:.2}", our_first / floor_ms);
}
