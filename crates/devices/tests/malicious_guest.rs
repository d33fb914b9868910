//! A malicious guest against virtio-mmio + virtio-blk: no panic; the request fails or the
//! device asks for a reset; other devices (and the device after a reset) keep working; and
//! what one kick can cost the host (descriptors walked, heap) is bounded, as the engine's
//! own counters and a counting allocator show.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use splitvisor_bus::{BusDevice, EventFdInterrupt};
use splitvisor_devices::fuzzing::heap::{CountingAllocator, measure};
use splitvisor_devices::virtio::block::{
    Block, BlockRequests, MAX_CHAIN_SEGMENTS, id_bytes, request_status, request_type,
};
use splitvisor_devices::virtio::testing::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue, guest_memory, memory_disk, write_blk_header,
    write_descriptor_at,
};
use splitvisor_devices::virtio::{GuestMemoryMmap, MmioTransport, features, reg, status};
use vm_memory::{Bytes, GuestAddress};

#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

const RAM: u64 = 0x20_0000;
const QUEUE_SIZE: u16 = 16;
const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;
const INDIRECT: u64 = 0xb_0000;
/// Generous bound on any wait for the worker thread.
const WAIT_MS: i32 = 10_000;

/// Waits (bounded) until `fd` is readable; true if it became so.
fn wait_readable(fd: &impl AsRawFd) -> bool {
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd we pass.
    unsafe { libc::poll(&mut poll, 1, WAIT_MS) == 1 }
}

/// One virtio-blk device on its own queue memory, driven through its registers.
struct Device {
    mem: GuestMemoryMmap,
    transport: MmioTransport<Block>,
    image: std::fs::File,
    line: Arc<EventFdInterrupt>,
    queue_base: u64,
    queue_size: u16,
    avail_idx: u16,
}

impl Device {
    fn new(mem: &GuestMemoryMmap, queue_base: u64) -> Self {
        Self::with_queue(mem, queue_base, QUEUE_SIZE)
    }

    fn with_queue(mem: &GuestMemoryMmap, queue_base: u64, queue_size: u16) -> Self {
        let (disk, image) = memory_disk(128, false);
        let line = Arc::new(EventFdInterrupt::new().unwrap());
        let transport = MmioTransport::new(Block::new(disk, "evil"), mem.clone(), line.clone()).unwrap();
        Self { mem: mem.clone(), transport, image, line, queue_base, queue_size, avail_idx: 0 }
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut word = [0u8; 4];
        self.transport.read(offset, &mut word);
        u32::from_le_bytes(word)
    }

