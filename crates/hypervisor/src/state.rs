//! Complete vCPU and VM state, read out and written back for snapshot and migration.
//!
//! The structs are plain serde values so a snapshot file or a migration stream can carry them.
//! The restore order follows what KVM needs: MP state and registers first, LAPIC before MSRs
//! (TSC deadline depends on it), vCPU events last (they may carry a pending exception).

use crate::{Result, ioctl_err};
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Everything KVM holds for one vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

impl VcpuState {
    /// Reads the state of `vcpu`; `msr_indices` lists the MSRs to save (KVM_GET_MSR_INDEX_LIST).
    /// Must run on a vCPU that is not inside KVM_RUN.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self> {
        let entries: Vec<kvm_msr_entry> =
            msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| crate::Error::Ioctl {
            what: "KVM_GET_MSRS (too many MSRs)",
            err: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl_err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?,
            msrs: msrs.as_slice()[..read].to_vec(),
            lapic: vcpu.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(ioctl_err("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes this state into `vcpu` (whose CPUID must already be set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_mp_state(self.mp_state).map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        vcpu.set_sregs(&self.sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(ioctl_err("KVM_SET_REGS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE (or deserialized
        // from one), so KVM reads exactly the struct it expects.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(ioctl_err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| crate::Error::Ioctl {
            what: "KVM_SET_MSRS (too many MSRs)",
            err: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let written = vcpu.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(crate::Error::Ioctl {
                what: "KVM_SET_MSRS (an MSR was refused)",
                err: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        vcpu.set_vcpu_events(&self.events).map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT and the kvmclock.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the VM-wide state of `vm` (which has an in-kernel irqchip and PIT).
    pub fn save(vm: &VmFd) -> Result<Self> {
        let chip = |id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut c).map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes this state into `vm`.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(ioctl_err("KVM_SET_PIT2"))?;
        // Only the clock value is restored; the flags KVM reported describe the source host.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
