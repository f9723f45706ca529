//! ferro-hypervisor
