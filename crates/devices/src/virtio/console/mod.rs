//! virtio-console with one port (no multiport): receiveq 0 carries host input to the guest,
//! transmitq 1 guest output to the host. The host side (`port`) is this process's stdio, a new
//! pty, or a unix socket; it outlives driver resets, so a connected client stays connected.

mod port;
mod state;

pub use port::ConsoleIo;
pub use state::ConsoleState;

use super::chains::{self, Broken, Chain, gather, scatter};
use super::worker::{Runner, Wake, WorkerState};
use super::{
    Activation, GuestMemoryMmap, InterruptReason, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioDeviceState, VirtioInterrupt, device_type,
    read_config_bytes,
};
use port::Port;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 64;
/// Largest piece of guest output copied at once.
const TX_PIECE: usize = 4096;
/// Most host input put in one receive chain.
const RX_MAX: usize = 64 * 1024;

pub struct Console {
    port: Arc<Mutex<Port>>,
    acked_features: u64,
    runner: Runner<ConsoleWorker>,
}

const NAME: &str = "virtio-console";

impl Console {
    pub fn new(io: ConsoleIo) -> Result<Console, String> {
        Ok(Console { port: Arc::new(Mutex::new(Port::new(io)?)), acked_features: 0, runner: Runner::Idle })
    }
}

/// The worker's side: both queues and their kicks, and the port (shared with the device, which
/// outlives driver resets).
struct ConsoleWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    broken: Broken,
    queues: Vec<Queue>,
    kicks: [EventFd; 2],
    port: Arc<Mutex<Port>>,
    port_fd: RawFd,
}

impl WorkerState for ConsoleWorker {
    const DEVICE: ferro_jail::seccomp::Device = ferro_jail::seccomp::Device::Console;

    fn fds(&self) -> Vec<RawFd> {
        vec![self.kicks[0].as_raw_fd(), self.kicks[1].as_raw_fd(), self.port_fd]
    }

    fn wake(&mut self, wake: Wake) {
        let mut port = self.port.lock().unwrap_or_else(|p| p.into_inner());
        let (mem, interrupt, broken) = (&self.mem, &self.interrupt, &self.broken);
        let [rxq, txq] = self.queues.as_mut_slice() else { return };
        let result = match wake {
            0 => {
                let _ = self.kicks[0].read();
                Ok(())
            }
            1 => {
                let _ = self.kicks[1].read();
                if broken.is_set() {
                    Ok(())
                } else {
                    transmit(txq, mem, &mut port).map(|notify| {
                        if notify {
                            interrupt.trigger(InterruptReason::Queue(1));
                        }
                    })
                }
            }
            _ => {
                port.poll();
                Ok(())
            }
        };
        let result = result.and_then(|()| if broken.is_set() { Ok(()) } else { receive(rxq, mem, &mut port, interrupt.as_ref()) });
        if let Err(why) = result {
            broken.set(NAME, &why, interrupt.as_ref());
        }
        port.rearm();
    }

    fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    fn put_queues(&mut self, queues: Vec<Queue>) {
        self.queues = queues;
    }
}

/// Copies guest output from the transmit chains to the port; every chain is answered with
/// length 0 (the device writes nothing into them).
fn transmit(queue: &mut Queue, mem: &GuestMemoryMmap, port: &mut Port) -> Result<bool, String> {
    chains::drain(queue, mem, |chain| {
        let chain = Chain::parse(chain, mem);
        if chain.fault.is_none() {
            let mut buf = [0u8; TX_PIECE];
            let total = chain.readable_len();
            let mut done = 0;
            while done < total {
                let n = (total - done).min(TX_PIECE as u64) as usize;
                if !gather(mem, &chain.readable, done, &mut buf[..n]) {
                    break;
                }
                port.write_output(&buf[..n]);
                done += n as u64;
            }
        }
        0
    })
}

/// Moves waiting host input into the guest's receive buffers while there are both.
fn receive(queue: &mut Queue, mem: &GuestMemoryMmap, port: &mut Port, interrupt: &dyn VirtioInterrupt) -> Result<(), String> {
    let mut used = false;
    while !port.input.is_empty() {
        let Some(chain) = chains::next_chain(queue, mem)? else { break };
        let head = chain.head_index();
        let chain = Chain::parse(chain, mem);
        let mut n = 0;
        if chain.fault.is_none() && chain.readable.is_empty() {
            let take = port.input.len().min(chain.writable_len().min(RX_MAX as u64) as usize);
            let bytes: Vec<u8> = port.input.iter().take(take).copied().collect();
            if scatter(mem, &chain.writable, 0, &bytes) {
                port.input.drain(..take);
                n = take as u32;
            }
        }
        queue.add_used(mem, head, n).map_err(|e| format!("receive queue head {head}: {e}"))?;
        used = true;
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.trigger(InterruptReason::Queue(0));
    }
    Ok(())
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none of their features is offered.
        read_config_bytes(&[0; 12], offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let Activation { mem, interrupt, queues, features, broken } = a;
        let (queues, kicks): (Vec<_>, Vec<_>) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
        let Ok(kicks) = <[EventFd; 2]>::try_from(kicks) else {
            return Err("virtio-console needs its receive and transmit queues".into());
        };
        self.acked_features = features;
        let port_fd = self.port.lock().unwrap_or_else(|p| p.into_inner()).epoll_fd();
        self.runner.start(NAME, ConsoleWorker { mem, interrupt, broken, queues, kicks, port: self.port.clone(), port_fd })
    }

    fn pause(&mut self) -> Vec<Queue> {
        self.runner.pause()
    }

    fn resume(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        self.runner.resume(NAME, queues)
    }

    fn reset(&mut self) {
        self.runner.stop();
        self.acked_features = 0;
    }

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState::Console(self.state())
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Console(s) => {
                self.restore_state(s);
                Ok(())
            }
            other => Err(other.mismatch(NAME)),
        }
    }
}
