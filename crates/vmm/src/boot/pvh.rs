//! The PVH boot protocol: `hvm_start_info` with the command line, the memory map, the RSDP and
//! the initrd as module 0.

use super::e820;
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

pub fn write_start_info(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>, rsdp: u64) -> Result<()> {
    let map = e820::entries(mem);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::Internal("memory map has too many entries".into()));
    }
    let werr = |e: vm_memory::GuestMemoryError| Error::Internal(format!("writing PVH start info: {e}"));
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr: *addr, size: *size, type_: *kind, reserved: 0 };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(werr)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START)).map_err(werr)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START)).map_err(werr)?;
    Ok(())
}
