//! A bump allocator for buffers and rings, from the RAM after the program's image.
//!
//! Nothing is ever freed: programs allocate once at start. Memory comes from a VMM as
//! zeroed pages, but callers must not rely on it.

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    static __bss_end: u8;
}

/// Next free byte (0: not yet initialised).
static NEXT: AtomicU64 = AtomicU64::new(0);
/// Kept below the kit's identity map (1 GiB) and the end of the first RAM range.
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the end of allocatable memory (from the memory map).
pub fn init(ram_end: u64) {
    let start = (&raw const __bss_end as u64 + 0xfff) & !0xfff;
    NEXT.store(start, Ordering::Release);
    LIMIT.store(ram_end.min(1 << 30), Ordering::Release);
}

/// `size` bytes aligned to `align` (a power of two), or `None` when RAM runs out.
pub fn alloc(size: u64, align: u64) -> Option<*mut u8> {
    let mut current = NEXT.load(Ordering::Acquire);
    loop {
        let start = (current + align - 1) & !(align - 1);
        let end = start.checked_add(size)?;
        if end > LIMIT.load(Ordering::Acquire) {
            return None;
        }
        match NEXT.compare_exchange(current, end, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(start as *mut u8),
            Err(now) => current = now,
        }
    }
}
