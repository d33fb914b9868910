//! Fuzz harnesses: the entry points `fuzz/` drives with libFuzzer, and that the corpus
//! replay tests (`tests/fuzz_corpus.rs`) run on stable with `cargo test`.
//!
//! Each takes raw bytes, shapes them with `arbitrary` into what a malicious guest could
//! do to the device, and checks the device against a reference model or invariants that
//! a wrong device breaks; a panic is a finding.
//!
//! * [`virtio_blk`]: the request engine against an independent model of the virtio-blk
//!   rules, observed through its [`RequestJournal`] at the moment each request is taken
//!   and returned: the heads taken are exactly those the driver offered, in order; each
//!   status byte, used length and data transfer is what the model predicts; guest memory
//!   changes only where the model says the device writes (and in the used ring); the
//!   image equals the model's disk; the descriptors walked and heap allocated per kick stay
//!   within fixed bounds.
//! * [`virtio_mmio`]: the transport's register file against its invariants, with a live
//!   device whose worker must not panic.
//! * [`serial`], [`i8042`]: reference models of what a guest relies on.

pub mod heap;

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use splitvisor_bus::{BusDevice, CountingInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::i8042::I8042;
use crate::serial::Serial;
use crate::virtio::block::{
    Block, BlockRequests, MAX_CHAIN_SEGMENTS, MAX_REQUEST_BYTES, RequestJournal, SECTOR_SIZE, id_bytes,
    request_status, request_type,
};
use crate::virtio::testing::{
    DriverQueue, guest_memory, guest_memory_regions, memory_disk, write_blk_header, write_descriptor_at,
};
use crate::virtio::{GuestMemoryMmap, MmioTransport, VirtioDevice, features, reg, status};

// ---------------------------------------------------------------------------------------
// virtio-blk

/// Where the queue lives (its rings end below 0x3000 for 256 entries).
const QUEUE_BASE: u64 = 0x1000;
/// Buffers and indirect tables live in slots from here.
const BUFFERS: u64 = 0x2_0000;
const SLOT: u64 = 0x4000;
const SLOTS: u64 = 40;
/// Guest memory layouts: one region; regions with holes (the first 64 KiB of the buffers
/// and 64 KiB at 512 KiB are missing); adjacent regions that buffers straddle.
const LAYOUTS: [&[(u64, usize)]; 3] = [
    &[(0, 0xc_0000)],
    &[(0, 0x2_0000), (0x3_0000, 0x5_0000), (0x9_0000, 0x3_0000)],
    &[(0, 0x4_0000), (0x4_0000, 0x4_0000), (0x8_0000, 0x4_0000)],
];
/// The disk: 512 KiB, filled with a pattern the model knows.
const DISK_SECTORS: u64 = 1024;
/// Most heap one kick may allocate, whatever the guest offers (the engine's working lists
/// are allocated when it is made: a kick should allocate nothing).
pub const KICK_HEAP_BOUND: usize = 16 * 1024;
/// Most heap the engine may hold for its working lists.
pub const ENGINE_HEAP_BOUND: usize = 32 * 1024;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where a fuzzed address points.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Target {
    /// Slot `n % SLOTS`, plus an offset: ordinary buffers (some straddle regions or holes).
    Buffer(u8, u16),
    /// The queue's own rings and what is around them.
    Ring(u16),
    /// Anywhere at all: beyond RAM, straddling its end, near the top of the address space.
    Raw(u64),
}

impl Target {
    fn address(self) -> u64 {
        match self {
            Target::Buffer(slot, offset) => {
                BUFFERS + (u64::from(slot) % SLOTS) * SLOT + u64::from(offset) % (2 * SLOT)
            }
            Target::Ring(offset) => QUEUE_BASE + u64::from(offset) % 0x2400,
            Target::Raw(addr) => addr,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzDescriptor {
    target: Target,
    /// Mostly sector-sized lengths; `huge` picks from the whole u32 range.
    sectors: u8,
    extra: u8,
    huge: Option<u32>,
    flags: u8,
    next: u16,
}

impl FuzzDescriptor {
    fn len(&self) -> u32 {
        self.huge.unwrap_or(u32::from(self.sectors % 9) * 512 + u32::from(self.extra % 24))
    }

    fn flags(&self) -> u16 {
        // Mostly the three meaningful bits; sometimes garbage above them.
        if self.flags & 0x80 != 0 { u16::from(self.flags) << 3 | 7 } else { u16::from(self.flags) & 7 }
    }
}

#[derive(Arbitrary, Debug)]
struct TableEntry {
    slot: u8,
    index: u16,
    descriptor: FuzzDescriptor,
}

#[derive(Arbitrary, Debug)]
struct FuzzHeader {
    target: Target,
    kind: u8,
    sector: u16,
}

#[derive(Arbitrary, Debug)]
struct Fill {
    target: Target,
    byte: u8,
    len: u16,
}

#[derive(Arbitrary, Debug)]
struct Kick {
    heads: Vec<u16>,
    avail_jump: Option<u16>,
    used_event: u16,
}

#[derive(Arbitrary, Debug)]
struct BlkInput {
    queue_size_log2: u8,
    start_index: Option<u16>,
    layout: u8,
    event_idx: bool,
    indirect: bool,
    read_only: bool,
    descriptors: Vec<FuzzDescriptor>,
    tables: Vec<TableEntry>,
    headers: Vec<FuzzHeader>,
    fills: Vec<Fill>,
    kicks: Vec<Kick>,
}

fn disk_pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(7) ^ (offset >> 9)) as u8
}

/// The model's view of guest memory: which bytes exist.
struct MemoryModel {
    regions: &'static [(u64, usize)],
}

impl MemoryModel {
    fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        for &(start, size) in self.regions {
            let region_end = start + size as u64;
            if at >= start && at < region_end {
                at = region_end;
            }
            if at >= end {
                return true;
            }
        }
        len == 0 && self.regions.iter().any(|&(start, size)| addr >= start && addr < start + size as u64)
    }
}

/// One buffer of a chain, as the model walked it.
#[derive(Clone, Copy, Debug)]
struct ModelSegment {
    addr: u64,
    len: u64,
    writable: bool,
}

/// What the model expects of one request.
#[derive(Debug, Default)]
struct Expected {
    head: u16,
    used_len: u32,
    /// Where the status goes and what it is.
    status: Option<(u64, u8)>,
    /// Guest bytes the device writes.
    writes: Vec<(u64, u64)>,
    /// An OUT request's data: (image offset, bytes).
    disk_write: Option<(u64, Vec<u8>)>,
    /// An IN request's data pieces and the image offset they read.
    read_into: Option<(Vec<(u64, u64)>, u64)>,
    /// GET_ID's pieces.
    id_into: Option<Vec<(u64, u64)>>,
}

/// Independent model of the virtio-blk rules the engine implements (see
/// `virtio::block`'s documentation), and the oracle that checks the engine against it.
struct BlkOracle<'a> {
    mem: &'a GuestMemoryMmap,
    layout: MemoryModel,
    desc_table: u64,
    size: u16,
    indirect: bool,
    read_only: bool,
    rings: [(u64, u64); 3],
    disk: &'a mut Vec<u8>,
    /// Heads the driver offered for this kick, in ring order.
    offered: Vec<u16>,
    fetched: usize,
    completed: usize,
    first_used: u16,
    current: Option<Expected>,
    /// Bytes the device may have written this kick.
    allowed: Vec<(u64, u64)>,
}

