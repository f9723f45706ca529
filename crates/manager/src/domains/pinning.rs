//! Where a domain's threads run (virsh vcpupin, emulatorpin, vcpuinfo): live through the VMM's
//! control socket, and with `config` also in the stored definition's `[tuning]`, for the next
//! start.

use super::Domains;
use super::supervise::VMM_TIMEOUT;
use crate::error::{Error, Result};
use crate::model::DomainInfo;
use crate::vmm;
use ferro_vmm_api::CpuList;
use ferro_vmm_api::control::{Done, Request, VcpuInfoReply};

/// The thread (or threads) a CPU list is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinTarget {
    Vcpu(u8),
    /// Every VMM thread that is not a vCPU.
    Emulator,
}

impl Domains {
    /// Each vCPU's host thread, state, CPU time and affinity, and the emulator's affinity.
    pub async fn vcpu_info(&self, name: &str) -> Result<VcpuInfoReply> {
        let socket = self.active_socket(name, true)?;
        vmm::call::<VcpuInfoReply>(&socket, &Request::VcpuInfo, VMM_TIMEOUT).await.map_err(Error::vmm)
    }

    /// Pins `target` to `cpus`: live when the domain runs, and in its definition when `config`
    /// is set (which a domain that does not run needs).
    pub async fn pin(&self, name: &str, target: PinTarget, cpus: CpuList, config: bool) -> Result<DomainInfo> {
        let host = CpuList::host_online().map_err(Error::internal)?;
        cpus.check_within(&host).map_err(Error::invalid)?;
        let info = self.info(name)?;
        let mut definition = info.config.ok_or_else(|| Error::conflict(format!("domain {name} has an invalid definition")))?;
        if let PinTarget::Vcpu(vcpu) = target
            && u32::from(vcpu) >= definition.vcpus
        {
            return Err(Error::invalid(format!("vcpu {vcpu}: domain {name} has {} vCPUs (0-{})", definition.vcpus, definition.vcpus - 1)));
        }
        if info.state.is_active() {
            let socket = self.active_socket(name, true)?;
            let request = match target {
                PinTarget::Vcpu(vcpu) => Request::PinVcpu { vcpu, cpus: cpus.clone() },
                PinTarget::Emulator => Request::PinEmulator { cpus: cpus.clone() },
            };
            vmm::call::<Done>(&socket, &request, VMM_TIMEOUT).await.map_err(Error::vmm)?;
        } else if !config {
            return Err(Error::conflict(format!("domain {name} is not running: pin with config to change its definition")));
        }
        if config {
            let tuning = &mut definition.tuning;
            match target {
                PinTarget::Vcpu(vcpu) => {
                    // vCPUs before this one that had no list keep running anywhere.
                    tuning.vcpu_pin.resize(tuning.vcpu_pin.len().max(usize::from(vcpu) + 1), host.clone());
                    tuning.vcpu_pin[usize::from(vcpu)] = cpus.clone();
                }
                PinTarget::Emulator => tuning.emulator_pin = Some(cpus.clone()),
            }
            let text = toml::to_string(&definition).map_err(|e| Error::internal(format!("cannot write the definition: {e}")))?;
            self.define(&text).await?;
        }
        let what = match target {
            PinTarget::Vcpu(vcpu) => format!("vCPU {vcpu}"),
            PinTarget::Emulator => "emulator".to_string(),
        };
        self.events.emit("domain", name, "pinned", format!("{what} to CPUs {cpus}{}", if config { " (definition too)" } else { "" }));
        self.info(name)
    }
}
