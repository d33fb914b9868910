//! Fuzzes the vhost-user block backend's queue server over a hostile queue in guest
//! memory mapped from a memory table; the counting allocator lets it bound the heap per
//! serve.
#![no_main]

#[global_allocator]
static HEAP: splitvisor_devices::fuzzing::heap::CountingAllocator =
    splitvisor_devices::fuzzing::heap::CountingAllocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_isolation::backend::blk::fuzzing::vhost_user_backend(data));
