//! `blk-verify`: writes a pattern to every virtio-blk disk, reads it back and checks it.
//!
//! Every 512-byte sector carries its own number (le64), the generation (le64, from
//! `blk_verify.generation=N`, default 1), then 496 bytes of `(sector ^ generation) as u8`,
//! so the host can check the image afterwards. Sectors covered: the whole disk, or the first
//! `blk_verify.sectors=N`. Writes go out several at a time, then a FLUSH, then the reads.
//! A read-only disk must refuse a write with IOERR and still serve reads.
//!
//! It runs in ring 0, interrupt-driven, which the build machines' KVM emulates: 64 MiB take
//! most of a minute there, so a progress line (MiB written, then MiB verified) comes every
//! few seconds. No wait is unbounded: the run fails if no request completes for 60 seconds,
//! or if a completion stays unannounced by the device's interrupt for a second.

#![no_std]
#![no_main]

use splitvisor_guest_kit::clock::{self, TscScale};
use splitvisor_guest_kit::virtio::{self, BlockDevice, MAX_IN_FLIGHT, blk};
use splitvisor_guest_kit::{Boot, Line, alloc, apic, cpu, guest_main, rdtsc, start_info};

guest_main!(main);

const SECTOR: u64 = 512;
/// Sectors per request: 64 KiB.
const CHUNK_SECTORS: u64 = 128;
const CHUNK_BYTES: u64 = CHUNK_SECTORS * SECTOR;
/// Requests kept in flight.
const DEPTH: usize = 8;
const _: () = assert!(DEPTH <= MAX_IN_FLIGHT);
/// Nanoseconds between progress lines.
const PROGRESS_NS: u64 = 3_000_000_000;

/// Progress lines, every [`PROGRESS_NS`]: "vd0: written 12/64 MiB".
struct Progress {
    disk: usize,
    interval: u64,
    next: u64,
}

impl Progress {
    fn new(disk: usize, scale: Option<TscScale>) -> Self {
        // Without kvm-clock, assume a TSC of about 2 GHz.
        let interval = scale.map_or(PROGRESS_NS * 2, |scale| scale.ticks(PROGRESS_NS));
        Self { disk, interval, next: rdtsc() + interval }
    }

    /// Prints `what done/total MiB` if the time has come.
    fn update(&mut self, what: &str, done_sectors: u64, total_sectors: u64) {
        let now = rdtsc();
        if now < self.next {
            return;
        }
        self.next = now + self.interval;
        Line::new()
            .str("vd")
            .dec(self.disk as u64)
            .str(": ")
            .str(what)
            .str(" ")
            .dec(done_sectors * SECTOR >> 20)
            .str("/")
            .dec(total_sectors * SECTOR >> 20)
            .str(" MiB")
            .print();
    }
}

fn fill_sector(sector_buf: *mut u8, sector: u64, generation: u64) {
    // SAFETY: `sector_buf` points at 512 writable bytes.
    unsafe {
        core::ptr::write_bytes(sector_buf, (sector ^ generation) as u8, SECTOR as usize);
        (sector_buf as *mut u64).write_unaligned(sector);
        (sector_buf.add(8) as *mut u64).write_unaligned(generation);
    }
}

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
    let generation = info.cmdline_value("blk_verify.generation").and_then(start_info::parse_u64).unwrap_or(1);
    let limit = info.cmdline_value("blk_verify.sectors").and_then(start_info::parse_u64);
    apic::mask_pic();
    apic::enable_local();

    let buffers = alloc::alloc(CHUNK_BYTES * DEPTH as u64, 4096).ok_or("out of memory")?;
    let expected = alloc::alloc(SECTOR, 64).ok_or("out of memory")?;
    let scale = clock::kvm_clock_scale();
    let mut disks = 0;
    for (index, device) in virtio::block_devices(info.cmdline()).enumerate() {
        disks += 1;
        let progress = Progress::new(index, scale);
        let limits = (clock::ticks_in(scale, 60_000_000_000), clock::ticks_in(scale, 1_000_000_000));
        if let Err(why) = verify_disk(index, device, buffers, expected, generation, limit, progress, limits) {
            Line::new().str("vd").dec(index as u64).str(": failed: ").str(why).print();
            return Err(why);
        }
    }
    if disks == 0 {
        return Err("no virtio-blk disk on the command line");
    }
    Ok(())
}

