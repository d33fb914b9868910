//! Fuzz harness for the vhost-user block backend's queue server (what `splitvisor-driver
//! blk` runs for each queue) over a hostile queue in shared memory.
//!
//! Guest memory is set up as a vhost-user frontend describes it: one memfd, mapped region
//! by region from a memory table (some layouts with holes, one with a region far above
//! the others) through [`MappedMemory`], and the ring addresses are the frontend's virtual
//! addresses, translated as `SET_VRING_ADDR` ones are. The input writes descriptor tables,
//! indirect tables, request headers and the available ring (queue sizes up to 256, ring
//! indices that start anywhere and wrap at 2^16, heads beyond the queue, chains that loop),
//! and the harness calls [`QueueServer::serve`] on the block queue directly, with an I/O
//! engine that runs each transfer on a memfd image synchronously, in the order or in
//! reverse (so completions come out of order, as io_uring's may).
//!
//! The oracle, per serve, from a snapshot of guest memory and the [`RequestJournal`]:
//! * each head fetched is the one the available ring holds at that position;
//! * each head is seen fetched, completing, completed, in that order, exactly once per
//!   fetch; the used entry published with it names it, and its length is at most the
//!   bytes of device-writable buffers in its chain (walked independently, at the moment it
//!   was fetched);
//! * guest memory changes only inside the writable buffers of fetched chains and in the
//!   used ring;
//! * chains, descriptors walked (per chain and per serve) and heap allocated per serve
//!   stay within fixed bounds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use splitvisor_devices::fuzzing::{check_memory, heap, snapshot};
use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::{
    BlockRequests, DiskImage, MAX_CHAIN_SEGMENTS, QUEUE_SIZE, RequestJournal, request_type,
};
use splitvisor_devices::virtio::block_io::{self, Completion, IoEngine, MAX_IN_FLIGHT, Transfer};
use splitvisor_devices::virtio::features;
use splitvisor_devices::virtio::testing::{DriverQueue, memory_disk, write_blk_header, write_descriptor_at};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::super::{MappedMemory, QueueServer, VhostUserDevice, new_queue};
use super::{BlockDevice, BlockQueue};

/// Where the queue lives (its rings end below 0x3000 for 256 entries).
const QUEUE_BASE: u64 = 0x1000;
/// Buffers and indirect tables: slots from here.
const BUFFERS: u64 = 0x2_0000;
const SLOT: u64 = 0x4000;
const SLOTS: u64 = 40;
/// A region far above the others (a frontend's memory above 4 GiB).
const HIGH: u64 = 0x1_0000_0000;
/// The frontend's virtual address of guest-physical 0.
const FRONTEND_VA: u64 = 0x7f3a_0000_0000;
/// Memory tables: one region; regions with holes (in the buffers and at 512 KiB);
/// adjacent regions; low memory and a region at 4 GiB.
const LAYOUTS: [&[(u64, u64)]; 4] = [
    &[(0, 0xc_0000)],
    &[(0, 0x2_0000), (0x3_0000, 0x5_0000), (0x9_0000, 0x3_0000)],
    &[(0, 0x4_0000), (0x4_0000, 0x4_0000), (0x8_0000, 0x4_0000)],
    &[(0, 0x6_0000), (HIGH, 0x8_0000)],
];
/// The disk: 512 KiB.
const DISK_SECTORS: u64 = 1024;
/// Most heap one serve may allocate, whatever the queue holds.
pub const SERVE_HEAP_BOUND: usize = 16 * 1024;
/// Descriptors the oracle follows in one chain: beyond any chain the device may take.
const ORACLE_WALK: usize = 4 * MAX_CHAIN_SEGMENTS as usize;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where a fuzzed address points.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Target {
    /// A buffer slot, plus an offset (some straddle regions or holes).
    Buffer(u8, u16),
    /// The queue's rings and what is around them.
    Ring(u16),
    /// The high region (or where it is in other layouts: a hole).
    High(u32),
    /// Anywhere at all.
    Raw(u64),
}

