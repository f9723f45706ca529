//! Image tool operations.
