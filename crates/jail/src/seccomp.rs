//! seccomp filters for the VMM's threads: one allowlist per [`ThreadKind`], the default action
//! killing the whole process, and [`spawn`], the one way the VMM starts a thread, which installs
//! the new thread's filter before the thread runs its work (so before it touches guest input).
//!
//! Filters are off until the process calls [`enable`] (`ferro vmm --seccomp`, `ferro run
//! --seccomp`); [`install`] then filters the calling thread (the main thread, once the VM is
//! built). A thread inherits the filters of the thread that created it and adds its own, so a
//! thread's effective allowlist is the intersection along its ancestry: the lists of threads that
//! create others (vCPUs start device workers when the guest activates a device; a control
//! connection restarts vCPUs after a snapshot) include what their children need. docs/isolation.md
//! lists what each kind may do.
//!
//! A forbidden call is not executed: the kernel sends the thread SIGSYS (SECCOMP_RET_TRAP), whose
//! handler writes one line naming the thread kind and the system call number to stderr
//! ([`FORBIDDEN_CALL_PREFIX`]) and kills the process with SIGSYS, so the VMM's supervisor sees both
//! the signal and the call.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::OnceLock;

/// How the line a VMM writes to stderr before seccomp kills it begins; it goes on with
/// `<kind> thread made the forbidden system call <number>`.
pub const FORBIDDEN_CALL_PREFIX: &str = "ferro: seccomp: ";

/// The kinds of thread in a VMM, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread's event loop (signals, the exit event, teardown).
    Main,
    /// A vCPU: KVM_RUN and the device emulation it does in place.
    Vcpu,
    /// A device's worker thread.
    Device(Device),
    /// The control socket's listener and its connections.
    ControlListener,
    ControlConnection,
    /// The serial console socket's listener and each client's input.
    SerialListener,
    SerialInput,
}

/// Device kinds with a worker thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Device {
    Block,
    Net,
    Console,
    Rng,
    Balloon,
    Vsock,
}

impl Device {
    const ALL: [Device; 6] = [
        Device::Block,
        Device::Net,
        Device::Console,
        Device::Rng,
        Device::Balloon,
        Device::Vsock,
    ];

    /// The name of its worker thread (what `ps -L` and /proc/PID/task/*/comm show).
    pub fn thread_name(self) -> &'static str {
        match self {
            Device::Block => "virtio-blk",
            Device::Net => "virtio-net",
            Device::Console => "virtio-console",
            Device::Rng => "virtio-rng",
            Device::Balloon => "virtio-balloon",
            Device::Vsock => "virtio-vsock",
        }
    }
}

impl ThreadKind {
    /// The name used by `FERRO_SECCOMP_SELFTEST` (debug builds).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device(d) => d.thread_name(),
            ThreadKind::ControlListener => "api",
            ThreadKind::ControlConnection => "api-conn",
            ThreadKind::SerialListener => "serial-sock",
            ThreadKind::SerialInput => "serial-in",
        }
    }

    fn all() -> Vec<ThreadKind> {
        let mut all = vec![
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::ControlListener,
            ThreadKind::ControlConnection,
            ThreadKind::SerialListener,
            ThreadKind::SerialInput,
        ];
        all.extend(Device::ALL.map(ThreadKind::Device));
        all
    }

    /// The system calls this kind of thread may make.
    fn allowed(self) -> Vec<i64> {
        let mut list: Vec<i64> = THREAD_LIFE.to_vec();
        match self {
            ThreadKind::Device(device) => list.extend(device_calls(device)),
            ThreadKind::Vcpu => list.extend(vcpu_calls()),
            ThreadKind::ControlConnection => list.extend(control_connection_calls()),
            ThreadKind::ControlListener => {
                list.extend([libc::SYS_accept4]);
                list.extend(control_connection_calls());
            }
            ThreadKind::SerialInput => list.extend(SERIAL_INPUT),
            ThreadKind::SerialListener => {
                list.extend([libc::SYS_accept4, libc::SYS_setsockopt]);
                list.extend(SPAWN);
                list.extend(SERIAL_INPUT);
            }
            ThreadKind::Main => {
                list.extend(MAIN);
                list.extend(control_connection_calls());
            }
        }
        list.sort_unstable();
        list.dedup();
        list
    }
}