fn overlaps(range: (u64, u64), addr: u64, len: u64) -> bool {
    addr < range.1 && range.0 < addr.saturating_add(len)
}

impl BlkOracle<'_> {
    fn read_descriptor(&self, at: u64) -> Option<(u64, u64, u16, u16)> {
        let mut raw = [0u8; 16];
        if !self.layout.contains(at, 16) {
            return None;
        }
        self.mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
        let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        Some((addr, u64::from(len), flags, next))
    }

    /// The chain at `head`, or `None` if it is malformed.
    fn walk(&self, head: u16) -> Option<Vec<ModelSegment>> {
        let max = u64::from(MAX_CHAIN_SEGMENTS);
        let (addr, len, flags, _) =
            self.read_descriptor(self.desc_table.checked_add(16 * u64::from(head))?)?;
        let (table, entries, first) = if flags & F_INDIRECT != 0 {
            if !self.indirect || flags & F_NEXT != 0 || len == 0 || len % 16 != 0 || len / 16 > max {
                return None;
            }
            (addr, len / 16, 0)
        } else {
            (self.desc_table, u64::from(self.size), u64::from(head))
        };
        let limit = entries.min(max);
        let mut segments = Vec::new();
        let mut index = first;
        loop {
            if segments.len() as u64 == limit {
                return None;
            }
            let (addr, len, flags, next) = self.read_descriptor(table.checked_add(16 * index)?)?;
            let writable = flags & F_WRITE != 0;
            let readable_late = !writable && segments.iter().any(|s: &ModelSegment| s.writable);
            if flags & F_INDIRECT != 0 || readable_late {
                return None;
            }
            segments.push(ModelSegment { addr, len, writable });
            if flags & F_NEXT == 0 {
                return Some(segments);
            }
            if u64::from(next) >= entries {
                return None;
            }
            index = u64::from(next);
        }
    }

    fn pieces(segments: &[ModelSegment], writable: bool, skip: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let (mut skip, mut left) = (skip, len);
        for s in segments.iter().filter(|s| s.writable == writable) {
            let skipped = skip.min(s.len);
            skip -= skipped;
            let take = (s.len - skipped).min(left);
            left -= take;
            if take > 0 {
                out.push((s.addr + skipped, take));
            }
        }
        out
    }

    fn in_rings(&self, addr: u64, len: u64) -> bool {
        self.rings.iter().any(|&range| overlaps(range, addr, len))
    }

    /// What the engine must do with the chain at `head`, from guest memory as it is now.
    fn expect(&self, head: u16) -> Expected {
        let mut expected = Expected { head, ..Expected::default() };
        let Some(segments) = self.walk(head) else {
            return expected;
        };
        let Some(last) = segments.iter().rev().find(|s| s.writable && s.len > 0) else {
            return expected;
        };
        let Some(status_addr) = last.addr.checked_add(last.len - 1) else {
            return expected;
        };
        if !self.layout.contains(status_addr, 1) || self.in_rings(status_addr, 1) {
            return expected;
        }
        let readable: u64 = segments.iter().filter(|s| !s.writable).map(|s| s.len).sum();
        let writable: u64 = segments.iter().filter(|s| s.writable).map(|s| s.len).sum();
        let mut status = request_status::IOERR;
        let mut written = 0u64;
        let wraps = segments.iter().any(|s| s.addr.checked_add(s.len).is_none());
        let header_pieces = if wraps { Vec::new() } else { Self::pieces(&segments, false, 0, 16) };
        let header =
            (!wraps && readable >= 16 && header_pieces.iter().all(|&(a, l)| self.layout.contains(a, l)))
                .then(|| {
                    let mut header = Vec::new();
                    for &(a, l) in &header_pieces {
                        let mut bytes = vec![0u8; l as usize];
                        self.mem.read_slice(&mut bytes, GuestAddress(a)).ok()?;
                        header.extend_from_slice(&bytes);
                    }
                    Some(header)
                })
                .flatten();
        if let Some(header) = header {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector_bytes = [0u8; 8];
            sector_bytes.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector_bytes);
            let fits = |len: u64| {
                len % SECTOR_SIZE == 0
                    && len <= MAX_REQUEST_BYTES
                    && sector.checked_add(len / SECTOR_SIZE).is_some_and(|end| end <= DISK_SECTORS)
            };
            match kind {
                request_type::IN => {
                    let len = writable - 1;
                    let pieces = Self::pieces(&segments, true, 0, len);
                    let usable =
                        pieces.iter().all(|&(a, l)| self.layout.contains(a, l) && !self.in_rings(a, l));
                    if fits(len) && usable {
                        status = request_status::OK;
                        written = len;
                        expected.writes.extend_from_slice(&pieces);
                        expected.read_into = Some((pieces, sector * SECTOR_SIZE));
                    }
                }
                request_type::OUT => {
                    let len = readable - 16;
                    let pieces = Self::pieces(&segments, false, 16, len);
                    if !self.read_only && fits(len) && pieces.iter().all(|&(a, l)| self.layout.contains(a, l))
                    {
                        let mut data = Vec::with_capacity(len as usize);
                        for &(a, l) in &pieces {
                            let mut bytes = vec![0u8; l as usize];
                            let _ = self.mem.read_slice(&mut bytes, GuestAddress(a));
                            data.extend_from_slice(&bytes);
                        }
                        status = request_status::OK;
                        expected.disk_write = Some((sector * SECTOR_SIZE, data));
                    }
                }
                request_type::FLUSH => status = request_status::OK,
                request_type::GET_ID => {
                    let pieces = Self::pieces(&segments, true, 0, 20);
                    let usable =
                        pieces.iter().all(|&(a, l)| self.layout.contains(a, l) && !self.in_rings(a, l));
                    if writable > 20 && usable {
                        status = request_status::OK;
                        written = 20;
                        expected.writes.extend_from_slice(&pieces);
                        expected.id_into = Some(pieces);
                    }
                }
                _ => status = request_status::UNSUPP,
            }
        }
        expected.status = Some((status_addr, status));
        expected.writes.push((status_addr, 1));
        expected.used_len = (written + 1) as u32;
        expected
    }

    /// Checks `pieces` hold `source` in order, skipping pieces a later write overlaps.
    fn check_pieces(&self, pieces: &[(u64, u64)], status_addr: u64, source: impl Fn(u64) -> u8, what: &str) {
        let mut later: Vec<(u64, u64)> = vec![(status_addr, status_addr + 1)];
        let mut offsets = Vec::with_capacity(pieces.len());
        let mut offset = 0u64;
        for &(_, len) in pieces {
            offsets.push(offset);
            offset += len;
        }
        for (&(addr, len), &offset) in pieces.iter().zip(&offsets).rev() {
            if !later.iter().any(|&range| overlaps(range, addr, len)) {
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).expect("a checked piece is in memory");
                for (i, byte) in bytes.iter().enumerate() {
                    assert_eq!(
                        *byte,
                        source(offset + i as u64),
                        "{what}: byte {} at {addr:#x}",
                        offset + i as u64
                    );
                }
            }
            later.push((addr, addr + len));
        }
    }
}

