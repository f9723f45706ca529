//! Fuzz target: ferro_fuzz_targets::kernel (what it does with an input is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferro_fuzz_targets::kernel(data);
});
