//! `marker`: the first thing it does, before paging, a stack or anything else, is write one
//! byte (`M`) to COM1. So the host's "process start to first guest byte" measures the VMM
//! (its set-up and the first KVM_RUN), not the guest's boot code, which the build machines'
//! software KVM emulates slowly. Then it boots as every program does, ends the marker's line
//! and reports PASS.
//!
//! The program brings its own PVH entry, `__pvh_entry` (see the kit's `boot` module and
//! `guest.ld`): three instructions, then the runtime's `pvh_start32` with `ebx` (the
//! `hvm_start_info` address) untouched.

#![no_std]
#![no_main]

use splitvisor_guest_kit::{Boot, console, guest_main};

guest_main!(main);

core::arch::global_asm!(
    r#"
    .section .text.pvh_entry, "ax"
    .code32
    .global __pvh_entry
__pvh_entry:
    mov dx, {com1}
    mov al, {byte}
    out dx, al
    jmp pvh_start32
    .code64
    .text
"#,
    com1 = const console::COM1,
    byte = const MARKER_BYTE,
);

/// The byte the entry writes.
const MARKER_BYTE: u8 = b'M';

fn main(_boot: &Boot) -> Result<(), &'static str> {
    // End the marker byte's line, so the result line stands alone.
    console::write_bytes(b"\n");
    Ok(())
}
