//! 32-bit ELF kernels with a PVH note, as QEMU's `-kernel` accepts them (linux-loader reads only
//! ELF64). Segments are loaded at their physical addresses; the entry point is the note's
//! XEN_ELFNOTE_PHYS32_ENTRY. Every header field is checked against the file and guest memory.

use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MAX_PHDRS: usize = 64;
const MAX_NOTE_BYTES: u32 = 64 * 1024;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Loads a 32-bit PVH ELF; returns (PVH entry, end of the highest segment).
pub fn load(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<(u64, u64)> {
    let bad = |what: &str| Error::Kernel(format!("{}: {what}", path.display()));
    let io = |e: std::io::Error| Error::Kernel(format!("{}: {e}", path.display()));
    let mut ehdr = [0u8; 52];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut ehdr).map_err(|_| bad("truncated ELF header"))?;
    if ehdr[5] != 1 {
        return Err(bad("big-endian ELF"));
    }
    if u16_at(&ehdr, 18) != EM_386 {
        return Err(bad("32-bit ELF for another machine than x86"));
    }
    let phoff = u64::from(u32_at(&ehdr, 28));
    let phentsize = usize::from(u16_at(&ehdr, 42));
    let phnum = usize::from(u16_at(&ehdr, 44));
    if phentsize != 32 || phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad("bad program header table"));
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).map_err(io)?;
    file.read_exact(&mut phdrs).map_err(|_| bad("program headers past the end of the file"))?;

    let mem_end = mem.last_addr().0 + 1;
    let mut entry = None;
    let mut kernel_end = 0u64;
    for ph in phdrs.chunks_exact(32) {
        let (kind, offset, paddr) = (u32_at(ph, 0), u64::from(u32_at(ph, 4)), u64::from(u32_at(ph, 12)));
        let (filesz, memsz) = (u64::from(u32_at(ph, 16)), u64::from(u32_at(ph, 20)));
        match kind {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(bad("segment file size larger than its memory size"));
                }
                let end = paddr.checked_add(memsz).filter(|e| *e <= mem_end).ok_or_else(|| {
                    bad(&format!("segment at {paddr:#x} (+{memsz:#x}) does not fit in guest memory"))
                })?;
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                mem.read_exact_volatile_from(GuestAddress(paddr), file, filesz as usize)
                    .map_err(|_| bad("segment data past the end of the file"))?;
                kernel_end = kernel_end.max(end);
            }
            PT_NOTE if filesz <= u64::from(MAX_NOTE_BYTES) => {
                let mut notes = vec![0u8; filesz as usize];
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                file.read_exact(&mut notes).map_err(|_| bad("note segment past the end of the file"))?;
                entry = entry.or(pvh_entry(&notes));
            }
            _ => {}
        }
    }
    let entry = entry.ok_or_else(|| {
        bad("32-bit ELF without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH is supported for 32-bit kernels")
    })?;
    Ok((entry, kernel_end))
}

/// Walks ELF notes (4-byte aligned) looking for Xen's PHYS32_ENTRY.
fn pvh_entry(notes: &[u8]) -> Option<u64> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut p = 0usize;
    while p.checked_add(12)? <= notes.len() {
        let (namesz, descsz, kind) = (u32_at(notes, p) as usize, u32_at(notes, p + 4) as usize, u32_at(notes, p + 8));
        let name_start = p + 12;
        let desc_start = name_start.checked_add(align4(namesz)?)?;
        let next = desc_start.checked_add(align4(descsz)?)?;
        if next > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[name_start..name_start + namesz.min(4)] == b"Xen\0" && descsz >= 4 {
            return Some(u64::from(u32_at(notes, desc_start)));
        }
        p = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::pvh_entry;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((name.len() as u32).to_le_bytes());
        v.extend((desc.len() as u32).to_le_bytes());
        v.extend(kind.to_le_bytes());
        v.extend(name);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v.extend(desc);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    #[test]
    fn finds_the_entry_among_other_notes() {
        let mut n = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        n.extend(note(b"Xen\0", 18, &0x10_0000u32.to_le_bytes()));
        assert_eq!(pvh_entry(&n), Some(0x10_0000));
    }

    #[test]
    fn hostile_notes_are_rejected_without_panicking() {
        assert_eq!(pvh_entry(&[]), None);
        let mut huge = note(b"Xen\0", 18, &[0; 4]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
        let mut short = note(b"Xen\0", 18, &[1]);
        short.truncate(14);
        assert_eq!(pvh_entry(&short), None);
    }
}
