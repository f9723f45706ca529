//! Per-vCPU CPUID, derived from what KVM supports: APIC ids in leaves 1 and 0xB, the topology
//! (one socket, one thread per core), and the hypervisor bit. The KVM paravirt leaves
//! (0x4000_0000 "KVMKVMKVM", 0x4000_0001 features) pass through so guests use kvm-clock.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` cores.
fn core_id_bits(n: u8) -> u32 {
    (u32::from(n).max(1) - 1).checked_ilog2().map_or(0, |b| b + 1)
}

/// The CPUID table for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                e.eax &= 0x3fff;
                e.eax |= (u32::from(count).saturating_sub(1)) << 26;
            }
            LEAF_TOPOLOGY => {
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        e.eax = 0; // SMT level: no threads
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_id_bits(count);
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
        ];
        let supported = CpuId::from_entries(&entries).unwrap();
        let c = for_vcpu(&supported, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (2, 4, 3));
    }

    #[test]
    fn core_bits() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(core_id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
