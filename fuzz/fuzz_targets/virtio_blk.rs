//! Fuzzes virtio-blk request handling over fuzzer-built descriptor chains in guest memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::fuzzing::virtio_blk(data));
