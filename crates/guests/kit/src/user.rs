//! User mode: running a program's work in ring 3.
//!
//! The build machines' software KVM emulates ring-0 code one instruction at a time (about
//! 2,000 times slower than the CPU) but runs ring-3 code natively. So the kit's ring 0 does
//! what needs privilege (set-up, port I/O, interrupt handlers, halting) and a program runs
//! its workload loop — filling descriptors, ringing the doorbell, polling the used ring,
//! formatting, checksums — in ring 3, through [`run`].
//!
//! # The user address range
//!
//! * RAM (the first GiB, identity-mapped) carries the user bit: the program's code, its
//!   statics, its ring-3 stack and everything from [`crate::alloc`] (virtqueues, request
//!   headers, data buffers) are reachable from ring 3 at the same addresses as from ring 0,
//!   which are also the guest-physical addresses the device sees. Ring 3 is used for speed,
//!   not to protect ring 0 from the program, which is one program.
//! * The device windows (the last GiB below 4 GiB: virtio-mmio, IOAPIC, local APIC) stay
//!   ring 0 only. [`map_mmio`] maps one 4 KiB register page into the *user MMIO window*, a
//!   range of its own at [`USER_MMIO_WINDOW`] (uncached, user bit set), so that ring 3 can
//!   write QueueNotify and read the device's status, and nothing else.
//!
//! # Entering and leaving ring 3
//!
//! [`run`] saves the ring-0 context and enters ring 3 with `iretq`, interrupts off. Ring 3
//! comes back to ring 0 only through `ud2` (port I/O and `int` fault in ring 3 on the build
//! machines' KVM): the invalid-opcode gate, on a stack of its own, reads a service number in
//! `rax` and arguments in `rdi`, `rsi`, `rdx`, then either returns to ring 3 after the `ud2`
//! or ends user mode. The services are console output, waiting for an interrupt, the end of
//! [`run`] and [`crate::report`]. The console, [`crate::report`] and
//! [`crate::cpu::wait_for_interrupt_since`] pick the right path themselves, so the same code
//! runs in either ring.
//!
//! User mode runs on the bootstrap processor only.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{self, InterruptFrame};
use crate::{alloc, boot, console};

/// Where [`map_mmio`] maps device register pages: the second GiB of the address space, which
/// the boot page tables leave unmapped (the kit identity-maps only the first GiB of RAM).
pub const USER_MMIO_WINDOW: u64 = 1 << 30;
/// Pages the user MMIO window holds (one page table).
const USER_MMIO_PAGES: u64 = 512;
/// Bytes of the ring-3 stack.
const USER_STACK_SIZE: u64 = 256 * 1024;
/// Bytes of the stack the invalid-opcode gate (the services) runs on.
const SERVICE_STACK_SIZE: u64 = 16 * 1024;
/// Most bytes one console service call prints (longer text is split by the caller).
const MAX_PRINT: u64 = 4096;

/// Page-table entry bits.
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
/// The physical address bits of a 4 KiB page-table entry.
const ADDRESS_BITS: u64 = 0x000f_ffff_ffff_f000;

/// The services ring 3 asks for with `ud2` (number in `rax`).
mod service {
    /// Print `rsi` bytes at `rdi` on the console.
    pub const PRINT: u64 = 1;
    /// Halt until an interrupt, unless the interrupt count is no longer `rdi`; at most about
    /// `rsi` TSC ticks if `rsi` is not 0.
    pub const WAIT: u64 = 2;
    /// Leave user mode: [`super::run`] returns.
    pub const EXIT: u64 = 3;
    /// End the program: `rdi` 0 for PASS, else FAIL with the `rdx` bytes at `rsi`.
    pub const REPORT: u64 = 4;
}

/// The ring-0 stack pointer [`run`] resumes with (0: not in user mode).
#[unsafe(no_mangle)]
static KIT_KERNEL_RSP: AtomicU64 = AtomicU64::new(0);
/// Top of the ring-3 stack (0: not allocated yet).
static USER_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// The user MMIO window's page table (0: not built yet), and pages used in it.
static USER_MMIO_TABLE: AtomicU64 = AtomicU64::new(0);
static USER_MMIO_USED: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    /// Saves the callee-saved registers and the stack pointer in `KIT_KERNEL_RSP`, then
    /// enters ring 3 at `entry` with `rdi` = `arg` and `rsp` = `stack`. Returns when ring 3
    /// asks for [`service::EXIT`].
    fn kit_enter_user(entry: u64, arg: u64, stack: u64);
    /// Back to the ring-0 context `kit_enter_user` saved, as if it returned.
    fn kit_resume_kernel() -> !;
}

