//! The local APIC (xAPIC MMIO at 0xfee00000) and the IOAPIC (0xfec00000).

use core::sync::atomic::{AtomicU8, Ordering};

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
/// The local APIC timer's vector (a wake-up: the runtime counts it and sends the EOI).
pub const TIMER_VECTOR: u8 = 0xef;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL_COUNT: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
/// LVT timer: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer: TSC-deadline mode.
const LVT_TSC_DEADLINE: u32 = 2 << 17;
/// The MSR holding the TSC value at which the timer fires in TSC-deadline mode.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// CPUID.1:ECX: the local APIC timer has TSC-deadline mode.
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

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

/// Whether the timer has TSC-deadline mode: 0 not known yet, 1 no, 2 yes.
static TSC_DEADLINE: AtomicU8 = AtomicU8::new(0);

/// Arms this CPU's local APIC timer to interrupt once, about `ticks` TSC ticks from now:
/// exactly in TSC-deadline mode where the CPU has it, otherwise in one-shot mode counting at
/// the 1 GHz that KVM's local APIC timer runs at (a rough wake-up elsewhere). Callers use it
/// only to wake from a halt, and look at the TSC themselves. Ring 0 only.
pub fn arm_wakeup(ticks: u64) {
    let deadline = match TSC_DEADLINE.load(Ordering::Relaxed) {
        0 => {
            let has = core::arch::x86_64::__cpuid(1).ecx & CPUID_TSC_DEADLINE != 0;
            TSC_DEADLINE.store(if has { 2 } else { 1 }, Ordering::Relaxed);
            has
        }
        known => known == 2,
    };
    if deadline {
        lapic_write(LAPIC_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(TIMER_VECTOR));
        // SAFETY: the TSC-deadline MSR exists (CPUID said so); a past value fires at once.
        unsafe { crate::cpu::wrmsr(MSR_TSC_DEADLINE, crate::rdtsc().saturating_add(ticks.max(1))) };
    } else {
        lapic_write(LAPIC_TIMER_DIVIDE, 0b1011); // divide by 1
        lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot
        lapic_write(LAPIC_TIMER_INITIAL_COUNT, ticks.clamp(1, u64::from(u32::MAX)) as u32);
    }
}

/// Stops this CPU's local APIC timer.
pub fn disarm_wakeup() {
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL_COUNT, 0);
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
