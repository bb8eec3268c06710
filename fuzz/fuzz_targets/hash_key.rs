//! Fuzz target: see `lbkit_fuzz::hash_key`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::hash_key(data));
