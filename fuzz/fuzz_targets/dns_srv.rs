//! Fuzz target: see `lbkit_fuzz::dns_srv`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::dns_srv(data));
