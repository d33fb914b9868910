//! A malicious guest against virtio-net's queue engines: bad descriptors, oversized frames,
//! receive buffers too small, floods. The device never panics, never touches memory outside
//! the buffers it was given, does bounded work per pass, and keeps serving well-formed
//! frames after bad ones.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use splitvisor_devices::virtio::net::{
    BUDGET, HDR_F_NEEDS_CSUM, HEADER_SIZE, NetParams, NetRx, NetStats, NetTx, feature,
};
use splitvisor_devices::virtio::tap::SocketBackend;
use splitvisor_devices::virtio::testing::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue, guest_memory,
};
use splitvisor_devices::virtio::{GuestMemoryMmap, features};
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 0x40_0000;
const QUEUE: u64 = 0x1000;
const SIZE: u16 = 16;
const BUFFERS: u64 = 0x10_0000;

fn negotiated(mergeable: bool) -> u64 {
    features::VERSION_1 | feature::CSUM | feature::MAC | if mergeable { feature::MRG_RXBUF } else { 0 }
}

struct Rig {
    mem: GuestMemoryMmap,
    wire: UnixDatagram,
    stats: Arc<NetStats>,
    backend: Arc<SocketBackend>,
}

fn new_rig() -> Rig {
    let mem = guest_memory(RAM);
    let (backend, wire) = SocketBackend::pair().unwrap();
    let wire = UnixDatagram::from(wire);
    wire.set_nonblocking(true).unwrap();
    Rig { mem, wire, stats: Arc::new(NetStats::default()), backend: Arc::new(backend) }
}

impl Rig {
    fn tx(&self) -> NetTx {
        NetTx::new(
            self.mem.clone(),
            self.backend.clone(),
            &NetParams::new([0x52, 0x54, 0, 0, 0, 1]),
            negotiated(false),
            self.stats.clone(),
        )
    }

    fn rx(&self, mergeable: bool) -> NetRx {
        NetRx::new(self.mem.clone(), self.backend.clone(), negotiated(mergeable), self.stats.clone())
    }

    /// Frames the device sent, header included.
    fn sent(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.wire.recv(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }

    /// Puts a header and an Ethernet frame of `len` bytes (tagged `tag`) in guest memory
    /// at `at`; returns the bytes.
    fn write_frame(&self, at: u64, len: usize, tag: u8, flags: u8, gso: u8) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_SIZE + len];
        frame[0] = flags;
        frame[1] = gso;
        for (i, byte) in frame[HEADER_SIZE..].iter_mut().enumerate() {
            *byte = tag.wrapping_add(i as u8);
        }
        self.mem.write_slice(&frame, GuestAddress(at)).unwrap();
        frame
    }

    fn inject(&self, len: usize, tag: u8) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_SIZE + len];
        for (i, byte) in frame[HEADER_SIZE..].iter_mut().enumerate() {
            *byte = tag.wrapping_add(i as u8);
        }
        self.wire.send(&frame).unwrap();
        frame
    }
}

