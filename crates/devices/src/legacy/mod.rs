//! Legacy PC devices on port I/O.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{Serial, SerialState};
