//! CPU tables and instructions: port I/O, the GDT (kernel and user segments, one TSS per CPU),
//! the IDT (every gate on an IST stack), interrupt dispatch, and waiting for interrupts from
//! either privilege level.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::{Line, MAX_CPUS, apic, boot, user};

/// Kernel code selector (same as the boot GDT and splitvisor's long-mode GDT).
pub const CODE_SELECTOR: u16 = 0x08;
/// Kernel data selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// User (ring 3) data selector, with RPL 3.
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// User (ring 3) 64-bit code selector, with RPL 3.
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// Selector of CPU 0's TSS; CPU n's is 16 bytes further per n.
const FIRST_TSS_SELECTOR: u16 = 0x28;
const IST_STACK_SIZE: usize = 16 * 1024;
/// The invalid-opcode exception: `ud2` from ring 3 asks ring 0 for a service.
pub const INVALID_OPCODE: u8 = 6;
/// The IST slot (1-based) of the invalid-opcode gate. Ring 0 may halt inside a service and
/// take an interrupt on IST 1, which must not land on the service's own frame.
const SERVICE_IST: u8 = 2;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The write must be meaningful to the device at `port`.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// The read must be meaningful to the device at `port`.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: forwarded to the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes a double word to an I/O port.
///
/// # Safety
/// The write must be meaningful to the device at `port`.
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// The privilege level the CPU runs at: 0 (kernel) or 3 (user mode, see [`crate::user`]).
#[inline(always)]
pub fn current_ring() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no effect; it is allowed at every privilege level.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    (cs & 3) as u8
}

/// Disables interrupts and halts, for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops this CPU; nothing is left to run on it.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Enables interrupts and halts until one arrives (`sti` delays interrupts by one
/// instruction, so none can slip in between), then disables them again.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is loaded before any program code runs.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Ends the VM the hard way: with an empty IDT, the next exception cannot be delivered.
pub fn triple_fault() -> ! {
    let null_idt = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately unrecoverable.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &null_idt, options(noreturn)) }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// The 64-bit task-state segment: only the IST pointers matter here.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const GDT_ENTRIES: usize = 5 + 2 * MAX_CPUS;
static mut GDT: [u64; GDT_ENTRIES] = [0; GDT_ENTRIES];
static mut TSS: [Tss; MAX_CPUS] = [const {
    Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 104 }
}; MAX_CPUS];
// Not zeroed by the entry (guest.ld's .noinit): a stack needs no initial value.
#[unsafe(link_section = ".bss.noinit")]
static mut IST_STACKS: [Stack; MAX_CPUS] = [const { Stack([0; IST_STACK_SIZE]) }; MAX_CPUS];
static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0,
}; 256];

/// Registered handlers for vectors 32 and up (0: none).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// What the interrupt stubs saved, lowest address first.
#[repr(C)]
pub struct InterruptFrame {
    /// Saved caller-saved registers: r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax.
    pub regs: [u64; 9],
    /// The vector.
    pub vector: u64,
    /// The error code (0 for vectors without one).
    pub error_code: u64,
    /// Interrupted instruction pointer.
    pub rip: u64,
    /// Interrupted code segment.
    pub cs: u64,
    /// Interrupted flags.
    pub rflags: u64,
    /// Interrupted stack pointer.
    pub rsp: u64,
    /// Interrupted stack segment.
    pub ss: u64,
}

impl InterruptFrame {
    /// The interrupted code's `rax`.
    pub fn rax(&self) -> u64 {
        self.regs[8]
    }

    /// Sets the `rax` the interrupted code resumes with.
    pub fn set_rax(&mut self, value: u64) {
        self.regs[8] = value;
    }

    /// The interrupted code's `rdi`, `rsi` and `rdx` (the first three C arguments).
    pub fn args(&self) -> [u64; 3] {
        [self.regs[4], self.regs[5], self.regs[6]]
    }

    /// The privilege level of the interrupted code.
    pub fn ring(&self) -> u8 {
        (self.cs & 3) as u8
    }
}

/// An interrupt handler.
pub type Handler = fn(&InterruptFrame);

/// Device interrupts (vectors 32 and up) handled so far, on every CPU.
static INTERRUPTS_HANDLED: AtomicU64 = AtomicU64::new(0);

/// Device interrupts handled so far; pass it to [`wait_for_interrupt_since`] to wait for
/// the next one without missing one that arrives in between.
pub fn interrupts_handled() -> u64 {
    INTERRUPTS_HANDLED.load(Ordering::Acquire)
}