impl RequestJournal for BlkOracle<'_> {
    fn fetched(&mut self, head: u16) {
        heap::exclude(|| {
            assert!(self.current.is_none(), "head {head} fetched before the previous one completed");
            assert_eq!(
                self.offered.get(self.fetched).copied(),
                Some(head),
                "fetched head #{} is not the one the driver offered there",
                self.fetched
            );
            self.fetched += 1;
            self.current = Some(self.expect(head));
        });
    }

    fn completing(&mut self, head: u16) {
        heap::exclude(|| {
            let expected = self.current.as_ref().expect("completing a head never fetched");
            assert_eq!(expected.head, head);
            let Some((status_addr, status)) = expected.status else {
                return;
            };
            let written: u8 = self.mem.read_obj(GuestAddress(status_addr)).expect("status in memory");
            assert_eq!(written, status, "status of head {head} at {status_addr:#x}");
            if status != request_status::OK {
                return;
            }
            if let Some((pieces, offset)) = &expected.read_into {
                let disk = &*self.disk;
                self.check_pieces(pieces, status_addr, |i| disk[(offset + i) as usize], "read data");
            }
            if let Some(pieces) = &expected.id_into {
                let id = id_bytes("fuzz");
                self.check_pieces(pieces, status_addr, |i| id[i as usize], "device id");
            }
            if let Some((offset, data)) = &expected.disk_write {
                let start = *offset as usize;
                self.disk[start..start + data.len()].copy_from_slice(data);
            }
        });
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        heap::exclude(|| {
            let expected = self.current.take().expect("completed a head never fetched");
            self.completed += 1;
            assert_eq!(used_idx, self.first_used.wrapping_add(self.completed as u16), "used index");
            let slot = self.rings[2].0 + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used ring in memory");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used ring in memory");
            assert_eq!(id, u32::from(head), "used id");
            assert_eq!(len, expected.used_len, "used length of head {head} ({expected:?})");
            self.allowed.extend_from_slice(&expected.writes);
        });
    }
}

