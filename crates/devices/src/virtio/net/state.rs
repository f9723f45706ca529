//! What a virtio-net device carries through a snapshot: its tap, MAC and features. Frames in
//! flight are not kept (a NIC may lose them); the queues belong to the transport's state.

use ferro_vmm_api::MacAddr;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: MacAddr,
    pub offered_features: u64,
    pub acked_features: u64,
}
