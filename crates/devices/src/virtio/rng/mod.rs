//! virtio-rng (entropy device): fills the driver's buffers with bytes from the host's
//! getrandom, optionally limited to a number of bytes per second (a token bucket; requests wait
//! for tokens instead of getting short answers).

use super::worker::Worker;
use super::{Activation, InterruptReason, VirtioDevice, device_type, read_config_bytes};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;
use vm_memory::Bytes;
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
        let Activation { mem, interrupt, mut queues, .. } = a;
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
            let mut used_any = false;
            loop {
                let budget = match &mut bucket {
                    Some(b) => {
                        b.refill();
                        if b.tokens == 0 {
                            let wait = Duration::from_secs_f64(1.0 / b.rate as f64).max(Duration::from_millis(1));
                            let _ = timer.reset(wait, None);
                            break;
                        }
                        b.tokens as usize
                    }
                    None => MAX_REQUEST,
                };
                let Some(chain) = queue.pop_descriptor_chain(&mem) else { break };
                let head = chain.head_index();
                let mut written = 0usize;
                for desc in chain.writable() {
                    let want = (desc.len() as usize).min(budget.min(MAX_REQUEST) - written);
                    if want == 0 {
                        break;
                    }
                    let mut bytes = vec![0u8; want];
                    if getrandom(&mut bytes).is_err() || mem.write_slice(&bytes, desc.addr()).is_err() {
                        break;
                    }
                    written += want;
                }
                if let Some(b) = &mut bucket {
                    b.tokens -= written as u64;
                }
                // A chain with bad addresses gets a zero-length answer; the device keeps going.
                if queue.add_used(&mem, head, written as u32).is_err() {
                    break;
                }
                used_any = true;
            }
            if used_any && queue.needs_notification(&mem).unwrap_or(true) {
                interrupt.trigger(InterruptReason::Queue(0));
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
