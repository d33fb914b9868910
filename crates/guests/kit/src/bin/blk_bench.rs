//! `blk-bench`: throughput of the first virtio-blk disk.
//!
//! Sequential 1 MiB and random 4 KiB reads and writes, at queue depth 1 and 16. Each
//! workload moves `blk_bench.mib=N` MiB (1 MiB requests, default 32) or does
//! `blk_bench.ops=N` requests (4 KiB, default 2000), timed with the TSC; with kvm-clock the
//! program also reports nanoseconds, IOPS and MB/s itself (otherwise the host converts).
//!
//! The workload loop (descriptors, doorbell, polling the used ring, the report lines) runs in
//! ring 3 ([`splitvisor_guest_kit::user`]), natively even where ring 0 is emulated, so the
//! figures are the VMM's and the device's; it waits for an interrupt only after polling for
//! up to `blk_bench.poll_us=N` microseconds (default 5000; the time adapts, see
//! `BlockDevice::set_poll_ticks`). `blk_bench.ring=0` runs the same loop in ring 0 instead,
//! waking on every interrupt without polling. `blk_bench.only=NAME[,NAME...]` runs only the
//! workloads named (to profile or compare one row).
//!
//! Before the first workload, `blk_bench.warmup_ms=N` milliseconds (default 50) of 4 KiB
//! random reads at queue depth 1 run untimed, as fio's `ramp_time`: the host is still
//! busy with the VM's start for a few milliseconds after it (the kernel's deferred work
//! for new processes and their sandboxes, the scheduler placing new threads), and a
//! short workload timed from the first request would measure that, not the data path.

#![no_std]
#![no_main]

use splitvisor_guest_kit::clock::{self, TscScale};
use splitvisor_guest_kit::virtio::{self, BlockDevice, MAX_IN_FLIGHT, blk};
use splitvisor_guest_kit::{Boot, Line, alloc, apic, cpu, guest_main, rdtsc, start_info, user};

guest_main!(main);

const SECTOR: u64 = 512;

struct Workload {
    name: &'static str,
    kind: u32,
    bytes: u64,
    random: bool,
    depth: usize,
}

const WORKLOADS: [Workload; 8] = [
    Workload { name: "seq-read-1M-qd1", kind: blk::IN, bytes: 1 << 20, random: false, depth: 1 },
    Workload { name: "seq-write-1M-qd1", kind: blk::OUT, bytes: 1 << 20, random: false, depth: 1 },
    Workload { name: "rand-read-4K-qd1", kind: blk::IN, bytes: 4096, random: true, depth: 1 },
    Workload { name: "rand-write-4K-qd1", kind: blk::OUT, bytes: 4096, random: true, depth: 1 },
    Workload { name: "seq-read-1M-qd16", kind: blk::IN, bytes: 1 << 20, random: false, depth: 16 },
    Workload { name: "seq-write-1M-qd16", kind: blk::OUT, bytes: 1 << 20, random: false, depth: 16 },
    Workload { name: "rand-read-4K-qd16", kind: blk::IN, bytes: 4096, random: true, depth: 16 },
    Workload { name: "rand-write-4K-qd16", kind: blk::OUT, bytes: 4096, random: true, depth: 16 },
];

/// xorshift64: integer-only, good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run(disk: &mut BlockDevice, w: &Workload, ops: u64, buffers: *mut u8, scale: Option<TscScale>) -> Result<(), &'static str> {
    let per_op = w.bytes / SECTOR;
    let slots = disk.capacity / per_op;
    if slots == 0 {
        return Err("disk too small");
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next_slot = 0u64;
    let (irqs_before, notifies_before) = (disk.interrupts(), disk.notifications);
    let (mut submitted, mut completed) = (0u64, 0u64);
    let start = rdtsc();
    while completed < ops {
        while submitted < ops && disk.in_flight() < w.depth {
            let slot = disk.free_slot().ok_or("no free slot")?;
            let index = if w.random { rng.next() % slots } else { next_slot % slots };
            next_slot += 1;
            // SAFETY: slot < MAX_IN_FLIGHT buffers of 1 MiB each.
            let buf = unsafe { buffers.add(slot << 20) };
            disk.submit(slot, w.kind, index * per_op, buf, w.bytes as u32);
            submitted += 1;
        }
        let (_, status) = disk.wait()?;
        if status != blk::OK {
            return Err("a request failed");
        }
        completed += 1;
    }
    let ticks = rdtsc() - start;
    let mut line = Line::new();
    line.str("blk-bench: ").str(w.name).str(" ops=").dec(ops).str(" bytes=").dec(ops * w.bytes);
    line.str(" ticks=").dec(ticks);
    line.str(" notifies=").dec(disk.notifications - notifies_before);
    line.str(" irqs=").dec(u64::from(disk.interrupts() - irqs_before));
    if let Some(scale) = scale {
        let ns = scale.ns(ticks).max(1);
        line.str(" ns=").dec(ns);
        line.str(" iops=").dec(((u128::from(ops) * 1_000_000_000) / u128::from(ns)) as u64);
        line.str(" kbps=").dec(((u128::from(ops * w.bytes) * 1_000_000) / u128::from(ns)) as u64);
    }
    line.print();
    Ok(())
}

