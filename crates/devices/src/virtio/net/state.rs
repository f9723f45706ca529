//! What a virtio-net device carries through a save: its MAC (a configuration without one makes
//! one up, but the guest knows the saved one), the features it offered and the driver accepted.
//! The tap comes from the configuration. Frames in flight are not kept (a NIC may lose them);
//! the queues belong to the transport's state.

use super::Net;
use ferro_vmm_api::MacAddr;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The tap when the state was saved (for messages).
    pub tap: String,
    pub mac: MacAddr,
    pub offered_features: u64,
    pub acked_features: u64,
}

impl Net {
    pub(super) fn state(&self) -> NetState {
        NetState { tap: self.tap.name().to_owned(), mac: self.mac, offered_features: self.offered, acked_features: self.acked }
    }

    /// Takes a saved state over; fails if this tap no longer offers what the guest was promised.
    pub(super) fn restore_state(&mut self, s: &NetState) -> Result<(), String> {
        if s.offered_features & !self.offered != 0 {
            return Err(format!("tap {} does not take the offloads the guest was offered on tap {}", self.tap.name(), s.tap));
        }
        self.mac = s.mac;
        self.offered = s.offered_features;
        self.acked = s.acked_features;
        Ok(())
    }
}