    fn driver(&self) -> DriverQueue<'_> {
        DriverQueue::new(&self.mem, self.queue_base, self.queue_size)
    }

    /// Negotiates VERSION_1 and INDIRECT_DESC and sets up queue 0 of `size`; stops before
    /// DRIVER_OK.
    fn negotiate(&mut self, size: u32) {
        self.negotiate_features(size, features::VERSION_1 | features::RING_INDIRECT_DESC);
    }

    fn negotiate_features(&mut self, size: u32, wanted: u64) {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        let wanted = offered & wanted;
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, wanted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (wanted >> 32) as u32);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.read(reg::STATUS) & status::FEATURES_OK, 0);
        let (desc, avail, used) = self.driver().addresses();
        self.write(reg::QUEUE_SEL, 0);
        self.write(reg::QUEUE_NUM, size);
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.write(reg::QUEUE_DEVICE_LOW, used as u32);
        self.write(reg::QUEUE_READY, 1);
        // A driver starts its rings afresh.
        self.avail_idx = 0;
        self.driver().set_avail_idx(0);
        self.mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
    }

    fn driver_ok(&mut self) {
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    fn bring_up(&mut self) {
        self.negotiate(u32::from(self.queue_size));
        self.driver_ok();
        assert_eq!(self.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Publishes `heads`, rings the doorbell once, and waits (bounded) for the interrupt
    /// the worker raises after it published the used index; true if it came and the used
    /// index moved by the number of heads.
    fn submit_all(&mut self, heads: &[u16]) -> bool {
        let before = self.driver().used_idx();
        let (_, avail, _) = self.driver().addresses();
        for &head in heads {
            let slot = avail + 4 + 2 * u64::from(self.avail_idx % self.queue_size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.driver().set_avail_idx(self.avail_idx);
        self.write(reg::QUEUE_NOTIFY, 0);
        let mut served = 0u16;
        while served < heads.len() as u16 {
            if !self.wait_interrupt() {
                return false;
            }
            served = self.driver().used_idx().wrapping_sub(before);
        }
        served == heads.len() as u16
    }

    fn submit(&mut self, head: u16) -> bool {
        self.submit_all(&[head])
    }

    /// Waits (bounded) for the device's interrupt, and consumes it.
    fn wait_interrupt(&self) -> bool {
        let ready = wait_readable(self.line.irqfd());
        let _ = self.line.irqfd().read();
        ready
    }

    /// A well-formed read of sector `sector` into DATA; returns the status byte.
    fn good_read(&mut self, sector: u64) -> u8 {
        self.three_part(request_type::IN, sector, DATA, 512, DESC_F_WRITE, STATUS, DESC_F_WRITE)
    }

    #[allow(clippy::too_many_arguments)]
    fn three_part(
        &mut self,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
        data_flags: u16,
        status: u64,
        status_flags: u16,
    ) -> u8 {
        write_blk_header(&self.mem, HDR, kind, sector);
        let _ = self.mem.write_obj(0xeeu8, GuestAddress(STATUS));
        let driver = self.driver();
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        driver.write_descriptor(1, data, len, data_flags | DESC_F_NEXT, 2);
        driver.write_descriptor(2, status, 1, status_flags, 0);
        assert!(self.submit(0), "the device answered");
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn last_used_len(&self) -> u32 {
        let driver = self.driver();
        driver.used_elem(driver.used_idx().wrapping_sub(1)).1
    }

    /// Resets the device (which joins its worker) and says whether a worker panicked.
    fn worker_panic(&mut self) -> Option<String> {
        self.write(reg::STATUS, 0);
        self.transport.device().worker_panic()
    }
}

fn mem() -> GuestMemoryMmap {
    guest_memory(RAM as usize)
}

#[test]
fn a_good_request_works_end_to_end_through_the_worker_thread() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.image.write_all_at(&[0x5a; 512], 7 * 512).unwrap();
    dev.bring_up();
    assert_eq!(dev.good_read(7), request_status::OK);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x5a; 512]);
    // The worker sets the status bit before it raises the line, and `submit` waited for
    // the line.
    assert_eq!(dev.read(reg::INTERRUPT_STATUS) & 1, 1);
    assert_eq!(dev.last_used_len(), 513, "data and status");
    assert_eq!(dev.worker_panic(), None);
}

#[test]
fn descriptor_loop_fails_the_request_not_the_device() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
    driver.write_descriptor(1, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 0);
    assert!(dev.submit(0));
    assert_eq!(dev.last_used_len(), 0);
    assert_eq!(dev.good_read(1), request_status::OK, "the device still works");
}

#[test]
fn indirect_table_longer_than_the_queue_and_nested_indirect_tables() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    let pattern: Vec<u8> = (0..38 * 512u32).map(|i| (i % 251) as u8).collect();
    dev.image.write_all_at(&pattern, 0).unwrap();
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    // 40 entries (more than the queue's 16, within seg_max + 2): header, 38 sectors, status.
    let entries = 40u16;
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 1);
    for i in 1..entries - 1 {
        write_descriptor_at(
            &mem,
            INDIRECT + 16 * u64::from(i),
            DATA + 512 * u64::from(i - 1),
            512,
            DESC_F_WRITE | DESC_F_NEXT,
            i + 1,
        );
    }
    write_descriptor_at(&mem, INDIRECT + 16 * u64::from(entries - 1), STATUS, 1, DESC_F_WRITE, 0);
    dev.driver().write_descriptor(0, INDIRECT, 16 * u32::from(entries), DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    // Indirect tables may be longer than the queue (Linux makes them so): served.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
    let mut read = vec![0u8; pattern.len()];
    mem.read_slice(&mut read, GuestAddress(DATA)).unwrap();
    assert!(read == pattern, "the 38 sectors arrived in order");
    assert_eq!(dev.last_used_len(), 38 * 512 + 1);

    // One entry more than seg_max + 2 allows: refused whole, before any entry is read.
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let too_many = MAX_CHAIN_SEGMENTS as u16 + 1;
    for i in 0..too_many {
        let flags = if i + 1 < too_many { DESC_F_WRITE | DESC_F_NEXT } else { DESC_F_WRITE };
        write_descriptor_at(&mem, INDIRECT + 16 * u64::from(i), STATUS, 1, flags, i + 1);
    }
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 1);
    dev.driver().write_descriptor(0, INDIRECT, 16 * u32::from(too_many), DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee, "no status for a refused chain");
    assert_eq!(dev.last_used_len(), 0);

    // An indirect descriptor inside an indirect table is not allowed.
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 1);
    write_descriptor_at(&mem, INDIRECT + 16, INDIRECT, 48, DESC_F_INDIRECT | DESC_F_NEXT, 2);
    write_descriptor_at(&mem, INDIRECT + 32, STATUS, 1, DESC_F_WRITE, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    dev.driver().write_descriptor(0, INDIRECT, 48, DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee, "no status for a broken chain");
    assert_eq!(dev.good_read(2), request_status::OK);
}

