//! The console lines of `console-flood`: numbered, self-checking, all of one length.
//!
//! This file is compiled twice, like [`stress`](crate::stress): into the guest kit, which
//! writes the lines to COM1, and into the host crate `splitvisor-guests`, whose
//! `console_flood_check` checks a captured console. So both sides agree by construction.
//! Plain integer code, no dependencies, no formatting machinery.
//!
//! Line `n` (from 0) is [`LINE_LEN`] bytes:
//!
//! ```text
//! flood 000123 38dinsxCHMRW16bg 81d0f2dd\n
//! ```
//!
//! `flood `, the number in six decimal digits, a space, sixteen payload characters (from
//! [`ALPHABET`], starting at `n * 7` and stepping by 5, so neighbouring lines differ in
//! every column), a space, the checksum in eight lowercase hex digits, a newline. The
//! checksum is FNV-1a (32-bit) over every byte before the space that precedes it. A lost,
//! duplicated or changed byte makes a line that [`parse`] refuses; a lost or duplicated line
//! shows in the numbers.

/// Bytes in one line, the newline included.
pub const LINE_LEN: usize = PREFIX.len() + DIGITS + 1 + PAYLOAD + 1 + 8 + 1;
/// Lines a run may write: the numbers have six digits.
pub const MAX_LINES: u64 = 1_000_000;
/// What every line starts with.
pub const PREFIX: &[u8] = b"flood ";
/// The payload's characters.
pub const ALPHABET: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Decimal digits of the line number.
const DIGITS: usize = 6;
/// Payload characters per line.
const PAYLOAD: usize = 16;
/// Where the checksum starts.
const CHECKSUM_AT: usize = LINE_LEN - 9;
const FNV_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// FNV-1a (32-bit) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut hash = FNV_BASIS;
    for &byte in bytes {
        hash = (hash ^ u32::from(byte)).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Writes line `n` (taken modulo [`MAX_LINES`]) into `line`.
pub fn format(n: u64, line: &mut [u8; LINE_LEN]) {
    let n = n % MAX_LINES;
    line[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut value = n;
    for at in (PREFIX.len()..PREFIX.len() + DIGITS).rev() {
        line[at] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    let payload_at = PREFIX.len() + DIGITS + 1;
    line[payload_at - 1] = b' ';
    for (k, byte) in line[payload_at..payload_at + PAYLOAD].iter_mut().enumerate() {
        *byte = ALPHABET[((n * 7 + k as u64 * 5) % ALPHABET.len() as u64) as usize];
    }
    line[CHECKSUM_AT - 1] = b' ';
    let sum = checksum(&line[..CHECKSUM_AT - 1]);
    for k in 0..8 {
        line[CHECKSUM_AT + k] = HEX[((sum >> (28 - 4 * k)) & 0xf) as usize];
    }
    line[LINE_LEN - 1] = b'\n';
}

/// The number of `line` (without its newline) if it is exactly a line [`format()`] writes.
pub fn parse(line: &[u8]) -> Option<u64> {
    if line.len() != LINE_LEN - 1 || !line.starts_with(PREFIX) {
        return None;
    }
    let mut n = 0u64;
    for &digit in &line[PREFIX.len()..PREFIX.len() + DIGITS] {
        if !digit.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(digit - b'0');
    }
    let mut expected = [0u8; LINE_LEN];
    format(n, &mut expected);
    (expected[..LINE_LEN - 1] == *line).then_some(n)
}
