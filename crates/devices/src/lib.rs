//! ferro-devices