/// What every thread does to live and end: memory, locks, its signal stack, time, closing and
/// plain reads and writes of descriptors it already has, and the abort path of a panic.
const THREAD_LIFE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls every thread may make with one argument fixed: `fcntl(fd, F_GETFD)`, which Rust's
/// standard library makes (in debug builds) before it closes a descriptor it owns, to catch a
/// descriptor closed twice; and signals to this process only, `tgkill(own_pid, ...)` (a vCPU
/// kicked out of KVM_RUN, the SIGSYS report, an abort) and `kill(own_pid, ...)`. Every VMM runs
/// as the same user, so without the pid fixed a compromised VMM could signal another VM's.
fn narrowed_calls(own_pid: u32) -> Result<Vec<(i64, SeccompRule)>, seccompiler::BackendError> {
    let f_getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )?;
    let this_process = || {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(own_pid))
    };
    Ok(vec![
        (libc::SYS_fcntl, SeccompRule::new(vec![f_getfd])?),
        (libc::SYS_tgkill, SeccompRule::new(vec![this_process()?])?),
        (libc::SYS_kill, SeccompRule::new(vec![this_process()?])?),
    ])
}

/// Starting a thread (in the parent and in the child before its work begins, which includes
/// taking the emulator's CPUs) and the epoll and eventfd set-up of a device worker.
const SPAWN: &[i64] = &[
    libc::SYS_sched_setaffinity,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_seccomp,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_timerfd_create,
];

/// Waiting on a worker's descriptors and vectored I/O.
const WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_readv,
    libc::SYS_writev,
];

const SOCKET_IO: &[i64] = &[
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_poll,
];

const SERIAL_INPUT: &[i64] = &[libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_ioctl];

fn device_calls(device: Device) -> Vec<i64> {
    let mut list = WORKER.to_vec();
    list.extend(match device {
        // Image I/O, growth of qcow2 files and flushes.
        Device::Block => &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
        ][..],
        // The tap, watched for room and for frames.
        Device::Net => &[libc::SYS_epoll_ctl, libc::SYS_openat, libc::SYS_ioctl][..],
        // A pty or a socket client, accepted and watched.
        Device::Console => &[
            libc::SYS_accept4,
            libc::SYS_epoll_ctl,
            libc::SYS_ioctl,
            libc::SYS_fcntl,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
        ][..],
        Device::Rng => &[
            libc::SYS_getrandom,
            libc::SYS_epoll_ctl,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
        ][..],
        Device::Balloon => &[libc::SYS_fallocate][..],
        // Host-side unix sockets: accepted, connected, watched.
        Device::Vsock => &[
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_socket,
            libc::SYS_epoll_ctl,
            libc::SYS_fcntl,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
        ][..],
    });
    list
}

/// A vCPU runs KVM_RUN and emulates devices in place (ioctls on KVM and device descriptors,
/// serial output to socket clients), and starts a device's worker when the guest activates it:
/// so it may do what every worker does.
fn vcpu_calls() -> Vec<i64> {
    let mut list = vec![libc::SYS_ioctl, libc::SYS_sendto];
    list.extend(SPAWN);
    for device in Device::ALL {
        list.extend(device_calls(device));
    }
    list
}

/// A control connection answers requests: pause and resume (which restarts vCPUs, so it may do
/// what they do), statistics, balloon changes and snapshots (a new directory of files), and
/// migrations (a source whose migration failed opens its disk images again: their paths are
/// resolved, symbolic links included, and they are locked with fcntl, which SPAWN allows).
fn control_connection_calls() -> Vec<i64> {
    let mut list = vcpu_calls();
    list.extend(SOCKET_IO);
    list.extend([
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_openat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_getdents64,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat2,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getrusage,
    ]);
    list
}

/// The main thread's loop: signals through a signalfd, the terminal in `ferro run`, the exit
/// event, teardown (device flushes, socket files removed) and the forked helper that lets KVM
/// tear down after the process exits.
const MAIN: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_signalfd4,
    libc::SYS_ioctl,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_close_range,
    libc::SYS_wait4,
    libc::SYS_sigaltstack,
];

/// The compiled programs, one per kind; set by [`enable`].
static PROGRAMS: OnceLock<BTreeMap<ThreadKind, BpfProgram>> = OnceLock::new();

thread_local! {
    /// The kind of the calling thread's filter, for the report of a forbidden call (read in the
    /// SIGSYS handler: a const-initialised cell without destructor is safe to read there).
    static FILTERED_AS: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Compiles every thread kind's filter, installs the SIGSYS handler that reports a forbidden
/// call, and turns filtering on for threads started through [`spawn`] from now on and for
/// [`install`]. Call it before the process starts its threads.
pub fn enable() -> Result<(), String> {
    let own_pid = std::process::id();
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::all() {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = kind
            .allowed()
            .into_iter()
            .map(|call| (call, Vec::new()))
            .collect();
        // A call a kind may make with any arguments stays unconditional.
        for (call, rule) in narrowed_calls(own_pid)
            .map_err(|e| format!("seccomp filter of {} threads: {e}", kind.name()))?
        {
            if let Entry::Vacant(entry) = rules.entry(call) {
                entry.insert(vec![rule]);
            }
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| format!("seccomp filter of {} threads: {e}", kind.name()))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e| format!("seccomp filter of {} threads: {e}", kind.name()))?;
        programs.insert(kind, program);
    }
    PROGRAMS
        .set(programs)
        .map_err(|_| "seccomp filters are already enabled".to_string())?;
    install_sigsys_handler()
}

