//! A virtio-net driver (virtio-mmio version 2, split virtqueues): one receive and one
//! transmit queue, 2 KiB buffers, the MAC from the device, checksum offload both ways.
//!
//! Checksums are what the emulated ring 0 of the build machines pays most for (one
//! instruction at a time over every byte), so the driver offloads them when the device
//! offers it: a frame to send carries `NEEDS_CSUM` with the pseudo-header sum in place,
//! and a received frame the device marks `NEEDS_CSUM` or `DATA_VALID` is not checked again.
//! Without the offload the driver computes and checks them itself, eight bytes per step.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::cpu::{self, InterruptFrame};
use crate::virtio::MmioDevice;
use crate::{alloc, apic};

mod reg {
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

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

const DESC_F_WRITE: u16 = 2;

const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;

/// Bytes of `virtio_net_hdr_v1`.
pub const HEADER: usize = 12;
/// Bytes of each buffer: a header and a 1500-byte-MTU frame fit.
pub const BUFFER: usize = 2048;
/// Buffers per queue.
const BUFFERS: u16 = 128;

/// The device's interrupt vector, and the one-shot timer's.
const NET_VECTOR: u8 = 0x2c;
const TIMER_VECTOR: u8 = 0x2d;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;

static NET_BASE: AtomicU64 = AtomicU64::new(0);
/// Interrupts taken from the device, and from the timer.
pub static NET_INTERRUPTS: AtomicU32 = AtomicU32::new(0);
pub static TIMER_INTERRUPTS: AtomicU32 = AtomicU32::new(0);

fn on_net_interrupt(_frame: &InterruptFrame) {
    let base = NET_BASE.load(Ordering::Acquire);
    if base != 0 {
        let status = read32(base, reg::INTERRUPT_STATUS);
        write32(base, reg::INTERRUPT_ACK, status);
    }
    NET_INTERRUPTS.fetch_add(1, Ordering::AcqRel);
}

fn on_timer(_frame: &InterruptFrame) {
    TIMER_INTERRUPTS.fetch_add(1, Ordering::AcqRel);
}

fn read32(base: u64, offset: usize) -> u32 {
    // SAFETY: the register window is identity-mapped (the kit maps the 32-bit MMIO window).
    unsafe { read_volatile((base as usize + offset) as *const u32) }
}

fn write32(base: u64, offset: usize, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { write_volatile((base as usize + offset) as *mut u32, value) }
}

fn lapic_write(reg: usize, value: u32) {
    // SAFETY: the local APIC register page is identity-mapped by the boot page tables.
    unsafe { ((LAPIC + reg) as *mut u32).write_volatile(value) }
}

/// Arms the local APIC timer to fire once after about `ns` nanoseconds (KVM's APIC timer
/// counts nanoseconds at divide-by-1).
fn arm_timer(ns: u64) {
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb);
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL, ns.clamp(1, u64::from(u32::MAX)) as u32);
}

#[repr(C)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue whose descriptor `i` always points at buffer `i`.
struct Ring {
    size: u16,
    desc: *mut Descriptor,
    avail: *mut u16,
    used: *mut u16,
    avail_idx: u16,
    last_used: u16,
    buffers: *mut u8,
}

impl Ring {
    fn new(size: u16, device_writes: bool) -> Option<Self> {
        let n = u64::from(size);
        let desc = alloc::alloc(16 * n, 4096)? as *mut Descriptor;
        let avail = alloc::alloc(6 + 2 * n, 4096)? as *mut u16;
        let used = alloc::alloc(6 + 8 * n, 4096)? as *mut u16;
        let buffers = alloc::alloc(BUFFER as u64 * n, 4096)?;
        // SAFETY: fresh allocations of the sizes above.
        unsafe {
            core::ptr::write_bytes(avail as *mut u8, 0, (6 + 2 * n) as usize);
            core::ptr::write_bytes(used as *mut u8, 0, (6 + 8 * n) as usize);
            for i in 0..usize::from(size) {
                let flags = if device_writes { DESC_F_WRITE } else { 0 };
                let addr = buffers as u64 + (i * BUFFER) as u64;
                write_volatile(desc.add(i), Descriptor { addr, len: BUFFER as u32, flags, next: 0 });
            }
        }
        Some(Self { size, desc, avail, used, avail_idx: 0, last_used: 0, buffers })
    }