impl Target {
    fn address(self) -> u64 {
        match self {
            Target::Buffer(slot, offset) => {
                BUFFERS + (u64::from(slot) % SLOTS) * SLOT + u64::from(offset) % (2 * SLOT)
            }
            Target::Ring(offset) => QUEUE_BASE + u64::from(offset) % 0x2400,
            Target::High(offset) => HIGH + u64::from(offset) % 0x9_0000,
            Target::Raw(addr) => addr,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Descriptor {
    target: Target,
    sectors: u8,
    extra: u8,
    huge: Option<u32>,
    flags: u8,
    next: u16,
}

impl Descriptor {
    fn len(&self) -> u32 {
        self.huge.unwrap_or(u32::from(self.sectors % 9) * 512 + u32::from(self.extra % 24))
    }

    fn flags(&self) -> u16 {
        if self.flags & 0x80 != 0 { u16::from(self.flags) << 3 | 7 } else { u16::from(self.flags) & 7 }
    }
}

#[derive(Arbitrary, Debug)]
struct TableEntry {
    slot: u8,
    index: u16,
    descriptor: Descriptor,
}

#[derive(Arbitrary, Debug)]
struct Header {
    target: Target,
    kind: u8,
    sector: u16,
}

#[derive(Arbitrary, Debug)]
struct Serve {
    heads: Vec<u16>,
    avail_jump: Option<u16>,
    used_event: u16,
}

#[derive(Arbitrary, Debug)]
struct BackendInput {
    layout: u8,
    queue_size_log2: u8,
    /// The ring position the frontend sets with SET_VRING_BASE.
    base: u16,
    indirect: bool,
    event_idx: bool,
    read_only: bool,
    reverse_completions: bool,
    descriptors: Vec<Descriptor>,
    tables: Vec<TableEntry>,
    headers: Vec<Header>,
    serves: Vec<Serve>,
}

/// Runs each transfer on the image when asked to wait, first-in first-out or the last
/// pushed first.
struct Synchronous {
    disk: Arc<DiskImage>,
    queued: Vec<Transfer>,
    reverse: bool,
}

impl IoEngine for Synchronous {
    fn name(&self) -> &'static str {
        "fuzz-synchronous"
    }

    unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()> {
        if self.queued.len() >= MAX_IN_FLIGHT {
            return Err(io::Error::other("more transfers than MAX_IN_FLIGHT"));
        }
        self.queued.push(transfer);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let transfer = if self.reverse { self.queued.pop() } else { Some(self.queued.remove(0)) };
        if let Some(transfer) = transfer {
            // SAFETY: the engine's caller keeps the transfer's buffers valid until its
            // completion, which is returned here.
            let result = unsafe { block_io::execute(self.disk.file().as_raw_fd(), &transfer) };
            done.push(Completion { tag: transfer.tag, result });
        }
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.queued.len()
    }
}

/// Guest memory from one memfd, region by region, as a memory table maps it.
fn map_memory(regions: &[(u64, u64)]) -> MappedMemory {
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"splitvisor-fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(regions.iter().map(|&(_, size)| size).sum()).expect("size the memfd");
    let mut offset = 0;
    let mut table = Vec::new();
    let mut files = Vec::new();
    for &(gpa, size) in regions {
        table.push(VhostUserMemoryRegion::new(gpa, size, FRONTEND_VA + gpa, offset));
        files.push(file.try_clone().expect("duplicate the memfd"));
        offset += size;
    }
    MappedMemory::map(&table, files).expect("a well-formed memory table maps")
}

/// Fuzz harness: see the module documentation.
pub fn vhost_user_backend(data: &[u8]) {
    let Ok(input) = BackendInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let regions = LAYOUTS[usize::from(input.layout) % LAYOUTS.len()];
    let mapped = map_memory(regions);
    let mem = mapped.memory.clone();
    let size = 1u16 << (input.queue_size_log2 % 9);
    let mut driver = DriverQueue::new(&mem, QUEUE_BASE, size);
    driver.start_at(input.base);
    for (index, d) in input.descriptors.iter().take(usize::from(size)).enumerate() {
        driver.write_descriptor(index as u16, d.target.address(), d.len(), d.flags(), d.next);
    }
    for entry in input.tables.iter().take(512) {
        let at = BUFFERS + (u64::from(entry.slot) % SLOTS) * SLOT + 16 * u64::from(entry.index % 300);
        let d = &entry.descriptor;
        write_descriptor_at(&mem, at, d.target.address(), d.len(), d.flags(), d.next);
    }
    for header in input.headers.iter().take(32) {
        let kinds = [request_type::IN, request_type::OUT, request_type::FLUSH, request_type::GET_ID];
        let kind = kinds.get(usize::from(header.kind % 5)).copied().unwrap_or(u32::from(header.kind));
        write_blk_header(&mem, header.target.address(), kind, u64::from(header.sector) % (DISK_SECTORS + 8));
    }

    let (disk, _image) = memory_disk(DISK_SECTORS, input.read_only);
    let device = BlockDevice::new(disk, "fuzz");
    let wanted = features::VERSION_1
        | if input.indirect { features::RING_INDIRECT_DESC } else { 0 }
        | if input.event_idx { features::RING_EVENT_IDX } else { 0 };
    let negotiated = device.features() & wanted;
    // The frontend's ring addresses, translated as the backend does for SET_VRING_ADDR.
    let (desc, avail, used) = driver.addresses();
    let translate = |gpa: u64| mapped.to_guest(FRONTEND_VA + gpa).expect("the rings are in the memory table");
    let mut queue =
        new_queue(QUEUE_SIZE, size, translate(desc), translate(avail), translate(used), negotiated)
            .expect("a queue within the device's limits");
    queue.set_next_avail(input.base);
    queue.set_next_used(input.base);
    let engine = Synchronous {
        disk: device.disk.clone(),
        queued: Vec::with_capacity(MAX_IN_FLIGHT),
        reverse: input.reverse_completions,
    };
    let mut requests =
        BlockRequests::with_io_engine(mem.clone(), device.disk.clone(), device.id, Some(Box::new(engine)));
    requests.set_features(negotiated);
    let mut server = BlockQueue {
        requests,
        pending: false,
        #[cfg(feature = "test-hooks")]
        attempt: None,
    };
    let rings = Rings { desc, avail, used, size };

    for serve in input.serves.iter().take(4) {
        for &head in serve.heads.iter().take(usize::from(size)) {
            driver.publish(head % (size + 1));
        }
        if let Some(idx) = serve.avail_jump {
            driver.set_avail_idx(idx);
        }
        driver.set_used_event(serve.used_event);
        if !check_serve(&mem, regions, &mut server, &mut queue, &rings, negotiated) {
            break;
        }
    }
}

/// The queue's rings (guest-physical) and size.
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

/// One serve against the oracle; returns whether the queue still works.
fn check_serve(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    server: &mut BlockQueue,
    queue: &mut Queue,
    rings: &Rings,
    negotiated: u64,
) -> bool {
    let before = snapshot(mem, regions);
    let mut oracle = Oracle {
        mem,
        rings,
        indirect: negotiated & features::RING_INDIRECT_DESC != 0,
        first_avail: queue.next_avail(),
        first_used: queue.next_used(),
        fetched: 0,
        completed: 0,
        in_flight: Vec::with_capacity(usize::from(rings.size)),
        completing: None,
        writable: Vec::new(),
    };
    let (result, heap) = heap::measure(|| server.serve(queue, &mut oracle));
    let stats = server.requests.stats();
    if let Some(heap) = heap {
        assert!(heap <= SERVE_HEAP_BOUND, "one serve allocated {heap} bytes of heap");
    }
    let chains = stats.chains;
    assert!(chains <= usize::from(rings.size), "{chains} chains in one serve of a queue of {}", rings.size);
    assert!(stats.max_chain_descriptors <= MAX_CHAIN_SEGMENTS as usize + 1, "{stats:?}");
    assert!(stats.descriptors <= chains * (MAX_CHAIN_SEGMENTS as usize + 1), "{stats:?}");
    assert!(oracle.completing.is_none(), "a head completing was never completed");
    if result.is_ok() {
        assert!(oracle.in_flight.is_empty(), "heads fetched and never completed: {:?}", oracle.in_flight);
        assert_eq!(oracle.fetched, oracle.completed, "fetched and completed differ");
        assert_eq!(queue.next_used(), oracle.first_used.wrapping_add(oracle.completed as u16));
    }
    let mut allowed = std::mem::take(&mut oracle.writable);
    allowed.push((rings.used, 4 + 8 * u64::from(rings.size) + 2));
    check_memory(mem, regions, &before, &allowed);
    result.is_ok()
}

/// The journal's view of one serve.
struct Oracle<'a> {
    mem: &'a GuestMemoryMmap,
    rings: &'a Rings,
    indirect: bool,
    first_avail: u16,
    first_used: u16,
    fetched: usize,
    completed: usize,
    /// Heads fetched and not completed, with their chains' writable bytes.
    in_flight: Vec<(u16, u64)>,
    completing: Option<u16>,
    /// (address, length) of every writable buffer of a fetched chain.
    writable: Vec<(u64, u64)>,
}

impl Oracle<'_> {
    fn read_u16(&self, at: u64) -> u16 {
        self.mem.read_obj::<u16>(GuestAddress(at)).map(u16::from_le).expect("the rings are in memory")
    }

