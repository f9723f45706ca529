//! The device-state contract every device implements: [`Persist`].
//!
//! A VM is saved by pausing it (vCPUs first, then devices: a paused device runs no worker thread
//! and touches neither guest memory nor its interrupt), saving every device's state, and
//! restoring it into devices built afresh from the same configuration: construction opens the
//! host resources (disk images, taps, sockets), `restore` then puts the guest-visible state back
//! in place. Snapshots, their restore and live migration all go through this one path.
//!
//! States are plain serde values. Their shape is versioned as a whole by [`STATE_VERSION`]: any
//! change to a state struct of this crate (or of the VMM's composition of them) bumps it, and a
//! saved state of another version is refused rather than misread.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// The version of every device state shape in this crate; saved with the VM state.
pub const STATE_VERSION: u32 = 1;

/// A device whose state can be saved and put back.
pub trait Persist {
    /// Everything the guest can observe of the device (and what it needs to carry on), but no
    /// host resource: those belong to the configuration the device is built from.
    type State: Clone + Debug + PartialEq + Serialize + DeserializeOwned;

    /// Stops the device from touching guest memory or raising interrupts until [`resume`].
    /// Devices without a worker thread have nothing to stop.
    ///
    /// [`resume`]: Persist::resume
    fn pause(&mut self) {}

    /// Lets a paused (or freshly restored) device run again.
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The device's state; call it paused, so the state does not move while it is read.
    fn save(&self) -> Self::State;

    /// Applies a saved state to this device, built from the configuration the state was saved
    /// under; the device stays paused until [`resume`]. A state that does not fit the device
    /// (another kind, other sizes, values the device would refuse from a guest) is an error
    /// naming what does not fit, and leaves the device as it was reset.
    ///
    /// [`resume`]: Persist::resume
    fn restore(&mut self, state: &Self::State) -> Result<(), String>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Persist;

    /// Saves `from`, sends the state through JSON (as a snapshot file or a migration stream
    /// carries it), restores it into `into` and checks `into` now saves the same state.
    pub fn round_trip<T: Persist>(from: &T, into: &mut T) -> T::State {
        let state = from.save();
        let wire = serde_json::to_string(&state).unwrap();
        let back: T::State = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, state, "the state survives serde");
        into.restore(&back).unwrap();
        assert_eq!(into.save(), state, "the restored device saves the same state");
        state
    }
}
