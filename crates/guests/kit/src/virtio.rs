//! A virtio-mmio (version 2) driver with a split virtqueue, and a virtio-blk driver on it.
//!
//! Devices are found on the command line, `virtio_mmio.device=<size>@<addr>:<irq>`, the
//! convention of Linux, QEMU microvm and Firecracker. Completions are interrupt driven:
//! the device's IRQ is routed through the IOAPIC; the handler acknowledges it and the
//! waiter, halted in `sti; hlt`, wakes and reads the used ring. EVENT_IDX is used when
//! offered, so neither side is notified more than needed.
//!
//! A [`BlockDevice`] can be driven from ring 3 ([`crate::user`]) once
//! [`BlockDevice::use_from_user_mode`] has mapped its registers there; it then polls the used
//! ring for a while ([`BlockDevice::set_poll_ticks`]) before it asks ring 0 to wait for the
//! interrupt.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{self, InterruptFrame};
use crate::{alloc, apic, start_info};

/// Register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG: usize = 0x100;
}

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const F_BLK_SIZE_MAX: u64 = 1 << 1;
const F_BLK_SEG_MAX: u64 = 1 << 2;
const F_BLK_RO: u64 = 1 << 5;
const F_BLK_BLK_SIZE: u64 = 1 << 6;
const F_BLK_FLUSH: u64 = 1 << 9;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// First interrupt vector for virtio devices (one per device).
const FIRST_VECTOR: u8 = 0x30;

/// A virtio-mmio device named on the command line.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    /// Base (physical) address of its registers.
    pub base: u64,
    /// Its interrupt line (a GSI / IOAPIC pin).
    pub irq: u8,
    /// Where this driver reaches the registers: `base` (identity-mapped, ring 0) or their
    /// page in the user MMIO window.
    regs: u64,
}

impl MmioDevice {
    /// The device whose registers start at `base`, raising `irq`.
    pub fn new(base: u64, irq: u8) -> Self {
        Self { base, irq, regs: base }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `regs` is the identity-mapped register window (the kit maps the 32-bit MMIO
        // window) or its mapping in the user MMIO window.
        unsafe { read_volatile((self.regs as usize + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.regs as usize + offset) as *mut u32, value) }
    }

    /// The device ID (0 if there is no virtio device there).
    pub fn device_id(&self) -> u32 {
        if self.read(reg::MAGIC) != 0x7472_6976 || self.read(reg::VERSION) != 2 {
            return 0;
        }
        self.read(reg::DEVICE_ID)
    }
}

/// Parses a number: decimal, `0x` hex, with an optional K/M/G suffix.
fn parse_number(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => start_info::parse_u64(digits)?,
    };
    value.checked_mul(1 << shift)
}

/// The virtio-blk devices on the command line, in order (other devices, and the empty
/// transports QEMU's microvm lists, are skipped).
pub fn block_devices(cmdline: &'static str) -> impl Iterator<Item = MmioDevice> {
    devices(cmdline).filter(|device| device.device_id() == 2)
}

/// The virtio-mmio devices on the command line, in order.
pub fn devices(cmdline: &'static str) -> impl Iterator<Item = MmioDevice> {
    cmdline.split(' ').filter_map(|word| {
        let spec = word.strip_prefix("virtio_mmio.device=")?;
        let (_size, rest) = spec.split_once('@')?;
        let (addr, irq) = rest.split_once(':')?;
        let base = parse_number(addr)?;
        let irq = u8::try_from(parse_number(irq)?).ok()?;
        Some(MmioDevice::new(base, irq))
    })
}

#[repr(C)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Bytes before the available ring in its allocation, in the ring's first cache line: a
/// request header there travels to the device with the available index.
const DRIVER_LEAD_IN: u64 = 16;
/// Bytes before the used ring in its allocation (the ring is 4-byte aligned), in the ring's
/// first cache line: a status byte there comes back with the used index.
const DEVICE_LEAD_IN: u64 = 4;