/// virtio-blk request handling over descriptor chains a fuzzer builds in guest memory,
/// checked against a model.
pub fn virtio_blk(data: &[u8]) {
    let Ok(input) = BlkInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let regions = LAYOUTS[usize::from(input.layout) % LAYOUTS.len()];
    let mem = if regions.len() == 1 { guest_memory(regions[0].1) } else { guest_memory_regions(regions) };
    let layout = MemoryModel { regions };
    let size = 1u16 << (input.queue_size_log2 % 9);
    let mut driver = DriverQueue::new(&mem, QUEUE_BASE, size);
    if let Some(start) = input.start_index {
        driver.start_at(start);
    }
    for (index, d) in input.descriptors.iter().take(usize::from(size)).enumerate() {
        driver.write_descriptor(index as u16, d.target.address(), d.len(), d.flags(), d.next);
    }
    for entry in input.tables.iter().take(512) {
        let at = BUFFERS + (u64::from(entry.slot) % SLOTS) * SLOT + 16 * u64::from(entry.index % 300);
        let d = &entry.descriptor;
        write_descriptor_at(&mem, at, d.target.address(), d.len(), d.flags(), d.next);
    }
    for fill in input.fills.iter().take(32) {
        let bytes = vec![fill.byte; usize::from(fill.len % 4096)];
        let _ = mem.write_slice(&bytes, GuestAddress(fill.target.address()));
    }
    for header in input.headers.iter().take(32) {
        let kinds = [request_type::IN, request_type::OUT, request_type::FLUSH, request_type::GET_ID];
        let kind = kinds.get(usize::from(header.kind % 5)).copied().unwrap_or(u32::from(header.kind));
        let sector = u64::from(header.sector) % (DISK_SECTORS + 8);
        write_blk_header(&mem, header.target.address(), kind, sector);
    }

    let (disk, image) = memory_disk(DISK_SECTORS, input.read_only);
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut model_disk =
        PATTERN.get_or_init(|| (0..DISK_SECTORS * SECTOR_SIZE).map(disk_pattern).collect()).clone();
    image.write_all_at(&model_disk, 0).expect("fill the disk");
    let mut requests = BlockRequests::new(mem.clone(), Arc::new(disk), id_bytes("fuzz"));
    // The oracle models requests executed one after the other, in ring order (overlapping
    // requests in flight together may complete in any order, which it cannot predict).
    requests.set_depth(1);
    let indirect = if input.indirect { features::RING_INDIRECT_DESC } else { 0 };
    requests.set_features(features::VERSION_1 | indirect);
    let mut queue = driver.device_queue();
    queue.set_event_idx(input.event_idx);
    let (desc_table, avail_ring, used_ring) = driver.addresses();
    let rings = [
        (desc_table, desc_table + 16 * u64::from(size)),
        (avail_ring, avail_ring + 6 + 2 * u64::from(size)),
        (used_ring, used_ring + 6 + 8 * u64::from(size)),
    ];

    for kick in input.kicks.iter().take(4) {
        for &head in kick.heads.iter().take(usize::from(size)) {
            // Mostly heads within the queue, sometimes one beyond.
            driver.publish(head % (size + 1));
        }
        if let Some(idx) = kick.avail_jump {
            driver.set_avail_idx(idx);
        }
        driver.set_used_event(kick.used_event);
        if !check_kick(
            &mem,
            &layout,
            &mut requests,
            &mut queue,
            &mut model_disk,
            &image,
            rings,
            input.indirect,
            input.read_only,
        ) {
            break;
        }
    }
}

