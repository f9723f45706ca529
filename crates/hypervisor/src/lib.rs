//! Thin, safe layer over `kvm-ioctls`.
//!
//! Owns: opening `/dev/kvm` with errors a user can act on, probing which KVM module backs it
//! (hardware VT-x/AMD-V or the kvm-pvm software mode, see docs/kvm-pvm.md), caching the
//! expensive supported-CPUID query, and reading/writing the complete state of a vCPU and of a VM
//! (for snapshot and migration). [`host_memory`] reads what the host kernel says about its
//! memory (huge pages, THP, KSM).

pub mod host_memory;
mod probe;
mod state;

pub use kvm_bindings;
pub use kvm_ioctls;
pub use probe::{HostKind, probe_host_kind};
pub use state::{VcpuState, VmState};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::io;

/// Errors from the hypervisor layer. Each message names what failed and, where possible, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) or enable virtualization in the firmware")]
    NoKvmDevice,
    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group (usermod -aG kvm $USER) or run as root")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks the capability {0:?}, which the VMM needs")]
    MissingCap(Cap),
    #[error("KVM ioctl {what} failed: {err}")]
    Ioctl { what: &'static str, err: kvm_ioctls::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for mapping a kvm-ioctls error into [`Error::Ioctl`] naming the call.
pub fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Ioctl { what, err }
}

/// Capabilities every VM we build relies on.
pub const REQUIRED_CAPS: &[Cap] = &[
    Cap::Irqchip,
    Cap::Pit2,
    Cap::UserMemory,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::IrqRouting,
    Cap::SetTssAddr,
    Cap::ExtCpuid,
    Cap::MpState,
    Cap::Xsave,
    Cap::Xcrs,
    Cap::VcpuEvents,
    Cap::Debugregs,
    Cap::AdjustClock,
    Cap::ImmediateExit,
];

/// An open `/dev/kvm` with the host facts the VMM needs.
pub struct Hypervisor {
    kvm: Kvm,
    kind: HostKind,
    supported_cpuid: CpuId,
}

impl Hypervisor {
    /// Opens `/dev/kvm`, checks the API version and required capabilities, and queries the
    /// supported CPUID once (every CPUID traps on a nested host, so the query is costly).
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => Error::NoKvmDevice,
            libc::EACCES | libc::EPERM => Error::KvmPermission,
            _ => Error::OpenKvm(io::Error::from_raw_os_error(e.errno())),
        })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(Error::ApiVersion(api));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(Error::MissingCap(*cap));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Hypervisor { kvm, kind: probe_host_kind(), supported_cpuid })
    }

    /// The underlying `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Which KVM module backs `/dev/kvm`.
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// The CPUID entries KVM supports, as queried once at open.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The largest vCPU count KVM accepts for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<VmFd> {
        self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))
    }
}
