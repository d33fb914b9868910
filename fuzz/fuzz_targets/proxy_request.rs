//! Fuzzes the decoder of the partition proxy protocol's requests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_isolation::proxy::wire::fuzz_request(data));