#[test]
fn addresses_beyond_ram_or_straddling_its_end_fail() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.bring_up();
    for (data, len) in [(RAM + 0x1000, 512), (RAM - 256, 512), (u64::MAX - 100, 512)] {
        assert_eq!(
            dev.three_part(request_type::IN, 0, data, len, DESC_F_WRITE, STATUS, DESC_F_WRITE),
            request_status::IOERR
        );
        assert_eq!(
            dev.three_part(request_type::OUT, 0, data, len, 0, STATUS, DESC_F_WRITE),
            request_status::IOERR
        );
    }
    // A status byte outside RAM: nothing to write, the buffer comes back with length 0.
    dev.three_part(request_type::IN, 0, DATA, 512, DESC_F_WRITE, RAM + 10, DESC_F_WRITE);
    assert_eq!(dev.last_used_len(), 0);
    assert_eq!(dev.good_read(0), request_status::OK);
}

#[test]
fn zero_and_huge_lengths() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.bring_up();
    // A zero-length segment is a zero-length transfer.
    assert_eq!(
        dev.three_part(request_type::IN, 0, DATA, 0, DESC_F_WRITE, STATUS, DESC_F_WRITE),
        request_status::OK
    );
    // 4 GiB of data: beyond MAX_REQUEST_BYTES, refused with a status.
    assert_eq!(
        dev.three_part(request_type::IN, 0, DATA, u32::MAX, DESC_F_WRITE, STATUS, DESC_F_WRITE),
        request_status::IOERR
    );
    assert_eq!(dev.last_used_len(), 1, "only the status byte was written");
    // Segments past SIZE_MAX are refused before any buffer is sized for them.
    assert_eq!(
        dev.three_part(request_type::OUT, 0, 0, 0x4000_0000, 0, STATUS, DESC_F_WRITE),
        request_status::IOERR
    );
    // A zero-length header.
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 0, DESC_F_NEXT, 1);
    driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::IOERR);
    assert_eq!(dev.good_read(0), request_status::OK);
}

#[test]
fn header_in_a_writable_buffer_and_status_in_a_read_only_one() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 16, DESC_F_WRITE | DESC_F_NEXT, 1);
    driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::IOERR);

    assert_eq!(
        dev.three_part(request_type::IN, 0, DATA, 512, DESC_F_WRITE, STATUS, 0),
        0xee,
        "status untouched"
    );
    assert_eq!(dev.last_used_len(), 0);
    assert_eq!(dev.good_read(0), request_status::OK);
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two_needs_a_reset_then_recovers() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.negotiate(15);
    dev.driver_ok();
    assert_ne!(dev.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(dev.read(reg::INTERRUPT_STATUS) & 2, 2, "config-change interrupt");
    dev.bring_up();
    assert_eq!(dev.good_read(0), request_status::OK);
}

