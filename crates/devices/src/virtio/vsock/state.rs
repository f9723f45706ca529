//! What a vsock device carries through a snapshot: its CID, host socket path and features.
//! Streams do not survive (their host sockets belong to this process); as Firecracker does, the
//! restored device tells the guest with a TRANSPORT_RESET event, and the guest drops them.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub uds: PathBuf,
    pub acked_features: u64,
}
