//! Fuzz target: see `lbkit_fuzz::headers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::headers(data));