/// One kick against the oracle; returns whether the queue still works.
#[allow(clippy::too_many_arguments)]
fn check_kick(
    mem: &GuestMemoryMmap,
    layout: &MemoryModel,
    requests: &mut BlockRequests,
    queue: &mut Queue,
    model_disk: &mut Vec<u8>,
    image: &std::fs::File,
    rings: [(u64, u64); 3],
    indirect: bool,
    read_only: bool,
) -> bool {
    let size = queue.size();
    let avail_idx: u16 = mem.read_obj(GuestAddress(rings[1].0 + 2)).expect("avail ring in memory");
    let waiting = avail_idx.wrapping_sub(queue.next_avail());
    // What the driver offers: the ring entries from our position to its index.
    let offered: Vec<u16> = (0..waiting.min(size))
        .map(|i| {
            let slot = rings[1].0 + 4 + 2 * u64::from(queue.next_avail().wrapping_add(i) % size);
            mem.read_obj(GuestAddress(slot)).expect("avail ring in memory")
        })
        .collect();
    let ring_broken = waiting > size;
    let first_bad_head = offered.iter().position(|&head| head >= size);
    let regions: Vec<(u64, u64)> = layout.regions.iter().map(|&(start, size)| (start, size as u64)).collect();
    let snapshot = snapshot(mem, &regions);
    let first_used = queue.next_used();
    let mut oracle = BlkOracle {
        mem,
        layout: MemoryModel { regions: layout.regions },
        desc_table: rings[0].0,
        size,
        indirect,
        read_only,
        rings,
        disk: model_disk,
        offered,
        fetched: 0,
        completed: 0,
        first_used,
        current: None,
        allowed: Vec::new(),
    };
    let (result, heap) = heap::measure(|| requests.process_queue_with(queue, &mut oracle));
    let stats = requests.stats();
    if let Some(heap) = heap {
        assert!(heap <= KICK_HEAP_BOUND, "one kick allocated {heap} bytes of heap");
    }
    assert!(requests.heap_bytes() <= ENGINE_HEAP_BOUND, "the engine holds {} bytes", requests.heap_bytes());
    assert!(stats.chains <= usize::from(size), "{} chains in one call on a queue of {size}", stats.chains);
    assert!(stats.max_chain_descriptors <= MAX_CHAIN_SEGMENTS as usize + 1);
    assert!(stats.descriptors <= stats.chains * (MAX_CHAIN_SEGMENTS as usize + 1));
    assert!(oracle.current.is_none(), "a fetched head was not completed");
    assert_eq!(oracle.fetched, oracle.completed);
    assert_eq!(stats.chains, oracle.completed);
    let still_works = match (&result, ring_broken, first_bad_head) {
        (Err(_), true, _) => {
            assert_eq!(oracle.completed, 0, "requests served from a broken available ring");
            false
        }
        (Err(_), false, Some(bad)) => {
            assert_eq!(oracle.completed, bad, "served up to the first head beyond the queue");
            false
        }
        (Ok(processed), false, None) => {
            assert_eq!(processed.completed, oracle.offered.len(), "every offered request served");
            assert!(!processed.pending, "nothing can be pending: the device never feeds its own ring");
            true
        }
        (result, broken, bad) => {
            panic!("engine said {result:?}; the model expected broken ring {broken}, bad head {bad:?}")
        }
    };
    // Guest memory changed only where the device writes, and in the used ring.
    let mut allowed = std::mem::take(&mut oracle.allowed);
    allowed.push((rings[2].0, rings[2].1 - rings[2].0));
    check_memory(mem, &regions, &snapshot, &allowed);
    // The image is the model's disk.
    let mut on_disk = vec![0u8; model_disk.len()];
    image.read_exact_at(&mut on_disk, 0).expect("read the disk back");
    assert!(on_disk == *model_disk, "the image differs from the model of accepted writes");
    still_works
}

/// The bytes of each (start, size) region of `mem`, for [`check_memory`].
pub fn snapshot(mem: &GuestMemoryMmap, regions: &[(u64, u64)]) -> Vec<Vec<u8>> {
    regions
        .iter()
        .map(|&(start, size)| {
            let mut bytes = vec![0u8; size as usize];
            mem.read_slice(&mut bytes, GuestAddress(start)).expect("a region reads");
            bytes
        })
        .collect()
}

