//! `triple-fault`: triple-faults on purpose, so tests can see how a VMM reports it.

#![no_std]
#![no_main]

use splitvisor_guest_kit::{Boot, cpu, console, guest_main};

guest_main!(main);

fn main(_boot: &Boot) -> Result<(), &'static str> {
    console::println("triple-fault: faulting on purpose");
    cpu::triple_fault()
}