/// A split virtqueue in memory from the bump allocator.
///
/// The available and used rings each start a few bytes into a page, and the bytes before
/// them (the *lead-ins*) are free for the driver's buffers: one request's header and status
/// byte placed there share a cache line with the available and used index. A request then
/// moves two lines between the driver's and the device's CPUs (the available ring's there,
/// the used ring's back) instead of four (blk-bench's rand-read-4K-qd1, which keeps that
/// one request in flight: 0.74 of host fio's rate before, 0.77 after, medians of 8
/// alternating rounds).
struct VirtQueue {
    size: u16,
    desc: *mut Descriptor,
    avail: *mut u16,
    used: *mut u16,
    /// [`DRIVER_LEAD_IN`] bytes before `avail`, device-readable.
    driver_lead_in: *mut u8,
    /// [`DEVICE_LEAD_IN`] bytes before `used`, device-writable.
    device_lead_in: *mut u8,
    avail_idx: u16,
    last_used: u16,
}

impl VirtQueue {
    fn new(size: u16) -> Option<Self> {
        let n = u64::from(size);
        let desc = alloc::alloc(16 * n, 4096)? as *mut Descriptor;
        let driver_lead_in = alloc::alloc(DRIVER_LEAD_IN + 6 + 2 * n, 4096)?;
        let device_lead_in = alloc::alloc(DEVICE_LEAD_IN + 6 + 8 * n, 4096)?;
        // SAFETY: fresh allocations of the sizes above; the rings start after the lead-ins
        // (2- and 4-byte aligned, as virtio 1.x wants).
        let (avail, used) = unsafe {
            core::ptr::write_bytes(desc as *mut u8, 0, (16 * n) as usize);
            core::ptr::write_bytes(driver_lead_in, 0, (DRIVER_LEAD_IN + 6 + 2 * n) as usize);
            core::ptr::write_bytes(device_lead_in, 0, (DEVICE_LEAD_IN + 6 + 8 * n) as usize);
            (
                driver_lead_in.add(DRIVER_LEAD_IN as usize) as *mut u16,
                device_lead_in.add(DEVICE_LEAD_IN as usize) as *mut u16,
            )
        };
        Some(Self { size, desc, avail, used, driver_lead_in, device_lead_in, avail_idx: 0, last_used: 0 })
    }

    /// Sets descriptor `index`, leaving it alone if it already says that. A slot reused for
    /// the same buffers (as a benchmark's are) then leaves the line in the device CPU's cache:
    /// storing even an unchanged value takes the line from there, and the device's next read
    /// of it waits for its return.
    fn set_descriptor(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: index < size, inside the table.
        unsafe {
            let entry = self.desc.add(usize::from(index));
            let current = read_volatile(entry);
            if (current.addr, current.len, current.flags, current.next) != (addr, len, flags, next) {
                write_volatile(entry, Descriptor { addr, len, flags, next });
            }
        }
    }

