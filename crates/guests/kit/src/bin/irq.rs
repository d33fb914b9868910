//! `irq`: takes interrupts that the host raises through an irqfd.
//!
//! The COM1 UART's "transmitter empty" interrupt (IRQ 4) is routed through the IOAPIC to
//! this CPU's local APIC. Enabling it in IER makes the UART raise it once; each byte written
//! afterwards raises it again. The program waits for every one of them, with a deadline.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use splitvisor_guest_kit::console::{COM1, IER, IIR, THR};
use splitvisor_guest_kit::cpu::{self, InterruptFrame, inb, outb};
use splitvisor_guest_kit::{Boot, Line, apic, guest_main, rdtsc};

guest_main!(main);

const COM1_IRQ: u8 = 4;
/// Far from the exception vectors: the runtime must route every vector to its handler, not
/// only the low ones.
const COM1_VECTOR: u8 = 0x84;
const ROUNDS: u64 = 16;
/// Per interrupt, in TSC ticks (at least 0.2 s on a TSC up to 5 GHz).
const TIMEOUT_TICKS: u64 = 1_000_000_000;
/// IER: transmitter holding register empty interrupt.
const IER_THR_EMPTY: u8 = 0x02;

static INTERRUPTS: AtomicU64 = AtomicU64::new(0);

fn on_com1(_frame: &InterruptFrame) {
    // SAFETY: reading IIR identifies (and so acknowledges) the THR-empty interrupt.
    let _ = unsafe { inb(COM1 + IIR) };
    INTERRUPTS.fetch_add(1, Ordering::AcqRel);
}

fn main(_boot: &Boot) -> Result<(), &'static str> {
    apic::mask_pic();
    apic::enable_local();
    cpu::set_handler(COM1_VECTOR, on_com1);
    apic::route_irq(COM1_IRQ, COM1_VECTOR, apic::local_id());

    let start = rdtsc();
    for round in 0..ROUNDS {
        let before = INTERRUPTS.load(Ordering::Acquire);
        // SAFETY: COM1 registers: enable the THR-empty interrupt, then send bytes.
        unsafe {
            if round == 0 {
                outb(COM1 + IER, IER_THR_EMPTY);
            } else {
                outb(COM1 + THR, b'.');
            }
        }
        let deadline = rdtsc() + TIMEOUT_TICKS;
        while INTERRUPTS.load(Ordering::Acquire) == before {
            if rdtsc() > deadline {
                // SAFETY: turn the interrupt off again before reporting.
                unsafe { outb(COM1 + IER, 0) };
                return Err("an interrupt did not arrive");
            }
            cpu::wait_for_interrupt_or_timeout();
        }
    }
    let elapsed = rdtsc() - start;
    // SAFETY: COM1 IER: interrupts off.
    unsafe { outb(COM1 + IER, 0) };
    Line::new().print();
    Line::new()
        .str("interrupts=")
        .dec(INTERRUPTS.load(Ordering::Acquire))
        .str(" ticks_per_interrupt=")
        .dec(elapsed / ROUNDS)
        .print();
    Ok(())
}
