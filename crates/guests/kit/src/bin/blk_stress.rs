//! `blk-stress`: writes and verifies every block of the first virtio-blk disk, pass after
//! pass, for the driver-lifecycle tests: the host kills, stops or replaces the disk's driver
//! while this runs, and the guest must see no error and lose no acknowledged write.
//!
//! Each pass writes every 4 KiB block (the whole disk, or the first `blk_stress.blocks=N`)
//! in the self-describing format of [`splitvisor_guest_kit::stress`] — magic, block index,
//! generation, a pattern keyed by both, a checksum — in a shuffled order, up to
//! `blk_stress.depth=D` requests in flight (default 16), then flushes, then reads every
//! block back and checks it. Pass `p` (from 0) writes generation `G + p`, with
//! `blk_stress.generation=G` (default 1) and `blk_stress.passes=P` (default 1); after the
//! last pass every block of the disk holds generation `G + P - 1`, which the host can check
//! (`splitvisor_guests::blk_stress_check`).
//!
//! Any request status other than OK, and a device that asks for a reset
//! (DEVICE_NEEDS_RESET), fail the run at once with a line that says which request or what.
//! A progress line (pass, writes acknowledged, blocks verified) comes every 2 seconds or so.
//! The loop runs in ring 3 (`blk_stress.ring=3`, the default), polling the used ring for up
//! to `blk_stress.poll_us=N` microseconds (default 5000, adapting) before it waits for an
//! interrupt; `blk_stress.ring=0` runs it in ring 0, interrupt-driven (slow where ring 0 is
//! emulated).
//! No wait is unbounded: the run fails if no request completes for `blk_stress.timeout_s=N`
//! seconds (default 60), or if a completion stays unannounced by the device's interrupt for
//! a second (a lost interrupt).

#![no_std]
#![no_main]

use splitvisor_guest_kit::clock::{self, TscScale};
use splitvisor_guest_kit::stress::{self, BLOCK_SIZE, Mismatch};
use splitvisor_guest_kit::virtio::{self, BlockDevice, MAX_IN_FLIGHT, blk};
use splitvisor_guest_kit::{Boot, Line, StartInfo, alloc, apic, cpu, guest_main, rdtsc, start_info, user};

guest_main!(main);

const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / 512) as u64;
/// Nanoseconds between progress lines.
const PROGRESS_NS: u64 = 2_000_000_000;

/// What the command line asked for.
struct Settings {
    generation: u64,
    passes: u64,
    blocks: u64,
    depth: usize,
}

/// A pseudo-random permutation of `0..n`, without memory: a bijective scramble of the
/// smallest power-of-two range holding `n` (multiply by an odd number, add, xor-shift: each
/// step is invertible modulo 2^bits), walked along its cycle until it lands below `n`.
struct Shuffle {
    n: u64,
    mask: u64,
    shift: u32,
    multiplier: [u64; 2],
    offset: u64,
}

impl Shuffle {
    fn new(n: u64, seed: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let mut state = seed ^ 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let multiplier = [next() | 1, next() | 1];
        let offset = next();
        Self { n, mask, shift: bits.div_ceil(2).max(1), multiplier, offset }
    }

    fn scramble(&self, mut x: u64) -> u64 {
        x = x.wrapping_mul(self.multiplier[0]).wrapping_add(self.offset) & self.mask;
        x ^= x >> self.shift;
        x = x.wrapping_mul(self.multiplier[1]) & self.mask;
        x ^ (x >> self.shift)
    }

    /// The `i`-th block of the order (`i < n`).
    fn nth(&self, i: u64) -> u64 {
        let mut x = self.scramble(i);
        while x >= self.n {
            x = self.scramble(x);
        }
        x
    }
}

/// Progress lines, every [`PROGRESS_NS`].
struct Progress {
    interval: u64,
    next: u64,
}

impl Progress {
    fn new(scale: Option<TscScale>) -> Self {
        // Without kvm-clock, assume a TSC of about 2 GHz.
        let interval = scale.map_or(PROGRESS_NS * 2, |scale| scale.ticks(PROGRESS_NS));
        Self { interval, next: rdtsc() + interval }
    }

    fn due(&mut self) -> bool {
        let now = rdtsc();
        if now < self.next {
            return false;
        }
        self.next = now + self.interval;
        true
    }
}

fn status_name(status: u8) -> &'static str {
    match status {
        blk::OK => "OK",
        blk::IOERR => "IOERR",
        blk::UNSUPP => "UNSUPP",
        0xff => "never written by the device",
        _ => "not a virtio-blk status",
    }
}

