//! The raw-ioctl floor: what the same work costs with nothing but KVM ioctls and a few guest
//! instructions, no VMM at all. Every VMM number is compared against it.
//!
//! - [`first_exit_ms`]: a new process opens /dev/kvm, creates a VM with 256 MiB of RAM and one
//!   vCPU (CPUID set, real mode at 0x1000), and runs it to its first instruction, an `out` to
//!   port 0xe1; the time is from the parent's spawn to that exit.
//! - [`exit_cost_us`]: the cost of one PIO or MMIO exit round trip, from a guest loop of
//!   `out`/`mov` + `dec` + `jnz` (the loop ferro's `exitbench` guest runs), N iterations against 1.

use crate::common::{median, monotonic_ns};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::process::{Command, Stdio};

const CODE_AT: u64 = 0x1000;
const DONE_PORT: u16 = 0xe1;
const LOOP_PORT: u16 = 0xe0;
/// Real-mode data segment of the MMIO loop's stores: linear 0x20000, past the 64 KiB of RAM.
const MMIO_SEGMENT: u16 = 0x2000;

/// One VM with `mem_size` bytes of RAM at 0 and one vCPU in real mode at `CODE_AT` running `code`.
/// The memory mapping is leaked: the VM lives until the process exits.
fn build(kvm: &Kvm, mem_size: usize, code: &[u8]) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let mem = unsafe {
        libc::mmap(std::ptr::null_mut(), mem_size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
    // SAFETY: the code fits in the mapping (CODE_AT + a few bytes < mem_size), which we own.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>().add(CODE_AT as usize), code.len()) };
    let region = kvm_userspace_memory_region { slot: 0, flags: 0, guest_phys_addr: 0, memory_size: mem_size as u64, userspace_addr: mem as u64 };
    // SAFETY: the region is a valid mapping of `mem_size` bytes that outlives the VM (leaked).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = u64::from(MMIO_SEGMENT) << 4;
    sregs.ds.selector = MMIO_SEGMENT;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_AT;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    (vm, vcpu)
}

/// The child of [`first_exit_ms`]: builds the VM, runs to the first exit, prints the time.
pub fn first_exit_child() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let code = [0xe6, DONE_PORT as u8]; // out 0xe1, al
    let (_vm, mut vcpu) = build(&kvm, 256 << 20, &code);
    match vcpu.run() {
        Ok(VcpuExit::IoOut(DONE_PORT, _)) => println!("{}", monotonic_ns()),
        other => panic!("floor guest: unexpected first exit {other:?}"),
    }
}

/// Spawn -> first guest exit of the floor, `runs` times, in milliseconds (one per run).
pub fn first_exit_ms(runs: usize) -> Vec<f64> {
    let me = std::env::current_exe().expect("own path");
    (0..runs)
        .map(|_| {
            let start = monotonic_ns();
            let out = Command::new(&me).arg("floor-child").stderr(Stdio::inherit()).output().expect("spawn the floor child");
            assert!(out.status.success(), "floor child failed: {}", out.status);
            let at: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("floor child's time");
            (at - start) as f64 / 1e6
        })
        .collect()
}

/// Which exit the loop makes.
#[derive(Clone, Copy, Debug)]
pub enum ExitKind {
    Pio,
    Mmio,
}

/// The guest loop: `mov ecx, n; 1: <exit>; dec ecx; jnz 1b; out 0xe1, al`.
fn loop_code(kind: ExitKind, n: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&n.to_le_bytes());
    let body: &[u8] = match kind {
        ExitKind::Pio => &[0xe6, LOOP_PORT as u8], // out 0xe0, al
        ExitKind::Mmio => &[0xa2, 0x00, 0x00],     // mov [ds:0], al (unbacked: an MMIO exit)
    };
    code.extend_from_slice(body);
    code.extend_from_slice(&[0x66, 0x49]); // dec ecx
    let back = -((body.len() + 4) as i8);
    code.extend_from_slice(&[0x75, back as u8]); // jnz to the exit instruction
    code.extend_from_slice(&[0xe6, DONE_PORT as u8]);
    code
}

/// Runs the loop `n` times in a fresh VM; seconds from the first KVM_RUN to the last exit.
fn time_loop(kvm: &Kvm, kind: ExitKind, n: u32) -> f64 {
    let (_vm, mut vcpu) = build(kvm, 64 << 10, &loop_code(kind, n));
    let start = std::time::Instant::now();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(DONE_PORT, _) => return start.elapsed().as_secs_f64(),
            VcpuExit::IoOut(LOOP_PORT, _) | VcpuExit::MmioWrite(..) => {}
            other => panic!("floor guest: unexpected exit {other:?}"),
        }
    }
}

/// Microseconds per exit round trip: the median over `rounds` of (T(n) - T(1)) / (n - 1).
pub fn exit_cost_us(kind: ExitKind, n: u32, rounds: usize) -> f64 {
    let kvm = Kvm::new().expect("open /dev/kvm");
    median((0..rounds).map(|_| (time_loop(&kvm, kind, n) - time_loop(&kvm, kind, 1)) / f64::from(n - 1) * 1e6).collect())
}
