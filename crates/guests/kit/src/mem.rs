//! The memory functions the compiler expects from a C library.
//!
//! `rep movsb`/`rep stosb` make each call one instruction for the software emulator of the
//! build machines, and keep the compiler from turning a loop back into a call to itself.

use core::arch::asm;

/// C `memcpy`.
///
/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // Eight bytes per iteration where possible: the emulator pays per iteration.
    // SAFETY: the caller guarantees both ranges are valid; the two copies cover them exactly.
    unsafe {
        asm!("rep movsq", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n / 8 => _,
             options(nostack, preserves_flags));
        asm!("rep movsb", inout("rdi") dst.add(n & !7) => _, inout("rsi") src.add(n & !7) => _,
             inout("rcx") n % 8 => _, options(nostack, preserves_flags));
    }
    dst
}

/// C `memmove`.
///
/// # Safety
/// `dst` and `src` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or the ranges are apart.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards (direction flag set for the one instruction, then cleared).
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

/// C `memset`.
///
/// # Safety
/// `dst` is valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // Eight bytes per iteration where possible: the emulator pays per iteration.
    let word = u64::from(value as u8) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees the range is valid; the two stores cover it exactly.
    unsafe {
        asm!("rep stosq", inout("rdi") dst => _, inout("rcx") n / 8 => _, in("rax") word,
             options(nostack, preserves_flags));
        asm!("rep stosb", inout("rdi") dst.add(n & !7) => _, inout("rcx") n % 8 => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// C `memcmp`.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both are valid for n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// C `bcmp`.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
