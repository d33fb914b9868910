//! Fuzzes the decoder of the partition proxy protocol's responses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_isolation::proxy::wire::fuzz_response(data));
