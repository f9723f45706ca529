//! A device's worker thread: waits on the queues' kick eventfds (and any extra fds a device needs,
//! such as a tap) with epoll, and calls the device's handler. The thread owns the worker's state
//! ([`WorkerState`]: the queues and whatever else the device serves them with) while it runs and
//! hands it back when stopped, so pausing a device leaves its queues, with their indices, where
//! they can be saved, and resuming carries on from exactly there.

use ferro_jail::seccomp::{self, Device, ThreadKind};
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What woke the worker: the index of the fd in [`WorkerState::fds`].
pub type Wake = usize;

/// What a device's worker runs on.
pub trait WorkerState: Send + 'static {
    /// The device kind, whose seccomp allowlist the worker thread runs under.
    const DEVICE: Device;
    /// The fds to wait on; `wake(i)` is called when `fds()[i]` is readable.
    fn fds(&self) -> Vec<RawFd>;
    /// Handles a wake. It must drain what woke it (read the eventfd, the tap) or it is called
    /// again at once.
    fn wake(&mut self, wake: Wake);
    /// Takes the queues out, in queue order (the worker is stopped).
    fn take_queues(&mut self) -> Vec<Queue>;
    /// Puts back the queues [`take_queues`](WorkerState::take_queues) gave, before a restart.
    fn put_queues(&mut self, queues: Vec<Queue>);
}

/// A running worker thread; dropping it stops the thread.
pub struct Worker<S: WorkerState> {
    stop: EventFd,
    thread: Option<JoinHandle<S>>,
}

impl<S: WorkerState> Worker<S> {
    /// Starts a thread named `name`, under the seccomp filter of `S::DEVICE`'s workers, that
    /// serves `state` until stopped.
    pub fn spawn(name: &str, mut state: S) -> std::io::Result<Worker<S>> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let fds = state.fds();
        let stop_token = fds.len() as u64;
        for (i, fd) in fds.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, *fd, EpollEvent::new(EventSet::IN, i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let thread = seccomp::spawn(ThreadKind::Device(S::DEVICE), name, move || {
            let mut events = vec![EpollEvent::default(); fds.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return state,
                };
                for ev in &events[..n] {
                    if ev.data() == stop_token {
                        return state;
                    }
                    state.wake(ev.data() as usize);
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }

    /// Stops the thread after the wake it is handling and returns its state (None if the thread
    /// panicked, which loses it).
    pub fn stop(mut self) -> Option<S> {
        self.join()
    }

    fn join(&mut self) -> Option<S> {
        let _ = self.stop.write(1);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<S: WorkerState> Drop for Worker<S> {
    fn drop(&mut self) {
        self.join();
    }
}

/// A device's worker through its life: none yet, running, or stopped with its state kept.
pub enum Runner<S: WorkerState> {
    Idle,
    Running(Worker<S>),
    Paused(S),
}

impl<S: WorkerState> Runner<S> {
    /// Starts a worker on `state` (at activation), dropping any earlier one.
    pub fn start(&mut self, name: &str, state: S) -> Result<(), String> {
        *self = Runner::Idle;
        let worker = Worker::spawn(name, state).map_err(|e| format!("starting the {name} worker: {e}"))?;
        *self = Runner::Running(worker);
        Ok(())
    }

    /// Stops a running worker, keeps its state and hands back its queues (none when there was no
    /// worker running).
    pub fn pause(&mut self) -> Vec<Queue> {
        match std::mem::replace(self, Runner::Idle) {
            Runner::Running(worker) => match worker.stop() {
                Some(mut state) => {
                    let queues = state.take_queues();
                    *self = Runner::Paused(state);
                    queues
                }
                None => Vec::new(),
            },
            other => {
                *self = other;
                Vec::new()
            }
        }
    }

    /// Restarts a paused worker with the queues [`pause`](Runner::pause) gave.
    pub fn resume(&mut self, name: &str, queues: Vec<Queue>) -> Result<(), String> {
        match std::mem::replace(self, Runner::Idle) {
            Runner::Paused(mut state) => {
                state.put_queues(queues);
                self.start(name, state)
            }
            other => {
                *self = other;
                Err(format!("{name}: resumed without being paused"))
            }
        }
    }

    /// Ends the worker and drops its state (a driver reset, or the VM stopping).
    pub fn stop(&mut self) {
        *self = Runner::Idle;
    }

    /// The worker's state while it is paused.
    pub fn paused_state(&self) -> Option<&S> {
        match self {
            Runner::Paused(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    /// Counts the kicks it was woken by; holds one queue.
    struct Counter {
        kick: EventFd,
        kicks: u64,
        queues: Vec<Queue>,
    }

    impl WorkerState for Counter {
        const DEVICE: Device = Device::Rng;
        fn fds(&self) -> Vec<RawFd> {
            vec![self.kick.as_raw_fd()]
        }
        fn wake(&mut self, _: Wake) {
            self.kicks += self.kick.read().unwrap_or(0);
        }
        fn take_queues(&mut self) -> Vec<Queue> {
            std::mem::take(&mut self.queues)
        }
        fn put_queues(&mut self, queues: Vec<Queue>) {
            self.queues = queues;
        }
    }

    #[test]
    fn pause_hands_back_the_queues_and_keeps_the_rest() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_next_avail(7);
        let mut runner = Runner::Idle;
        runner.start("test-worker", Counter { kick: kick.try_clone().unwrap(), kicks: 0, queues: vec![queue] }).unwrap();
        kick.write(3).unwrap();
        let queues = runner.pause();
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].next_avail(), 7, "the queue comes back as the worker left it");
        // Every kick was either counted by the worker before it stopped or is still waiting.
        let waiting = kick.read().unwrap_or(0);
        assert_eq!(runner.paused_state().unwrap().kicks + waiting, 3);
        assert!(runner.pause().is_empty(), "pausing twice hands back nothing");
        runner.resume("test-worker", queues).unwrap();
        kick.write(2).unwrap();
        let queues = runner.pause();
        assert_eq!(queues.len(), 1);
        let waiting = waiting + kick.read().unwrap_or(0);
        assert_eq!(runner.paused_state().unwrap().kicks + waiting, 5, "what the worker counted stays with it");
        runner.stop();
        assert!(runner.resume("test-worker", queues).is_err(), "a stopped worker cannot resume");
    }
}