/// Panics unless guest memory changed, since `before` was taken of `regions`, only inside
/// the (address, length) ranges in `allowed`: the oracle of every harness that lets a
/// device write guest memory.
pub fn check_memory(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    before: &[Vec<u8>],
    allowed: &[(u64, u64)],
) {
    // The ranges the device may write, sorted and merged.
    let mut ranges: Vec<(u64, u64)> =
        allowed.iter().map(|&(addr, len)| (addr, addr.saturating_add(len))).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (&(start, size), old) in regions.iter().zip(before) {
        let mut now = vec![0u8; size as usize];
        mem.read_slice(&mut now, GuestAddress(start)).expect("a region reads");
        if now == *old {
            continue;
        }
        // Compare the gaps between the ranges the device may write.
        let end = start + size;
        let mut at = start;
        for &(from, to) in merged.iter().chain(std::iter::once(&(end, end))) {
            let gap_end = from.clamp(start, end);
            if at < gap_end {
                let (a, b) = ((at - start) as usize, (gap_end - start) as usize);
                if old[a..b] != now[a..b] {
                    let i = (a..b).find(|&i| old[i] != now[i]).unwrap_or(a);
                    panic!(
                        "the device wrote {:#x} ({:#x} -> {:#x}), outside every buffer it may write",
                        start + i as u64,
                        old[i],
                        now[i]
                    );
                }
            }
            at = at.max(to.clamp(start, end));
        }
    }
}

// ---------------------------------------------------------------------------------------
// virtio-mmio

#[derive(Arbitrary, Debug)]
enum MmioOp {
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        width: u8,
        value: u64,
    },
    /// Negotiates (features `wanted` of what is offered, maybe with bits never offered),
    /// programs a queue of `1 << size_log2` and sets DRIVER_OK.
    BringUp {
        wanted: u64,
        extra: bool,
        size_log2: u8,
    },
    /// Offers a chain of up to four fuzzed descriptors, with a header, and rings the bell.
    Publish {
        descriptors: Vec<FuzzDescriptor>,
        header: FuzzHeader,
    },
    Reset,
}

/// Bits a driver may see in Status.
const STATUS_BITS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// What the harness knows of the register file from the guest's writes.
#[derive(Default)]
struct MmioModel {
    driver_features: u64,
    driver_features_sel: u32,
    device_features_sel: u32,
    queue_sel: u32,
    /// Status as last read, to check that bits only come and go as allowed.
    last_status: u32,
}

/// The virtio-mmio register file under an arbitrary sequence of guest accesses, checked
/// against its invariants; the device's worker must not panic.
pub fn virtio_mmio(data: &[u8]) {
    let Ok(ops) = Vec::<MmioOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let mem = guest_memory(0x18_0000);
    let (disk, _) = memory_disk(64, false);
    let line = Arc::new(CountingInterrupt::new());
    let Ok(mut transport) = MmioTransport::new(Block::new(disk, "fuzz"), mem.clone(), line) else {
        return;
    };
    let offered = transport.device().device_features();
    let mut model = MmioModel::default();
    let mut driver = DriverQueue::new(&mem, QUEUE_BASE, 16);
    for op in ops.into_iter().take(512) {
        match op {
            MmioOp::Read { offset, width } => {
                let width = [1, 2, 4, 8][usize::from(width % 4)];
                let offset = u64::from(offset % 0x200);
                let mut buf = [0u8; 8];
                transport.read(offset, &mut buf[..width]);
                if width == 4 && offset % 4 == 0 {
                    check_register(&mut transport, &mut model, offered, offset, &buf[..4]);
                }
            }
            MmioOp::Write { offset, width, value } => {
                let width = [1, 2, 4, 8][usize::from(width % 4)];
                let offset = u64::from(offset % 0x200);
                transport.write(offset, &value.to_le_bytes()[..width]);
                if width == 4 && offset % 4 == 0 {
                    model.wrote(offset, value as u32, transport_status(&mut transport));
                }
            }
            MmioOp::BringUp { wanted, extra, size_log2 } => {
                let features = (wanted & offered) | if extra { wanted } else { 0 };
                let size = 1u16 << (size_log2 % 6);
                driver = DriverQueue::new(&mem, QUEUE_BASE, size);
                bring_up(&mut transport, &mut model, &driver, features);
            }
            MmioOp::Publish { descriptors, header } => {
                let size = driver.size();
                let head = 0u16;
                let count = descriptors.len().min(4);
                for (i, d) in descriptors.iter().take(4).enumerate() {
                    let next = if i + 1 < count { (i + 1) as u16 } else { d.next };
                    driver.write_descriptor(i as u16 % size, d.target.address(), d.len(), d.flags(), next);
                }
                write_blk_header(
                    &mem,
                    header.target.address(),
                    u32::from(header.kind % 9),
                    u64::from(header.sector),
                );
                driver.publish(head);
                transport.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
            }
            MmioOp::Reset => {
                write32(&mut transport, reg::STATUS, 0);
                model = MmioModel::default();
                assert_eq!(transport_status(&mut transport), 0, "Status reads 0 after a reset");
                assert_eq!(read32(&mut transport, reg::INTERRUPT_STATUS), 0, "no interrupt after a reset");
            }
        }
        assert_eq!(transport.device().worker_panic(), None, "the queue worker panicked");
    }
    // Stop the worker (a reset joins it) and make sure it never panicked.
    write32(&mut transport, reg::STATUS, 0);
    assert_eq!(transport.device().worker_panic(), None, "the queue worker panicked");
}

