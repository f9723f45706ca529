//! One virtual machine: guest memory, boot, ACPI tables, devices on the port I/O bus, one thread
//! per vCPU, and the main loop that waits for the guest (or a signal, or the console) to end it.

pub mod acpi;
pub mod backup;
pub mod boot;
mod builder;
pub mod bus;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod dirty;
pub mod events;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod resources;
pub mod serial_socket;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod virtio;
mod vm;

pub use builder::VmBuilder;
pub use events::EventSink;
pub use exit::ExitReason;
pub use ferro_vmm_api::VmConfig;
pub use state::SavedVm;
pub use vm::{RunOptions, Start, Vm, VmControl, run_foreground};

/// Errors building or running a VM. Every message names the input or the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] ferro_hypervisor::Error),
    #[error("{0}")]
    Config(String),
    #[error("kernel {0}")]
    Kernel(String),
    #[error("initrd {0}")]
    Initrd(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
