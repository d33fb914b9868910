//! `idle`: says so, then halts every CPU with interrupts off, forever. Only the host can
//! end it: for tests of stopping a VM and of timeouts.

#![no_std]
#![no_main]

use splitvisor_guest_kit::{Boot, console, cpu, guest_main};

guest_main!(main);

fn main(_boot: &Boot) -> Result<(), &'static str> {
    console::println("idle: halting until the host stops the VM");
    cpu::halt_forever()
}
