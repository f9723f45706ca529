//! The balloon's snapshot state. The queues themselves belong to the transport's state; this is
//! what the device adds: target, actual, the guest's last statistics, the statistics buffer it
//! holds (the driver waits for it to come back) and the page counters.

use super::control::RawStats;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual: u32,
    pub stats: RawStats,
    pub stats_head: Option<u16>,
    pub inflated: u64,
    pub deflated: u64,
    pub invalid: u64,
}

#[cfg(test)]
mod tests {
    use super::super::Balloon;
    use super::*;
    use crate::virtio::VirtioDevice;

    #[test]
    fn state_round_trips_through_serde_and_a_new_device() {
        let state = BalloonState {
            num_pages: 12288,
            actual: 4096,
            stats: vec![(4, 1 << 20), (5, 64 << 20)],
            stats_head: Some(3),
            inflated: 5000,
            deflated: 904,
            invalid: 2,
        };
        let text = serde_json::to_string(&state).unwrap();
        let back: BalloonState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);

        let dev = Balloon::new(0, false).unwrap();
        dev.control().restore(&back);
        assert_eq!(dev.control().state(), state);
        let mut config = [0u8; 8];
        dev.read_config(0, &mut config);
        assert_eq!(config, [0x00, 0x30, 0, 0, 0x00, 0x10, 0, 0], "num_pages and actual in config space");
    }
}
