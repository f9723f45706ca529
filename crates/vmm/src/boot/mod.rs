//! Loading a guest kernel and preparing the boot state.
//!
//! Formats, detected from the file's bytes: ELF with a PVH note (booted through the PVH entry in
//! 32-bit protected mode with an `hvm_start_info`), ELF without one (the 64-bit Linux boot
//! protocol, entered in long mode with a zero page), and bzImage (64-bit Linux boot protocol).
//! The kernel is a file, or one of the test guests built into this program (`ferro-guests`).

mod e820;
mod elf32;
mod linux;
mod pvh;
pub mod regs;

use crate::layout::{CMDLINE_MAX, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use ferro_vmm_api::Kernel;
use linux_loader::loader::{self, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// What the guest should be booted with.
pub struct BootSource<'a> {
    pub kernel: &'a Kernel,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub rsdp: u64,
}

/// How the boot vCPU must start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode at `entry`, %ebx = start_info.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode at `entry`, %rsi = zero page.
    Linux64 { entry: u64 },
}

/// The kernel formats we recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    Elf32,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(|e| Error::Kernel(format!("{}: cannot read: {e}", path.display())))?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return match head.get(4) {
            Some(2) => Ok(KernelFormat::Elf),
            Some(1) => Ok(KernelFormat::Elf32),
            _ => Err(Error::Kernel(format!("{}: ELF of an unknown class", path.display()))),
        };
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::Kernel(format!("{}: not a kernel this VMM can boot (expected an ELF vmlinux or a bzImage)", path.display())))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Refuses a command line the guest could not be given.
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::Config(format!("kernel command line is {} bytes; the limit is {} bytes", cmdline.len(), CMDLINE_MAX - 1)));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::Config("kernel command line contains a NUL byte".into()));
    }
    Ok(())
}

/// Loads the kernel, initrd and command line into `mem` and writes the boot structures.
pub fn load(mem: &GuestMemoryMmap, src: &BootSource) -> Result<EntryPoint> {
    check_cmdline(src.cmdline)?;
    let (mut file, name) = open_kernel(src.kernel)?;
    let path = name.as_path();
    let format = detect_format(&mut file, path)?;
    let low_ram_end = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
    let write_cmdline = || -> Result<()> {
        let mut cmdline = src.cmdline.as_bytes().to_vec();
        cmdline.push(0);
        mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
            .map_err(|e| Error::Internal(format!("writing the command line: {e}")))
    };
    if format == KernelFormat::Elf32 {
        let (entry, kernel_end) = elf32::load(mem, &mut file, path)?;
        let initrd = src.initrd.map(|p| load_initrd(mem, p, kernel_end, low_ram_end)).transpose()?;
        write_cmdline()?;
        pvh::write_start_info(mem, initrd, src.rsdp)?;
        return Ok(EntryPoint::Pvh { entry });
    }
    let loaded = match format {
        KernelFormat::BzImage => loader::BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))),
        _ => loader::Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(|e| Error::Kernel(format!("{}: cannot load: {e}", path.display())))?;
    let initrd = src.initrd.map(|p| load_initrd(mem, p, loaded.kernel_end, low_ram_end)).transpose()?;
    write_cmdline()?;

    match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            pvh::write_start_info(mem, initrd, src.rsdp)?;
            Ok(EntryPoint::Pvh { entry: entry.0 })
        }
        (KernelFormat::Elf, _) => {
            linux::write_zero_page(mem, None, src.cmdline.len(), initrd, src.rsdp)?;
            Ok(EntryPoint::Linux64 { entry: loaded.kernel_load.0 })
        }
        (KernelFormat::BzImage | KernelFormat::Elf32, _) => {
            let header = loaded
                .setup_header
                .ok_or_else(|| Error::Kernel(format!("{}: bzImage without a setup header", path.display())))?;
            linux::write_zero_page(mem, Some(header), src.cmdline.len(), initrd, src.rsdp)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            Ok(EntryPoint::Linux64 { entry: loaded.kernel_load.0 + 0x200 })
        }
    }
}

/// Opens the kernel; returns the file and the name error messages use for it.
fn open_kernel(kernel: &Kernel) -> Result<(File, PathBuf)> {
    match kernel {
        Kernel::Path(path) => {
            let file = File::open(path).map_err(|e| Error::Kernel(format!("{}: {e}", path.display())))?;
            Ok((file, path.clone()))
        }
        Kernel::TestGuest(name) => Ok((test_guest_file(name)?, PathBuf::from(format!("built-in guest {name}")))),
    }
}

/// A built-in test guest's image in an anonymous memory file.
fn test_guest_file(name: &str) -> Result<File> {
    let image = ferro_guests::get(name).ok_or_else(|| {
        let names: Vec<&str> = ferro_guests::names().collect();
        Error::Config(format!("no built-in guest named '{name}'; available: {}", names.join(", ")))
    })?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferro-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(image).map_err(|e| Error::Io("writing the test guest image", e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::Io("writing the test guest image", e))?;
    Ok(file)
}

/// Places the initrd page-aligned at the top of low RAM; it must not overlap the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, low_ram_end: u64) -> Result<(u64, u64)> {
    let mut file = File::open(path).map_err(|e| Error::Initrd(format!("{}: {e}", path.display())))?;
    let size = file.metadata().map_err(|e| Error::Initrd(format!("{}: {e}", path.display())))?.len();
    let too_big = || {
        Error::Initrd(format!(
            "{}: {} MiB does not fit in guest memory after the kernel; give the VM more memory",
            path.display(),
            size >> 20
        ))
    };
    let start = low_ram_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| Error::Initrd(format!("{}: cannot load: {e}", path.display())))?;
    Ok((start, size))
}
