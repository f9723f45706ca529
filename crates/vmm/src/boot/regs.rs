//! Initial vCPU state: segments, control registers and page tables for the boot entry, MSRs,
//! FPU and the local APIC's LINT pins.

use super::EntryPoint;
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, PD_START, PDPT_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use ferro_hypervisor::ioctl_err;
use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

// Boot GDT: null, 32-bit code, 64-bit code, data, TSS.
const GDT: [u64; 5] = [0, 0x00cf_9b00_0000_ffff, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
const SEL_CODE32: u16 = 0x08;
const SEL_CODE64: u16 = 0x10;
const SEL_DATA: u16 = 0x18;
const SEL_TSS: u16 = 0x20;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Decodes a GDT entry into the hidden segment state KVM wants.
fn segment(selector: u16) -> kvm_segment {
    let d = GDT[usize::from(selector >> 3)];
    let limit_raw = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and (for long-mode entry) identity page tables.
pub fn write_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<()> {
    let werr = |e: vm_memory::GuestMemoryError| Error::Internal(format!("writing boot tables: {e}"));
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64)).map_err(werr)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(werr)?;
    if let EntryPoint::Linux64 { .. } = entry {
        mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START)).map_err(werr)?;
        mem.write_obj(PD_START | 0x3, GuestAddress(PDPT_START)).map_err(werr)?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_START + i * 8)).map_err(werr)?;
        }
    }
    Ok(())
}

/// Sets segments, control registers and general registers of the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: EntryPoint) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment(SEL_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SEL_TSS);
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        EntryPoint::Pvh { entry } => {
            sregs.cs = segment(SEL_CODE32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64 { entry } => {
            sregs.cs = segment(SEL_CODE64);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
    Ok(())
}

/// FPU defaults (as after FNINIT) and the MSRs a freshly reset CPU has.
pub fn setup_fpu_and_msrs(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))?;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, 1), // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Internal("building the MSR list".into()))?;
    let written = vcpu.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(Error::Internal(format!("KVM accepted {written} of {} boot MSRs", entries.len())));
    }
    Ok(())
}

/// Wires LINT0 to ExtINT and LINT1 to NMI, as firmware does on a PC.
pub fn setup_lapic_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl_err("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs32 = segment(SEL_CODE32);
        assert_eq!((cs32.base, cs32.limit, cs32.db, cs32.l, cs32.type_), (0, 0xffff_ffff, 1, 0, 0xb));
        let cs64 = segment(SEL_CODE64);
        assert_eq!((cs64.l, cs64.db), (1, 0));
        let tss = segment(SEL_TSS);
        assert_eq!((tss.type_, tss.s, tss.limit), (0xb, 0, 0x67));
    }
}
