//! virtio-console with one port (no multiport): receiveq 0 carries host input to the guest,
//! transmitq 1 guest output to the host. The host side (`port`) is this process's stdio, a new
//! pty, or a unix socket; it outlives driver resets, so a connected client stays connected.

mod port;
mod state;

pub use port::ConsoleIo;
pub use state::ConsoleState;

use super::chains::{self, Chain, gather, scatter};
use super::worker::Worker;
use super::{Activation, GuestMemoryMmap, InterruptReason, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioInterrupt, device_type, read_config_bytes};
use port::Port;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};

const QUEUE_SIZE: u16 = 64;
/// Largest piece of guest output copied at once.
const TX_PIECE: usize = 4096;
/// Most host input put in one receive chain.
const RX_MAX: usize = 64 * 1024;

pub struct Console {
    port: Arc<Mutex<Port>>,
    acked_features: u64,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(io: ConsoleIo) -> Result<Console, String> {
        Ok(Console { port: Arc::new(Mutex::new(Port::new(io)?)), acked_features: 0, worker: None })
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
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err("virtio-console needs its receive and transmit queues".into());
        };
        self.acked_features = features;
        let (mut rxq, mut txq) = (rx.queue, tx.queue);
        let (rx_kick, tx_kick) = (rx.kick, tx.kick);
        let port = self.port.clone();
        let epoll_fd = port.lock().unwrap_or_else(|p| p.into_inner()).epoll_fd();
        let fds = vec![rx_kick.as_raw_fd(), tx_kick.as_raw_fd(), epoll_fd];
        let worker = Worker::spawn("virtio-console", fds, move |wake| {
            let mut port = port.lock().unwrap_or_else(|p| p.into_inner());
            let result = match wake {
                0 => {
                    let _ = rx_kick.read();
                    Ok(())
                }
                1 => {
                    let _ = tx_kick.read();
                    if broken.is_set() {
                        Ok(())
                    } else {
                        transmit(&mut txq, &mem, &mut port).map(|notify| {
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
            let result = result.and_then(|()| if broken.is_set() { Ok(()) } else { receive(&mut rxq, &mem, &mut port, interrupt.as_ref()) });
            if let Err(why) = result {
                broken.set("virtio-console", &why, interrupt.as_ref());
            }
            port.rearm();
        })
        .map_err(|e| format!("starting the virtio-console worker: {e}"))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked_features = 0;
    }
}