/// The fields of a SIGSYS siginfo from seccomp (`struct siginfo`'s `_sigsys` on x86_64; the libc
/// crate does not expose them).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: sigaction is plain data, zero is a valid start (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = report_forbidden_call as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the action is initialised and its handler only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "cannot install the SIGSYS handler for seccomp: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// SIGSYS handler: one line on stderr naming the thread's kind and the forbidden call, then the
/// process dies of SIGSYS (the call itself was never made). Only async-signal-safe work here: a
/// stack buffer, write(2), sigaction(2), sigprocmask(2), raise(3); every filter allows them.
extern "C" fn report_forbidden_call(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose layout SigsysInfo follows.
    let info = unsafe { &*(info as *const SigsysInfo) };
    let mut line = LineBuffer::default();
    line.push(FORBIDDEN_CALL_PREFIX);
    line.push(FILTERED_AS.with(Cell::get));
    if info.code == SYS_SECCOMP {
        line.push(" thread made the forbidden system call ");
        line.push_number(info.syscall as i64);
    } else {
        line.push(" thread got SIGSYS from outside seccomp");
    }
    line.push("\n");
    // SAFETY: writes the initialised bytes of the buffer to stderr.
    unsafe { libc::write(2, line.bytes.as_ptr().cast(), line.len) };
    // SAFETY: resets SIGSYS to its default action (end the process), unblocks it in this thread
    // and raises it; nothing here touches memory shared with other threads.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// A line assembled without allocating (for the signal handler); what does not fit is dropped.
struct LineBuffer {
    bytes: [u8; 160],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer { bytes: [0; 160], len: 0 }
    }
}

impl LineBuffer {
    fn push(&mut self, text: &str) {
        for &byte in text.as_bytes() {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = byte;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, number: i64) {
        if number < 0 {
            self.push("-");
        }
        let mut digits = [0u8; 20];
        let mut rest = number.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(std::str::from_utf8(&digits[start..]).unwrap_or("?"));
    }
}

/// The system call number in a line the SIGSYS handler wrote, if `line` is one.
pub fn forbidden_call_in(line: &str) -> Option<(&str, i64)> {
    let rest = line.trim().strip_prefix(FORBIDDEN_CALL_PREFIX)?;
    let (kind, number) = rest.split_once(" thread made the forbidden system call ")?;
    Some((kind, number.parse().ok()?))
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    PROGRAMS.get().is_some()
}

/// Filters the calling thread as `kind` (and sets no_new_privs, which a filter needs) when
/// filtering is enabled. A thread whose filter could not be installed must not go on.
pub fn install(kind: ThreadKind) -> Result<(), String> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    let program = programs
        .get(&kind)
        .ok_or_else(|| format!("no seccomp filter for {} threads", kind.name()))?;
    seccompiler::apply_filter(program).map_err(|e| {
        format!(
            "cannot install the seccomp filter of {} threads: {e}",
            kind.name()
        )
    })?;
    FILTERED_AS.with(|cell| cell.set(kind.name()));
    selftest(kind);
    Ok(())
}

/// Starts a thread named `name` that installs `kind`'s filter and then runs `work`. If the
/// filter cannot be installed the process ends (a thread must never run unfiltered once
/// filtering is on).
pub fn spawn<F, T>(
    kind: ThreadKind,
    name: &str,
    work: F,
) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            if kind != ThreadKind::Vcpu {
                crate::affinity::join_emulator();
            }
            if let Err(e) = install(kind) {
                eprintln!("ferro: {e}");
                std::process::abort();
            }
            work()
        })
}

