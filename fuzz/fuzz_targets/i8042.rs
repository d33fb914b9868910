//! Fuzzes the i8042 under arbitrary register accesses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_devices::fuzzing::i8042(data));