/// Runs 4 KiB random reads at queue depth 1 for `ticks` TSC ticks, untimed; returns how
/// many completed.
fn warm_up(disk: &mut BlockDevice, ticks: u64, buffers: *mut u8) -> Result<u64, &'static str> {
    let slots = disk.capacity / (4096 / SECTOR);
    if slots == 0 {
        return Err("disk too small");
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (start, mut completed) = (rdtsc(), 0u64);
    while rdtsc().wrapping_sub(start) < ticks {
        disk.submit(0, blk::IN, (rng.next() % slots) * (4096 / SECTOR), buffers, 4096);
        let (_, status) = disk.wait()?;
        if status != blk::OK {
            return Err("a request failed");
        }
        completed += 1;
    }
    Ok(completed)
}

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
    let mib = info.cmdline_value("blk_bench.mib").and_then(start_info::parse_u64).unwrap_or(32);
    let small_ops = info.cmdline_value("blk_bench.ops").and_then(start_info::parse_u64).unwrap_or(2000);
    let ring = info.cmdline_value("blk_bench.ring").map_or(Some(3), start_info::parse_u64);
    let poll_us = info.cmdline_value("blk_bench.poll_us").and_then(start_info::parse_u64).unwrap_or(5000);
    let warmup_ms = info.cmdline_value("blk_bench.warmup_ms").and_then(start_info::parse_u64).unwrap_or(50);
    // `blk_bench.only=NAME[,NAME...]`: just these workloads (to profile or compare one row).
    let only = info.cmdline_value("blk_bench.only");
    if let Some(only) = only
        && !only.split(',').all(|name| WORKLOADS.iter().any(|w| w.name == name))
    {
        return Err("blk_bench.only names a workload blk-bench does not have");
    }
    apic::mask_pic();
    apic::enable_local();
    let device = virtio::block_devices(info.cmdline()).next().ok_or("no virtio-blk disk on the command line")?;
    let mut disk = BlockDevice::init(device, 0)?;
    if disk.read_only {
        return Err("blk-bench writes: give it a writable disk");
    }
    let buffers = alloc::alloc((MAX_IN_FLIGHT as u64) << 20, 4096).ok_or("out of memory for buffers")?;
    let scale = clock::kvm_clock_scale();
    let user_mode = match ring {
        Some(0) => false,
        Some(3) => true,
        _ => return Err("blk_bench.ring must be 0 or 3"),
    };
    if user_mode {
        disk.use_from_user_mode()?;
        disk.set_poll_ticks(clock::ticks_in(scale, poll_us.saturating_mul(1000)));
    }
    // A request that never completes, or whose interrupt never comes, fails the run.
    disk.set_time_limits(clock::ticks_in(scale, 60_000_000_000), clock::ticks_in(scale, 1_000_000_000));
    let mut workloads = || {
        // The ring is the one the loop really runs in.
        Line::new()
            .str("blk-bench: disk ")
            .dec(disk.capacity * SECTOR >> 20)
            .str(" MiB, clock ")
            .str(if scale.is_some() { "kvm-clock" } else { "tsc (host converts)" })
            .str(", ring ")
            .dec(u64::from(cpu::current_ring()))
            .print();
        let warmed = warm_up(&mut disk, clock::ticks_in(scale, warmup_ms.saturating_mul(1_000_000)), buffers)?;
        Line::new().str("blk-bench: warm-up ").dec(warmup_ms).str(" ms, ").dec(warmed).str(" requests, untimed").print();
        let chosen = |w: &&Workload| only.is_none_or(|only| only.split(',').any(|name| name == w.name));
        for workload in WORKLOADS.iter().filter(chosen) {
            let ops = if workload.bytes == 1 << 20 { mib } else { small_ops };
            run(&mut disk, workload, ops, buffers, scale)?;
        }
        Ok(())
    };
    if user_mode { user::run(workloads) } else { workloads() }
}
