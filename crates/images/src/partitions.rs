//! Partition tables of a disk image: GPT (header and entry array checked against their CRC32s)
//! and MBR (primary partitions, and logical ones through the extended partition's chain). Every
//! number read from the image is checked against the disk's size before it is used, and the
//! amount read is bounded, so a hostile image gets an error, never a panic or a huge allocation.

use crate::Error;
use ferro_block::DiskImage;

const SECTOR: u64 = 512;
/// Most GPT entries we read (the usual array has 128).
const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed through an MBR extended partition.
const MAX_LOGICAL: usize = 64;
/// The GPT header's type for an MBR that only protects a GPT.
const MBR_PROTECTIVE: u8 = 0xee;

/// One partition: where it is on the virtual disk and its number as Linux names it (vdaN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as in /dev/vda1; logical MBR partitions start at 5.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// The GPT partition's unique GUID (for root=PARTUUID=), lower case.
    pub guid: Option<String>,
}

/// How the disk is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Gpt(Vec<Partition>),
    Mbr(Vec<Partition>),
    /// No partition table: the filesystem, if any, fills the disk.
    Whole,
}

impl Layout {
    /// The partitions to look into, in disk order; the whole disk when there is no table.
    pub fn partitions(&self, disk_size: u64) -> Vec<Partition> {
        match self {
            Layout::Gpt(p) | Layout::Mbr(p) => p.clone(),
            Layout::Whole => vec![Partition { number: 0, start: 0, size: disk_size, guid: None }],
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Layout::Gpt(_) => "GPT",
            Layout::Mbr(_) => "MBR",
            Layout::Whole => "no partition table",
        }
    }
}

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

fn read(disk: &mut dyn DiskImage, off: u64, len: u64, what: &str) -> Result<Vec<u8>, Error> {
    let end = off.checked_add(len).filter(|&e| e <= disk.size());
    if end.is_none() {
        return Err(Error::new(format!("{what} at byte {off} (+{len}) lies beyond the disk's {} bytes", disk.size())));
    }
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, off).map_err(|e| Error::new(format!("reading {what}: {e}")))?;
    Ok(buf)
}

/// Reads the disk's partition table.
pub fn read_layout(disk: &mut dyn DiskImage) -> Result<Layout, Error> {
    if disk.size() < 2 * SECTOR {
        return Ok(Layout::Whole);
    }
    let mbr = read(disk, 0, SECTOR, "the MBR")?;
    if le16(&mbr, 510) != 0xaa55 || !plausible_mbr(&mbr) {
        return Ok(Layout::Whole);
    }
    if (0..4).any(|i| mbr[446 + i * 16 + 4] == MBR_PROTECTIVE) {
        return read_gpt(disk).map(Layout::Gpt);
    }
    read_mbr(disk, &mbr).map(Layout::Mbr)
}

/// A FAT or ext boot sector also ends in 0x55aa; an MBR's status bytes are 0x00 or 0x80.
fn plausible_mbr(mbr: &[u8]) -> bool {
    (0..4).all(|i| matches!(mbr[446 + i * 16], 0x00 | 0x80)) && (0..4).any(|i| mbr[446 + i * 16 + 4] != 0)
}

fn read_gpt(disk: &mut dyn DiskImage) -> Result<Vec<Partition>, Error> {
    let header = read(disk, SECTOR, SECTOR, "the GPT header")?;
    if &header[0..8] != b"EFI PART" {
        return Err(Error::new("the MBR protects a GPT but sector 1 holds no GPT header"));
    }
    let header_size = le32(&header, 12);
    if !(92..=512).contains(&header_size) {
        return Err(Error::new(format!("GPT header size {header_size} is not 92-512")));
    }
    let mut copy = header[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(&header, 16) {
        return Err(Error::new("GPT header checksum does not match"));
    }
    let entries_lba = le64(&header, 72);
    let count = le32(&header, 80);
    let entry_size = le32(&header, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(Error::new(format!("GPT claims {count} partition entries (at most {MAX_GPT_ENTRIES} are read)")));
    }
    if !(128..=1024).contains(&entry_size) || entry_size % 8 != 0 {
        return Err(Error::new(format!("GPT entry size {entry_size} is not a multiple of 8 in 128-1024")));
    }
    let at = entries_lba.checked_mul(SECTOR).ok_or_else(|| Error::new("GPT entry array offset overflows"))?;
    let array = read(disk, at, u64::from(count) * u64::from(entry_size), "the GPT entry array")?;
    if crc32(&array) != le32(&header, 88) {
        return Err(Error::new("GPT entry array checksum does not match"));
    }
    let disk_sectors = disk.size() / SECTOR;
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if first == 0 || first > last || last >= disk_sectors {
            return Err(Error::new(format!("GPT partition {} spans sectors {first}-{last} of a {disk_sectors}-sector disk", i + 1)));
        }
        parts.push(Partition { number: i as u32 + 1, start: first * SECTOR, size: (last - first + 1) * SECTOR, guid: Some(guid(&e[16..32])) });
    }
    Ok(parts)
}

/// A GUID in its text form (mixed-endian, as GPT stores it).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10..16].iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn read_mbr(disk: &mut dyn DiskImage, mbr: &[u8]) -> Result<Vec<Partition>, Error> {
    let disk_sectors = disk.size() / SECTOR;
    let entry = |table: &[u8], i: usize| {
        let e = &table[446 + i * 16..446 + (i + 1) * 16];
        (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
    };
    let check = |number: u32, start: u64, len: u64| -> Result<Partition, Error> {
        if start == 0 || len == 0 || start + len > disk_sectors {
            return Err(Error::new(format!("MBR partition {number} spans sectors {start}+{len} of a {disk_sectors}-sector disk")));
        }
        Ok(Partition { number, start: start * SECTOR, size: len * SECTOR, guid: None })
    };
    let mut parts = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let (kind, start, len) = entry(mbr, i);
        if kind == 0 {
            continue;
        }
        let p = check(i as u32 + 1, start, len)?;
        if is_extended(kind) {
            extended = Some(start);
        } else {
            parts.push(p);
        }
    }
    // Logical partitions: a chain of EBRs, each relative to the extended partition's start.
    if let Some(base) = extended {
        let mut next = base;
        let mut seen = Vec::new();
        while parts.len() < 4 + MAX_LOGICAL {
            if seen.contains(&next) {
                return Err(Error::new(format!("MBR extended partition chain loops back to sector {next}")));
            }
            seen.push(next);
            let ebr = read(disk, next * SECTOR, SECTOR, "an extended boot record")?;
            if le16(&ebr, 510) != 0xaa55 {
                return Err(Error::new(format!("extended boot record at sector {next} has no signature")));
            }
            let (kind, start, len) = entry(&ebr, 0);
            if kind != 0 {
                let number = 5 + seen.len() as u32 - 1;
                parts.push(check(number, next + start, len)?);
            }
            let (kind, link, _) = entry(&ebr, 1);
            if !is_extended(kind) || link == 0 {
                break;
            }
            next = base + link;
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_is_mixed_endian() {
        let b = [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];
        assert_eq!(guid(&b), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    }
}