impl MmioModel {
    /// Follows a 32-bit register write of the guest.
    fn wrote(&mut self, offset: u64, value: u32, status_after: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::DRIVER_FEATURES
                if self.last_status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) == 0 =>
            {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::STATUS if value == 0 => {
                *self = MmioModel::default();
            }
            _ => {}
        }
        if offset == reg::STATUS {
            self.last_status = status_after;
        }
    }
}

fn read32(transport: &mut MmioTransport<Block>, offset: u64) -> u32 {
    let mut word = [0u8; 4];
    transport.read(offset, &mut word);
    u32::from_le_bytes(word)
}

fn transport_status(transport: &mut MmioTransport<Block>) -> u32 {
    read32(transport, reg::STATUS)
}

/// Checks what a 32-bit read returned against the register file's invariants.
fn check_register(
    transport: &mut MmioTransport<Block>,
    model: &mut MmioModel,
    offered: u64,
    offset: u64,
    word: &[u8],
) {
    let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
    match offset {
        reg::MAGIC_VALUE => assert_eq!(value, 0x7472_6976, "MagicValue"),
        reg::VERSION => assert_eq!(value, 2, "Version"),
        reg::DEVICE_ID => assert_eq!(value, 2, "DeviceID"),
        reg::VENDOR_ID => assert_eq!(value, 0x5650_4c53, "VendorID"),
        reg::DEVICE_FEATURES => {
            let page = match model.device_features_sel {
                0 => offered as u32,
                1 => (offered >> 32) as u32,
                _ => 0,
            };
            assert_eq!(value, page, "DeviceFeatures page {}", model.device_features_sel);
        }
        reg::QUEUE_NUM_MAX => {
            let max = if model.queue_sel == 0 { 256 } else { 0 };
            assert_eq!(value, max, "QueueNumMax of queue {}", model.queue_sel);
        }
        reg::STATUS => {
            assert_eq!(value & !STATUS_BITS, 0, "Status has bits no one may set: {value:#x}");
            if value & status::FEATURES_OK != 0 {
                assert_eq!(model.driver_features & !offered, 0, "FEATURES_OK with features never offered");
                assert_ne!(model.driver_features & features::VERSION_1, 0, "FEATURES_OK without VERSION_1");
            }
            if value & status::DRIVER_OK != 0 && value & status::FEATURES_OK == 0 {
                assert_ne!(value & status::DEVICE_NEEDS_RESET, 0, "DRIVER_OK without FEATURES_OK activated");
            }
            // Without a reset the driver's bits only accumulate.
            let driver_bits = !status::DEVICE_NEEDS_RESET;
            assert_eq!(
                model.last_status & driver_bits & !value,
                0,
                "Status lost bits without a reset ({:#x} -> {value:#x})",
                model.last_status
            );
            model.last_status = value;
        }
        reg::CONFIG => assert_eq!(value, 64, "capacity (low word)"),
        _ => {}
    }
    let _ = transport;
}

