//! `ferro-bench memory`: guest RAM backed by 2 MiB huge pages against ordinary pages, for `ferro
//! run` and QEMU (`-mem-path` on a hugetlbfs mount) running the same PVH test guests:
//!
//! - the `memory` guest writes and checks every byte of a 1 GiB guest in ring 3 (native speed on
//!   kvm-pvm), so the run is dominated by first-touch faults: 4 KiB (or transparent huge) pages
//!   against hugetlb pages reserved up front;
//! - the `hello` guest boots in a 4 GiB VM and exits: what a large guest costs to start.
//!
//! The host's huge page pool is grown for the run and put back afterwards; the hugetlbfs mount
//! QEMU needs lives in the scratch directory and is unmounted at the end.

use crate::common::{QEMU_CPU, Scratch, ferro_bin, median, qemu_bin};
use crate::launch::{Launch, launch};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the memory guest prints when it found every byte it wrote.
const VERIFIED: &str = "with 0 errors";
const POOL: &str = "/proc/sys/vm/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_number(path: &str) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or_else(|| panic!("cannot read {path}"))
}

/// The huge page pool grown by `pages` for the run, shrunk back when dropped.
struct PoolGrowth {
    before: u64,
}

impl PoolGrowth {
    fn new(pages: u64) -> PoolGrowth {
        let before = read_number(POOL);
        std::fs::write(POOL, (before + pages).to_string()).unwrap_or_else(|e| panic!("{POOL}: {e} (run as root)"));
        let free = read_number(FREE);
        assert!(free >= pages, "asked the kernel for {pages} more 2 MiB pages and {free} are free: not enough contiguous memory");
        PoolGrowth { before }
    }
}

impl Drop for PoolGrowth {
    fn drop(&mut self) {
        let _ = std::fs::write(POOL, self.before.to_string());
    }
}

/// A hugetlbfs mount for QEMU's `-mem-path`, unmounted when dropped.
struct HugetlbMount(PathBuf);

impl HugetlbMount {
    fn new(dir: PathBuf) -> HugetlbMount {
        std::fs::create_dir_all(&dir).expect("mount point");
        let ok = Command::new("mount").args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"]).arg(&dir).status().expect("mount");
        assert!(ok.success(), "mount -t hugetlbfs on {} failed", dir.display());
        HugetlbMount(dir)
    }
}

impl Drop for HugetlbMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn ferro(guest: &Path, memory: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new(ferro_bin());
    cmd.args(["run", "--memory", memory, "--debug-exit", "--cmdline", cmdline, "--kernel"]).arg(guest);
    cmd
}

/// `cmd` with transparent huge pages disabled for the process (PR_SET_THP_DISABLE is inherited
/// across exec): guest RAM in 4 KiB pages only, the baseline huge pages are measured against.
fn without_thp(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours; it runs in the forked
    // child before exec.
    unsafe {
        cmd.pre_exec(|| if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
    }
    cmd
}

fn qemu(qemu: &Path, guest: &Path, mib: u64, mem_path: Option<&Path>, cmdline: &str) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", &mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-append", cmdline]);
    if let Some(dir) = mem_path {
        cmd.arg("-mem-path").arg(dir);
    }
    cmd.arg("-kernel").arg(guest);
    cmd
}

/// Runs `make()` `runs` times; every run must print `expect` and exit with `status`. The memory
/// guest powers off when every byte checked: status 0 under ferro; under QEMU's microvm the
/// ACPI sleep request is handled by QEMU's main loop while the vCPU runs on, so the kit may
/// find itself still running and leave through debug-exit 0x7f (status 255) first: either is
/// accepted after the result line. hello leaves through debug-exit 0 (status 1) under both.
fn runs(runs: usize, expect: &str, status: &[i32], mut make: impl FnMut() -> Command) -> Vec<Launch> {
    (0..runs)
        .map(|_| {
            let mut cmd = make();
            let run = launch(&mut cmd, status);
            assert!(run.output.contains(expect), "{cmd:?} did not print {expect:?}: {}", run.output);
            run
        })
        .collect()
}

fn exit_ms(runs: &[Launch]) -> f64 {
    median(runs.iter().map(|r| r.exit_ms).collect())
}

