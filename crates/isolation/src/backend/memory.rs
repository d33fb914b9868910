//! Guest memory as a vhost-user frontend describes it (SET_MEM_TABLE): regions of shared
//! files, each at a guest-physical address and at an address in the frontend's process.

use std::fs::File;

use splitvisor_devices::virtio::GuestMemoryMmap;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// Most regions a memory table may have (vhost-user frontends send at most 8).
pub const MAX_REGIONS: usize = 32;

/// Errors mapping a memory table.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Regions and fds do not pair up, or too many regions.
    #[error("memory table of {regions} regions with {files} fds")]
    Shape {
        /// Regions described.
        regions: usize,
        /// Fds attached.
        files: usize,
    },
    /// A region could not be mapped or overlaps another.
    #[error("cannot map guest memory region at {gpa:#x} ({size:#x} bytes): {why}")]
    Map {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// What went wrong.
        why: String,
    },
}

/// Guest memory mapped in this process, and how the frontend's addresses translate to it.
#[derive(Clone, Debug)]
pub struct MappedMemory {
    /// The guest memory.
    pub memory: GuestMemoryMmap,
    /// (frontend address, guest-physical address, size) of each region.
    translations: Vec<(u64, u64, u64)>,
}

impl MappedMemory {
    /// Maps every region of a memory table.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemoryError> {
        if regions.len() != files.len() || regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(MemoryError::Shape { regions: regions.len(), files: files.len() });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut translations = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            let (gpa, size) = (region.guest_phys_addr, region.memory_size);
            let error = |why: String| MemoryError::Map { gpa, size, why };
            let len = usize::try_from(size).map_err(|_| error("too large".into()))?;
            let map = MmapRegion::from_file(FileOffset::new(file, region.mmap_offset), len)
                .map_err(|e| error(e.to_string()))?;
            let guest =
                GuestRegionMmap::new(map, GuestAddress(gpa)).ok_or_else(|| error("wraps around".into()))?;
            mapped.push(guest);
            translations.push((region.user_addr, gpa, size));
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map {
            gpa: regions[0].guest_phys_addr,
            size: regions[0].memory_size,
            why: e.to_string(),
        })?;
        Ok(Self { memory, translations })
    }

    /// The guest-physical address of the frontend's address `va` (ring addresses arrive
    /// as the frontend's own virtual addresses).
    pub fn to_guest(&self, va: u64) -> Option<GuestAddress> {
        self.translations.iter().find_map(|&(user, gpa, size)| {
            let offset = va.checked_sub(user)?;
            (offset < size).then(|| GuestAddress(gpa + offset))
        })
    }
}