/// Writes, flushes, reads back and checks disk `index`.
fn verify_disk(
    index: usize,
    device: virtio::MmioDevice,
    buffers: *mut u8,
    expected: *mut u8,
    generation: u64,
    limit: Option<u64>,
    mut progress: Progress,
    (timeout, grace): (u64, u64),
) -> Result<(), &'static str> {
    let mut disk = BlockDevice::init(device, index)?;
    disk.set_time_limits(timeout, grace);
    let mut line = Line::new();
    line.str("vd").dec(index as u64).str(": ").dec(disk.capacity).str(" sectors");

    let mut id = [0u8; 20];
    if disk.request(blk::GET_ID, 0, id.as_mut_ptr(), 20)? != blk::OK {
        return Err("GET_ID failed");
    }
    let id_len = id.iter().position(|b| *b == 0).unwrap_or(20);
    line.str(", id \"").bytes(&id[..id_len]).str("\"");

    if disk.read_only {
        if disk.request(blk::IN, 0, buffers, SECTOR as u32)? != blk::OK {
            return Err("read from the read-only disk failed");
        }
        if disk.request(blk::OUT, 0, buffers, SECTOR as u32)? != blk::IOERR {
            return Err("the read-only disk accepted a write");
        }
        line.str(", read-only: reads work, writes refused").print();
        return Ok(());
    }

    let sectors = limit.map_or(disk.capacity, |n| n.min(disk.capacity));
    Line::new()
        .str("vd")
        .dec(index as u64)
        .str(": writing, then verifying ")
        .dec(sectors)
        .str(" sectors (")
        .dec(sectors * SECTOR >> 20)
        .str(" MiB), generation ")
        .dec(generation)
        .print();
    let chunks = sectors.div_ceil(CHUNK_SECTORS);
    let chunk_len = |chunk: u64| (sectors - chunk * CHUNK_SECTORS).min(CHUNK_SECTORS);

    // Writes, DEPTH at a time.
    let mut next = 0u64;
    let mut done = 0u64;
    while done < chunks {
        while next < chunks && disk.in_flight() < DEPTH {
            let slot = disk.free_slot().ok_or("no free slot")?;
            // SAFETY: slot buffers are CHUNK_BYTES apart inside `buffers`.
            let buf = unsafe { buffers.add(slot * CHUNK_BYTES as usize) };
            for i in 0..chunk_len(next) {
                // SAFETY: i < CHUNK_SECTORS, inside this slot's buffer.
                fill_sector(unsafe { buf.add((i * SECTOR) as usize) }, next * CHUNK_SECTORS + i, generation);
            }
            disk.submit(slot, blk::OUT, next * CHUNK_SECTORS, buf, (chunk_len(next) * SECTOR) as u32);
            next += 1;
        }
        let (_, status) = disk.wait()?;
        if status != blk::OK {
            return Err("a write failed");
        }
        done += 1;
        progress.update("written", (done * CHUNK_SECTORS).min(sectors), sectors);
    }
    if disk.request(blk::FLUSH, 0, core::ptr::null_mut(), 0)? != blk::OK {
        return Err("FLUSH failed");
    }

    // Reads, DEPTH at a time; each completed chunk is checked sector by sector.
    let mut chunk_of_slot = [0u64; DEPTH];
    let (mut next, mut done, mut bad) = (0u64, 0u64, 0u64);
    while done < chunks {
        while next < chunks && disk.in_flight() < DEPTH {
            let slot = disk.free_slot().ok_or("no free slot")?;
            // SAFETY: as for the writes.
            let buf = unsafe { buffers.add(slot * CHUNK_BYTES as usize) };
            // SAFETY: clobber the buffer so stale data cannot pass the check.
            unsafe { core::ptr::write_bytes(buf, 0xee, (chunk_len(next) * SECTOR) as usize) };
            chunk_of_slot[slot] = next;
            disk.submit(slot, blk::IN, next * CHUNK_SECTORS, buf, (chunk_len(next) * SECTOR) as u32);
            next += 1;
        }
        let (slot, status) = disk.wait()?;
        if status != blk::OK {
            return Err("a read failed");
        }
        let chunk = chunk_of_slot[slot];
        for i in 0..chunk_len(chunk) {
            fill_sector(expected, chunk * CHUNK_SECTORS + i, generation);
            // SAFETY: both are 512 readable bytes.
            let same = unsafe { cpu::bytes_equal(buffers.add(slot * CHUNK_BYTES as usize + (i * SECTOR) as usize), expected, SECTOR as usize) };
            bad += u64::from(!same);
        }
        done += 1;
        progress.update("verified", (done * CHUNK_SECTORS).min(sectors), sectors);
    }
    line.str(", wrote+read ").dec(sectors).str(" sectors, generation ").dec(generation);
    line.str(", bad ").dec(bad).str(", interrupts ").dec(u64::from(disk.interrupts()));
    line.print();
    if bad != 0 {
        return Err("read-back mismatch");
    }
    Ok(())
}