fn first_ms(runs: &[Launch]) -> f64 {
    median(runs.iter().map(|r| r.first_output_ms).collect())
}

pub fn run(count: usize) {
    let scratch = Scratch::new();
    let guest = |name: &str| {
        let path = scratch.0.join(format!("{name}.elf"));
        std::fs::write(&path, ferro_guests::get(name).expect("built-in guest")).expect("write the guest");
        path
    };
    let (memory, hello) = (guest("memory"), guest("hello"));
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    println!("transparent huge pages: {} (ordinary guest RAM is advised MADV_HUGEPAGE by both VMMs)", thp.trim());
    // 4 GiB for the largest guest, plus slack for the pages the kernel keeps for itself.
    let _pool = PoolGrowth::new(2048 + 8);
    let qemu_bin = qemu_bin();
    let mount = qemu_bin.as_ref().map(|_| HugetlbMount::new(scratch.0.join("hugetlbfs")));

    println!("== memory guest: write + check all of 1 GiB in ring 3, launch to exit, {count} runs, medians");
    let ours_4k = exit_ms(&runs(count, VERIFIED, &[0], || without_thp(ferro(&memory, "1G", ""))));
    let ours = exit_ms(&runs(count, VERIFIED, &[0], || ferro(&memory, "1G", "")));
    let ours_huge = exit_ms(&runs(count, VERIFIED, &[0], || ferro(&memory, "size=1G,hugepages=on", "")));
    println!("  ferro run, THP off (4 KiB)   {ours_4k:8.1} ms   {:6.0} MiB/s", 1024.0 / (ours_4k / 1e3));
    println!("  ferro run                    {ours:8.1} ms   {:6.0} MiB/s", 1024.0 / (ours / 1e3));
    println!("  ferro run hugepages=on       {ours_huge:8.1} ms   {:6.0} MiB/s", 1024.0 / (ours_huge / 1e3));
    println!("  ratio ferro huge pages / 4 KiB pages: {:.3}", ours_huge / ours_4k);
    if let (Some(q), Some(m)) = (&qemu_bin, &mount) {
        let theirs = exit_ms(&runs(count, VERIFIED, &[0, 255], || qemu(q, &memory, 1024, None, "")));
        let theirs_huge = exit_ms(&runs(count, VERIFIED, &[0, 255], || qemu(q, &memory, 1024, Some(&m.0), "")));
        println!("  qemu -M microvm              {theirs:8.1} ms   {:6.0} MiB/s", 1024.0 / (theirs / 1e3));
        println!("  qemu -mem-path hugetlbfs     {theirs_huge:8.1} ms   {:6.0} MiB/s", 1024.0 / (theirs_huge / 1e3));
        println!(
            "  ratio ferro/qemu: ordinary pages {:.3}, huge pages {:.3}; huge/ordinary: ferro {:.3}, qemu {:.3}",
            ours / theirs,
            ours_huge / theirs_huge,
            ours_huge / ours,
            theirs_huge / theirs
        );
    } else {
        println!("  (no QEMU peer: see scripts/qemu-peer.sh)");
    }

    println!("== hello guest in 4 GiB: launch -> first output -> exit, {count} runs, medians");
    let greeting = "Hello from";
    let report = |name: &str, runs: &[Launch]| {
        let (first, exit) = (first_ms(runs), exit_ms(runs));
        println!("  {name:<28} first output {first:7.2} ms   exit {exit:7.2} ms");
        exit
    };
    let ours = report("ferro run", &runs(count, greeting, &[1], || ferro(&hello, "4G", "exit=0")));
    let ours_huge = report("ferro run hugepages=on", &runs(count, greeting, &[1], || ferro(&hello, "size=4G,hugepages=on", "exit=0")));
    if let (Some(q), Some(m)) = (&qemu_bin, &mount) {
        let theirs = report("qemu -M microvm", &runs(count, greeting, &[1], || qemu(q, &hello, 4096, None, "exit=0")));
        let theirs_huge = report("qemu -mem-path hugetlbfs", &runs(count, greeting, &[1], || qemu(q, &hello, 4096, Some(&m.0), "exit=0")));
        println!("  ratio ferro/qemu (exit): ordinary pages {:.3}, huge pages {:.3}", ours / theirs, ours_huge / theirs_huge);
    }
}
