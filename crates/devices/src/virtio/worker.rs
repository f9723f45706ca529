//! A device worker thread: waits on the queues' kick eventfds (and any extra fds a device needs,
//! such as a tap) with epoll, and calls the device's handler. Stopping it is a write to its stop
//! eventfd followed by a join.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Handle to a running worker; dropping it stops the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What woke the worker: the index of the fd in the list it was started with.
pub type Wake = usize;

impl Worker {
    /// Starts a thread that calls `handle(i)` whenever `fds[i]` is readable. The handler must
    /// drain what woke it (read the eventfd, the tap) or it is called again at once.
    pub fn spawn<F>(name: &str, fds: Vec<RawFd>, mut handle: F) -> std::io::Result<Worker>
    where
        F: FnMut(Wake) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = fds.len() as u64;
        for (i, fd) in fds.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, *fd, EpollEvent::new(EventSet::IN, i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let mut events = vec![EpollEvent::default(); fds.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for ev in &events[..n] {
                    if ev.data() == stop_token {
                        return;
                    }
                    handle(ev.data() as usize);
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