#[test]
fn an_avail_index_jump_needs_a_reset_and_spares_other_devices() {
    let mem = mem();
    let mut evil = Device::new(&mem, 0x1000);
    let mut good = Device::new(&mem, 0x3000);
    evil.bring_up();
    good.bring_up();
    evil.driver().set_avail_idx(100);
    evil.write(reg::QUEUE_NOTIFY, 0);
    assert!(evil.wait_interrupt(), "the configuration-change interrupt");
    assert_ne!(evil.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(good.good_read(3), request_status::OK, "the other device is unaffected");
    // The guest resets the broken device and it serves again.
    evil.write(reg::STATUS, 0);
    assert_eq!(evil.status(), 0);
    evil.bring_up();
    assert_eq!(evil.good_read(3), request_status::OK);
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.negotiate(u32::from(QUEUE_SIZE));
    write_blk_header(&mem, HDR, request_type::IN, 0);
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
    driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
    let mut driver = dev.driver();
    driver.publish(0);
    dev.write(reg::QUEUE_NOTIFY, 0);
    // No worker exists before DRIVER_OK, so nothing can have been served.
    assert_eq!(dev.driver().used_idx(), 0, "nothing served before DRIVER_OK");
    // Queue registers are locked once the driver is ready; a late QUEUE_NUM is ignored.
    dev.driver_ok();
    dev.write(reg::QUEUE_NUM, 3);
    // The request offered early is served on the first kick after DRIVER_OK.
    dev.avail_idx = 1;
    dev.write(reg::QUEUE_NOTIFY, 0);
    assert!(dev.wait_interrupt());
    assert_eq!(dev.driver().used_idx(), 1);
    assert_eq!(dev.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn garbage_register_traffic_never_panics() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    let mut seed = 0x1234_5678_9abc_def0u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = (seed >> 8) % 0x140;
        let len = [1usize, 2, 4, 8][(seed & 3) as usize];
        let mut data = seed.to_le_bytes();
        if seed & 0x10 == 0 {
            dev.transport.read(offset, &mut data[..len]);
        } else {
            dev.transport.write(offset, &data[..len]);
        }
    }
    dev.bring_up();
    assert_eq!(dev.good_read(0), request_status::OK);
    assert_eq!(dev.worker_panic(), None, "a worker thread panicked");
}

/// The engine alone on a queue of `size` at 0x1000, with a disk.
fn engine(mem: &GuestMemoryMmap, size: u16, indirect: bool) -> (BlockRequests, virtio_queue::Queue) {
    let (disk, _) = memory_disk(128, false);
    let mut requests = BlockRequests::new(mem.clone(), Arc::new(disk), id_bytes("evil"));
    if indirect {
        requests.set_features(features::VERSION_1 | features::RING_INDIRECT_DESC);
    }
    (requests, DriverQueue::new(mem, 0x1000, size).device_queue())
}

#[test]
fn self_chaining_huge_indirect_tables_cost_neither_heap_nor_time() {
    // 256 heads, each an indirect descriptor for a table of 0xFFFF0 bytes (65,535 entries)
    // whose entry 0 chains to itself: 32 bytes of guest memory in all. Once this cost 256 MiB
    // of heap and most of a second per kick.
    let mem = mem();
    let (mut requests, mut queue) = engine(&mem, 256, true);
    let mut driver = DriverQueue::new(&mem, 0x1000, 256);
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 0);
    for head in 0..256 {
        driver.write_descriptor(head, INDIRECT, 0xf_fff0, DESC_F_INDIRECT, 0);
        driver.publish(head);
    }
    let (processed, heap) = measure(|| requests.process_queue(&mut queue).unwrap());
    assert_eq!(processed.completed, 256);
    let stats = requests.stats();
    assert_eq!(stats.chains, 256);
    assert_eq!(stats.descriptors, 256, "one descriptor read per head: the table is refused unread");
    assert_eq!(heap, Some(0), "no heap allocated for the kick");
    assert!(requests.heap_bytes() <= 64 * 1024);
    for i in 0..256 {
        assert_eq!(driver.used_elem(i).1, 0, "refused chains come back empty");
    }

    // The largest table allowed, still self-chaining: each chain stops at the table's size.
    let table = 16 * MAX_CHAIN_SEGMENTS;
    for head in 0..256 {
        driver.write_descriptor(head, INDIRECT, table, DESC_F_INDIRECT, 0);
        driver.publish(head);
    }
    let (processed, heap) = measure(|| requests.process_queue(&mut queue).unwrap());
    assert_eq!(processed.completed, 256);
    let stats = requests.stats();
    assert_eq!(stats.max_chain_descriptors, MAX_CHAIN_SEGMENTS as usize + 1);
    assert!(stats.descriptors <= 256 * (MAX_CHAIN_SEGMENTS as usize + 1));
    assert_eq!(heap, Some(0));
}