global_asm!(
    r#"
    .text
    .global kit_enter_user
kit_enter_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + KIT_KERNEL_RSP], rsp
    push {user_data}
    push rdx
    push 0x2                    /* rflags: interrupts off, direction up */
    push {user_code}
    push rdi
    mov rdi, rsi
    iretq

    .global kit_resume_kernel
kit_resume_kernel:
    mov ax, {kernel_data}
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, [rip + KIT_KERNEL_RSP]
    mov qword ptr [rip + KIT_KERNEL_RSP], 0
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#,
    user_data = const cpu::USER_DATA_SELECTOR,
    user_code = const cpu::USER_CODE_SELECTOR,
    kernel_data = const cpu::DATA_SELECTOR,
);

/// Whether the CPU runs in ring 3.
#[inline(always)]
pub fn in_user_mode() -> bool {
    cpu::current_ring() == 3
}

/// What [`run`] hands to ring 3, and what ring 3 leaves for it.
struct Job<F> {
    work: Option<F>,
    result: Result<(), &'static str>,
}

/// Runs `work` in ring 3 on this (the bootstrap) processor and returns its result in ring 0.
///
/// Everything `work` borrows lives in RAM, which ring 3 reaches; device registers it touches
/// must come from [`map_mmio`]. A panic or a CPU exception in ring 3 ends the program with a
/// failure, as in ring 0. Called from ring 3, it simply runs `work`.
pub fn run<F: FnOnce() -> Result<(), &'static str>>(work: F) -> Result<(), &'static str> {
    if in_user_mode() {
        return work();
    }
    let stack_top = match USER_STACK_TOP.load(Ordering::Acquire) {
        0 => {
            let stack = alloc::alloc(USER_STACK_SIZE, 4096).ok_or("out of memory for the user stack")?;
            let service = alloc::alloc(SERVICE_STACK_SIZE, 4096).ok_or("out of memory for the service stack")?;
            cpu::set_service_stack(0, service as u64 + SERVICE_STACK_SIZE);
            let top = stack as u64 + USER_STACK_SIZE;
            USER_STACK_TOP.store(top, Ordering::Release);
            top
        }
        top => top,
    };
    let mut job = Job { work: Some(work), result: Err("user mode ended without a result") };
    // A function is entered with `rsp + 8` 16-byte aligned, as after a call.
    // SAFETY: `user_entry::<F>` takes a `*mut Job<F>` and leaves ring 3 through `EXIT` only;
    // `job` outlives the call; the stack is fresh RAM that nothing else uses.
    unsafe { kit_enter_user(user_entry::<F> as *const () as u64, (&raw mut job) as u64, stack_top - 8) };
    job.result
}

/// The first ring-3 code [`run`] enters.
extern "C" fn user_entry<F: FnOnce() -> Result<(), &'static str>>(job: *mut Job<F>) -> ! {
    // SAFETY: `run` passes a pointer to its `Job`, alive until it regains control.
    let job = unsafe { &mut *job };
    if let Some(work) = job.work.take() {
        job.result = work();
    }
    call(service::EXIT, [0; 3]);
    // Ring 0 does not come back after EXIT.
    loop {
        core::hint::spin_loop();
    }
}

/// Asks ring 0 for `number` with `args` in `rdi`, `rsi`, `rdx`; returns its `rax`.
fn call(number: u64, args: [u64; 3]) -> u64 {
    let result: u64;
    // SAFETY: the invalid-opcode gate serves the request and resumes after the `ud2` with
    // every other register as it was.
    unsafe {
        asm!("ud2", inlateout("rax") number => result, in("rdi") args[0], in("rsi") args[1],
             in("rdx") args[2], options(nostack));
    }
    result
}

/// Prints `bytes` on the console, from ring 3.
pub(crate) fn print(bytes: &[u8]) {
    for chunk in bytes.chunks(MAX_PRINT as usize) {
        call(service::PRINT, [chunk.as_ptr() as u64, chunk.len() as u64, 0]);
    }
}

/// [`cpu::wait_for_interrupt_since_or_timeout`], from ring 3.
pub(crate) fn wait_for_interrupt_since(seen: u64, ticks: u64) {
    call(service::WAIT, [seen, ticks, 0]);
}

