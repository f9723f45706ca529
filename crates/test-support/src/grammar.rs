//! The one table of sizes and MAC addresses that every place accepting them is tested with:
//! ferro-vmm-api's parsers themselves, domain definitions, `ferro img` and `ferro run` flags.
//! Sizes are powers of 1024 as in qemu-img; all of these are whole 512-byte sectors, between
//! 512 bytes and 2 TiB, so a disk image of each can be made.

/// Accepted sizes and their bytes.
pub const SIZES: &[(&str, u64)] = &[
    ("512", 512),
    ("512B", 512),
    ("0.5K", 512),
    ("64K", 64 << 10),
    ("64k", 64 << 10),
    ("4096K", 4 << 20),
    ("1048576", 1 << 20),
    ("512M", 512 << 20),
    ("512m", 512 << 20),
    ("512MiB", 512 << 20),
    ("512MB", 512 << 20),
    ("1.5G", 3 << 29),
    (" 2G ", 2 << 30),
    ("0.25T", 256 << 30),
    ("2T", 2 << 40),
];

/// Refused sizes: no number, no known suffix, a sign, a fraction of a byte, too many digits
/// after the point, more than 64 bits.
pub const NOT_SIZES: &[&str] = &[
    "", "M", "lots", "12Q", "1 G", "0x10", "1e3", "-1G", "+1G", "1.5", "1.G", "1..5G", "iB", "1iB", "1.0000000001G",
    "99999999999T",
];

/// Accepted MAC addresses and their bytes.
pub const MACS: &[(&str, [u8; 6])] = &[
    ("52:54:00:12:34:56", [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
    ("52:54:00:AB:cd:0f", [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]),
    ("52-54-00-ab-cd-0f", [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]),
    ("02:00:00:00:00:01", [0x02, 0, 0, 0, 0, 0x01]),
];

/// Refused MAC addresses, and a word the error must contain.
pub const NOT_MACS: &[(&str, &str)] = &[
    ("", "not a MAC"),
    ("52:54:00:12:34", "not a MAC"),
    ("52:54:00:12:34:56:78", "not a MAC"),
    ("52:54:00:12:34:5", "not a MAC"),
    ("52:54:00:12:34:zz", "not a MAC"),
    ("+2:54:00:12:34:56", "not a MAC"),
    ("5254.0012.3456", "not a MAC"),
    ("01:00:5e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "multicast"),
];
