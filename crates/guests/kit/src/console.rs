//! The console: COM1, an 8250/16550 UART at I/O port 0x3f8.
//!
//! Output is assembled in a [`Line`] (no `core::fmt`, see the crate docs) and sent with
//! `rep outsb`, up to a FIFO's worth of bytes per instruction: one VM exit for 16 bytes
//! instead of one per byte.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu::{inb, outb};

/// Base I/O port of COM1.
pub const COM1: u16 = 0x3f8;
/// Transmit holding register / receive buffer.
pub const THR: u16 = 0;
/// Interrupt enable register.
pub const IER: u16 = 1;
/// Interrupt identification (read) / FIFO control (write).
pub const IIR: u16 = 2;
/// Line control register.
pub const LCR: u16 = 3;
/// Modem control register.
pub const MCR: u16 = 4;
/// Line status register.
pub const LSR: u16 = 5;
/// LSR: the transmitter holding register (and FIFO) is empty.
pub const LSR_THR_EMPTY: u8 = 1 << 5;
/// LSR: a received byte is waiting.
pub const LSR_DATA_READY: u8 = 1 << 0;
/// Bytes the 16550 transmit FIFO holds.
const FIFO_DEPTH: usize = 16;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs the UART: 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    // SAFETY: COM1 registers; the writes only configure the UART.
    unsafe {
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, 0x80); // DLAB: the next two writes set the divisor
        outb(COM1 + THR, 0x01); // divisor low: 115200 baud
        outb(COM1 + IER, 0x00); // divisor high
        outb(COM1 + LCR, 0x03); // 8 data bits, no parity, one stop bit
        outb(COM1 + IIR, 0xc7); // enable and clear FIFOs
        outb(COM1 + MCR, 0x0b); // DTR, RTS, OUT2 (OUT2 gates the IRQ line on PCs)
    }
}

/// Sends raw bytes to the console (from ring 3, through ring 0: see [`crate::user`]).
pub fn write_bytes(bytes: &[u8]) {
    if crate::cpu::current_ring() == 3 {
        crate::user::print(bytes);
        return;
    }
    while LOCK
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    for chunk in bytes.chunks(FIFO_DEPTH) {
        // SAFETY: reading the line status has no side effect on transmit.
        while unsafe { inb(COM1 + LSR) } & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        // SAFETY: `chunk` is valid for `chunk.len()` bytes; `rep outsb` only reads it.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                in("dx") COM1 + THR,
                inout("rsi") chunk.as_ptr() => _,
                inout("rcx") chunk.len() => _,
                options(nostack, readonly, preserves_flags)
            );
        }
    }
    LOCK.store(false, Ordering::Release);
}

/// One line of console output, assembled without `core::fmt`.
///
/// ```ignore
/// Line::new().str("vcpus=").dec(2).print();
/// ```
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }

    /// Appends a string (truncated when the line is full).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends raw bytes (truncated when the line is full).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }

    /// Appends an unsigned number in decimal.
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[i..])
    }

    /// Appends an unsigned number in hexadecimal with a `0x` prefix.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = HEX[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.str("0x").bytes(&digits[i..])
    }

    /// Ends the line and sends it.
    pub fn print(&mut self) {
        if self.len == self.buf.len() {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        write_bytes(&self.buf[..=self.len]);
        self.len = 0;
    }
}

/// Prints one line.
pub fn println(s: &str) {
    Line::new().str(s).print();
}
