//! A paused VM's whole state besides its memory: KVM's VM-wide state (interrupt controllers,
//! PIT, clock), every vCPU's, and every device's with their placement. One plain serde value;
//! with the memory file and the configuration it was saved under, it is what
//! [`VmBuilder::restore`](crate::VmBuilder::restore) needs.

use crate::device_manager::DeviceManagerState;
use ferro_hypervisor::{VcpuState, VmState};
use serde::{Deserialize, Serialize};

/// The version of this struct's shape and of everything in it; a state of another version is
/// refused. It follows `ferro_devices::state::STATE_VERSION` (devices are most of the state).
pub const SAVED_VM_VERSION: u32 = ferro_devices::state::STATE_VERSION;

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedVm {
    pub version: u32,
    pub kvm: VmState,
    /// In vCPU index order.
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceManagerState,
}
