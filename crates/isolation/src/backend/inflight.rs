//! The inflight region of vhost-user's INFLIGHT_SHMFD protocol feature, split virtqueues.
//!
//! The backend allocates it (GET_INFLIGHT_FD) as a memfd; the frontend keeps the fd and hands
//! it to every later backend of the same device (SET_INFLIGHT_FD). The backend writes in it,
//! before and after each request, what it took and what it returned, so that the backend
//! that replaces a dead one knows exactly which requests are still owed to the driver.
//!
//! Layout of one queue's part (the vhost-user specification, "Inflight I/O tracking"):
//!
//! ```text
//! u64 features   u16 version   u16 desc_num   u16 last_batch_head   u16 used_idx
//! desc_num × { u8 inflight, u8 padding[5], u16 next, u64 counter }
//! ```
//!
//! The protocol for one request with head descriptor `h`:
//! 1. taken off the available ring: `desc[h].counter = ++counter; desc[h].inflight = 1`;
//! 2. before it goes in the used ring: `last_batch_head = h`;
//! 3. the used element and the used index are written in guest memory;
//! 4. `desc[h].inflight = 0; used_idx = <the used index just published>`.
//!
//! A successor that finds `used_idx` behind the ring's used index knows the process died
//! between 3 and 4, and clears `desc[last_batch_head]`; every descriptor still marked is
//! then re-executed, oldest counter first, and the available ring resumes after them.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// Version written in a queue's part once it is in use.
const VERSION: u16 = 1;
/// Bytes of a queue part's header.
const HEADER_SIZE: usize = 16;
/// Bytes of one descriptor's state.
const DESC_SIZE: usize = 16;
/// Each queue's part starts on this boundary.
const ALIGNMENT: usize = 64;

// Offsets in a queue's header.
const VERSION_OFFSET: usize = 8;
const DESC_NUM_OFFSET: usize = 10;
const LAST_BATCH_HEAD_OFFSET: usize = 12;
const USED_IDX_OFFSET: usize = 14;
// Offsets in a descriptor's state.
const INFLIGHT_OFFSET: usize = 0;
const COUNTER_OFFSET: usize = 8;

/// Errors allocating or mapping an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for a shape this backend cannot track.
    #[error("inflight region for {queues} queues of {size} descriptors is out of bounds")]
    BadShape {
        /// Queues asked for.
        queues: u16,
        /// Descriptors per queue.
        size: u16,
    },
    /// The memfd could not be created or sized.
    #[error("cannot allocate the inflight region: {0}")]
    Allocate(#[source] std::io::Error),
    /// The region could not be mapped.
    #[error("cannot map the inflight region: {0}")]
    Map(String),
}

/// Bytes of one queue's part for queues of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_SIZE + DESC_SIZE * usize::from(queue_size)).div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A mapped inflight region covering every queue of a device.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Allocates a zeroed region (GET_INFLIGHT_FD) and returns it with the fd to hand to
    /// the frontend.
    pub fn allocate(queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        let size = Self::checked_size(queues, queue_size)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"splitvisor-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Allocate(std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(InflightError::Allocate)?;
        let region = Self::map(&file, 0, size as u64, queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps a region the frontend handed over (SET_INFLIGHT_FD).
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let needed = Self::checked_size(queues, queue_size)?;
        let size = usize::try_from(size).map_err(|_| InflightError::BadShape { queues, size: queue_size })?;
        if size < needed {
            return Err(InflightError::Map(format!("{size} bytes given, {needed} needed")));
        }
        let file = file.try_clone().map_err(InflightError::Allocate)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), needed)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(Self { map, queues, queue_size })
    }

    fn checked_size(queues: u16, queue_size: u16) -> Result<usize, InflightError> {
        if queues == 0 || queue_size == 0 || queues > 64 || !queue_size.is_power_of_two() {
            return Err(InflightError::BadShape { queues, size: queue_size });
        }
        Ok(usize::from(queues) * queue_region_size(queue_size))
    }

    /// Number of queues covered.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The part of queue `index`, for a queue of `size` descriptors (at most the size the
    /// region was made for).
    pub fn queue(&self, index: u16, size: u16) -> Option<InflightQueue<'_>> {
        if index >= self.queues || size == 0 || size > self.queue_size {
            return None;
        }
        let stride = queue_region_size(self.queue_size);
        let slice = self.map.get_slice(usize::from(index) * stride, stride).ok()?;
        Some(InflightQueue { slice, size, counter: 0 })
    }
}