/// Prints why a request failed and returns the result to report.
fn request_failed(what: &str, block: u64, generation: u64, status: u8) -> &'static str {
    Line::new()
        .str("blk-stress: ")
        .str(what)
        .str(" of block ")
        .dec(block)
        .str(" (generation ")
        .dec(generation)
        .str(") completed with status ")
        .dec(u64::from(status))
        .str(" (")
        .str(status_name(status))
        .str(")")
        .print();
    if what == "write" { "a write failed" } else { "a read failed" }
}

/// Waits for one completion; a device that asks for a reset is a failure, said so.
fn wait(disk: &mut BlockDevice, pass: u64) -> Result<(usize, u8), &'static str> {
    disk.wait().inspect_err(|why| {
        Line::new().str("blk-stress: pass ").dec(pass + 1).str(": the device failed: ").str(why).print();
    })
}

fn progress_line(pass: u64, settings: &Settings, generation: u64, written: u64, verified: u64) {
    Line::new()
        .str("blk-stress: pass ")
        .dec(pass + 1)
        .str("/")
        .dec(settings.passes)
        .str(" generation ")
        .dec(generation)
        .str(": ")
        .dec(written)
        .str("/")
        .dec(settings.blocks)
        .str(" writes acknowledged, ")
        .dec(verified)
        .str("/")
        .dec(settings.blocks)
        .str(" blocks verified")
        .print();
}

/// One pass: write every block with `generation` in a shuffled order, flush, read back.
fn pass(
    disk: &mut BlockDevice,
    settings: &Settings,
    pass: u64,
    buffers: *mut u8,
    progress: &mut Progress,
) -> Result<(), &'static str> {
    let generation = settings.generation + pass;
    let order = Shuffle::new(settings.blocks, generation);
    let buffer = |slot: usize| {
        // SAFETY: MAX_IN_FLIGHT buffers of BLOCK_SIZE bytes each, one per request slot.
        unsafe { &mut *(buffers.add(slot * BLOCK_SIZE) as *mut [u8; BLOCK_SIZE]) }
    };
    let mut block_of_slot = [0u64; MAX_IN_FLIGHT];

    // Writes, shuffled, up to `depth` in flight.
    let (mut submitted, mut written) = (0u64, 0u64);
    while written < settings.blocks {
        while submitted < settings.blocks && disk.in_flight() < settings.depth {
            let slot = disk.free_slot().ok_or("no free request slot")?;
            let block = order.nth(submitted);
            stress::fill(buffer(slot), block, generation);
            block_of_slot[slot] = block;
            disk.submit(slot, blk::OUT, block * SECTORS_PER_BLOCK, buffer(slot).as_mut_ptr(), BLOCK_SIZE as u32);
            submitted += 1;
        }
        let (slot, status) = wait(disk, pass)?;
        if status != blk::OK {
            return Err(request_failed("write", block_of_slot[slot], generation, status));
        }
        written += 1;
        if progress.due() {
            progress_line(pass, settings, generation, written, 0);
        }
    }

    if disk.flush {
        let status = disk.request(blk::FLUSH, 0, core::ptr::null_mut(), 0).inspect_err(|why| {
            Line::new().str("blk-stress: FLUSH: the device failed: ").str(why).print();
        })?;
        if status != blk::OK {
            Line::new().str("blk-stress: FLUSH completed with status ").dec(u64::from(status)).print();
            return Err("FLUSH failed");
        }
    }

    // Reads, in disk order, up to `depth` in flight; each block is checked as it arrives.
    let (mut submitted, mut verified) = (0u64, 0u64);
    while verified < settings.blocks {
        while submitted < settings.blocks && disk.in_flight() < settings.depth {
            let slot = disk.free_slot().ok_or("no free request slot")?;
            // Stale data must not pass: the device has to overwrite all of it.
            buffer(slot).fill(0xee);
            block_of_slot[slot] = submitted;
            disk.submit(slot, blk::IN, submitted * SECTORS_PER_BLOCK, buffer(slot).as_mut_ptr(), BLOCK_SIZE as u32);
            submitted += 1;
        }
        let (slot, status) = wait(disk, pass)?;
        let block = block_of_slot[slot];
        if status != blk::OK {
            return Err(request_failed("read", block, generation, status));
        }
        if let Err(mismatch) = stress::check(buffer(slot), block, generation) {
            let mut line = Line::new();
            line.str("blk-stress: block ").dec(block).str(" read back wrong (generation ").dec(generation);
            line.str(" was written and acknowledged): ");
            match mismatch {
                Mismatch::Magic(found) => line.str("no blk-stress block there, word 0 is ").hex(found),
                Mismatch::Index(found) => line.str("it holds block ").dec(found),
                Mismatch::Generation(found) => line.str("it holds generation ").dec(found),
                Mismatch::Checksum(found) => line.str("bad checksum ").hex(found),
                Mismatch::Pattern(word) => line.str("pattern word ").dec(word as u64).str(" is wrong"),
            };
            line.print();
            return Err("read-back mismatch");
        }
        verified += 1;
        if progress.due() {
            progress_line(pass, settings, generation, written, verified);
        }
    }
    // A reset request the waits did not run into (they look only before sleeping).
    if disk.needs_reset() {
        Line::new().str("blk-stress: pass ").dec(pass + 1).str(": the device asks for a reset").print();
        return Err("device needs reset");
    }
    progress_line(pass, settings, generation, written, verified);
    Ok(())
}

