//! Fuzzes the virtio-mmio register file under arbitrary guest access sequences.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::fuzzing::virtio_mmio(data));