/// Debug builds only: with `FERRO_SECCOMP_SELFTEST=<kind name>` in the environment, a thread of
/// that kind makes a call outside every allowlist (getppid) right after its filter is installed,
/// which must kill the process with SIGSYS. Tests use it to prove the filters are in force.
fn selftest(kind: ThreadKind) {
    if cfg!(debug_assertions)
        && std::env::var("FERRO_SECCOMP_SELFTEST").is_ok_and(|v| v == kind.name())
    {
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_line_is_built_without_allocation_and_parsed_back() {
        let mut line = LineBuffer::default();
        line.push(FORBIDDEN_CALL_PREFIX);
        line.push("vcpu thread made the forbidden system call ");
        line.push_number(0);
        assert_eq!(
            forbidden_call_in(std::str::from_utf8(&line.bytes[..line.len]).unwrap()),
            Some(("vcpu", 0))
        );
        let mut line = LineBuffer::default();
        line.push_number(-457);
        line.push(&"x".repeat(500));
        assert_eq!(line.len, 160, "a long line is cut, not overflowed");
        assert!(line.bytes.starts_with(b"-457x"));
        assert_eq!(forbidden_call_in("ferro: seccomp: vcpu thread made"), None);
    }

    #[test]
    fn every_kind_compiles_and_the_selftest_call_is_in_no_list() {
        for kind in ThreadKind::all() {
            let allowed = kind.allowed();
            assert!(!allowed.contains(&libc::SYS_getppid), "{kind:?}");
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setuid,
            ] {
                assert!(
                    !allowed.contains(&forbidden),
                    "{kind:?} may call {forbidden}"
                );
            }
        }
        // Workers are narrower than the vCPUs that start them.
        let vcpu = ThreadKind::Vcpu.allowed();
        for device in Device::ALL {
            let worker = ThreadKind::Device(device).allowed();
            assert!(
                worker.iter().all(|c| vcpu.contains(c)),
                "{device:?} needs a call its parent vCPU may not make"
            );
            assert!(
                !worker.contains(&libc::SYS_clone3),
                "{device:?} workers start no threads"
            );
        }
        assert!(
            !ThreadKind::Device(Device::Block)
                .allowed()
                .contains(&libc::SYS_openat),
            "a disk worker opens no files"
        );
    }

    /// Signals reach this process only: a filtered thread may signal its own process (kill and
    /// tgkill with its pid, as a vCPU kick or an abort does), and the same call aimed at another
    /// process (here the test process, of the same user, as another VMM would be) kills it with
    /// SIGSYS naming the call. Run in child processes, one per call.
    #[test]
    fn signals_reach_only_the_own_process() {
        if let Ok(target) = std::env::var("FERRO_SECCOMP_SIGNAL_TARGET") {
            let target: libc::pid_t = target.parse().unwrap();
            let call = std::env::var("FERRO_SECCOMP_SIGNAL_CALL").unwrap();
            enable().unwrap();
            let t = spawn(ThreadKind::Main, "main-test", move || {
                // SAFETY: signal 0 only checks the target exists; no memory is touched.
                unsafe {
                    let own = libc::getpid();
                    assert_eq!(libc::kill(own, 0), 0, "kill of its own process");
                    assert_eq!(libc::syscall(libc::SYS_tgkill, own, libc::syscall(libc::SYS_gettid), 0), 0, "tgkill in its own process");
                    eprintln!("own process signalled");
                    if call == "kill" {
                        libc::kill(target, 0);
                    } else {
                        libc::syscall(libc::SYS_tgkill, target, target, 0);
                    }
                }
            })
            .unwrap();
            let _ = t.join();
            std::process::exit(0);
        }
        for (call, number) in [("kill", libc::SYS_kill), ("tgkill", libc::SYS_tgkill)] {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "seccomp::tests::signals_reach_only_the_own_process", "--nocapture"])
                .env("FERRO_SECCOMP_SIGNAL_TARGET", std::process::id().to_string())
                .env("FERRO_SECCOMP_SIGNAL_CALL", call)
                .output()
                .unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(child.status.signal(), Some(libc::SIGSYS), "{call}: {child:?}");
            let stderr = String::from_utf8_lossy(&child.stderr);
            assert!(stderr.contains("own process signalled"), "{call}: its own process first: {stderr}");
            assert_eq!(stderr.lines().find_map(forbidden_call_in), Some(("main", number)), "{call}: {stderr}");
        }
    }

    /// A filtered thread that makes a forbidden call kills its whole process with SIGSYS: run in
    /// a child process (this test binary again) so the test process survives.
    #[test]
    fn a_forbidden_call_kills_the_process() {
        if std::env::var("FERRO_SECCOMP_CHILD").is_ok() {
            enable().unwrap();
            let t = spawn(ThreadKind::Device(Device::Rng), "virtio-rng", || {
                // SAFETY: getppid takes no arguments and touches no memory.
                unsafe { libc::syscall(libc::SYS_getppid) }
            })
            .unwrap();
            let _ = t.join();
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let child = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_forbidden_call_kills_the_process",
                "--nocapture",
            ])
            .env("FERRO_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.status.signal(), Some(libc::SIGSYS), "{child:?}");
        // Its last words name the thread kind and the call.
        let stderr = String::from_utf8_lossy(&child.stderr);
        let reported = stderr.lines().find_map(forbidden_call_in);
        assert_eq!(
            reported,
            Some(("virtio-rng", libc::SYS_getppid)),
            "stderr: {stderr}"
        );
    }
}