#[test]
fn one_call_serves_at_most_a_queue_and_says_more_is_pending() {
    let mem = mem();
    let (mut requests, mut queue) = engine(&mem, 16, false);
    let mut driver = DriverQueue::new(&mem, 0x1000, 16);
    write_blk_header(&mem, HDR, request_type::FLUSH, 0);
    driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
    driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
    for _ in 0..16 {
        driver.publish(0);
    }
    let first = requests.process_queue(&mut queue).unwrap();
    assert_eq!((first.completed, first.pending), (16, false));
    // Sixteen more, and four after them (the driver refilled the ring while the device
    // worked): one call stops at the queue size and says more is waiting.
    for _ in 0..16 {
        driver.publish(0);
    }
    let second = {
        let mut journal = RefillAfter { mem: &mem, driver: &mut driver, after: 4, done: 0 };
        requests.process_queue_with(&mut queue, &mut journal).unwrap()
    };
    assert_eq!((second.completed, second.pending), (16, true));
    let third = requests.process_queue(&mut queue).unwrap();
    assert_eq!((third.completed, third.pending), (4, false));
    assert_eq!(driver.used_idx(), 36);
}

/// A driver that offers another request each time one completes, `after` times.
struct RefillAfter<'a, 'm> {
    mem: &'m GuestMemoryMmap,
    driver: &'a mut DriverQueue<'m>,
    after: usize,
    done: usize,
}

impl splitvisor_devices::virtio::block::RequestJournal for RefillAfter<'_, '_> {
    fn completed(&mut self, _head: u16, _used_idx: u16) {
        let _ = self.mem;
        if self.done < self.after {
            self.done += 1;
            self.driver.publish(0);
        }
    }
}

