//! `exit-bench`: the round-trip cost of one PIO exit and one MMIO exit.
//!
//! Reads COM1's line status register (a PIO exit to the VMM's 8250) and, when the command
//! line names one with `exit_bench.mmio=ADDR`, a register of an MMIO device, SAMPLES times
//! each, timing every access with the TSC. Reports the medians in TSC ticks; the host
//! converts them with the vCPU's TSC frequency.

#![no_std]
#![no_main]

use splitvisor_guest_kit::console::{COM1, LSR};
use splitvisor_guest_kit::cpu::inb;
use splitvisor_guest_kit::{Boot, Line, guest_main, rdtsc};

guest_main!(main);

const SAMPLES: usize = 101;

fn median(samples: &mut [u64; SAMPLES]) -> u64 {
    // Insertion sort: tiny, and the samples are few.
    for i in 1..samples.len() {
        let mut j = i;
        while j > 0 && samples[j - 1] > samples[j] {
            samples.swap(j - 1, j);
            j -= 1;
        }
    }
    samples[SAMPLES / 2]
}

fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    u64::from_str_radix(digits, 16).ok()
}

fn main(boot: &Boot) -> Result<(), &'static str> {
    let mut samples = [0u64; SAMPLES];
    for sample in samples.iter_mut() {
        let t0 = rdtsc();
        // SAFETY: reading the UART line status has no side effect.
        let _ = unsafe { inb(COM1 + LSR) };
        *sample = rdtsc() - t0;
    }
    let pio = median(&mut samples);
    let mut line = Line::new();
    line.str("exit-bench: pio_ticks=").dec(pio);

    let mmio = boot
        .start_info
        .as_ref()
        .and_then(|info| info.cmdline_value("exit_bench.mmio"))
        .and_then(parse_hex);
    if let Some(addr) = mmio {
        for sample in samples.iter_mut() {
            let t0 = rdtsc();
            // SAFETY: the host placed a device register at `addr` for this program; the
            // kit maps the first GiB and the 32-bit MMIO window.
            let _ = unsafe { (addr as *const u32).read_volatile() };
            *sample = rdtsc() - t0;
        }
        line.str(" mmio_ticks=").dec(median(&mut samples));
    }
    line.print();
    Ok(())
}
