//! Guest RAM: anonymous host mappings split around the 32-bit device hole, registered with KVM.

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START, MIN_MEMORY};
use crate::{Error, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The (start, size) RAM ranges for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// Checks the size against our minimum and against what the host has.
pub fn check_size(size: u64) -> Result<()> {
    if size < MIN_MEMORY {
        return Err(Error::Config(format!("memory {} MiB is too small: at least {} MiB is needed", size >> 20, MIN_MEMORY >> 20)));
    }
    if let Some(host) = host_memory_bytes() {
        if size > host {
            return Err(Error::Config(format!(
                "memory {} MiB is more than this host has ({} MiB in total)",
                size >> 20,
                host >> 20
            )));
        }
    }
    Ok(())
}

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Maps guest RAM and registers every region with KVM as a memory slot.
pub fn create(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    check_size(size)?;
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|e| Error::Config(format!("cannot map {} MiB of guest memory: {e}", size >> 20)))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Internal(format!("guest memory region has no host address: {e}")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // Guest RAM is never needed in a forked child (see vm::defer_kvm_teardown); this also
        // keeps fork from copying its page tables.
        // SAFETY: madvise on a mapping `mem` owns, covering exactly the region.
        unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTFORK) };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the Vm
        // struct keeps both and drops the VM fd first), and the slots do not overlap.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(ferro_hypervisor::ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), (1 << 30) as usize));
    }

    #[test]
    fn too_small_and_too_large_are_refused() {
        assert!(check_size(1 << 20).unwrap_err().to_string().contains("too small"));
        assert!(check_size(1 << 50).unwrap_err().to_string().contains("more than this host has"));
        assert!(check_size(64 << 20).is_ok());
    }
}
