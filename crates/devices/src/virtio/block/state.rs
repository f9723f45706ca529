//! The block device's snapshot state. The queue belongs to the transport's state; this is what
//! the device itself adds: which image, how it is exposed, and what the driver accepted.

use super::{Block, ID_BYTES};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    /// The image format ("raw" or "qcow2") found when the device was created.
    pub format: String,
    pub readonly: bool,
    /// Capacity in sectors; a restore refuses an image whose size changed.
    pub capacity: u64,
    pub id: [u8; ID_BYTES],
    pub acked_features: u64,
}

impl Block {
    /// The state to save in a snapshot (call with the worker paused or stopped).
    pub fn state(&self) -> BlockState {
        let format = self.disk.lock().unwrap_or_else(|p| p.into_inner()).info().format.name().to_owned();
        BlockState {
            path: self.path.clone(),
            format,
            readonly: self.readonly,
            capacity: self.capacity,
            id: self.id,
            acked_features: self.acked_features,
        }
    }

    /// Reopens the image of a saved state; the transport restores the queue and reactivates.
    pub fn restore(state: &BlockState) -> Result<Block, String> {
        let format = ferro_vmm_api::DiskFormat::from_name(&state.format).ok_or_else(|| format!("disk format {:?} in the snapshot", state.format))?;
        let mut block = Block::new(&state.path, Some(format), state.readonly)?;
        if block.capacity != state.capacity {
            return Err(format!(
                "disk {}: {} sectors now, {} in the snapshot",
                state.path.display(),
                block.capacity,
                state.capacity
            ));
        }
        block.id = state.id;
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_serde_and_a_new_device() {
        let dir = ferro_test_support::TempDir::new("blk-state");
        let path = dir.join("ferro-blk-state-0.qcow2");
        let opts = ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(1 << 20));
        ferro_block::create(&path, &opts).unwrap();
        let mut block = Block::new(&path, None, false).unwrap();
        block.acked_features = 1 << 32 | 1 << 9;
        let state = block.state();
        assert_eq!(state.format, "qcow2");
        assert_eq!(state.capacity, 2048);
        assert!(state.id.starts_with(b"ferro-blk-state-"), "GET_ID serial from the file name: {:?}", state.id);
        let text = serde_json::to_string(&state).unwrap();
        let back: BlockState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        drop(block);
        assert_eq!(Block::restore(&back).unwrap().state(), state);
        std::fs::write(&path, b"").unwrap();
        assert!(Block::restore(&back).is_err(), "an image that changed size is refused");
    }
}
