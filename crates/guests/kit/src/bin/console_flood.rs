//! `console-flood`: writes numbered, self-checking lines to COM1 as fast as the UART takes
//! them, for a host that kills the console's driver meanwhile and checks that every byte
//! arrived exactly once (`splitvisor_guests::console_flood_check`).
//!
//! The lines (format in `kit/src/flood.rs`) are made in ring 3, which runs natively, a batch
//! at a time; ring 0 sends them the way a driver does: in FIFO mode (the default) it waits
//! for LSR THRE, then loads up to 16 bytes (`rep outsb`); with `console_flood.fifo=0` it
//! waits for THRE before every byte (`out`). Every wait is bounded.
//!
//! After every batch it checks that the UART kept the registers it was given (line and
//! modem control, the scratch register, which carries a new value each batch, and the baud
//! divisor, read through DLAB as a driver that changes speed does): a driver that came
//! back without the device's state fails the run here, whatever the host sees.

#![no_std]
#![no_main]

use splitvisor_guest_kit::console::{COM1, IER, LCR, LSR, LSR_THR_EMPTY, MCR, THR};
use splitvisor_guest_kit::cpu::{inb, outb};
use splitvisor_guest_kit::flood::{LINE_LEN, MAX_LINES, format};
use splitvisor_guest_kit::{Boot, Line, alloc, guest_main, rdtsc, start_info, user};

guest_main!(main);

/// Lines written when the command line does not say.
const DEFAULT_LINES: u64 = 2000;
/// Lines made per trip to ring 3, and between two checks of the UART's registers.
const BATCH_LINES: usize = 64;
/// Bytes the 16550 transmit FIFO takes after THRE.
const FIFO_DEPTH: usize = 16;
/// Longest wait for THRE: 5e10 TSC ticks, at least 10 s on a TSC up to 5 GHz (a driver
/// partition being replaced takes far less).
const THRE_TIMEOUT_TICKS: u64 = 50_000_000_000;
/// The scratch register.
const SCR: u16 = 7;
/// What `console::init` programs: 8N1 in LCR, DTR, RTS and OUT2 in MCR, divisor 1.
const LCR_8N1: u8 = 0x03;
const MCR_SET: u8 = 0x0b;
const LCR_DLAB: u8 = 0x80;
const DIVISOR: (u8, u8) = (0x01, 0x00);

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
    let key = |name| info.cmdline_value(name).map(|v| start_info::parse_u64(v).ok_or("a console_flood key is not a number"));
    let lines = key("console_flood.lines").transpose()?.unwrap_or(DEFAULT_LINES);
    if lines > MAX_LINES {
        return Err("console_flood.lines is above 1000000");
    }
    let fifo = key("console_flood.fifo").transpose()?.unwrap_or(1) != 0;
    let batch = alloc::alloc((BATCH_LINES * LINE_LEN) as u64, 4096).ok_or("out of memory for the lines")?;
    // SAFETY: `batch` is a fresh allocation of this many bytes in RAM, used only here.
    let batch = unsafe { core::slice::from_raw_parts_mut(batch, BATCH_LINES * LINE_LEN) };

    Line::new()
        .str("console-flood: writing ")
        .dec(lines)
        .str(" lines of ")
        .dec(LINE_LEN as u64)
        .str(" bytes, ")
        .str(if fifo { "16 bytes per THRE" } else { "THRE before every byte" })
        .print();
    let mut next = 0u64;
    let mut tag = 0u8;
    // SAFETY: COM1's scratch register, which only the program uses.
    unsafe { outb(COM1 + SCR, tag) };
    while next < lines {
        let count = (lines - next).min(BATCH_LINES as u64) as usize;
        let bytes = &mut batch[..count * LINE_LEN];
        user::run(|| {
            for (k, line) in bytes.chunks_exact_mut(LINE_LEN).enumerate() {
                let line: &mut [u8; LINE_LEN] = line.try_into().map_err(|_| "a line of the wrong size")?;
                format(next + k as u64, line);
            }
            Ok(())
        })?;
        if fifo {
            for chunk in bytes.chunks(FIFO_DEPTH) {
                wait_for_thre()?;
                send_string(chunk);
            }
        } else {
            for &byte in bytes.iter() {
                wait_for_thre()?;
                // SAFETY: COM1's transmit holding register; THRE said it is empty.
                unsafe { outb(COM1 + THR, byte) };
            }
        }
        next += count as u64;
        check_registers(tag)?;
        tag = tag.wrapping_add(1);
        // SAFETY: as above.
        unsafe { outb(COM1 + SCR, tag) };
    }
    Line::new().str("console-flood: done: ").dec(lines).str(" lines").print();
    Ok(())
}

/// Waits, bounded, until the transmitter holding register (and FIFO) is empty.
fn wait_for_thre() -> Result<(), &'static str> {
    let deadline = rdtsc() + THRE_TIMEOUT_TICKS;
    // SAFETY: reading COM1's line status has no side effect on transmit.
    while unsafe { inb(COM1 + LSR) } & LSR_THR_EMPTY == 0 {
        if rdtsc() > deadline {
            return Err("the UART's transmitter never became empty");
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Checks that the UART holds what it was given: `tag` in the scratch register, the line
/// and modem control set at start, and (through DLAB, restored after) the baud divisor.
fn check_registers(tag: u8) -> Result<(), &'static str> {
    // SAFETY: COM1 registers; reading them has no side effect, and LCR is set back to 8N1
    // (DLAB off) before any byte is sent again.
    let (line, modem, scratch, enable, divisor) = unsafe {
        let line = inb(COM1 + LCR);
        let modem = inb(COM1 + MCR);
        let scratch = inb(COM1 + SCR);
        let enable = inb(COM1 + IER);
        outb(COM1 + LCR, LCR_8N1 | LCR_DLAB);
        let divisor = (inb(COM1 + THR), inb(COM1 + IER));
        outb(COM1 + LCR, LCR_8N1);
        (line, modem, scratch, enable, divisor)
    };
    let checks = [
        (line == LCR_8N1, "the UART lost its line control register"),
        (modem == MCR_SET, "the UART lost its modem control register"),
        (scratch == tag, "the UART lost its scratch register"),
        (enable == 0, "the UART's interrupt enable register changed"),
        (divisor == DIVISOR, "the UART lost its baud divisor"),
    ];
    match checks.iter().find(|(held, _)| !held) {
        Some((_, lost)) => Err(lost),
        None => Ok(()),
    }
}

/// Sends `bytes` (at most a FIFO's worth) with one `rep outsb`.
fn send_string(bytes: &[u8]) {
    // SAFETY: `bytes` is valid for `bytes.len()` bytes; `rep outsb` only reads it and writes
    // COM1's transmit register.
    unsafe {
        core::arch::asm!(
            "rep outsb",
            in("dx") COM1 + THR,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, readonly, preserves_flags)
        );
    }
}
