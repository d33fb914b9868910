//! Measures what the code under test allocates: a global allocator that counts the live
//! heap bytes of each thread, for harnesses that bound a device's host memory per guest
//! action. A test or fuzz binary installs it:
//!
//! ```
//! use splitvisor_devices::fuzzing::heap::{CountingAllocator, measure};
//!
//! #[global_allocator]
//! static HEAP: CountingAllocator = CountingAllocator;
//!
//! let (v, peak) = measure(|| vec![0u8; 4096]);
//! assert!(peak.unwrap() >= 4096);
//! # drop(v);
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Counts each thread's live heap bytes on top of the system allocator.
pub struct CountingAllocator;

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Const-initialised and without destructors: touching them never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(bytes as isize);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(bytes as isize)));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged and only adds bookkeeping that never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on unchanged.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        new
    }
}

/// Runs `f` and returns its result with the most heap bytes this thread held during it
/// beyond what it held before; `None` if [`CountingAllocator`] is not the global
/// allocator of this program.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get);
    let growth = usize::try_from(peak.saturating_sub(start)).unwrap_or(0);
    (result, INSTALLED.load(Ordering::Relaxed).then_some(growth))
}

/// Whether [`CountingAllocator`] is the global allocator (it has served an allocation).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Runs `f` without counting what it allocates or frees: for an oracle that runs inside
/// the code being measured (a journal's callbacks). Allocations made inside must also be
/// freed inside (or after the measurement).
pub fn exclude<R>(f: impl FnOnce() -> R) -> R {
    let live = LIVE.with(Cell::get);
    let peak = PEAK.with(Cell::get);
    let result = f();
    LIVE.with(|cell| cell.set(live));
    PEAK.with(|cell| cell.set(peak));
    result
}