    fn buffer(&self, index: u16) -> *mut u8 {
        // SAFETY: index < size: inside the buffer area.
        unsafe { self.buffers.add(usize::from(index % self.size) * BUFFER) }
    }

    fn set_len(&mut self, index: u16, len: u32) {
        // SAFETY: index < size, inside the table.
        unsafe { write_volatile(&raw mut (*self.desc.add(usize::from(index))).len, len) }
    }

    /// Offers buffer `head`; returns whether the device wants a notification.
    fn publish(&mut self, head: u16, event_idx: bool) -> bool {
        let old = self.avail_idx;
        let new = old.wrapping_add(1);
        // SAFETY: ring slot and index inside the available ring.
        unsafe {
            write_volatile(self.avail.add(2 + usize::from(old % self.size)), head);
            cpu::mfence();
            write_volatile(self.avail.add(1), new);
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

    fn has_used(&self) -> bool {
        // SAFETY: used->idx.
        unsafe { read_volatile(self.used.add(1)) != self.last_used }
    }

    fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        cpu::mfence();
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

/// A virtio-net device, ready to send and receive.
pub struct NetDevice {
    base: u64,
    rx: Ring,
    tx: Ring,
    tx_free: [u16; BUFFERS as usize],
    tx_free_count: usize,
    event_idx: bool,
    /// Frames are sent with `NEEDS_CSUM` instead of a computed checksum.
    pub tx_csum_offload: bool,
    guest_csum: bool,
    mergeable: bool,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The link's MTU.
    pub mtu: u16,
    /// Frames received, sent, and received frames dropped (bad checksum, too long).
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Received frames dropped.
    pub rx_dropped: u64,
    /// QueueNotify writes.
    pub notifications: u64,
}

/// A received frame, in a receive buffer until [`NetDevice::recycle`].
pub struct RxFrame {
    head: u16,
    ptr: *const u8,
    len: usize,
}

impl RxFrame {
    /// The Ethernet frame.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the device wrote `len` bytes into this buffer, which stays ours until it is
        // recycled.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl NetDevice {
    /// Brings up the virtio-net device `device`.
    pub fn init(device: MmioDevice) -> Result<Self, &'static str> {
        let base = device.base;
        if device.device_id() != 1 {
            return Err("not a virtio-net device");
        }
        write32(base, reg::STATUS, 0);
        write32(base, reg::STATUS, STATUS_ACKNOWLEDGE);
        write32(base, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(base, reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(read32(base, reg::DEVICE_FEATURES));
        write32(base, reg::DEVICE_FEATURES_SEL, 1);
        let offered = low | (u64::from(read32(base, reg::DEVICE_FEATURES)) << 32);
        if offered & F_VERSION_1 == 0 {
            return Err("device is not virtio 1.x");
        }
        let wanted = offered
            & (F_VERSION_1 | F_EVENT_IDX | F_MAC | F_MTU | F_STATUS | F_CSUM | F_GUEST_CSUM | F_MRG_RXBUF);
        write32(base, reg::DRIVER_FEATURES_SEL, 0);
        write32(base, reg::DRIVER_FEATURES, wanted as u32);
        write32(base, reg::DRIVER_FEATURES_SEL, 1);
        write32(base, reg::DRIVER_FEATURES, (wanted >> 32) as u32);
        write32(base, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if read32(base, reg::STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("device refused the features");
        }
        let mut rings = [None, None];
        for (index, ring) in rings.iter_mut().enumerate() {
            write32(base, reg::QUEUE_SEL, index as u32);
            let max = read32(base, reg::QUEUE_NUM_MAX);
            if max == 0 {
                return Err("a queue is missing");
            }
            let size = (max as u16).min(BUFFERS);
            if !size.is_power_of_two() {
                return Err("queue size is not a power of two");
            }
            let new = Ring::new(size, index == 0).ok_or("out of memory for the queues")?;
            write32(base, reg::QUEUE_NUM, u32::from(size));
            for (low, high, addr) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, new.desc as u64),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, new.avail as u64),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, new.used as u64),
            ] {
                write32(base, low, addr as u32);
                write32(base, high, (addr >> 32) as u32);
            }
            write32(base, reg::QUEUE_READY, 1);
            *ring = Some(new);
        }
        let [Some(rx), Some(tx)] = rings else { return Err("queues not set up") };
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            // SAFETY: the configuration space is identity-mapped MMIO; byte reads are allowed.
            *byte = unsafe { read_volatile((base as usize + reg::CONFIG + i) as *const u8) };
        }
        let mtu = if wanted & F_MTU != 0 { (read32(base, reg::CONFIG + 8) >> 16) as u16 } else { 1500 };

        NET_BASE.store(base, Ordering::Release);
        apic::mask_pic();
        apic::enable_local();
        cpu::set_handler(NET_VECTOR, on_net_interrupt);
        cpu::set_handler(TIMER_VECTOR, on_timer);
        apic::route_irq(device.irq, NET_VECTOR, apic::local_id());

        write32(base, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        if read32(base, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err("device needs reset");
        }
        let tx_size = tx.size;
        let mut net = Self {
            base,
            rx,
            tx,
            tx_free: [0; BUFFERS as usize],
            tx_free_count: 0,
            event_idx: wanted & F_EVENT_IDX != 0,
            tx_csum_offload: wanted & F_CSUM != 0,
            guest_csum: wanted & F_GUEST_CSUM != 0,
            mergeable: wanted & F_MRG_RXBUF != 0,
            mac: if wanted & F_MAC != 0 { mac } else { [0x52, 0x54, 0, 0x12, 0x34, 0x56] },
            mtu,
            rx_frames: 0,
            tx_frames: 0,
            rx_dropped: 0,
            notifications: 0,
        };
        for i in 0..tx_size {
            net.tx_free[usize::from(i)] = i;
        }
        net.tx_free_count = usize::from(tx_size);
        for i in 0..net.rx.size {
            net.rx.publish(i, net.event_idx);
        }
        net.notify(0);
        Ok(net)
    }

    fn notify(&mut self, queue: u32) {
        self.notifications += 1;
        write32(self.base, reg::QUEUE_NOTIFY, queue);
    }

    /// Whether the device asked for a reset (its backend broke or the queue did).
    pub fn needs_reset(&self) -> bool {
        read32(self.base, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET != 0
    }

    /// The next received frame, if any. Frames whose checksum is wrong are dropped here.
    pub fn receive(&mut self) -> Option<RxFrame> {
        loop {
            let (head, len) = self.rx.pop_used()?;
            let len = len as usize;
            let buffer = self.rx.buffer(head);
            // SAFETY: the device filled `len` bytes of this buffer.
            let bytes = unsafe { core::slice::from_raw_parts(buffer as *const u8, len.min(BUFFER)) };
            let buffers = if self.mergeable && len >= HEADER { u16::from_le_bytes([bytes[10], bytes[11]]) } else { 1 };
            if len < HEADER + 14 || len > BUFFER || buffers != 1 {
                // A frame larger than one buffer: more than this driver takes. Its other
                // buffers come back too.
                for _ in 1..buffers.min(self.rx.size) {
                    if let Some((extra, _)) = self.rx.pop_used() {
                        self.recycle_head(extra);
                    }
                }
                self.rx_dropped += 1;
                self.recycle_head(head);
                continue;
            }
            let flags = bytes[0];
            let trusted = self.guest_csum && flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0;
            if !trusted && !checksum::verify(&bytes[HEADER..]) {
                self.rx_dropped += 1;
                self.recycle_head(head);
                continue;
            }
            self.rx_frames += 1;
            // SAFETY: inside the buffer, after the header.
            return Some(RxFrame { head, ptr: unsafe { buffer.add(HEADER) }, len: len - HEADER });
        }
    }

    /// Gives a received frame's buffer back to the device.
    pub fn recycle(&mut self, frame: RxFrame) {
        self.recycle_head(frame.head);
    }

    fn recycle_head(&mut self, head: u16) {
        self.rx.set_len(head, BUFFER as u32);
        if self.rx.publish(head, self.event_idx) {
            self.notify(0);
        }
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim(&mut self) {
        while let Some((head, _)) = self.tx.pop_used() {
            if usize::from(head) < self.tx_free.len() && self.tx_free_count < usize::from(self.tx.size) {
                self.tx_free[self.tx_free_count] = head;
                self.tx_free_count += 1;
            }
        }
    }

    /// Whether a frame can be sent now.
    pub fn can_send(&mut self) -> bool {
        self.reclaim();
        self.tx_free_count > 0
    }

    /// Sends a frame of `len` bytes that `fill` writes; false if no buffer is free.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        self.reclaim();
        if self.tx_free_count == 0 || len + HEADER > BUFFER {
            return None;
        }
        self.tx_free_count -= 1;
        let head = self.tx_free[self.tx_free_count];
        let buffer = self.tx.buffer(head);
        // SAFETY: this buffer is free (not offered to the device) and BUFFER bytes long.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buffer, HEADER + len) };
        bytes[..HEADER].fill(0);
        let result = fill(&mut bytes[HEADER..]);
        checksum::finish(bytes, self.tx_csum_offload);
        self.tx.set_len(head, (HEADER + len) as u32);
        self.tx_frames += 1;
        if self.tx.publish(head, self.event_idx) {
            self.notify(1);
        }
        Some(result)
    }

    /// Halts until the device has something or about `max_ns` nanoseconds pass.
    pub fn wait(&mut self, max_ns: u64) {
        if self.event_idx {
            self.rx.arm_used_event();
        }
        if self.rx.has_used() {
            return;
        }
        arm_timer(max_ns);
        cpu::wait_for_interrupt();
        lapic_write(LAPIC_TIMER_INITIAL, 0);
    }
}

/// Internet checksums (RFC 1071), eight bytes per step.
pub mod checksum {
    /// The one's-complement sum of `bytes` (not yet folded or inverted), starting at `sum`.
    pub fn add(mut sum: u64, bytes: &[u8]) -> u64 {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let (value, carry) = sum.overflowing_add(u64::from_be_bytes(word));
            sum = value + u64::from(carry);
        }
        let rest = chunks.remainder();
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        let (value, carry) = sum.overflowing_add(u64::from_be_bytes(word));
        value + u64::from(carry)
    }

    /// Folds a sum to 16 bits.
    pub fn fold(mut sum: u64) -> u16 {
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// (IP header length, protocol, the IPv4 header) of an IPv4 frame carrying TCP or UDP.
    fn transport(frame: &[u8]) -> Option<(usize, u8)> {
        if frame.len() < 34 || frame[12] != 0x08 || frame[13] != 0x00 {
            return None;
        }
        let ihl = usize::from(frame[14] & 0xf) * 4;
        let protocol = frame[23];
        let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff;
        if ihl < 20 || frame.len() < 14 + ihl || fragment != 0 || (protocol != 6 && protocol != 17) {
            return None;
        }
        Some((ihl, protocol))
    }

    /// The pseudo-header sum and the transport segment of an IPv4 TCP/UDP frame.
    fn pseudo(frame: &[u8]) -> Option<(u64, usize, u8, usize)> {
        let (ihl, protocol) = transport(frame)?;
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let start = 14 + ihl;
        let end = (14 + total).min(frame.len());
        if end < start {
            return None;
        }
        let length = (end - start) as u64;
        let sum = add(0, &frame[26..34]) + u64::from(protocol) + length;
        Some((sum, start, protocol, end))
    }

    /// Whether a received frame's TCP/UDP checksum is right (other frames: yes; smoltcp
    /// checks the rest).
    pub fn verify(frame: &[u8]) -> bool {
        let Some((sum, start, protocol, end)) = pseudo(frame) else { return true };
        if protocol == 17 && frame.len() >= start + 8 && frame[start + 6] == 0 && frame[start + 7] == 0 {
            return true; // UDP without a checksum
        }
        fold(add(sum, &frame[start..end])) == 0xffff
    }

    /// Completes a frame to send (header first): with offload, the pseudo-header sum and
    /// NEEDS_CSUM; without, the whole checksum.
    pub fn finish(bytes: &mut [u8], offload: bool) {
        let (header, frame) = bytes.split_at_mut(super::HEADER);
        let Some((sum, start, protocol, end)) = pseudo(frame) else { return };
        let offset = if protocol == 6 { 16 } else { 6 };
        if frame.len() < start + offset + 2 {
            return;
        }
        frame[start + offset] = 0;
        frame[start + offset + 1] = 0;
        if offload {
            let partial = fold(sum);
            frame[start + offset..start + offset + 2].copy_from_slice(&partial.to_be_bytes());
            header[0] = super::HDR_F_NEEDS_CSUM;
            // virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
            header[6..8].copy_from_slice(&(start as u16).to_le_bytes());
            header[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
        } else {
            let mut checksum = !fold(add(sum, &frame[start..end]));
            if protocol == 17 && checksum == 0 {
                checksum = 0xffff;
            }
            frame[start + offset..start + offset + 2].copy_from_slice(&checksum.to_be_bytes());
        }
    }
}
