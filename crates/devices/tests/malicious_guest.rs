//! A malicious guest against virtio-mmio + virtio-blk: no panic; the request fails or the
//! device asks for a reset; other devices (and the device after a reset) keep working.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splitvisor_bus::{BusDevice, CountingInterrupt};
use splitvisor_devices::virtio::block::{Block, request_status, request_type};
use splitvisor_devices::virtio::testing::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue, guest_memory, memory_disk, write_blk_header,
    write_descriptor_at,
};
use splitvisor_devices::virtio::{GuestMemoryMmap, MmioTransport, features, reg, status};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 0x20_0000;
const QUEUE_SIZE: u16 = 16;
const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;
const INDIRECT: u64 = 0xb_0000;

/// One virtio-blk device on its own queue memory, driven through its registers.
struct Device {
    mem: GuestMemoryMmap,
    transport: MmioTransport<Block>,
    image: std::fs::File,
    interrupts: Arc<CountingInterrupt>,
    queue_base: u64,
    avail_idx: u16,
}

impl Device {
    fn new(mem: &GuestMemoryMmap, queue_base: u64) -> Self {
        let (disk, image) = memory_disk(128, false);
        let interrupts = Arc::new(CountingInterrupt::new());
        let transport =
            MmioTransport::new(Block::new(disk, "evil"), mem.clone(), interrupts.clone()).unwrap();
        Self { mem: mem.clone(), transport, image, interrupts, queue_base, avail_idx: 0 }
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
        DriverQueue::new(&self.mem, self.queue_base, QUEUE_SIZE)
    }

    /// Negotiates features and sets up queue 0 of `size`; stops before DRIVER_OK.
    fn negotiate(&mut self, size: u32) {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        let wanted = offered & (features::VERSION_1 | features::RING_INDIRECT_DESC);
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
        self.avail_idx = 0;
    }

    fn driver_ok(&mut self) {
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    fn bring_up(&mut self) {
        self.negotiate(u32::from(QUEUE_SIZE));
        self.driver_ok();
        assert_eq!(self.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Publishes `head`, rings the doorbell, and waits (bounded) for the used index to move.
    fn submit(&mut self, head: u16) -> bool {
        let before = self.driver().used_idx();
        let (_, avail, _) = self.driver().addresses();
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.driver().set_avail_idx(self.avail_idx);
        self.write(reg::QUEUE_NOTIFY, 0);
        self.wait_used(before)
    }

    fn wait_used(&self, before: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.driver().used_idx() != before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
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
    assert_eq!(dev.read(reg::INTERRUPT_STATUS) & 1, 1);
    assert!(dev.interrupts.count() >= 1);
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
    dev.bring_up();
    write_blk_header(&mem, HDR, request_type::IN, 0);
    // 40 entries (more than the queue's 16): header, 38 sectors, status.
    let entries = 40u16;
    write_descriptor_at(&mem, INDIRECT, HDR, 16, DESC_F_NEXT, 1);
    for i in 1..entries - 1 {
        write_descriptor_at(
            &mem,
            INDIRECT + 16 * u64::from(i),
            DATA + 512 * u64::from(i),
            512,
            DESC_F_WRITE | DESC_F_NEXT,
            i + 1,
        );
    }
    write_descriptor_at(&mem, INDIRECT + 16 * u64::from(entries - 1), STATUS, 1, DESC_F_WRITE, 0);
    dev.driver().write_descriptor(0, INDIRECT, 16 * u32::from(entries), DESC_F_INDIRECT, 0);
    assert!(dev.submit(0));
    // Served or refused, but answered, and the device lives on.
    assert_eq!(dev.status() & status::DEVICE_NEEDS_RESET, 0);

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
    // Chains of 4 GiB and more end early (virtio-queue stops there): refused, no status.
    assert_ne!(
        dev.three_part(request_type::IN, 0, DATA, u32::MAX, DESC_F_WRITE, STATUS, DESC_F_WRITE),
        request_status::OK
    );
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
    assert_ne!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while evil.status() & status::DEVICE_NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
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
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.driver().used_idx(), 0, "nothing served before DRIVER_OK");
    // Queue registers are locked once the driver is ready; a late QUEUE_NUM is ignored.
    dev.driver_ok();
    dev.write(reg::QUEUE_NUM, 3);
    // The request offered early is served on the first kick after DRIVER_OK.
    dev.avail_idx = 1;
    dev.write(reg::QUEUE_NOTIFY, 0);
    assert!(dev.wait_used(0));
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
}
