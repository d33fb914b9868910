//! The splitvisor guest runtime.
//!
//! A tiny, freestanding x86_64 kernel library for the project's guest programs. Programs are
//! standard PVH guests, so every PVH-capable VMM (splitvisor, QEMU `-M microvm`,
//! Firecracker) runs them unchanged. The runtime gives a program:
//!
//! * the boot path (PVH 32-bit entry → long mode; a 64-bit entry for application processors),
//! * the `hvm_start_info` it was booted with (memory map, command line),
//! * a console on the COM1 8250 UART,
//! * a GDT with one TSS per CPU and an IDT whose gates all switch to an IST stack (the host
//!   ABI this code is compiled for keeps a red zone below `rsp`, which an interrupt arriving
//!   on the same stack would overwrite),
//! * local APIC and IOAPIC set-up for device interrupts,
//! * [`report`]: the one way a program ends, understood by every VMM: a result line on the
//!   console, then an i8042 reset, then a triple fault as a last resort.
//!
//! * [`user`]: user mode, to run a program's work in ring 3,
//! * a virtio-mmio and virtio-blk driver ([`virtio`]) that works from either ring,
//! * [`stress`]: the on-disk block format of `blk-stress`, shared with the host's checker,
//! * [`flood`]: the console lines of `console-flood`, shared with the host's checker.
//!
//! Ring 0 is what the build machines' software KVM emulates one instruction at a time and
//! without SSE; the whole kit is therefore compiled without SSE and avoids `core::fmt` (its
//! precompiled code uses SSE registers). Ring 3 runs natively there: see [`user`].

#![no_std]

pub mod alloc;
pub mod apic;
pub mod boot;
pub mod clock;
pub mod console;
pub mod cpu;
pub mod flood;
pub mod mem;
pub mod start_info;
pub mod stress;
pub mod user;
pub mod virtio;
pub mod virtio_net;
pub mod netstack;

use core::sync::atomic::{AtomicU32, Ordering};

pub use console::Line;
pub use start_info::StartInfo;

/// Most CPUs the runtime brings up: at least as many as splitvisor starts (56, the
/// application processors' stacks below the EBDA and the bootstrap processor).
pub const MAX_CPUS: usize = 64;

/// What a program's `main` gets.
pub struct Boot {
    /// The boot information, if the VMM passed a valid `hvm_start_info`.
    pub start_info: Option<StartInfo>,
}

/// CPUs that have finished [`cpu::init_this_cpu`] (the bootstrap processor included).
pub static CPUS_ONLINE: AtomicU32 = AtomicU32::new(0);

/// Set by the bootstrap processor once the shared tables (GDT, IDT, page tables) are ready.
static TABLES_READY: AtomicU32 = AtomicU32::new(0);

unsafe extern "Rust" {
    /// The program's entry point, on the bootstrap processor.
    fn guest_main(boot: &Boot) -> Result<(), &'static str>;
}

/// Rust entry of the bootstrap processor, called by the assembly in [`boot`].
#[unsafe(no_mangle)]
extern "C" fn guest_bsp_main() -> ! {
    console::init();
    // SAFETY: written once by the 32-bit entry before this function runs.
    let start_info_addr = unsafe { boot::PVH_START_INFO };
    // SAFETY: the PVH ABI passes the address of a `hvm_start_info` in identity-mapped RAM.
    let start_info = unsafe { StartInfo::from_addr(u64::from(start_info_addr)) };
    // Buffers come from the RAM range the program was loaded into (from 1 MiB).
    let ram_end = start_info
        .as_ref()
        .and_then(|info| info.memmap().iter().find(|e| e.kind == 1 && e.addr <= 0x10_0000 && e.addr + e.size > 0x10_0000).map(|e| e.addr + e.size))
        .unwrap_or(0);
    alloc::init(ram_end);
    cpu::init_tables();
    cpu::init_this_cpu(0);
    TABLES_READY.store(1, Ordering::Release);
    CPUS_ONLINE.fetch_add(1, Ordering::AcqRel);
    let boot = Boot { start_info };
    // SAFETY: every program defines `guest_main` through the `guest_main!` macro.
    let result = unsafe { guest_main(&boot) };
    report(result)
}

/// Rust entry of an application processor started by splitvisor in long mode.
#[unsafe(no_mangle)]
extern "C" fn guest_ap_main(cpu_index: u64) -> ! {
    while TABLES_READY.load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
    if cpu_index as usize >= MAX_CPUS {
        // Beyond what the runtime has tables for: stay parked.
        cpu::halt_forever();
    }
    cpu::init_this_cpu(cpu_index as usize);
    CPUS_ONLINE.fetch_add(1, Ordering::AcqRel);
    cpu::halt_forever()
}

/// The marker that starts the result line the host looks for.
pub const RESULT_MARKER: &str = "SPLITVISOR-RESULT: ";

/// Prints the result line and powers the machine off. Never returns.
///
/// Power-off is an i8042 CPU reset (splitvisor, Firecracker, QEMU with `-no-reboot`); should
/// the VMM have no i8042, a triple fault ends the VM instead. Works from ring 3 too (ring 0
/// does it on ring 3's behalf).
pub fn report(result: Result<(), &str>) -> ! {
    if cpu::current_ring() == 3 {
        user::report(result);
    }
    let mut line = Line::new();
    line.str(RESULT_MARKER);
    match result {
        Ok(()) => line.str("PASS"),
        Err(why) => line.str("FAIL ").str(why),
    };
    line.print();
    power_off()
}

/// Resets the machine through the i8042, falling back to a triple fault.
pub fn power_off() -> ! {
    // SAFETY: port 0x64 is the i8042 command port; 0xfe pulses the CPU reset line.
    unsafe { cpu::outb(0x64, 0xfe) };
    cpu::triple_fault()
}

/// Defines the program's entry point: `guest_main!(main)` with
/// `fn main(boot: &Boot) -> Result<(), &'static str>`.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn guest_main(boot: &$crate::Boot) -> Result<(), &'static str> {
            $main(boot)
        }

        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            $crate::report(Err("panic"))
        }
    };
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
