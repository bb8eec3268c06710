//! Fuzz target: see `lbkit_fuzz::forwarded`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::forwarded(data));
