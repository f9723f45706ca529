//! The guest's physical memory map (e820 types), shared by PVH and the Linux boot protocol.

use crate::layout::{ACPI_START, EBDA_START, HIMEM_START};
use crate::memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// (start, size, type) entries: conventional memory, the reserved BIOS/ACPI area below 1 MiB,
/// then every RAM region from 1 MiB up.
pub fn entries(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut out = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    const { assert!(ACPI_START > EBDA_START) };
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            out.push((start, end - start, E820_RAM));
        }
    }
    out
}
