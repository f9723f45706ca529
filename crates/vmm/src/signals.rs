//! SIGINT and SIGTERM end a VM cleanly: they are blocked in every thread (the mask is set before
//! the VM's first thread starts, so every thread inherits it) and read by the run loop from a
//! signalfd. A thread started before the mask would let the default action kill the process
//! instead, without the VM's disks being flushed.

use crate::{Error, Result};

const EXIT_SIGNALS: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

fn exit_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in EXIT_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread; threads it starts afterwards inherit that.
pub fn block_exit_signals() -> Result<()> {
    let set = exit_signal_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(Error::Io("blocking signals", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// SIGINT and SIGTERM as a readable fd.
pub struct SignalFd(i32);

impl SignalFd {
    /// Blocks the exit signals (if not yet) and opens a signalfd for them.
    pub fn open() -> Result<Self> {
        block_exit_signals()?;
        let set = exit_signal_set();
        // SAFETY: creates a new fd from a valid mask.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io("signalfd", std::io::Error::last_os_error()));
        }
        Ok(SignalFd(fd))
    }

    pub fn raw(&self) -> i32 {
        self.0
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe { libc::read(self.0, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}
