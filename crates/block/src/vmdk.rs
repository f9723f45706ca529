//! VMDK input (placeholder while being written).
use crate::error::{Error, Result};
use std::path::Path;
pub(crate) const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
pub struct VmdkImage;
impl VmdkImage {
    pub fn open(path: &Path) -> Result<Box<dyn crate::DiskImage>> {
        Err(Error::unsupported(path, "vmdk"))
    }
}
