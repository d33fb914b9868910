//! Fuzzes virtio-net's transmit and receive engines under a hostile driver and wire.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::virtio::net::fuzzing::virtio_net(data));
