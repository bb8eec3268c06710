//! Fuzz target: see `lbkit_fuzz::sticky_cookie`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::sticky_cookie(data));
