//! virtio-rng (entropy device): fills the driver's buffers with bytes from the host's
//! getrandom, optionally limited to a number of bytes per second (a token bucket; requests wait
//! for tokens instead of getting short answers).

use super::chains::{self, Broken, Chain};
use super::worker::{Runner, Wake, WorkerState};
use super::{Activation, GuestMemoryMmap, InterruptReason, VirtioDevice, VirtioDeviceState, VirtioInterrupt, device_type, read_config_bytes};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

const QUEUE_SIZE: u16 = 256;
/// Largest answer to one request, so one guest buffer cannot make us fill gigabytes.
const MAX_REQUEST: usize = 64 * 1024;
const NAME: &str = "virtio-rng";

pub struct Rng {
    /// Bytes per second, or None for unlimited.
    rate: Option<u64>,
    runner: Runner<RngWorker>,
}

impl Rng {
    pub fn new(rate: Option<u64>) -> Self {
        Rng { rate, runner: Runner::Idle }
    }
}

/// The worker's side: the request queue, its kick, and the rate limit's timer and bucket.
struct RngWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    broken: Broken,
    queues: Vec<Queue>,
    kick: EventFd,
    timer: TimerFd,
    bucket: Option<Bucket>,
}

impl WorkerState for RngWorker {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Rng;

    fn fds(&self) -> Vec<RawFd> {
        vec![self.kick.as_raw_fd(), self.timer.as_raw_fd()]
    }

    fn wake(&mut self, wake: Wake) {
        if wake == 0 {
            let _ = self.kick.read();
        } else {
            let _ = self.timer.wait();
        }
        let Some(queue) = self.queues.first_mut() else { return };
        if self.broken.is_set() || !queue.ready() {
            return;
        }
        match serve(queue, &self.mem, &mut self.bucket, &mut self.timer) {
            Ok(true) => self.interrupt.trigger(InterruptReason::Queue(0)),
            Ok(false) => {}
            Err(e) => self.broken.set(NAME, &e, &*self.interrupt),
        }
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}

/// Answers every request the bucket allows; returns whether the driver wants an interrupt.
/// Requests beyond the budget stay in the ring and the timer wakes the worker for them.
fn serve(queue: &mut Queue, mem: &GuestMemoryMmap, bucket: &mut Option<Bucket>, timer: &mut TimerFd) -> Result<bool, String> {
    let mut used = false;
    loop {
        let budget = match bucket {
            Some(b) => {
                b.refill();
                if b.tokens == 0 {
                    let wait = Duration::from_secs_f64(1.0 / b.rate as f64).max(Duration::from_millis(1));
                    let _ = timer.reset(wait, None);
                    break;
                }
                (b.tokens as usize).min(MAX_REQUEST)
            }
            None => MAX_REQUEST,
        };
        queue.disable_notification(mem).map_err(|e| format!("used ring: {e}"))?;
        let Some(chain) = chains::next_chain(queue, mem)? else {
            // Re-enable kicks, then look once more so a request that raced in is not missed.
            if queue.enable_notification(mem).map_err(|e| format!("used ring: {e}"))? {
                continue;
            }
            break;
        };
        let head = chain.head_index();
        let parsed = Chain::parse(chain, mem);
        let mut written = 0usize;
        if parsed.fault.is_none() {
            let want = (parsed.writable_len() as usize).min(budget);
            let mut bytes = vec![0u8; want];
            if getrandom(&mut bytes).is_ok() && chains::scatter(mem, &parsed.writable, 0, &bytes) {
                written = want;
            }
        }
        if let Some(b) = bucket {
            b.tokens -= written as u64;
        }
        // A faulty chain (bad addresses, a loop, a read-only buffer) gets a zero-length answer.
        queue.add_used(mem, head, written as u32).map_err(|e| format!("descriptor head {head}: {e}"))?;
        used = true;
    }
    Ok(used && queue.needs_notification(mem).unwrap_or(true))
}

struct Bucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self) {
        let now = Instant::now();
        let add = (now - self.last).as_secs_f64() * self.rate as f64;
        if add >= 1.0 {
            self.tokens = (self.tokens + add as u64).min(self.rate);
            self.last = now;
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_RING_F_EVENT_IDX | super::VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let Activation { mem, interrupt, queues, broken, .. } = a;
        let (queues, mut kicks): (Vec<_>, Vec<_>) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
        let kick = kicks.pop().ok_or("rng needs its request queue")?;
        let timer = TimerFd::new().map_err(|e| format!("timerfd: {e}"))?;
        let bucket = self.rate.map(|rate| Bucket { rate, tokens: rate, last: Instant::now() });
        self.runner.start(NAME, RngWorker { mem, interrupt, broken, queues, kick, timer, bucket })
    }

    fn pause(&mut self) -> Vec<Queue> {
        self.runner.pause()
    }

    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        self.runner.resume(NAME, queues)
    }

    fn reset(&mut self) {
        self.runner.stop();
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Rng => Ok(()),
            other => Err(other.mismatch(NAME)),
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn its_state_is_its_kind_and_other_kinds_are_refused() {
        let rng = Rng::new(Some(1024));
        let state = rng.save();
        let back: VirtioDeviceState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let mut fresh = Rng::new(Some(1024));
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), state);
        let console = crate::virtio::console::ConsoleState {
            backend: "stdio".into(),
            path: None,
            acked_features: 0,
            input: Vec::new(),
            output: Vec::new(),
        };
        let err = fresh.restore(&VirtioDeviceState::Console(console)).unwrap_err();
        assert_eq!(err, "saved virtio-console state does not fit a virtio-rng device");
    }
}