#[test]
fn indirect_descriptors_without_the_feature_are_refused() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.negotiate_features(u32::from(QUEUE_SIZE), features::VERSION_1);
    dev.driver_ok();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 1);
    write_descriptor_at(&mem, INDIRECT + 16, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    write_descriptor_at(&mem, INDIRECT + 32, STATUS, 1, DESC_F_WRITE, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    dev.driver().write_descriptor(0, INDIRECT, 48, DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee, "the table was not followed");
    assert_eq!(dev.last_used_len(), 0);
    assert_eq!(dev.good_read(0), request_status::OK, "direct chains still work");
    // The same chain once the feature is negotiated.
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    dev.driver().write_descriptor(0, INDIRECT, 48, DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
}

#[test]
fn a_header_split_across_descriptors_is_read_by_bytes() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.image.write_all_at(&[0x3c; 512], 5 * 512).unwrap();
    dev.bring_up();
    // The 16 header bytes in three pieces: 3 at HDR, 9 at HDR + 0x100, 4 at HDR + 0x200.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&request_type::IN.to_le_bytes());
    header[8..16].copy_from_slice(&5u64.to_le_bytes());
    mem.write_slice(&header[0..3], GuestAddress(HDR)).unwrap();
    mem.write_slice(&header[3..12], GuestAddress(HDR + 0x100)).unwrap();
    mem.write_slice(&header[12..16], GuestAddress(HDR + 0x200)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 3, DESC_F_NEXT, 1);
    driver.write_descriptor(1, HDR + 0x100, 9, DESC_F_NEXT, 2);
    driver.write_descriptor(2, HDR + 0x200, 4, DESC_F_NEXT, 3);
    driver.write_descriptor(3, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 4);
    driver.write_descriptor(4, STATUS, 1, DESC_F_WRITE, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x3c; 512], "sector 5, as the split header says");

    // A write whose header and data share one descriptor: the data starts at byte 16.
    let mut request = vec![0u8; 16 + 1024];
    request[0..4].copy_from_slice(&request_type::OUT.to_le_bytes());
    request[8..16].copy_from_slice(&9u64.to_le_bytes());
    request[16..].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
    mem.write_slice(&request, GuestAddress(HDR)).unwrap();
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, request.len() as u32, DESC_F_NEXT, 1);
    driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
    assert!(dev.submit(0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
    let mut on_disk = vec![0u8; 1024];
    dev.image.read_exact_at(&mut on_disk, 9 * 512).unwrap();
    assert!(on_disk == request[16..], "the data after the header reached sector 9");
    assert_eq!(dev.last_used_len(), 1, "a write returns only its status byte");
}

#[test]
fn data_and_status_in_one_writable_descriptor() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 3 % 256) as u8).collect();
    dev.image.write_all_at(&pattern, 2 * 512).unwrap();
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 2);
    mem.write_slice(&[0xee; 1025], GuestAddress(DATA)).unwrap();
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
    // 1024 data bytes and the status byte, in one buffer.
    driver.write_descriptor(1, DATA, 1025, DESC_F_WRITE, 0);
    assert!(dev.submit(0));
    let mut buffer = vec![0u8; 1025];
    mem.read_slice(&mut buffer, GuestAddress(DATA)).unwrap();
    assert!(buffer[..1024] == pattern[..], "the data is not overwritten by the status");
    assert_eq!(buffer[1024], request_status::OK, "the status is the buffer's last byte");
    assert_eq!(dev.last_used_len(), 1025);

    // GET_ID likewise: 20 bytes of ID, then the status in the same buffer.
    write_blk_header(&mem, HDR, request_type::GET_ID, 0);
    dev.driver().write_descriptor(1, DATA, 21, DESC_F_WRITE, 0);
    assert!(dev.submit(0));
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..4], b"evil");
    assert_eq!(id[20], request_status::OK);
    assert_eq!(dev.last_used_len(), 21);
}

#[test]
fn a_chain_longer_than_the_queue_is_refused() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    // Sixteen distinct descriptors chained in a circle: the seventeenth step is a repeat.
    let driver = dev.driver();
    driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
    for i in 1..QUEUE_SIZE {
        driver.write_descriptor(i, STATUS, 1, DESC_F_WRITE | DESC_F_NEXT, (i + 1) % QUEUE_SIZE);
    }
    assert!(dev.submit(0));
    assert_eq!(dev.last_used_len(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee, "no status for a loop");
    assert_eq!(dev.good_read(0), request_status::OK);
}

#[test]
fn buffers_over_the_rings_are_refused_and_the_rings_stay_intact() {
    let mem = mem();
    let mut dev = Device::new(&mem, 0x1000);
    dev.image.write_all_at(&[0xff; 512], 0).unwrap();
    dev.bring_up();
    let (desc, avail, _) = dev.driver().addresses();
    for target in [desc, avail] {
        // A read whose data would land on the driver's rings: refused, status written.
        write_blk_header(&mem, HDR, request_type::IN, 0);
        let driver = dev.driver();
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        driver.write_descriptor(1, target, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        driver.write_descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        assert!(dev.submit(0));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::IOERR);
        // The sector is all 0xff; the rings (small indices, lengths and addresses) have none.
        let mut after = vec![0u8; 512];
        mem.read_slice(&mut after, GuestAddress(target)).unwrap();
        assert!(!after.contains(&0xff), "no byte of the disk in the rings");
    }
    assert_eq!(dev.good_read(0), request_status::OK);
}
