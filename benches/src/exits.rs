//! `ferro-bench exits`: the cost of one PIO and one MMIO exit round trip under `ferro run` (its
//! `exitbench` guest: N exits against none) and under the raw-ioctl floor (the same guest loop
//! with no VMM). Rounds alternate so that drift in this nested host's speed (it moves by 20%
//! within minutes) hits both alike.

use crate::common::{ferro_bin, median};
use crate::floor::{self, ExitKind};
use std::process::{Command, Stdio};
use std::time::Instant;

const EXITS: u32 = 100_000;

pub fn run(rounds: usize) {
    let ferro = ferro_bin();
    println!("== exit round trips ({EXITS} exits; ferro: exitbench guest, N exits vs 0; floor: same loop, raw ioctls; {rounds} interleaved rounds, medians)");
    let timed = |args: &str| -> f64 {
        median(
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let s = Command::new(&ferro).args(["run", "--guest", "exitbench", "--cmdline", args]).stdout(Stdio::null()).status().expect("run ferro");
                    assert!(s.success(), "ferro run --guest exitbench {args}: {s}");
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let n = f64::from(EXITS);
    let (mut ours_pio, mut ours_mmio, mut floor_pio, mut floor_mmio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let base = timed("pio=0 mmio=0");
        ours_pio.push((timed(&format!("pio={EXITS}")) - base) / n * 1e6);
        ours_mmio.push((timed(&format!("mmio={EXITS}")) - base) / n * 1e6);
        floor_pio.push(floor::exit_cost_us(ExitKind::Pio, EXITS, 1));
        floor_mmio.push(floor::exit_cost_us(ExitKind::Mmio, EXITS, 1));
    }
    let (pio_us, mmio_us) = (median(ours_pio), median(ours_mmio));
    let (fp, fm) = (median(floor_pio), median(floor_mmio));
    println!("  ferro: PIO {pio_us:.2} us per exit, MMIO {mmio_us:.2} us per exit");
    println!("  raw ioctls (floor): PIO {fp:.2} us, MMIO {fm:.2} us");
    println!("  ratio ferro/floor: PIO {:.2}, MMIO {:.2}", pio_us / fp, mmio_us / fm);
}
