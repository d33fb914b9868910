//! Fuzzes the partition proxy protocol's request codec: decoding any bytes, reading
//! any stream, round-tripping any message; the counting allocator bounds what decoding
//! allocates.
#![no_main]

#[global_allocator]
static HEAP: splitvisor_devices::fuzzing::heap::CountingAllocator =
    splitvisor_devices::fuzzing::heap::CountingAllocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_isolation::proxy::wire::fuzz_request(data));
