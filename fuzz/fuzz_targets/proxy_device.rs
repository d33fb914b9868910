//! Fuzzes the hypervisor side of the proxy protocol (`ProxyDevice`) against partitions
//! whose answers the input scripts; the counting allocator lets it bound the heap per
//! access.
#![no_main]

#[global_allocator]
static HEAP: splitvisor_devices::fuzzing::heap::CountingAllocator =
    splitvisor_devices::fuzzing::heap::CountingAllocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_isolation::proxy::fuzzing::proxy_device(data));