fn write32(transport: &mut MmioTransport<Block>, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

fn bring_up(
    transport: &mut MmioTransport<Block>,
    model: &mut MmioModel,
    driver: &DriverQueue<'_>,
    features: u64,
) {
    let (desc, avail, used) = driver.addresses();
    let mut write = |transport: &mut MmioTransport<Block>, offset: u64, value: u32| {
        write32(transport, offset, value);
        let status = transport_status(transport);
        model.wrote(offset, value, status);
    };
    write(transport, reg::STATUS, 0);
    write(transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(transport, reg::DRIVER_FEATURES_SEL, 0);
    write(transport, reg::DRIVER_FEATURES, features as u32);
    write(transport, reg::DRIVER_FEATURES_SEL, 1);
    write(transport, reg::DRIVER_FEATURES, (features >> 32) as u32);
    write(transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    write(transport, reg::QUEUE_SEL, 0);
    write(transport, reg::QUEUE_NUM, u32::from(driver.size()));
    write(transport, reg::QUEUE_DESC_LOW, desc as u32);
    write(transport, reg::QUEUE_DRIVER_LOW, avail as u32);
    write(transport, reg::QUEUE_DEVICE_LOW, used as u32);
    write(transport, reg::QUEUE_READY, 1);
    let status = transport_status(transport);
    write(transport, reg::STATUS, status | status::DRIVER_OK);
}

// ---------------------------------------------------------------------------------------
// 8250 UART

#[derive(Arbitrary, Debug)]
enum UartOp {
    Read(u8),
    Write(u8, u8),
    Input(Vec<u8>),
}

/// What a guest relies on in a 16550: the model of its registers that matter.
#[derive(Default)]
struct UartModel {
    dlab: bool,
    loopback: bool,
    ier: u8,
    receive: VecDeque<u8>,
    output: Vec<u8>,
}

const UART_FIFO: usize = 64;

/// The 8250 UART under arbitrary register accesses and host input, against a model: every
/// byte written to THR reaches the output once and in order (or, in loopback, the receive
/// FIFO); received bytes are read back in order; LSR's data-ready bit says whether any are
/// left; IER reads back what was written; IIR identifies only enabled interrupts, one at a
/// time, and "data available" only while there is data.
pub fn serial(data: &[u8]) {
    let Ok(ops) = Vec::<UartOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let irq = Arc::new(CountingInterrupt::new());
    let mut uart = Serial::new(irq, Vec::new());
    let mut model = UartModel::default();
    for op in ops.into_iter().take(1024) {
        match op {
            UartOp::Read(offset) => {
                let offset = offset % 8;
                let mut byte = [0];
                uart.read(u64::from(offset), &mut byte);
                let value = byte[0];
                match offset {
                    0 if !model.dlab => {
                        let expected = model.receive.pop_front().unwrap_or(0);
                        assert_eq!(value, expected, "received byte");
                    }
                    1 if !model.dlab => assert_eq!(value, model.ier, "IER"),
                    2 => {
                        let id = value & 0x0f;
                        assert!(matches!(id, 0x01 | 0x02 | 0x04), "IIR identifies one interrupt: {value:#x}");
                        if id == 0x02 {
                            assert_ne!(model.ier & 0x02, 0, "THR-empty identified but not enabled");
                        }
                        if id == 0x04 {
                            assert_ne!(model.ier & 0x01, 0, "data-available identified but not enabled");
                            assert!(!model.receive.is_empty(), "data-available identified with no data");
                        }
                    }
                    5 => {
                        assert_eq!(value & 0x01 != 0, !model.receive.is_empty(), "LSR data ready");
                        assert_ne!(value & 0x20, 0, "LSR: the transmitter is always empty");
                    }
                    _ => {}
                }
            }
            UartOp::Write(offset, value) => {
                let offset = offset % 8;
                uart.write(u64::from(offset), &[value]);
                match offset {
                    0 if !model.dlab => {
                        if model.loopback {
                            if model.receive.len() < UART_FIFO {
                                model.receive.push_back(value);
                            }
                        } else {
                            model.output.push(value);
                        }
                    }
                    1 if !model.dlab => model.ier = value & 0x0f,
                    3 => model.dlab = value & 0x80 != 0,
                    4 => model.loopback = value & 0x10 != 0,
                    _ => {}
                }
            }
            UartOp::Input(bytes) => {
                let room = UART_FIFO - model.receive.len();
                let expected = if model.loopback || bytes.is_empty() { 0 } else { room.min(bytes.len()) };
                match uart.enqueue_input(&bytes) {
                    Ok(taken) => assert_eq!(taken, expected, "input bytes taken"),
                    Err(_) => assert!(room == 0 && !bytes.is_empty(), "input refused with room in the FIFO"),
                }
                model.receive.extend(&bytes[..expected]);
            }
        }
        assert!(uart.output() == model.output, "UART output differs from the bytes written to THR");
    }
}

// ---------------------------------------------------------------------------------------
// i8042

#[derive(Arbitrary, Debug)]
enum KeyboardOp {
    Read(u8, u8),
    Write(u8, Vec<u8>),
}

/// The i8042 under arbitrary register accesses, of any width: it resets exactly when the
/// byte 0xfe lands on the command port (offset 4).
pub fn i8042(data: &[u8]) {
    let Ok(ops) = Vec::<KeyboardOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let reset = Arc::new(CountingInterrupt::new());
    let mut kbd = I8042::new(reset.clone());
    let mut expected = 0;
    for op in ops.into_iter().take(1024) {
        match op {
            KeyboardOp::Read(offset, width) => {
                let mut bytes = [0xaau8; 4];
                let width = usize::from(width % 4) + 1;
                kbd.read(u64::from(offset % 6), &mut bytes[..width]);
                assert!(bytes[..width].iter().all(|&b| b == 0), "the i8042 reads as 0");
            }
            KeyboardOp::Write(offset, bytes) => {
                let offset = u64::from(offset % 6);
                let bytes = &bytes[..bytes.len().min(4)];
                kbd.write(offset, bytes);
                let lands_on_command = 4u64.checked_sub(offset).and_then(|i| bytes.get(i as usize));
                expected += u64::from(lands_on_command == Some(&0xfe));
            }
        }
        assert_eq!(reset.count(), expected, "reset requests");
    }
}