/// [`crate::report`], from ring 3.
pub(crate) fn report(result: Result<(), &str>) -> ! {
    let (failed, why) = match result {
        Ok(()) => (0, ""),
        Err(why) => (1, why),
    };
    call(service::REPORT, [failed, why.as_ptr() as u64, why.len() as u64]);
    // Ring 0 does not come back after REPORT.
    loop {
        core::hint::spin_loop();
    }
}

/// Serves a `ud2` from ring 3 (called by the interrupt dispatcher, in ring 0).
pub(crate) fn serve(frame: &mut InterruptFrame) {
    let [a, b, c] = frame.args();
    match frame.rax() {
        service::PRINT => {
            // SAFETY: ring 3 passes a slice of its own memory, which is identity-mapped RAM.
            let bytes = unsafe { core::slice::from_raw_parts(a as *const u8, b.min(MAX_PRINT) as usize) };
            console::write_bytes(bytes);
        }
        service::WAIT => cpu::wait_for_interrupt_since_or_timeout(a, b),
        service::EXIT if KIT_KERNEL_RSP.load(Ordering::Acquire) != 0 => {
            // SAFETY: `run` saved its context and waits for exactly this.
            unsafe { kit_resume_kernel() }
        }
        service::REPORT => {
            // SAFETY: as for PRINT; the text is the program's (a `&'static str` in ring 3).
            let why = unsafe { core::slice::from_raw_parts(b as *const u8, c.min(MAX_PRINT) as usize) };
            let why = core::str::from_utf8(why).unwrap_or("(not UTF-8)");
            crate::report(if a == 0 { Ok(()) } else { Err(why) })
        }
        _ => {
            crate::console::println("guest: unknown user-mode service");
            crate::report(Err("unknown user-mode service"))
        }
    }
    frame.set_rax(0);
    frame.rip += 2; // past the `ud2`
}

/// Maps the 4 KiB page holding the device register at physical `addr` into the user MMIO
/// window (uncached, reachable from ring 3) and returns the address of `addr` there. Ring 0
/// may use that address too. Call it in ring 0.
pub fn map_mmio(addr: u64) -> Result<u64, &'static str> {
    if in_user_mode() {
        return Err("map_mmio needs ring 0");
    }
    let table = match USER_MMIO_TABLE.load(Ordering::Acquire) {
        0 => {
            let directory = zeroed_page()?;
            let table = zeroed_page()?;
            // SAFETY: both pages are fresh; the PDPT entry for the second GiB is unused
            // (the boot tables map only the first and the last GiB below 4 GiB).
            unsafe {
                (directory as *mut u64).write_volatile(table | PRESENT | WRITABLE | USER);
                let pdpt = boot::boot_pdpt() as *mut u64;
                pdpt.add((USER_MMIO_WINDOW >> 30) as usize).write_volatile(directory | PRESENT | WRITABLE | USER);
            }
            USER_MMIO_TABLE.store(table, Ordering::Release);
            table
        }
        table => table,
    };
    let page = addr & !0xfff;
    // SAFETY: `table` is the window's page table, 512 entries.
    let entries = unsafe { core::slice::from_raw_parts_mut(table as *mut u64, USER_MMIO_PAGES as usize) };
    let used = USER_MMIO_USED.load(Ordering::Acquire);
    let slot = match entries[..used as usize].iter().position(|entry| entry & ADDRESS_BITS == page) {
        Some(slot) => slot as u64,
        None => {
            if used == USER_MMIO_PAGES {
                return Err("the user MMIO window is full");
            }
            entries[used as usize] = page | PRESENT | WRITABLE | USER | WRITE_THROUGH | CACHE_DISABLE;
            USER_MMIO_USED.store(used + 1, Ordering::Release);
            // The entry was not present before, so no TLB holds it; reload CR3 anyway so
            // that no paging-structure cache keeps the old, empty directory entry.
            // SAFETY: rewriting CR3 with its own value only flushes translations.
            unsafe { asm!("mov {tmp}, cr3", "mov cr3, {tmp}", tmp = out(reg) _, options(nostack)) };
            used
        }
    };
    Ok(USER_MMIO_WINDOW + slot * 4096 + (addr & 0xfff))
}

/// A zeroed, page-aligned page from the allocator.
fn zeroed_page() -> Result<u64, &'static str> {
    let page = alloc::alloc(4096, 4096).ok_or("out of memory for page tables")?;
    // SAFETY: a fresh page.
    unsafe { core::ptr::write_bytes(page, 0, 4096) };
    Ok(page as u64)
}
