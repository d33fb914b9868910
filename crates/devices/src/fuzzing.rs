//! Fuzz harnesses: the entry points `fuzz/` drives with libFuzzer, and that the corpus
//! replay tests (`tests/fuzz_corpus.rs`) run on stable with `cargo test`.
//!
//! Each takes raw bytes, shapes them with `arbitrary` into what a malicious guest could
//! do to the device, and checks the device's invariants; a panic is a finding.

pub mod heap;

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use splitvisor_bus::{BusDevice, CountingInterrupt};
use virtio_queue::QueueT;

use crate::i8042::I8042;
use crate::serial::Serial;
use crate::virtio::block::{Block, BlockWorker, id_bytes};
use crate::virtio::testing::{DriverQueue, counting_interrupt, guest_memory, memory_disk, write_blk_header};
use crate::virtio::{MmioTransport, features, reg};

/// Guest memory of the virtio harnesses.
const RAM: u64 = 0x10_0000;
/// Buffers live in 64 slots of 4 KiB from here.
const BUFFERS: u64 = 0x4_0000;

/// Where a fuzzed descriptor points.
#[derive(Arbitrary, Debug)]
enum Target {
    /// Buffer slot `n % 64`, plus a small offset.
    Buffer(u8, u8),
    /// Anywhere at all: outside RAM, straddling its end, the rings themselves.
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct FuzzDescriptor {
    target: Target,
    /// Mostly small lengths; `huge` picks from the whole u32 range.
    len: u16,
    huge: Option<u32>,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
struct FuzzHeader {
    slot: u8,
    kind: u8,
    sector: u64,
}

#[derive(Arbitrary, Debug)]
struct BlkInput {
    queue_size_log2: u8,
    event_idx: bool,
    read_only: bool,
    descriptors: Vec<FuzzDescriptor>,
    headers: Vec<FuzzHeader>,
    heads: Vec<u16>,
    avail_idx: Option<u16>,
    used_event: u16,
}

impl FuzzDescriptor {
    fn address(&self) -> u64 {
        match self.target {
            Target::Buffer(slot, offset) => BUFFERS + u64::from(slot % 64) * 0x1000 + u64::from(offset),
            Target::Raw(addr) => addr,
        }
    }
}

/// virtio-blk request handling over descriptor chains a fuzzer builds in guest memory.
pub fn virtio_blk(data: &[u8]) {
    let Ok(input) = BlkInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let mem = guest_memory(RAM as usize);
    let size = 1u16 << (input.queue_size_log2 % 6);
    let mut driver = DriverQueue::new(&mem, 0x1000, size);
    for (index, d) in input.descriptors.iter().take(64).enumerate() {
        let len = d.huge.unwrap_or(u32::from(d.len));
        driver.write_descriptor(index as u16, d.address(), len, d.flags, d.next);
    }
    for header in input.headers.iter().take(16) {
        let kinds = [0, 1, 4, 8, u32::from(header.kind)];
        let at = BUFFERS + u64::from(header.slot % 64) * 0x1000;
        write_blk_header(&mem, at, kinds[usize::from(header.kind % 5)], header.sector % 256);
    }
    for head in input.heads.iter().take(usize::from(size)) {
        driver.publish(*head);
    }
    if let Some(idx) = input.avail_idx {
        driver.set_avail_idx(idx);
    }
    driver.set_used_event(input.used_event);

    let (disk, _) = memory_disk(128, input.read_only);
    let (interrupt, _) = counting_interrupt();
    let mut queue = driver.device_queue();
    queue.set_event_idx(input.event_idx);
    let mut worker = BlockWorker::new(mem.clone(), queue, interrupt, Arc::new(disk), id_bytes("fuzz"));
    // The fuzzer's descriptors may overwrite the rings and the device may write data into
    // them (a buffer can point anywhere), so the rings in guest memory are no oracle. What
    // must hold: every completion advances the device's used index once, and no pass takes
    // more than the queue holds.
    for _ in 0..2 {
        let before = worker.queue().next_used();
        if let Ok(completed) = worker.process_queue() {
            assert!(completed <= usize::from(size), "{completed} completions from a queue of {size}");
            assert_eq!(worker.queue().next_used().wrapping_sub(before), completed as u16);
        }
    }
}

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
    /// Programs a valid queue and brings the device up, so later operations reach the
    /// worker.
    BringUp,
    Publish {
        head: u16,
    },
}

/// The virtio-mmio register file under an arbitrary sequence of guest accesses.
pub fn virtio_mmio(data: &[u8]) {
    let Ok(ops) = Vec::<MmioOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let mem = guest_memory(RAM as usize);
    let (disk, _) = memory_disk(64, false);
    let line = Arc::new(CountingInterrupt::new());
    let Ok(mut transport) = MmioTransport::new(Block::new(disk, "fuzz"), mem.clone(), line) else {
        return;
    };
    let mut driver = DriverQueue::new(&mem, 0x1000, 16);
    for op in ops.into_iter().take(512) {
        match op {
            MmioOp::Read { offset, width } => {
                let mut buf = [0u8; 8];
                let width = [1, 2, 4, 8][usize::from(width % 4)];
                transport.read(u64::from(offset % 0x200), &mut buf[..width]);
            }
            MmioOp::Write { offset, width, value } => {
                let width = [1, 2, 4, 8][usize::from(width % 4)];
                transport.write(u64::from(offset % 0x200), &value.to_le_bytes()[..width]);
            }
            MmioOp::BringUp => bring_up(&mut transport, &driver),
            MmioOp::Publish { head } => {
                driver.write_descriptor(head % 16, BUFFERS, 16, 0, 0);
                driver.publish(head % 16);
                transport.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
            }
        }
    }
}

fn write32(transport: &mut MmioTransport<Block>, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

fn bring_up(transport: &mut MmioTransport<Block>, driver: &DriverQueue<'_>) {
    let (desc, avail, used) = driver.addresses();
    write32(transport, reg::STATUS, 0);
    write32(transport, reg::STATUS, 3);
    write32(transport, reg::DRIVER_FEATURES_SEL, 1);
    write32(transport, reg::DRIVER_FEATURES, (features::VERSION_1 >> 32) as u32);
    write32(transport, reg::STATUS, 11);
    write32(transport, reg::QUEUE_SEL, 0);
    write32(transport, reg::QUEUE_NUM, u32::from(driver.size()));
    write32(transport, reg::QUEUE_DESC_LOW, desc as u32);
    write32(transport, reg::QUEUE_DRIVER_LOW, avail as u32);
    write32(transport, reg::QUEUE_DEVICE_LOW, used as u32);
    write32(transport, reg::QUEUE_READY, 1);
    write32(transport, reg::STATUS, 15);
}

#[derive(Arbitrary, Debug)]
enum UartOp {
    Read(u8),
    Write(u8, u8),
    Input(Vec<u8>),
}

/// The 8250 UART under arbitrary register accesses and host input.
pub fn serial(data: &[u8]) {
    let Ok(ops) = Vec::<UartOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let irq = Arc::new(CountingInterrupt::new());
    let mut uart = Serial::new(irq, Vec::new());
    let mut sent = 0;
    for op in ops.into_iter().take(1024) {
        match op {
            UartOp::Read(offset) => {
                let mut byte = [0];
                uart.read(u64::from(offset % 8), &mut byte);
            }
            UartOp::Write(offset, value) => uart.write(u64::from(offset % 8), &[value]),
            UartOp::Input(bytes) => {
                let _ = uart.enqueue_input(&bytes);
            }
        }
        // Output only ever grows.
        assert!(uart.output().len() >= sent);
        sent = uart.output().len();
    }
}

#[derive(Arbitrary, Debug)]
enum KeyboardOp {
    Read(u8),
    Write(u8, u8),
}

/// The i8042 under arbitrary register accesses: it resets exactly on command 0xfe.
pub fn i8042(data: &[u8]) {
    let Ok(ops) = Vec::<KeyboardOp>::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let reset = Arc::new(CountingInterrupt::new());
    let mut kbd = I8042::new(reset.clone());
    let mut expected = 0;
    for op in ops.into_iter().take(1024) {
        match op {
            KeyboardOp::Read(offset) => {
                let mut byte = [0];
                kbd.read(u64::from(offset % 5), &mut byte);
            }
            KeyboardOp::Write(offset, value) => {
                let offset = offset % 5;
                kbd.write(u64::from(offset), &[value]);
                expected += u64::from(offset == 4 && value == 0xfe);
            }
        }
    }
    assert_eq!(reset.count(), expected);
}