    /// Offers the chain at `head`; returns whether the device wants a notification.
    fn publish(&mut self, head: u16, event_idx: bool) -> bool {
        let old = self.avail_idx;
        let new = old.wrapping_add(1);
        // SAFETY: ring slot and index inside the available ring.
        unsafe {
            // Unchanged since the ring last passed (the same slot in the same place, as at
            // one request in flight): left alone, for the reason `set_descriptor` gives.
            let entry = self.avail.add(2 + usize::from(old % self.size));
            if read_volatile(entry) != head {
                write_volatile(entry, head);
            }
            // The entry before the index: store-to-store order, which x86 keeps anyway (a
            // compiler barrier, as Linux's virtio_wmb). A full fence here waited for the
            // entry's cache line to come back from the device's CPU.
            core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
            write_volatile(self.avail.add(1), new);
            // The index before the notification check below reads: store-to-load order
            // needs the full fence.
            cpu::mfence();
        }
        self.avail_idx = new;
        if !event_idx {
            // SAFETY: used->flags; bit 0 is VIRTQ_USED_F_NO_NOTIFY.
            return unsafe { read_volatile(self.used) } & 1 == 0;
        }
        // SAFETY: avail_event sits after the used ring's entries.
        let avail_event = unsafe { read_volatile(self.used.add(2 + 4 * usize::from(self.size))) };
        new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Whether the device has returned a used entry not popped yet.
    fn has_used(&self) -> bool {
        // SAFETY: used->idx.
        unsafe { read_volatile(self.used.add(1)) != self.last_used }
    }

    /// The next used entry, if the device has returned one: (head, bytes written).
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used->idx.
        let used_idx = unsafe { read_volatile(self.used.add(1)) };
        if used_idx == self.last_used {
            return None;
        }
        // The entry after the index: load-to-load order (a compiler barrier on x86).
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used->ring[slot] is 8 bytes (id: u32, len: u32) at u16 offset 2 + 4 * slot.
        let (id, len) = unsafe {
            let entry = self.used.add(2 + 4 * slot) as *const u32;
            (read_volatile(entry), read_volatile(entry.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Asks for an interrupt when the device uses the next buffer (EVENT_IDX).
    fn arm_used_event(&mut self) {
        // SAFETY: used_event sits after the available ring's entries.
        unsafe { write_volatile(self.avail.add(2 + usize::from(self.size)), self.last_used) };
        cpu::mfence();
    }
}

/// Interrupt counts per device slot (vector - FIRST_VECTOR).
static INTERRUPTS: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
/// Register bases per device slot, for the handlers.
static BASES: [core::sync::atomic::AtomicU64; 8] = [const { core::sync::atomic::AtomicU64::new(0) }; 8];

fn on_interrupt(frame: &InterruptFrame) {
    let slot = (frame.vector as usize).wrapping_sub(usize::from(FIRST_VECTOR));
    let Some(base) = BASES.get(slot).map(|b| b.load(Ordering::Acquire)) else {
        return;
    };
    if base == 0 {
        return;
    }
    let device = MmioDevice::new(base, 0);
    let status = device.read(reg::INTERRUPT_STATUS);
    device.write(reg::INTERRUPT_ACK, status);
    INTERRUPTS[slot].fetch_add(1, Ordering::AcqRel);
}

/// Request types and status values of virtio-blk.
pub mod blk {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Get the device ID.
    pub const GET_ID: u32 = 8;
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Not supported.
    pub const UNSUPP: u8 = 2;
}

/// The shortest poll [`BlockDevice::wait`] adapts down to (about a microsecond), so that a
/// completion found there can double it again.
const MIN_POLL_TICKS: u64 = 2048;

/// Requests a [`BlockDevice`] keeps in flight at most.
pub const MAX_IN_FLIGHT: usize = 16;

#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// The device-visible memory of one request slot: its header, then its status byte, in
/// one cache line (as Linux keeps them in one request structure). The device reads the one
/// and writes the other, so from another CPU a request moves one line there and back, not
/// two. Slot 0 has its header and status in the queue's lead-ins instead (see
/// [`VirtQueue`]): a driver at one request in flight, which always takes slot 0, then moves
/// no line beyond the rings' own.
#[repr(C, align(32))]
struct RequestBlock {
    header: RequestHeader,
    status: u8,
}

/// A virtio-blk device, ready for requests.
pub struct BlockDevice {
    device: MmioDevice,
    queue: VirtQueue,
    event_idx: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The device refuses writes.
    pub read_only: bool,
    /// The device takes FLUSH requests (without it, its writes are durable when acknowledged).
    pub flush: bool,
    /// Per request slot: its header and status byte (device-visible memory).
    requests: *mut RequestBlock,
    in_flight: [bool; MAX_IN_FLIGHT],
    /// Notifications (QueueNotify writes) sent.
    pub notifications: u64,
    slot_index: usize,
    /// Most TSC ticks [`Self::wait`] polls the used ring before it waits for an interrupt.
    poll_ticks: u64,
    /// What it polls now: halved after a poll that found nothing, doubled (up to
    /// `poll_ticks`) after one that found a completion or a halt that lasted less than
    /// `poll_ticks`, as KVM's halt polling adapts.
    poll_now: u64,
    /// Used entries that named no request in flight.
    stray_completions: u64,
    /// [`Self::wait`] fails when no request completes for this many TSC ticks (0: never).
    timeout_ticks: u64,
    /// ... or when a completion stays visible this long without the device's interrupt.
    grace_ticks: u64,
}

impl BlockDevice {
    /// Brings up the virtio-blk device `device` as interrupt slot `slot` (0..8).
    pub fn init(device: MmioDevice, slot: usize) -> Result<Self, &'static str> {
        if slot >= BASES.len() {
            return Err("too many virtio devices");
        }
        if device.device_id() != 2 {
            return Err("not a virtio-blk device");
        }
        device.write(reg::STATUS, 0);
        device.write(reg::STATUS, STATUS_ACKNOWLEDGE);
        device.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        device.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(device.read(reg::DEVICE_FEATURES));
        device.write(reg::DEVICE_FEATURES_SEL, 1);
        let offered = low | (u64::from(device.read(reg::DEVICE_FEATURES)) << 32);
        if offered & F_VERSION_1 == 0 {
            return Err("device is not virtio 1.x");
        }
        let wanted = offered & (F_VERSION_1 | F_EVENT_IDX | F_BLK_RO | F_BLK_BLK_SIZE | F_BLK_FLUSH | F_BLK_SEG_MAX | F_BLK_SIZE_MAX);
        device.write(reg::DRIVER_FEATURES_SEL, 0);
        device.write(reg::DRIVER_FEATURES, wanted as u32);
        device.write(reg::DRIVER_FEATURES_SEL, 1);
        device.write(reg::DRIVER_FEATURES, (wanted >> 32) as u32);
        device.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if device.read(reg::STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("device refused the features");
        }

        device.write(reg::QUEUE_SEL, 0);
        let max = device.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue 0 is not available");
        }
        // Three descriptors per request.
        let size = (max as u16).min(64);
        if (size as usize) < 3 * MAX_IN_FLIGHT {
            return Err("queue too small");
        }
        let queue = VirtQueue::new(size).ok_or("out of memory for the queue")?;
        device.write(reg::QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, queue.desc as u64),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, queue.avail as u64),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, queue.used as u64),
        ] {
            device.write(low, addr as u32);
            device.write(high, (addr >> 32) as u32);
        }
        device.write(reg::QUEUE_READY, 1);

