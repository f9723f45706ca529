//! ferro-block