/// What a successor must do for one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to re-execute, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the available ring resumes: the ring's used index plus the requests owed.
    pub next_avail: u16,
    /// Where the next completion goes in the used ring.
    pub next_used: u16,
}

/// One queue's part of the region: the request journal of that queue.
#[derive(Debug)]
pub struct InflightQueue<'a> {
    slice: VolatileSlice<'a>,
    size: u16,
    counter: u64,
}

impl InflightQueue<'_> {
    fn load_u16(&self, offset: usize) -> u16 {
        self.slice.load(offset, Ordering::Acquire).unwrap_or(0)
    }

    fn store_u16(&self, offset: usize, value: u16) {
        let _ = self.slice.store(value, offset, Ordering::Release);
    }

    fn desc(head: u16) -> usize {
        HEADER_SIZE + DESC_SIZE * usize::from(head)
    }

    /// Reads what a predecessor left, given the used index now in the guest's used ring,
    /// and makes the region consistent with it. A region never used is initialised, and
    /// the queue starts at `base` (the frontend's SET_VRING_BASE).
    pub fn recover(&mut self, ring_used_idx: u16, base: u16) -> Recovery {
        if self.load_u16(VERSION_OFFSET) != VERSION || self.load_u16(DESC_NUM_OFFSET) != self.size {
            // Fresh (or made for another queue size): nothing owed.
            let _ = self.slice.write_slice(&vec![0u8; self.slice.len()], 0);
            self.store_u16(DESC_NUM_OFFSET, self.size);
            self.store_u16(USED_IDX_OFFSET, base);
            self.store_u16(VERSION_OFFSET, VERSION);
            self.counter = 0;
            return Recovery { resubmit: Vec::new(), next_avail: base, next_used: base };
        }
        if self.load_u16(USED_IDX_OFFSET) != ring_used_idx {
            // The predecessor published its last completion but died before clearing it.
            let head = self.load_u16(LAST_BATCH_HEAD_OFFSET);
            if head < self.size {
                let _ = self.slice.store(0u8, Self::desc(head) + INFLIGHT_OFFSET, Ordering::Release);
            }
            self.store_u16(USED_IDX_OFFSET, ring_used_idx);
        }
        let mut owed: Vec<(u64, u16)> = (0..self.size)
            .filter(|&head| {
                self.slice.load::<u8>(Self::desc(head) + INFLIGHT_OFFSET, Ordering::Acquire).unwrap_or(0) == 1
            })
            .map(|head| {
                let counter =
                    self.slice.load::<u64>(Self::desc(head) + COUNTER_OFFSET, Ordering::Acquire).unwrap_or(0);
                (counter, head)
            })
            .collect();
        owed.sort_unstable();
        self.counter = owed.last().map_or(0, |(counter, _)| *counter);
        Recovery {
            next_avail: ring_used_idx.wrapping_add(owed.len() as u16),
            next_used: ring_used_idx,
            resubmit: owed.into_iter().map(|(_, head)| head).collect(),
        }
    }
}