    /// Walks the chain at `head` as a driver wrote it (following an indirect table only
    /// if negotiated, at most [`ORACLE_WALK`] descriptors): the writable bytes it has,
    /// recording each writable buffer.
    fn walk(&mut self, head: u16) -> u64 {
        let (mut table, mut entries, mut index) =
            (self.rings.desc, u64::from(self.rings.size), u64::from(head));
        let mut in_table = false;
        let mut total = 0u64;
        for _ in 0..ORACLE_WALK {
            if index >= entries {
                break;
            }
            let mut raw = [0u8; 16];
            if self.mem.read_slice(&mut raw, GuestAddress(table + 16 * index)).is_err() {
                break;
            }
            let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & F_INDIRECT != 0 && self.indirect && !in_table {
                (table, entries, index, in_table) = (addr, u64::from(len) / 16, 0, true);
                continue;
            }
            if flags & F_WRITE != 0 {
                self.writable.push((addr, u64::from(len)));
                total += u64::from(len);
            }
            if flags & F_NEXT == 0 {
                break;
            }
            index = u64::from(next);
        }
        total
    }
}

impl RequestJournal for Oracle<'_> {
    fn fetched(&mut self, head: u16) {
        heap::exclude(|| {
            let position = self.first_avail.wrapping_add(self.fetched as u16);
            let slot = self.rings.avail + 4 + 2 * u64::from(position % self.rings.size);
            let offered = self.read_u16(slot);
            assert_eq!(head, offered, "fetched head #{} is not the one the ring holds there", self.fetched);
            assert!(head < self.rings.size, "fetched head {head} beyond a queue of {}", self.rings.size);
            assert!(self.completing.is_none(), "fetched {head} between completing and completed");
            let writable = self.walk(head);
            self.in_flight.push((head, writable));
            self.fetched += 1;
        });
    }

    fn completing(&mut self, head: u16) {
        assert!(self.completing.is_none(), "completing {head} before the previous one completed");
        assert!(self.in_flight.iter().any(|&(h, _)| h == head), "completing {head}, which is not in flight");
        self.completing = Some(head);
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        heap::exclude(|| {
            assert_eq!(self.completing.take(), Some(head), "completed {head} without completing it first");
            self.completed += 1;
            assert_eq!(
                used_idx,
                self.first_used.wrapping_add(self.completed as u16),
                "used index published out of step"
            );
            assert_eq!(self.read_u16(self.rings.used + 2), used_idx, "the used index in memory");
            let entry = self.rings.used + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % self.rings.size);
            let id = self.mem.read_obj::<u32>(GuestAddress(entry)).expect("the used ring is in memory");
            let len = self.mem.read_obj::<u32>(GuestAddress(entry + 4)).expect("the used ring is in memory");
            assert_eq!(id, u32::from(head), "the used entry names another head");
            // A head the driver offered twice may be in flight twice: any of its chains
            // whose writable bytes cover the length.
            let position = self
                .in_flight
                .iter()
                .position(|&(h, writable)| h == head && u64::from(len) <= writable)
                .unwrap_or_else(|| {
                    panic!(
                        "used length {len} of head {head} beyond its chain's writable bytes: {:?}",
                        self.in_flight
                    )
                });
            self.in_flight.swap_remove(position);
        });
    }
}