#[test]
fn transmitted_frames_reach_the_wire_and_bad_chains_are_dropped_alone() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut tx = rig.tx();
    let good = rig.write_frame(BUFFERS, 100, 1, 0, 0);
    // 0: a well-formed frame in two pieces (header, then data).
    driver.write_descriptor(0, BUFFERS, HEADER_SIZE as u32, DESC_F_NEXT, 1);
    driver.write_descriptor(1, BUFFERS + HEADER_SIZE as u64, 100, 0, 0);
    driver.publish(0);
    // 2: a chain that loops on itself.
    driver.write_descriptor(2, BUFFERS, 112, DESC_F_NEXT, 2);
    driver.publish(2);
    // 3: next beyond the table.
    driver.write_descriptor(3, BUFFERS, 112, DESC_F_NEXT, 999);
    driver.publish(3);
    // 4: an indirect table (never offered).
    driver.write_descriptor(4, BUFFERS, 32, DESC_F_INDIRECT, 0);
    driver.publish(4);
    // 5: a device-writable buffer in a transmit chain.
    driver.write_descriptor(5, BUFFERS, 112, DESC_F_WRITE, 0);
    driver.publish(5);
    // 6: a buffer beyond guest memory.
    driver.write_descriptor(6, RAM as u64 - 16, 112, 0, 0);
    driver.publish(6);
    // 7: larger than the MTU allows.
    rig.write_frame(0x20_0000, 9000, 2, 0, 0);
    driver.write_descriptor(7, 0x20_0000, (HEADER_SIZE + 9000) as u32, 0, 0);
    driver.publish(7);
    // 8: segmentation offload that was not negotiated.
    rig.write_frame(0x30_0000, 100, 3, 0, 4);
    driver.write_descriptor(8, 0x30_0000, 112, 0, 0);
    driver.publish(8);
    // 9: shorter than a header and an Ethernet header.
    driver.write_descriptor(9, BUFFERS, 20, 0, 0);
    driver.publish(9);
    // 10: another well-formed frame, with a partial checksum (CSUM was negotiated).
    let offloaded = rig.write_frame(0x38_0000, 60, 4, HDR_F_NEEDS_CSUM, 0);
    driver.write_descriptor(10, 0x38_0000, (HEADER_SIZE + 60) as u32, 0, 0);
    driver.publish(10);

    let processed = tx.process(&mut queue).unwrap();
    assert_eq!(processed.completed, 10, "every chain goes back to the driver");
    assert_eq!(driver.used_idx(), 10);
    for i in 0..10 {
        assert_eq!(driver.used_elem(i).1, 0, "a transmit buffer is never written");
    }
    assert_eq!(rig.sent(), vec![good, offloaded], "only the well-formed frames went out");
    assert_eq!(rig.stats.tx_dropped.load(Ordering::Relaxed), 8);
    assert_eq!(rig.stats.tx_frames.load(Ordering::Relaxed), 2);
}

#[test]
fn a_flood_of_transmit_chains_is_served_in_bounded_passes() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut tx = rig.tx();
    rig.write_frame(BUFFERS, 60, 9, 0, 0);
    for i in 0..SIZE {
        driver.write_descriptor(i, BUFFERS, (HEADER_SIZE + 60) as u32, 0, 0);
    }
    let mut sent = 0usize;
    // The driver keeps the ring full for many passes; each pass is bounded.
    for _ in 0..40 {
        for i in 0..SIZE {
            driver.publish(i);
        }
        let processed = tx.process(&mut queue).unwrap();
        assert!(processed.completed <= BUDGET);
        sent += processed.completed;
        let _ = rig.sent();
    }
    assert_eq!(sent, 40 * usize::from(SIZE));
}

#[test]
fn an_available_index_beyond_the_queue_size_breaks_the_queue() {
    let rig = new_rig();
    let driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    driver.set_avail_idx(SIZE * 3);
    assert!(rig.tx().process(&mut queue).is_err());
    let mut queue = driver.device_queue();
    rig.inject(100, 1);
    assert!(rig.rx(true).process(&mut queue).is_err());
}

#[test]
fn a_head_beyond_the_descriptor_table_breaks_the_queue() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    driver.publish(SIZE + 100);
    assert!(rig.tx().process(&mut queue).is_err());
    assert_eq!(driver.used_idx(), 0, "nothing returned under a head the driver cannot have");
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    driver.publish(SIZE);
    rig.inject(100, 1);
    assert!(rig.rx(true).process(&mut queue).is_err());
    assert_eq!(driver.used_idx(), 0);
}

/// Offers `count` receive buffers of `len` bytes each, one descriptor per chain.
fn offer_rx(driver: &mut DriverQueue<'_>, count: u16, len: u32) {
    for i in 0..count {
        driver.write_descriptor(i, BUFFERS + u64::from(i) * 0x1_0000, len, DESC_F_WRITE, 0);
        driver.publish(i);
    }
}

#[test]
fn received_frames_fill_buffers_and_span_them_with_mergeable_buffers() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut rx = rig.rx(true);
    offer_rx(&mut driver, 8, 512);
    let small = rig.inject(100, 1);
    let large = rig.inject(1400, 2);
    let processed = rx.process(&mut queue).unwrap();
    assert_eq!(processed.completed, 4, "one buffer, then three");
    assert_eq!(driver.used_elem(0), (0, small.len() as u32));
    let mut first = vec![0u8; small.len()];
    rig.mem.read_slice(&mut first, GuestAddress(BUFFERS)).unwrap();
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 1, "num_buffers");
    assert_eq!(first[12..], small[12..]);
    // The large frame: 512 + 512 + the rest, num_buffers 3, in order.
    let mut spanned = Vec::new();
    for i in 1..4u16 {
        let (head, len) = driver.used_elem(i);
        let mut part = vec![0u8; len as usize];
        rig.mem.read_slice(&mut part, GuestAddress(BUFFERS + u64::from(head) * 0x1_0000)).unwrap();
        spanned.extend_from_slice(&part);
    }
    assert_eq!(u16::from_le_bytes([spanned[10], spanned[11]]), 3);
    assert_eq!(spanned[12..], large[12..]);
    assert_eq!(spanned.len(), large.len());
}

