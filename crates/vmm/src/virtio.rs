//! Virtio devices from their configuration: opening what each needs on the host (image, tap,
//! socket, pty), and the handles the VMM keeps to them while the VM runs (balloon control,
//! stdio console input, disk images and their counters, NIC counters).

use crate::{Error, Result};
use ferro_devices::virtio::balloon::{Balloon, BalloonControl};
use ferro_devices::virtio::block::{Block, BlockCounters, BlockDisk};
use ferro_devices::virtio::console::{Console, ConsoleIo};
use ferro_devices::virtio::net::NetCounters;
use ferro_devices::virtio::{VirtioDevice, net::Net, rng::Rng, vsock::Vsock};
use ferro_vmm_api::control::{DiskStats, NicStats};
use ferro_vmm_api::{ConsoleBackend, DeviceConfig, DeviceKind, MacAddr};
use std::sync::Arc;

/// Handles to devices the VMM controls while the VM runs (the control socket uses them).
#[derive(Clone, Default)]
pub struct DeviceHandles {
    pub balloon: Option<Arc<BalloonControl>>,
    /// With a virtio console on stdio: where the VMM's stdin reader sends the terminal's input
    /// (instead of COM1). stdin is one per process, so there is at most one such console.
    pub console_input: Option<Arc<std::fs::File>>,
    /// Each disk's id and request counters, in configuration order.
    pub disks: Vec<(String, Arc<BlockCounters>)>,
    /// Each disk's image, in configuration order (for disk snapshots and a migration's hand-over).
    pub disk_images: Vec<BlockDisk>,
    /// Each NIC's id, MAC and traffic counters, in configuration order.
    pub nics: Vec<(String, MacAddr, Arc<NetCounters>)>,
}

impl DeviceHandles {
    pub fn disk_stats(&self) -> Vec<DiskStats> {
        self.disks.iter().map(|(id, c)| c.stats(id)).collect()
    }

    pub fn nic_stats(&self) -> Vec<NicStats> {
        self.nics.iter().map(|(id, mac, c)| c.stats(id, &mac.to_string())).collect()
    }
}

/// When a VM's writable disks are opened (read-only ones always are at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOpening {
    /// While the devices are built.
    Now,
    /// Later, by activating them: a migration's destination, whose source holds them until the
    /// switch-over (docs/migration.md). Nothing of them is opened, locked or read before.
    Later,
}

/// Builds the device `config` describes, keeping its handles in `handles`.
pub fn build(config: &DeviceConfig, handles: &mut DeviceHandles, disks: DiskOpening) -> Result<Box<dyn VirtioDevice>> {
    let id = &config.id;
    match &config.kind {
        DeviceKind::Rng { rate } => Ok(Box::new(Rng::new(*rate))),
        DeviceKind::Balloon { size_mib, deflate_on_oom } => {
            if handles.balloon.is_some() {
                return Err(Error::Config("only one balloon device is supported".into()));
            }
            let balloon = Balloon::new(*size_mib, *deflate_on_oom).map_err(|e| Error::Io("eventfd", e))?;
            handles.balloon = Some(balloon.control());
            Ok(Box::new(balloon))
        }
        DeviceKind::Net { tap, mac, fd } => {
            let net = match fd {
                Some(fd) => Net::from_fd(*fd, tap, *mac).map_err(|e| Error::Config(format!("{id}: tap {tap} on inherited fd {fd}: {e}")))?,
                None => Net::new(tap, *mac).map_err(|e| Error::Config(format!("{id}: --net tap={tap}: {e}")))?,
            };
            handles.nics.push((id.clone(), net.mac(), net.counters()));
            Ok(Box::new(net))
        }
        DeviceKind::Block { path, format, readonly } => {
            let block = if !*readonly && disks == DiskOpening::Later {
                Block::new_inactive(path, *format)
            } else {
                Block::new(path, *format, *readonly).map_err(|e| Error::Config(format!("{id}: {e}")))?
            };
            handles.disks.push((id.clone(), block.counters()));
            handles.disk_images.push(block.disk_handle());
            Ok(Box::new(block))
        }
        DeviceKind::Console { backend } => {
            let io = match backend {
                ConsoleBackend::Stdio => {
                    if handles.console_input.is_some() {
                        return Err(Error::Config("only one virtio console can be on stdio".into()));
                    }
                    let (input, feed) = console_pipe()?;
                    handles.console_input = Some(Arc::new(feed));
                    ConsoleIo::Stdio { input }
                }
                ConsoleBackend::Pty => ConsoleIo::Pty,
                ConsoleBackend::Socket(path) => ConsoleIo::Socket(path.clone()),
            };
            Ok(Box::new(Console::new(io).map_err(|e| Error::Config(format!("{id}: --console: {e}")))?))
        }
        DeviceKind::Vsock { cid, uds } => {
            Ok(Box::new(Vsock::new(*cid, uds).map_err(|e| Error::Config(format!("{id}: --vsock uds: {e}")))?))
        }
    }
}

/// A pipe from the VMM's stdin reader to a stdio console: (read end, write end). The write end is
/// nonblocking so a guest that never reads cannot stall the VMM's main loop (input is dropped).
fn console_pipe() -> Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and belong to nobody else.
    let (read, write) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFL on the write end we own.
    unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((read, write))
}