/// Waits until a device interrupt has been handled after [`interrupts_handled`] returned
/// `seen`: returns at once if one already was, otherwise halts with interrupts enabled.
/// Works in ring 0 and in ring 3 (where it asks ring 0 to halt).
pub fn wait_for_interrupt_since(seen: u64) {
    wait_for_interrupt_since_or_timeout(seen, 0);
}

/// Like [`wait_for_interrupt_since`], but wakes up after about `ticks` TSC ticks even if no
/// interrupt comes (0: no limit), through the local APIC timer.
pub fn wait_for_interrupt_since_or_timeout(seen: u64, ticks: u64) {
    if current_ring() == 3 {
        user::wait_for_interrupt_since(seen, ticks);
    } else if interrupts_handled() == seen {
        // An interrupt that arrived after `seen` was taken is still pending (interrupts are
        // off in the kit's ring 0 and ring 3): `sti; hlt` takes it at once.
        if ticks > 0 {
            apic::arm_wakeup(ticks);
        }
        wait_for_interrupt();
        if ticks > 0 {
            apic::disarm_wakeup();
        }
    }
}

/// Installs `handler` for `vector` (32..=254); the runtime sends the EOI after it returns.
pub fn set_handler(vector: u8, handler: Handler) {
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

/// Builds the GDT, the TSSs and the IDT. Runs once, on the bootstrap processor.
pub fn init_tables() {
    // SAFETY: single-threaded: the application processors wait for `TABLES_READY`.
    unsafe {
        let gdt = &mut *(&raw mut GDT);
        gdt[0] = 0;
        gdt[1] = 0x00af_9a00_0000_ffff; // 64-bit code, DPL 0
        gdt[2] = 0x00cf_9200_0000_ffff; // data, DPL 0
        gdt[3] = 0x00cf_f200_0000_ffff; // data, DPL 3
        gdt[4] = 0x00af_fa00_0000_ffff; // 64-bit code, DPL 3
        let tss = &mut *(&raw mut TSS);
        let stacks = &raw mut IST_STACKS;
        for cpu in 0..MAX_CPUS {
            let stack_top = (&raw mut (*stacks)[cpu]) as u64 + IST_STACK_SIZE as u64;
            tss[cpu].ist[0] = stack_top;
            // The service stack until user mode gives this CPU its own (`set_service_stack`).
            tss[cpu].ist[usize::from(SERVICE_IST) - 1] = stack_top;
            let base = (&raw const tss[cpu]) as u64;
            let limit = (core::mem::size_of::<Tss>() - 1) as u64;
            let index = usize::from(FIRST_TSS_SELECTOR / 8) + 2 * cpu;
            gdt[index] = (limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40) // present, 64-bit available TSS
                | ((limit >> 16) & 0xf) << 48
                | ((base >> 24) & 0xff) << 56;
            gdt[index + 1] = base >> 32;
        }
        let idt = &mut *(&raw mut IDT);
        let stubs = &raw const isr_stubs as u64;
        for (vector, entry) in idt.iter_mut().enumerate() {
            let stub = stubs + (ISR_STUB_SIZE * vector) as u64;
            *entry = IdtEntry {
                offset_low: stub as u16,
                selector: CODE_SELECTOR,
                ist: if vector == usize::from(INVALID_OPCODE) { SERVICE_IST } else { 1 },
                type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (stub >> 16) as u16,
                offset_high: (stub >> 32) as u32,
                reserved: 0,
            };
        }
    }
}

/// Loads the shared tables and this CPU's TSS; switches to the kit's page tables.
pub fn init_this_cpu(cpu: usize) {
    let gdt = DescriptorPointer {
        limit: (GDT_ENTRIES * 8 - 1) as u16,
        base: (&raw const GDT) as u64,
    };
    let idt = DescriptorPointer {
        limit: (256 * 16 - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    let tss_selector = FIRST_TSS_SELECTOR + 16 * cpu as u16;
    // SAFETY: the tables were built by `init_tables`; the selectors match them, and the kit's
    // page tables identity-map everything this code touches.
    unsafe {
        asm!(
            "mov cr3, {pml4}",
            "lgdt [{gdt}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "mov fs, {data:x}",
            "mov gs, {data:x}",
            "ltr {tss:x}",
            "lidt [{idt}]",
            pml4 = in(reg) boot::boot_page_table(),
            gdt = in(reg) &gdt,
            idt = in(reg) &idt,
            code = in(reg) u64::from(CODE_SELECTOR),
            data = in(reg) u64::from(DATA_SELECTOR),
            tss = in(reg) u64::from(tss_selector),
            tmp = out(reg) _,
        );
    }
}

/// Points CPU `cpu`'s service stack (the invalid-opcode gate's IST) at `top`, and makes it
/// the ring-0 stack too. Called once per CPU before it first enters ring 3.
pub fn set_service_stack(cpu: usize, top: u64) {
    // SAFETY: only the CPU itself calls this, with interrupts off, before it uses the stack.
    unsafe {
        let tss = &mut *(&raw mut TSS);
        tss[cpu].ist[usize::from(SERVICE_IST) - 1] = top;
        tss[cpu].rsp[0] = top;
    }
}

#[unsafe(no_mangle)]
extern "C" fn guest_interrupt(frame: &mut InterruptFrame) {
    let vector = frame.vector as usize;
    if vector == usize::from(INVALID_OPCODE) && frame.ring() == 3 {
        // `ud2` in ring 3: a request for a service (or the end of user mode).
        user::serve(frame);
        return;
    }
    if vector < 32 {
        Line::new()
            .str("guest: exception ")
            .dec(frame.vector)
            .str(" at rip ")
            .hex(frame.rip)
            .str(" error ")
            .hex(frame.error_code)
            .str(" in ring ")
            .dec(u64::from(frame.ring()))
            .print();
        crate::report(Err("cpu exception"));
    }
    if vector == usize::from(apic::SPURIOUS_VECTOR) {
        // Not an interrupt in service: no EOI.
        return;
    }
    let handler = HANDLERS[vector].load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: only `set_handler` stores here, and it stores a `Handler`.
        let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
        handler(frame);
    }
    INTERRUPTS_HANDLED.fetch_add(1, Ordering::AcqRel);
    apic::eoi();
}

/// Bytes per interrupt entry stub: stub `n`, for vector `n`, is at `isr_stubs + 16 * n`.
const ISR_STUB_SIZE: usize = 16;

unsafe extern "C" {
    /// The 256 entry stubs, [`ISR_STUB_SIZE`] bytes each.
    static isr_stubs: u8;
}

// One stub per vector: it pushes a zero where the CPU pushes no error code, then the
// vector, and joins the common path, which saves the caller-saved registers and calls
// `guest_interrupt` with the frame.
global_asm!(
    r#"
    .text
    .balign 16
    .global isr_stubs
isr_stubs:
    .set kit_vector, 0
    .rept 256
    .balign 16
    .if (kit_vector == 8) || ((kit_vector >= 10) && (kit_vector <= 14)) || (kit_vector == 17) || (kit_vector == 21) || (kit_vector == 29) || (kit_vector == 30)
    .else
    push 0
    .endif
    .if kit_vector < 128
    .byte 0x6a, kit_vector          /* push imm8 */
    .else
    .byte 0x68                      /* push imm32 */
    .long kit_vector
    .endif
    jmp isr_common
    .set kit_vector, kit_vector + 1
    .endr

isr_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, rsp
    cld
    call guest_interrupt
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq
"#
);

/// Opens a one-instruction window for a pending interrupt, then disables interrupts again.
/// Unlike [`wait_for_interrupt`] it never blocks, so callers can keep a deadline.
pub fn wait_for_interrupt_or_timeout() {
    // SAFETY: the IDT is loaded before any program code runs.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Writes a model-specific register.
///
/// # Safety
/// The write must be valid for `msr`.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

/// Compares `len` bytes with `repe cmpsb` (one instruction for the emulator); true if equal.
///
/// # Safety
/// Both pointers are valid for `len` bytes.
pub unsafe fn bytes_equal(a: *const u8, b: *const u8, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let equal: u8;
    // Eight bytes per iteration when possible: the emulator pays per iteration.
    // SAFETY: forwarded to the caller; the direction flag is clear (cld at entry).
    unsafe {
        if len % 8 == 0 {
            asm!("repe cmpsq", "sete {eq}",
                 eq = out(reg_byte) equal,
                 inout("rsi") a => _, inout("rdi") b => _, inout("rcx") len / 8 => _,
                 options(nostack, readonly));
        } else {
            asm!("repe cmpsb", "sete {eq}",
                 eq = out(reg_byte) equal,
                 inout("rsi") a => _, inout("rdi") b => _, inout("rcx") len => _,
                 options(nostack, readonly));
        }
    }
    equal != 0
}

/// A full memory fence, for device-visible ring updates.
#[inline(always)]
pub fn mfence() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}
