//! The `kernel` target: a kernel file as `ferro run --kernel` and ferrod's domains give it to the
//! VMM, loaded by `ferro_vmm::boot::load` (the format is told by the file's bytes: ELF64 with or
//! without a PVH note, 32-bit ELF with one, bzImage) with an initrd and a command line into a
//! small guest memory, as a VM is booted.
//!
//! Besides never panicking: nothing may be written outside guest memory (the memory lies between
//! inaccessible pages, see `guest_memory`), and when the kernel loads, the initrd must be where
//! the boot information given to the kernel (zero page or PVH start info) says, whole, above
//! 1 MiB and inside guest memory.

use crate::guest_memory::Lease;
use ferro_devices::virtio::GuestMemoryMmap;
use ferro_vmm::boot::{self, BootSource, EntryPoint};
use ferro_vmm::layout::{HIMEM_START, PVH_INFO_START, ZERO_PAGE_START};
use ferro_vmm_api::Kernel;
use std::path::PathBuf;
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of the target: the low area, a kernel of up to a few MiB and the initrd.
const MEMORY: usize = 8 << 20;
/// The initrd: 64 KiB of a pattern that tells where each byte came from.
const INITRD: usize = 64 << 10;

fn initrd_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn initrd() -> Option<&'static PathBuf> {
    static INITRD_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    INITRD_FILE
        .get_or_init(|| {
            let contents: Vec<u8> = (0..INITRD).map(initrd_byte).collect();
            crate::process_file("kernel-initrd-", ".img", &contents)
        })
        .as_ref()
}

/// Loads the input as a kernel; returns how the kernel would be entered, when it loaded.
pub fn kernel(data: &[u8]) -> Option<EntryPoint> {
    let initrd = initrd()?;
    let path = crate::scratch_file("kernel", data)?;
    let lease = Lease::new(MEMORY);
    let entry = lease.as_ref().and_then(|lease| {
        let kernel = Kernel::Path(path.clone());
        let src = BootSource { kernel: &kernel, initrd: Some(initrd.as_path()), cmdline: "console=ttyS0 panic=-1", rsdp: 0xe0000 };
        let entry = boot::load(lease.mem(), &src).ok()?;
        check_initrd(lease.mem(), entry);
        Some(entry)
    });
    let _ = std::fs::remove_file(&path);
    entry
}

/// Panics (the fuzzer's crash) unless the boot information puts the initrd, whole and intact,
/// above 1 MiB inside guest memory.
fn check_initrd(mem: &GuestMemoryMmap, entry: EntryPoint) {
    let read_u32 = |addr: u64| mem.read_obj::<u32>(GuestAddress(addr)).unwrap_or(0);
    let read_u64 = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap_or(0);
    let (start, size) = match entry {
        // hvm_start_info: nr_modules at +12, modlist_paddr at +16; a module: paddr, size.
        EntryPoint::Pvh { .. } => {
            assert_eq!(read_u32(PVH_INFO_START + 12), 1, "PVH start info without the initrd module");
            let module = read_u64(PVH_INFO_START + 16);
            (read_u64(module), read_u64(module + 8))
        }
        // boot_params: hdr.ramdisk_image at 0x218, hdr.ramdisk_size at 0x21c.
        EntryPoint::Linux64 { .. } => (u64::from(read_u32(ZERO_PAGE_START + 0x218)), u64::from(read_u32(ZERO_PAGE_START + 0x21c))),
    };
    assert_eq!(size, INITRD as u64, "the boot information gives the initrd's size as {size}");
    assert!(
        start >= HIMEM_START && start + size <= MEMORY as u64,
        "the initrd at {start:#x} (+{size:#x}) is not in guest memory above 1 MiB"
    );
    let mut loaded = vec![0u8; INITRD];
    mem.read_slice(&mut loaded, GuestAddress(start)).unwrap_or_else(|e| panic!("the initrd at {start:#x} cannot be read back: {e}"));
    if let Some(i) = (0..INITRD).find(|&i| loaded[i] != initrd_byte(i)) {
        panic!("the initrd at {start:#x} differs from the file at byte {i}");
    }
}
