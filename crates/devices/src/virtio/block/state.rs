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

    /// Takes a saved state over, if it describes the image this device opened the same way. A
    /// device whose image is not open yet (see [`Block::new_inactive`]) takes the image's format
    /// and capacity from the state, to check them when it opens the image.
    pub(super) fn restore_state(&mut self, state: &BlockState) -> Result<(), String> {
        let here = self.path.display();
        let learned = {
            let mut slot = self.lock_disk();
            match &mut slot.inactive {
                Some((format, capacity @ None)) => {
                    if let Some(f) = format.filter(|f| *f != state.format) {
                        return Err(format!("disk {here}: {} here, {} when saved", f.name(), state.format.name()));
                    }
                    *format = Some(state.format);
                    *capacity = Some(state.capacity);
                    true
                }
                _ => false,
            }
        };
        if learned {
            self.format = state.format;
            self.capacity = state.capacity;
        }
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

    /// The hand-over of a migration: an inactive image holds no lock (another writer may open
    /// it), is opened again with its locks, and a device built inactive learns format and size
    /// from the state and refuses an image that changed size meanwhile.
    #[test]
    fn an_inactive_image_is_unlocked_and_opened_again_as_it_was() {
        use ferro_block::lock::{Use, file_use};
        let dir = ferro_test_support::TempDir::new("blk-handover");
        let path = dir.join("disk.qcow2");
        ferro_block::create(&path, &ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(1 << 20))).unwrap();
        let block = Block::new(&path, None, false).unwrap();
        let handle = block.disk_handle();
        assert_eq!(file_use(&path).unwrap(), Use::Write);
        handle.inactivate().unwrap();
        assert!(handle.is_inactive());
        assert_eq!(file_use(&path).unwrap(), Use::Unused, "closed, its locks released");
        {
            let mut other = ferro_block::open(&path, None, false).expect("another writer may open it now");
            other.write_at(&[0x5a; 512], 4096).unwrap();
            assert!(handle.activate().unwrap_err().0, "refused while the other writer holds it");
        }
        handle.activate().unwrap();
        assert!(!handle.is_inactive());
        assert_eq!(file_use(&path).unwrap(), Use::Write);
        assert!(ferro_block::open(&path, None, false).is_err(), "locked again");
        let state = block.save();
        handle.inactivate().unwrap();

        let mut arriving = Block::new_inactive(&path, None);
        let there = arriving.disk_handle();
        assert_eq!(file_use(&path).unwrap(), Use::Unused, "an inactive device opens nothing");
        assert!(there.activate().unwrap_err().1.contains("not known yet"));
        arriving.restore(&state).unwrap();
        assert_eq!(arriving.save(), state);
        there.activate().unwrap();
        assert_eq!(file_use(&path).unwrap(), Use::Write);
        there.inactivate().unwrap();
        drop(arriving);
        drop(block);
        std::fs::remove_file(&path).unwrap();
        ferro_block::create(&path, &ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(2 << 20))).unwrap();
        let err = there.activate().unwrap_err();
        assert!(!err.0 && err.1.contains("4096 sectors now, 2048 before"), "{err:?}");
        assert_eq!(file_use(&path).unwrap(), Use::Unused, "a refused image is closed again");
    }
}
