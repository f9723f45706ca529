//! qcow2 consistency check.
