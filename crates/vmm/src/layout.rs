//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  boot GDT (4 entries), boot IDT after it
//! 0x0000_6000  PVH hvm_start_info, memory map at +0x40, module list at +0x400
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_9000  Linux 64-bit boot page tables (PML4, PDPT, PD: 1 GiB identity map)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX bytes)
//! 0x0009_fc00  -- end of conventional memory; reserved up to 1 MiB --
//! 0x000e_0000  ACPI tables (RSDP first, where legacy scans look)
//! 0x0010_0000  kernel (1 MiB and up); initrd at the top of low RAM
//! 0xc000_0000  32-bit device hole: PCI MMIO, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 32;
pub const PVH_MODLIST_START: u64 = 0x6400;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's COMMAND_LINE_SIZE on x86 is 2048 including the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The smallest guest we build: room for the low area, a kernel and an initrd.
pub const MIN_MEMORY: u64 = 16 << 20;
