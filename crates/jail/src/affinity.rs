//! CPU affinity of the VMM's threads (libvirt's vcpupin and emulatorpin): set and read for one
//! thread id, and the emulator CPUs that every thread [`crate::seccomp::spawn`] starts, other
//! than a vCPU, takes before it runs (a device worker started by a vCPU thread must not inherit
//! that vCPU's CPUs).

use std::sync::Mutex;

/// CPUs of the threads that are not vCPUs, once the emulator is pinned.
static EMULATOR: Mutex<Option<Vec<u32>>> = Mutex::new(None);

/// The calling thread's id (what /proc/PID/task lists).
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments and touches no memory.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Lets thread `tid` run only on `cpus` (each below CPU_SETSIZE; the caller checked them).
pub fn set(tid: i32, cpus: &[u32]) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu as usize >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("CPU {cpu} is beyond CPU_SETSIZE")));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit is inside the set.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: the set is a valid cpu_set_t of the size passed; the kernel only reads it.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs thread `tid` may run on.
pub fn get(tid: i32) -> std::io::Result<Vec<u32>> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most the size passed into the set we own.
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: every index is below CPU_SETSIZE, inside the set.
    Ok((0..libc::CPU_SETSIZE as u32).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu as usize, &set) }).collect())
}

/// Pins every thread of this process except `vcpu_tids` (and KVM's own workers) to `cpus`, and
/// makes threads started from now on (other than vCPUs) take them too.
pub fn pin_emulator(cpus: &[u32], vcpu_tids: &[i32]) -> std::io::Result<()> {
    *EMULATOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(cpus.to_vec());
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        if vcpu_tids.contains(&tid) || is_kvm_worker(tid) {
            continue;
        }
        match set(tid, cpus) {
            // A thread that ended since the directory was read.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Whether `tid` is a worker the kernel's KVM runs inside this process (`kvm-nx-lpage-recovery`,
/// started at the first KVM_RUN with that vCPU's CPUs): the kernel places those, not us.
fn is_kvm_worker(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).is_ok_and(|comm| comm.starts_with("kvm-"))
}

/// Called by a new thread that is not a vCPU: takes the emulator's CPUs if it is pinned.
pub(crate) fn join_emulator() {
    let cpus = EMULATOR.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(cpus) = cpus {
        // The CPUs were checked when the emulator was pinned; a failure leaves the thread
        // where its parent runs, which is no reason to end the VM.
        let _ = set(0, &cpus);
    }
}
