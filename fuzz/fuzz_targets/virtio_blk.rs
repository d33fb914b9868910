//! Fuzzes virtio-blk request handling over fuzzer-built descriptor chains in guest memory,
//! against the harness's model; the counting allocator lets it bound the heap per kick.
#![no_main]

#[global_allocator]
static HEAP: splitvisor_devices::fuzzing::heap::CountingAllocator =
    splitvisor_devices::fuzzing::heap::CountingAllocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::fuzzing::virtio_blk(data));
