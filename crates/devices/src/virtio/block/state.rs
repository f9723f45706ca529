//! The block device's saved state. The queue belongs to the transport's state; this is what the
//! device itself adds: which image and how it is exposed (checked against the image the restored
//! device opened), the serial the guest reads, and what the driver accepted. The request counters
//! count from the VMM's start and are not kept.

use super::{Block, ID_BYTES};
use ferro_vmm_api::DiskFormat;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image when the state was saved (for messages; the configuration names the image).
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    /// Capacity in sectors; a restore refuses an image whose size changed.
    pub capacity: u64,
    pub id: [u8; ID_BYTES],
    pub acked_features: u64,
}

impl Block {
    pub(super) fn state(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            format: self.format,
            readonly: self.readonly,
            capacity: self.capacity,
            id: self.id,
            acked_features: self.acked_features,
        }
    }

    /// Takes a saved state over, if it describes the image this device opened the same way.
    pub(super) fn restore_state(&mut self, state: &BlockState) -> Result<(), String> {
        let here = self.path.display();
        if state.capacity != self.capacity {
            return Err(format!("disk {here}: {} sectors now, {} when saved ({})", self.capacity, state.capacity, state.path.display()));
        }
        if (state.format, state.readonly) != (self.format, self.readonly) {
            return Err(format!(
                "disk {here}: {} {} now, {} {} when saved",
                self.format.name(),
                if self.readonly { "read-only" } else { "read-write" },
                state.format.name(),
                if state.readonly { "read-only" } else { "read-write" }
            ));
        }
        self.id = state.id;
        self.acked_features = state.acked_features;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{VirtioDevice, VirtioDeviceState};

    #[test]
    fn state_round_trips_through_serde_into_a_new_device() {
        let dir = ferro_test_support::TempDir::new("blk-state");
        let path = dir.join("ferro-blk-state-0.qcow2");
        let opts = ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(1 << 20));
        ferro_block::create(&path, &opts).unwrap();
        let mut block = Block::new(&path, None, false).unwrap();
        block.acked_features = 1 << 32 | 1 << 9;
        let state = block.save();
        let VirtioDeviceState::Block(s) = &state else { panic!("{state:?}") };
        assert_eq!((s.format, s.capacity), (DiskFormat::Qcow2, 2048));
        assert!(s.id.starts_with(b"ferro-blk-state-"), "GET_ID serial from the file name: {:?}", s.id);
        let text = serde_json::to_string(&state).unwrap();
        let back: VirtioDeviceState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        drop(block);
        let mut fresh = Block::new(&path, None, false).unwrap();
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), state);
        assert!(fresh.restore(&VirtioDeviceState::Rng).unwrap_err().contains("does not fit"));
        drop(fresh);
        let mut readonly = Block::new(&path, None, true).unwrap();
        assert!(readonly.restore(&back).unwrap_err().contains("read-only now"));
        drop(readonly);
        std::fs::remove_file(&path).unwrap();
        ferro_block::create(&path, &ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(2 << 20))).unwrap();
        let mut grown = Block::new(&path, None, false).unwrap();
        assert!(grown.restore(&back).unwrap_err().contains("4096 sectors now, 2048 when saved"), "an image that changed size is refused");
    }
}
