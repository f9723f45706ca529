//! ferro-vmm
