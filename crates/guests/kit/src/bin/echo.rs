//! `echo`: reads one line from the console (host input) and prints it back.
//!
//! Polls the UART's line status for received bytes, with a deadline, so a host that sends
//! nothing gets a failure, not a hang.

#![no_std]
#![no_main]

use splitvisor_guest_kit::console::{COM1, LSR, LSR_DATA_READY, THR};
use splitvisor_guest_kit::cpu::inb;
use splitvisor_guest_kit::{Boot, Line, console, guest_main, rdtsc};

guest_main!(main);

/// At least 2 s on a TSC up to 5 GHz.
const TIMEOUT_TICKS: u64 = 10_000_000_000;

fn main(_boot: &Boot) -> Result<(), &'static str> {
    console::println("echo: type a line");
    let mut line = [0u8; 128];
    let mut len = 0;
    let deadline = rdtsc() + TIMEOUT_TICKS;
    loop {
        // SAFETY: COM1 registers: reading LSR, then the receive buffer when data is ready.
        let byte = unsafe {
            if inb(COM1 + LSR) & LSR_DATA_READY == 0 {
                if rdtsc() > deadline {
                    return Err("no input line arrived");
                }
                continue;
            }
            inb(COM1 + THR)
        };
        match byte {
            b'\n' | b'\r' => break,
            _ if len < line.len() => {
                line[len] = byte;
                len += 1;
            }
            _ => {}
        }
    }
    Line::new().str("echo: ").bytes(&line[..len]).print();
    Ok(())
}