/// The number `key=N` on the command line, if there.
fn setting(info: &StartInfo, key: &str) -> Result<Option<u64>, &'static str> {
    match info.cmdline_value(key) {
        None => Ok(None),
        Some(value) => start_info::parse_u64(value).map(Some).ok_or_else(|| {
            Line::new().str("blk-stress: ").str(key).str("=").str(value).str(" is not a number").print();
            "bad command line"
        }),
    }
}

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
    let generation = setting(info, "blk_stress.generation")?;
    let passes = setting(info, "blk_stress.passes")?;
    let blocks = setting(info, "blk_stress.blocks")?;
    let depth = setting(info, "blk_stress.depth")?;
    let ring = setting(info, "blk_stress.ring")?;
    let poll_us = setting(info, "blk_stress.poll_us")?;
    let timeout_s = setting(info, "blk_stress.timeout_s")?.unwrap_or(60);
    let user_mode = match ring.unwrap_or(3) {
        0 => false,
        3 => true,
        _ => return Err("blk_stress.ring must be 0 or 3"),
    };
    let depth = depth.unwrap_or(MAX_IN_FLIGHT as u64);
    if depth == 0 || depth > MAX_IN_FLIGHT as u64 {
        return Err("blk_stress.depth must be 1 to 16");
    }

    apic::mask_pic();
    apic::enable_local();
    let device = virtio::block_devices(info.cmdline()).next().ok_or("no virtio-blk disk on the command line")?;
    let mut disk = BlockDevice::init(device, 0)?;
    if disk.read_only {
        return Err("blk-stress writes: give it a writable disk");
    }
    let disk_blocks = disk.capacity / SECTORS_PER_BLOCK;
    if disk_blocks == 0 {
        return Err("the disk is smaller than one 4 KiB block");
    }
    let settings = Settings {
        generation: generation.unwrap_or(1),
        passes: passes.unwrap_or(1),
        blocks: blocks.map_or(disk_blocks, |blocks| blocks.min(disk_blocks)),
        depth: depth as usize,
    };
    if settings.blocks == 0 || settings.passes == 0 {
        return Err("nothing to do: blk_stress.blocks and blk_stress.passes must be at least 1");
    }
    let buffers = alloc::alloc((MAX_IN_FLIGHT * BLOCK_SIZE) as u64, 4096).ok_or("out of memory for buffers")?;
    let scale = clock::kvm_clock_scale();
    disk.set_time_limits(clock::ticks_in(scale, timeout_s.saturating_mul(1_000_000_000)), clock::ticks_in(scale, 1_000_000_000));
    if user_mode {
        disk.use_from_user_mode()?;
        disk.set_poll_ticks(clock::ticks_in(scale, poll_us.unwrap_or(5000).saturating_mul(1000)));
    }

    let mut work = || {
        let mut line = Line::new();
        line.str("blk-stress: ").dec(settings.blocks).str(" blocks of 4 KiB");
        line.str(" (disk ").dec(disk_blocks).str("), ").dec(settings.passes).str(" passes from generation ");
        line.dec(settings.generation).str(", depth ").dec(settings.depth as u64);
        // The ring is the one the loop really runs in.
        line.str(", ring ").dec(u64::from(cpu::current_ring())).print();
        let mut progress = Progress::new(scale);
        for number in 0..settings.passes {
            pass(&mut disk, &settings, number, buffers, &mut progress)?;
        }
        Line::new()
            .str("blk-stress: done: ")
            .dec(settings.passes)
            .str(" passes, every block verified, last generation ")
            .dec(settings.generation + settings.passes - 1)
            .str(", interrupts ")
            .dec(u64::from(disk.interrupts()))
            .print();
        Ok(())
    };
    if user_mode { user::run(work) } else { work() }
}
