//! virtio-rng (entropy device): fills the driver's buffers with bytes from the host's
//! getrandom, optionally limited to a number of bytes per second (a token bucket; requests wait
//! for tokens instead of getting short answers).

use super::chains::{self, Chain};
use super::worker::Worker;
use super::{Activation, GuestMemoryMmap, InterruptReason, VirtioDevice, device_type, read_config_bytes};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::timerfd::TimerFd;

const QUEUE_SIZE: u16 = 256;
/// Largest answer to one request, so one guest buffer cannot make us fill gigabytes.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    /// Bytes per second, or None for unlimited.
    rate: Option<u64>,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(rate: Option<u64>) -> Self {
        Rng { rate, worker: None }
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
        let Activation { mem, interrupt, mut queues, broken, .. } = a;
        let aq = queues.pop().ok_or("rng needs its request queue")?;
        let (mut queue, kick) = (aq.queue, aq.kick);
        let timer = TimerFd::new().map_err(|e| format!("timerfd: {e}"))?;
        let fds = vec![kick.as_raw_fd(), timer.as_raw_fd()];
        let mut bucket = self.rate.map(|rate| Bucket { rate, tokens: rate, last: Instant::now() });
        let mut timer = timer;
        let worker = Worker::spawn("virtio-rng", fds, move |wake| {
            if wake == 0 {
                let _ = kick.read();
            } else {
                let _ = timer.wait();
            }
            if broken.is_set() || !queue.ready() {
                return;
            }
            match serve(&mut queue, &mem, &mut bucket, &mut timer) {
                Ok(true) => interrupt.trigger(InterruptReason::Queue(0)),
                Ok(false) => {}
                Err(e) => broken.set("virtio-rng", &e, &*interrupt),
            }
        })
        .map_err(|e| format!("starting the rng worker: {e}"))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
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