#[test]
fn receive_buffers_too_small_lose_the_frame_and_never_stall_the_queue() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    // Without mergeable buffers: a 1400-byte frame and 256-byte buffers.
    let mut rx = rig.rx(false);
    offer_rx(&mut driver, 4, 256);
    let before = snapshot(&rig.mem);
    rig.inject(1400, 1);
    let small = rig.inject(100, 2);
    rx.process(&mut queue).unwrap();
    assert_eq!(rig.stats.rx_dropped.load(Ordering::Relaxed), 1, "the large frame is lost");
    assert_eq!(driver.used_idx(), 1, "the small one took the first buffer, which the large one left");
    assert_eq!(driver.used_elem(0), (0, small.len() as u32));
    assert_unchanged_outside(&rig.mem, &before, &[(BUFFERS, small.len() as u64), (QUEUE, 0x1000)]);

    // A chain that cannot hold even a header goes back unused.
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut rx = rig.rx(true);
    driver.write_descriptor(0, BUFFERS, 4, DESC_F_WRITE, 0);
    driver.publish(0);
    driver.write_descriptor(1, BUFFERS + 0x1_0000, 2048, DESC_F_WRITE, 0);
    driver.publish(1);
    rig.inject(100, 3);
    let good = rig.inject(100, 4);
    rx.process(&mut queue).unwrap();
    assert_eq!(driver.used_elem(0), (0, 0), "the tiny chain, unused");
    assert_eq!(driver.used_elem(1), (1, good.len() as u32));
    assert_eq!(rig.stats.rx_malformed.load(Ordering::Relaxed), 1);

    // A read-only buffer in a receive chain, and one beyond memory: returned unused.
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut rx = rig.rx(true);
    let before = snapshot(&rig.mem);
    driver.write_descriptor(0, BUFFERS, 2048, 0, 0);
    driver.publish(0);
    driver.write_descriptor(1, RAM as u64 - 100, 2048, DESC_F_WRITE, 0);
    driver.publish(1);
    rig.inject(100, 5);
    rig.inject(100, 6);
    rx.process(&mut queue).unwrap();
    assert_eq!(driver.used_idx(), 2, "each bad chain cost one frame");
    assert_eq!((driver.used_elem(0), driver.used_elem(1)), ((0, 0), (1, 0)));
    assert_unchanged_outside(&rig.mem, &before, &[(QUEUE, 0x1000)]);
}

#[test]
fn a_flood_from_the_wire_is_delivered_in_bounded_passes_and_waits_for_buffers() {
    let rig = new_rig();
    let mut driver = DriverQueue::new(&rig.mem, QUEUE, SIZE);
    let mut queue = driver.device_queue();
    let mut rx = rig.rx(true);
    offer_rx(&mut driver, SIZE, 2048);
    let mut sent = 0;
    while sent < 300 && rig.wire.send(&[0u8; 200]).is_ok() {
        sent += 1;
    }
    let processed = rx.process(&mut queue).unwrap();
    assert_eq!(processed.completed, usize::from(SIZE), "as many as there are buffers");
    assert!(rx.waiting_for_buffers(), "the next frame waits for the driver");
    // No buffers: a second pass delivers nothing and returns at once.
    assert_eq!(rx.process(&mut queue).unwrap().completed, 0);
    // Buffers again: delivery resumes with the frame that waited.
    offer_rx(&mut driver, SIZE, 2048);
    assert_eq!(rx.process(&mut queue).unwrap().completed, usize::from(SIZE));
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; RAM];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

/// Every byte outside `allowed` (address, length) ranges is as in `before`.
fn assert_unchanged_outside(mem: &GuestMemoryMmap, before: &[u8], allowed: &[(u64, u64)]) {
    let after = snapshot(mem);
    for (at, (a, b)) in before.iter().zip(&after).enumerate() {
        let at = at as u64;
        if a != b && !allowed.iter().any(|(start, len)| (*start..start + len).contains(&at)) {
            panic!("guest memory at {at:#x} changed outside the device's buffers");
        }
    }
}