        let requests = alloc::alloc((size_of::<RequestBlock>() * MAX_IN_FLIGHT) as u64, 64)
            .ok_or("out of memory")? as *mut RequestBlock;

        BASES[slot].store(device.base, Ordering::Release);
        let vector = FIRST_VECTOR + slot as u8;
        cpu::set_handler(vector, on_interrupt);
        apic::route_irq(device.irq, vector, apic::local_id());

        let capacity = u64::from(device.read(reg::CONFIG)) | (u64::from(device.read(reg::CONFIG + 4)) << 32);
        device.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        if device.read(reg::STATUS) & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err("device needs reset");
        }
        let mut blk = Self {
            device,
            queue,
            event_idx: wanted & F_EVENT_IDX != 0,
            capacity,
            read_only: wanted & F_BLK_RO != 0,
            flush: wanted & F_BLK_FLUSH != 0,
            requests,
            in_flight: [false; MAX_IN_FLIGHT],
            notifications: 0,
            slot_index: slot,
            poll_ticks: 0,
            poll_now: 0,
            stray_completions: 0,
            timeout_ticks: 0,
            grace_ticks: 0,
        };
        if blk.event_idx {
            blk.queue.arm_used_event();
        }
        Ok(blk)
    }

    /// Behaves like a broken driver: publishes an available index far past the queue size
    /// and rings the doorbell. The device must ask for a reset.
    pub fn break_queue(&mut self) {
        let bogus = self.queue.avail_idx.wrapping_add(3 * self.queue.size);
        // SAFETY: avail->idx.
        unsafe { write_volatile(self.queue.avail.add(1), bogus) };
        cpu::mfence();
        self.device.write(reg::QUEUE_NOTIFY, 0);
    }

    /// Maps the device's registers into the user MMIO window ([`crate::user::map_mmio`]), so
    /// that this driver works from ring 3 (and still from ring 0). Call it in ring 0.
    pub fn use_from_user_mode(&mut self) -> Result<(), &'static str> {
        self.device.regs = crate::user::map_mmio(self.device.base)?;
        Ok(())
    }

    /// Makes [`Self::wait`] poll the used ring for up to `ticks` TSC ticks before it waits
    /// for an interrupt (0, the default, polls once). Polling pays in ring 3, which runs
    /// natively, where an interrupt costs a trip through emulated ring 0; but a vCPU that
    /// polls takes a host CPU from the device. So the time adapts: a poll that ends without a
    /// completion halves the next one; a poll that finds one, or an interrupt that comes
    /// within `ticks` of the halt, doubles it again, up to `ticks`.
    pub fn set_poll_ticks(&mut self, ticks: u64) {
        self.poll_ticks = ticks;
        self.poll_now = ticks;
    }

    /// Bounds [`Self::wait`] (by default it waits for as long as it takes): it fails if no
    /// request completes for `timeout` TSC ticks, and if a completion stays in the used ring
    /// for `grace` ticks after the driver asked to be interrupted for it without the device's
    /// interrupt arriving (a lost interrupt: a driver that only halts would hang). While it
    /// waits it wakes every `grace / 2` ticks (the local APIC timer) to look.
    pub fn set_time_limits(&mut self, timeout: u64, grace: u64) {
        self.timeout_ticks = timeout;
        self.grace_ticks = grace.max(2);
    }

    /// Whether the device asks for a reset (DEVICE_NEEDS_RESET in its status): its backend
    /// died, or it found the queue broken. A register read: an exit to the VMM.
    pub fn needs_reset(&self) -> bool {
        self.device.read(reg::STATUS) & STATUS_DEVICE_NEEDS_RESET != 0
    }

    /// Used entries the device returned for no request in flight: a duplicate completion or
    /// a buffer this driver never offered.
    pub fn stray_completions(&self) -> u64 {
        self.stray_completions
    }

    /// Interrupts this device has raised.
    pub fn interrupts(&self) -> u32 {
        INTERRUPTS[self.slot_index].load(Ordering::Acquire)
    }

    /// Where request slot `slot` (< MAX_IN_FLIGHT) keeps its header and status byte.
    fn request_memory(&self, slot: usize) -> (*mut RequestHeader, *mut u8) {
        if slot == 0 {
            // RequestHeader is 16 bytes: it fills the driver lead-in; the status takes the
            // first byte of the device's.
            return (self.queue.driver_lead_in as *mut RequestHeader, self.queue.device_lead_in);
        }
        // SAFETY: slot < MAX_IN_FLIGHT: inside the allocation.
        let block = unsafe { self.requests.add(slot) };
        // SAFETY: fields of that block.
        unsafe { (&raw mut (*block).header, &raw mut (*block).status) }
    }

    /// A free request slot (the lowest).
    pub fn free_slot(&self) -> Option<usize> {
        self.in_flight.iter().position(|busy| !busy)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|busy| **busy).count()
    }

    /// Submits request `kind` on `sector` with the buffer `buf` of `len` bytes (none for
    /// FLUSH) in slot `slot`.
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, buf: *mut u8, len: u32) {
        let head = (3 * slot) as u16;
        let (header, status) = self.request_memory(slot);
        // SAFETY: slot < MAX_IN_FLIGHT; header and status memory belong to this slot.
        unsafe {
            write_volatile(header, RequestHeader { kind, reserved: 0, sector });
            write_volatile(status, 0xff);
        }
        let (header, status) = (header as u64, status as u64);
        let device_writes = if kind == blk::IN || kind == blk::GET_ID { DESC_F_WRITE } else { 0 };
        if len > 0 {
            self.queue.set_descriptor(head, header, 16, DESC_F_NEXT, head + 1);
            self.queue.set_descriptor(head + 1, buf as u64, len, DESC_F_NEXT | device_writes, head + 2);
        } else {
            self.queue.set_descriptor(head, header, 16, DESC_F_NEXT, head + 2);
        }
        self.queue.set_descriptor(head + 2, status, 1, DESC_F_WRITE, 0);
        self.in_flight[slot] = true;
        if self.queue.publish(head, self.event_idx) {
            self.notifications += 1;
            self.device.write(reg::QUEUE_NOTIFY, 0);
        }
    }

    /// Takes one completed request: (slot, status byte).
    ///
    /// A used entry that names no request in flight (a duplicate completion, or a buffer the
    /// driver never offered) is dropped and counted in [`Self::stray_completions`]; [`Self::wait`]
    /// fails on it.
    pub fn poll(&mut self) -> Option<(usize, u8)> {
        let (head, _len) = self.queue.pop_used()?;
        let slot = usize::from(head) / 3;
        if head % 3 != 0 || slot >= MAX_IN_FLIGHT || !self.in_flight[slot] {
            self.stray_completions += 1;
            return None;
        }
        self.in_flight[slot] = false;
        // SAFETY: the device wrote the status byte of this slot before returning it.
        let status = unsafe { read_volatile(self.request_memory(slot).1) };
        Some((slot, status))
    }

    /// Waits for one completion: polls the used ring (see [`Self::set_poll_ticks`]), then
    /// halts until the device interrupts. Fails if the device signals that it needs a reset
    /// (its backend died, or it found the queue broken), or if it returned a buffer that was
    /// not in flight. Works in ring 0 and ring 3.
    pub fn wait(&mut self) -> Result<(usize, u8), &'static str> {
        loop {
            if self.stray_completions != 0 {
                return Err("the device completed a request that was not in flight");
            }
            if let Some(done) = self.poll() {
                return Ok(done);
            }
            if self.poll_ticks > 0 {
                let deadline = crate::rdtsc().saturating_add(self.poll_now);
                while crate::rdtsc() < deadline {
                    core::hint::spin_loop();
                    if let Some(done) = self.poll() {
                        self.poll_now = self.poll_now.saturating_mul(2).clamp(MIN_POLL_TICKS, self.poll_ticks);
                        return Ok(done);
                    }
                }
                self.poll_now = (self.poll_now / 2).max(MIN_POLL_TICKS.min(self.poll_ticks));
            }
            // Taken before the last look at the ring: an interrupt for a completion that
            // lands after that look makes the wait below return at once.
            let seen = cpu::interrupts_handled();
            if self.event_idx {
                self.queue.arm_used_event();
            }
            // The device may have used a buffer before it saw the new used_event.
            if let Some(done) = self.poll() {
                return Ok(done);
            }
            if self.stray_completions != 0 {
                return Err("the device completed a request that was not in flight");
            }
            if self.needs_reset() {
                return Err("device needs reset");
            }
            let halted = crate::rdtsc();
            if self.timeout_ticks == 0 {
                cpu::wait_for_interrupt_since(seen);
            } else {
                self.wait_bounded(seen)?;
            }
            // A completion that came within the longest poll would have been found by a
            // longer one: poll longer next time (KVM's rule for halt polling). Without it a
            // few slow requests shrink the poll to where no completion is ever found in it,
            // and every later request waits for an interrupt.
            if self.poll_ticks > 0 && crate::rdtsc().saturating_sub(halted) <= self.poll_ticks {
                self.poll_now = self.poll_now.saturating_mul(2).max(MIN_POLL_TICKS).min(self.poll_ticks);
            }
        }
    }

    /// Halts until the device interrupts (then returns), within the limits of
    /// [`Self::set_time_limits`], waking on the timer to check them.
    fn wait_bounded(&mut self, mut seen: u64) -> Result<(), &'static str> {
        let device_interrupts = self.interrupts();
        let start = crate::rdtsc();
        let mut unannounced_since = None;
        loop {
            cpu::wait_for_interrupt_since_or_timeout(seen, self.grace_ticks / 2);
            if self.interrupts() != device_interrupts {
                return Ok(());
            }
            // Woken by the timer (or another device): look at the ring and the clock.
            let now = crate::rdtsc();
            if self.queue.has_used() {
                // Announced by an interrupt that is on its way, or by none at all.
                let since = *unannounced_since.get_or_insert(now);
                if now - since > self.grace_ticks {
                    return Err("the device completed a request but raised no interrupt");
                }
            } else if now - start > self.timeout_ticks {
                return Err("no request completed within the time limit");
            }
            if self.needs_reset() {
                return Err("device needs reset");
            }
            seen = cpu::interrupts_handled();
        }
    }

    /// One request, synchronously: returns its status byte.
    pub fn request(&mut self, kind: u32, sector: u64, buf: *mut u8, len: u32) -> Result<u8, &'static str> {
        let slot = self.free_slot().unwrap_or(0);
        self.submit(slot, kind, sector, buf, len);
        loop {
            let (done, status) = self.wait()?;
            if done == slot {
                return Ok(status);
            }
        }
    }
}