impl splitvisor_devices::virtio::block::RequestJournal for InflightQueue<'_> {
    fn fetched(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter += 1;
        let _ = self.slice.store(self.counter, Self::desc(head) + COUNTER_OFFSET, Ordering::Release);
        let _ = self.slice.store(1u8, Self::desc(head) + INFLIGHT_OFFSET, Ordering::Release);
    }

    fn completing(&mut self, head: u16) {
        self.store_u16(LAST_BATCH_HEAD_OFFSET, head);
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        if head < self.size {
            let _ = self.slice.store(0u8, Self::desc(head) + INFLIGHT_OFFSET, Ordering::Release);
        }
        self.store_u16(USED_IDX_OFFSET, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use splitvisor_devices::virtio::block::RequestJournal;

    use super::*;

    #[test]
    fn a_fresh_region_owes_nothing_and_a_crash_is_recovered_in_order() {
        let (region, file) = InflightRegion::allocate(1, 8).unwrap();
        let mut queue = region.queue(0, 8).unwrap();
        assert_eq!(queue.recover(0, 0), Recovery { resubmit: vec![], next_avail: 0, next_used: 0 });
        // Three requests taken (heads 5, 2, 7); 5 completed; 2 published but not cleared.
        queue.fetched(5);
        queue.fetched(2);
        queue.fetched(7);
        queue.completing(5);
        queue.completed(5, 1);
        queue.completing(2);
        let _ = queue;
        drop(region);

        // A successor maps the same memfd; the ring says 2 completions were published.
        let region = InflightRegion::map(&file, 0, file.metadata().unwrap().len(), 1, 8).unwrap();
        let mut queue = region.queue(0, 8).unwrap();
        assert_eq!(queue.recover(2, 0), Recovery { resubmit: vec![7], next_avail: 3, next_used: 2 });
        // New work continues the counter after the owed requests.
        queue.fetched(1);
        let mut third = region.queue(0, 8).unwrap();
        assert_eq!(third.recover(2, 0).resubmit, vec![7, 1]);
    }

    #[test]
    fn published_but_not_cleared_is_not_resubmitted() {
        let (region, _file) = InflightRegion::allocate(2, 16).unwrap();
        let mut queue = region.queue(1, 16).unwrap();
        queue.recover(100, 100);
        queue.fetched(3);
        queue.fetched(4);
        queue.completing(3);
        assert_eq!(
            region.queue(1, 16).unwrap().recover(100, 0).resubmit,
            vec![3, 4],
            "nothing published yet"
        );
        assert_eq!(
            region.queue(1, 16).unwrap().recover(101, 0),
            Recovery { resubmit: vec![4], next_avail: 102, next_used: 101 }
        );
    }

    #[test]
    fn out_of_order_completions_leave_exactly_the_rest_owed() {
        let (region, file) = InflightRegion::allocate(1, 16).unwrap();
        let mut queue = region.queue(0, 16).unwrap();
        queue.recover(0, 0);
        // Four requests in flight at once; they complete 9, 3 and then 12 is published
        // (used index 3) when the backend dies, before it clears the entry.
        for head in [3, 6, 9, 12] {
            queue.fetched(head);
        }
        queue.completing(9);
        queue.completed(9, 1);
        queue.completing(3);
        queue.completed(3, 2);
        queue.completing(12);
        let _ = queue;
        drop(region);
        let region = InflightRegion::map(&file, 0, file.metadata().unwrap().len(), 1, 16).unwrap();
        // Only 6 is owed; the ring resumes after the four fetched.
        assert_eq!(
            region.queue(0, 16).unwrap().recover(3, 0),
            Recovery { resubmit: vec![6], next_avail: 4, next_used: 3 }
        );
        // Had the death come before 12 was published, 6 and 12 would be owed, oldest first.
        let (region, _) = InflightRegion::allocate(1, 16).unwrap();
        let mut queue = region.queue(0, 16).unwrap();
        queue.recover(0, 0);
        for head in [3, 6, 9, 12] {
            queue.fetched(head);
        }
        queue.completing(9);
        queue.completed(9, 1);
        queue.completing(3);
        queue.completed(3, 2);
        queue.completing(12);
        assert_eq!(
            region.queue(0, 16).unwrap().recover(2, 0),
            Recovery { resubmit: vec![6, 12], next_avail: 4, next_used: 2 }
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(InflightRegion::allocate(0, 8).is_err());
        assert!(InflightRegion::allocate(1, 0).is_err());
        assert!(InflightRegion::allocate(1, 100).is_err());
        assert!(InflightRegion::allocate(1000, 8).is_err());
        let (region, _) = InflightRegion::allocate(1, 8).unwrap();
        assert!(region.queue(1, 8).is_none());
        assert!(region.queue(0, 16).is_none());
    }
}
