//! The local APIC (xAPIC MMIO at 0xfee00000) and the IOAPIC (0xfec00000).

use crate::cpu::outb;

const LAPIC_BASE: usize = 0xfee0_0000;
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;
/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// The spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IOAPIC_BASE: usize = 0xfec0_0000;
const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;
const IOREDTBL: u32 = 0x10;

fn lapic_write(reg: usize, value: u32) {
    // SAFETY: the local APIC register page is identity-mapped by the boot page tables.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

fn lapic_read(reg: usize) -> u32 {
    // SAFETY: as in `lapic_write`.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

/// Enables this CPU's local APIC and accepts every priority.
pub fn enable_local() {
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// This CPU's APIC ID.
pub fn local_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// Masks every line of both 8259 PICs, so ISA interrupts arrive only through the IOAPIC.
pub fn mask_pic() {
    // SAFETY: ports 0x21 and 0xa1 are the PIC interrupt mask registers.
    unsafe {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC register page is identity-mapped by the boot page tables.
    unsafe {
        ((IOAPIC_BASE + IOREGSEL) as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + IOWIN) as *mut u32).write_volatile(value);
    }
}

/// Routes IOAPIC input `pin` (an ISA IRQ) as an edge-triggered, active-high, fixed
/// interrupt at `vector` to the CPU with APIC ID `apic_id`, unmasked.
pub fn route_irq(pin: u8, vector: u8, apic_id: u8) {
    let entry = IOREDTBL + 2 * u32::from(pin);
    ioapic_write(entry + 1, u32::from(apic_id) << 24);
    ioapic_write(entry, u32::from(vector));
}
