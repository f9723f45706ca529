//! ferro-images: what it takes to run a VM from the disk images people have.
//!
//! - [`partitions`]: a disk's GPT or MBR partition table, checked before it is believed;
//! - [`bootcfg`]: the boot loader's word on what to boot (BLS entries, the default grub.cfg
//!   menu entry), parsed from text;
//! - [`boot`]: finds a disk's own kernel, initrd and command line on its ext2/3/4 boot
//!   filesystem (read only, through ferro-block, so qcow2 works) and extracts them;
//! - [`seed`]: cloud-init NoCloud seed volumes (VFAT labelled `cidata`);
//! - [`ovf`]: OVF descriptors (read 1.x and 2.x, write 1.0) and manifests; [`ova`]: packages
//!   (an OVA archive or an unpacked OVF), checked before anything is taken from them.
//!
//! Everything here reads images that may be hostile: every size and offset is checked and every
//! amount read is bounded, and a bad image gives an [`Error`] naming what was wrong, never a panic.

pub mod boot;
pub mod bootcfg;
pub mod ova;
pub mod ovf;
pub mod partitions;
pub mod seed;

/// One line saying what was wrong (and, where it helps, what was looked at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
