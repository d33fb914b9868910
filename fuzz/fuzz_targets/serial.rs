//! Fuzzes the 8250 UART under arbitrary register accesses and host input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::fuzzing::serial(data));
