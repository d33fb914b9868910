//! The driver's side of a split virtqueue, in guest memory: for tests, fuzzing and the
//! malicious-guest suite, where a "driver" writes whatever descriptors it likes.
//!
//! ```
//! use splitvisor_devices::virtio::testing::{DriverQueue, guest_memory};
//!
//! let mem = guest_memory(0x10_0000);
//! let mut driver = DriverQueue::new(&mem, 0x1000, 16);
//! driver.write_descriptor(0, 0x8000, 16, 0, 0);
//! driver.publish(0);
//! let queue = driver.device_queue();
//! assert!(virtio_queue::QueueT::is_valid(&queue, &mem));
//! ```

use std::sync::Arc;

use splitvisor_bus::CountingInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemoryMmap, VirtioInterrupt};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Plain guest memory of `size` bytes at address 0 (not shareable; tests only).
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous test memory")
}

/// Guest memory of several regions, `(start, size)`, sorted and not overlapping: adjacent
/// regions and holes, as a vhost-user memory table has them.
pub fn guest_memory_regions(regions: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(start, size)| (GuestAddress(start), size)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("anonymous test memory regions")
}

/// A device interrupt that counts, with the counter.
pub fn counting_interrupt() -> (VirtioInterrupt, Arc<CountingInterrupt>) {
    let line = Arc::new(CountingInterrupt::new());
    (VirtioInterrupt::new(line.clone()), line)
}

/// A split virtqueue laid out in guest memory from `base`: descriptor table, available
/// ring, used ring.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    avail_idx: u16,
    start: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries at `base` (16-byte aligned).
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc_table = base;
        let avail_ring = desc_table + 16 * u64::from(size);
        // used_event after the ring, then round up to the used ring's 4-byte alignment.
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 3) & !3;
        Self { mem, size, desc_table, avail_ring, used_ring, avail_idx: 0, start: 0 }
    }

    /// Starts both rings' indices at `idx` (as after a long uptime: indices wrap at 2^16),
    /// in guest memory and in the device's view ([`DriverQueue::device_queue`]).
    pub fn start_at(&mut self, idx: u16) {
        self.start = idx;
        self.avail_idx = idx;
        self.set_avail_idx(idx);
        let _ = self.mem.write_obj(idx.to_le(), GuestAddress(self.used_ring + 2));
    }

    /// The available index the driver published last.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// First byte after the used ring: free memory for buffers.
    pub fn end(&self) -> u64 {
        self.used_ring + 6 + 8 * u64::from(self.size)
    }

    /// Writes descriptor `index` (indices beyond the table are written anyway: a driver
    /// may scribble anywhere).
    pub fn write_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc_table + 16 * u64::from(index);
        write_descriptor_at(self.mem, at, addr, len, flags, next);
    }

    /// Offers the chain starting at `head`.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Sets the available index to anything, as a misbehaving driver might.
    pub fn set_avail_idx(&self, idx: u16) {
        let _ = self.mem.write_obj(idx.to_le(), GuestAddress(self.avail_ring + 2));
    }

    /// Sets `used_event` (EVENT_IDX): interrupt me when the used index passes it.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        let _ = self.mem.write_obj(idx.to_le(), GuestAddress(at));
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj::<u16>(GuestAddress(self.used_ring + 2)).map(u16::from_le).unwrap_or(0)
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap_or(u32::MAX);
        (id, len)
    }

    /// The device's view: a ready queue at these addresses.
    pub fn device_queue(&self) -> Queue {
        let mut queue = Queue::new(self.size.next_power_of_two().max(1)).expect("a power of two");
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc_table as u32), Some((self.desc_table >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail_ring as u32), Some((self.avail_ring >> 32) as u32));
        queue.set_used_ring_address(Some(self.used_ring as u32), Some((self.used_ring >> 32) as u32));
        queue.set_next_avail(self.start);
        queue.set_next_used(self.start);
        queue.set_ready(true);
        queue
    }

    /// The ring addresses: (descriptor table, available ring, used ring).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc_table, self.avail_ring, self.used_ring)
    }
}

/// Writes one 16-byte descriptor at `at` (in a table or an indirect table).
pub fn write_descriptor_at(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// Writes a virtio-blk request header (type, sector) at `at`.
pub fn write_blk_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// A disk image in memory (a memfd) of `sectors` sectors, and a handle to inspect it.
pub fn memory_disk(sectors: u64, read_only: bool) -> (super::block::DiskImage, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"splitvisor-test-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(sectors * super::block::SECTOR_SIZE).expect("size the memfd");
    let inspect = file.try_clone().expect("duplicate the memfd");
    let disk = super::block::DiskImage::from_file(file, read_only, "test memfd").expect("a memfd is a disk");
    (disk, inspect)
}
