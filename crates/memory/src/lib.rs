//! Guest RAM for splitvisor.
//!
//! RAM is one memfd, mapped shared, so that a driver partition in another process can map
//! the very same pages (it is handed the fd). The mapping is sparse: nothing is touched up
//! front, so a 64 GiB guest costs only what it uses. RAM is split around the 32-bit MMIO
//! window (see [`layout`]) into at most two regions, each a KVM memory slot.
//!
//! ```
//! use splitvisor_memory::{E820Kind, GuestRam, layout};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let ram = GuestRam::new(64 << 20).unwrap();
//! ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//! let e820 = ram.e820();
//! assert!(e820.iter().all(|e| e.kind == E820Kind::Ram));
//! assert_eq!(e820.last().unwrap().end(), 64 << 20);
//! # let _ = layout::HIMEM_START;
//! ```

pub mod layout;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Guest memory as the rest of splitvisor sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors of guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The size is below [`layout::MIN_RAM_SIZE`].
    #[error("guest memory of {size} bytes is too small: at least {min} bytes (16 MiB) are needed")]
    TooSmall {
        /// Requested bytes.
        size: u64,
        /// Smallest accepted.
        min: u64,
    },
    /// The size is above [`layout::MAX_RAM_SIZE`].
    #[error("guest memory of {size} bytes is too large: at most {max} bytes (1 TiB) are supported")]
    TooLarge {
        /// Requested bytes.
        size: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The size is not a whole number of 4 KiB pages.
    #[error("guest memory of {0} bytes is not a multiple of the 4 KiB page size")]
    NotPageAligned(u64),
    /// memfd_create failed.
    #[error("cannot create the guest memory file: {0}")]
    CreateMemfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    SizeMemfd {
        /// Requested bytes.
        size: u64,
        /// The error from ftruncate.
        #[source]
        source: std::io::Error,
    },
    /// Sealing the memfd's size failed.
    #[error("cannot seal the size of the guest memory file: {0}")]
    SealMemfd(#[source] std::io::Error),
    /// Mapping a region failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Bytes of the region.
        size: u64,
        /// The error from mmap.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Assembling the regions failed.
    #[error("cannot assemble the guest memory regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {guest_addr:#x}: {source}")]
    Register {
        /// The slot.
        slot: u32,
        /// Guest-physical start of the region.
        guest_addr: u64,
        /// The error from KVM_SET_USER_MEMORY_REGION.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of guest RAM operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The kind of an e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not for the guest's allocator.
    Reserved = 2,
}

/// One e820 (and PVH memory map) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// A contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of its first byte in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the 32-bit MMIO window.
pub fn ram_regions(size: u64) -> Result<Vec<RamRegion>> {
    if size < layout::MIN_RAM_SIZE {
        return Err(Error::TooSmall { size, min: layout::MIN_RAM_SIZE });
    }
    if size > layout::MAX_RAM_SIZE {
        return Err(Error::TooLarge { size, max: layout::MAX_RAM_SIZE });
    }
    if size % 4096 != 0 {
        return Err(Error::NotPageAligned(size));
    }
    let low = size.min(layout::MMIO32_START);
    let mut regions = vec![RamRegion { guest_addr: 0, size: low, file_offset: 0 }];
    if size > low {
        regions.push(RamRegion { guest_addr: layout::HIGH_RAM_START, size: size - low, file_offset: low });
    }
    Ok(regions)
}

/// Guest RAM: a sparse, shareable memfd mapped into this process.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    memfd: File,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM. Nothing is touched up front.
    pub fn new(size: u64) -> Result<Self> {
        let regions = ram_regions(size)?;
        let memfd = create_memfd(size)?;
        let mut mapped = Vec::with_capacity(regions.len());
        for region in &regions {
            let file = memfd.try_clone().map_err(Error::CreateMemfd)?;
            let mapping =
                MmapRegion::from_file(FileOffset::new(file, region.file_offset), region.size as usize)
                    .map_err(|source| Error::Map { size: region.size, source })?;
            let region =
                GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or(Error::Map {
                    size: region.size,
                    source: vm_memory::mmap::MmapRegionError::InvalidPointer,
                })?;
            mapped.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(Error::Regions)?;
        log::debug!("guest RAM: {size} bytes in {} region(s)", regions.len());
        Ok(Self { memory, regions, memfd, size })
    }

    /// The guest memory, for vm-memory's `Bytes` and `GuestMemoryBackend` traits.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions, in guest-physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The memfd holding all of RAM, to hand to another process.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The e820 map: usable RAM below the EBDA, from 1 MiB to the MMIO window, and above
    /// 4 GiB.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![E820Entry { addr: 0, size: layout::EBDA_START, kind: E820Kind::Ram }];
        for region in &self.regions {
            let start = region.guest_addr.max(layout::HIMEM_START);
            let end = region.guest_addr + region.size;
            if end > start {
                map.push(E820Entry { addr: start, size: end - start, kind: E820Kind::Ram });
            }
        }
        map
    }

    /// The KVM memory slots of this RAM, one per region (slots 0, 1, ...): what
    /// [`register`](Self::register) hands KVM. Whoever registers them must keep this
    /// `GuestRam` (its mapping) alive for as long as the VM may use them.
    pub fn kvm_slots(&self) -> Result<Vec<kvm_userspace_memory_region>> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let host = self.memory.get_host_address(region.start_addr()).map_err(|_| Error::Map {
                    size: region.len(),
                    source: vm_memory::mmap::MmapRegionError::InvalidPointer,
                })?;
                Ok(kvm_userspace_memory_region {
                    slot: slot as u32,
                    flags: 0,
                    guest_phys_addr: region.start_addr().0,
                    memory_size: region.len(),
                    userspace_addr: host as u64,
                })
            })
            .collect()
    }

    /// Registers every region as a KVM memory slot (slots 0, 1, ...).
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for slot in self.kvm_slots()? {
            // SAFETY: the mapping is owned by `self.memory` and outlives the VM: the VM holds
            // the `GuestRam` for as long as it runs (see splitvisor-vcpu's `Vm`).
            unsafe { register_slot(vm, slot) }?;
        }
        Ok(())
    }
}

/// Registers one slot of [`GuestRam::kvm_slots`] with KVM (KVM_SET_USER_MEMORY_REGION).
///
/// # Safety
///
/// The slot's host mapping must stay mapped for as long as the VM may use the slot: the
/// `GuestRam` it came from outlives the VM.
pub unsafe fn register_slot(vm: &VmFd, slot: kvm_userspace_memory_region) -> Result<()> {
    // SAFETY: the caller keeps the mapping alive for the VM's life.
    unsafe { vm.set_user_memory_region(slot) }.map_err(|source| Error::Register {
        slot: slot.slot,
        guest_addr: slot.guest_phys_addr,
        source,
    })
}

/// Creates the memfd of `size` bytes and seals its size: a driver partition handed the fd
/// could otherwise shrink it, and every access of the hypervisor (and of KVM) to the pages
/// cut off would fault.
fn create_memfd(size: u64) -> Result<File> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"splitvisor-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|source| Error::SizeMemfd { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd this function owns; it only changes the file's seals.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::SealMemfd(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_is_one_low_region() {
        let regions = ram_regions(128 * MIB).unwrap();
        assert_eq!(regions, vec![RamRegion { guest_addr: 0, size: 128 * MIB, file_offset: 0 }]);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let regions = ram_regions(8 * GIB).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].size, layout::MMIO32_START);
        assert_eq!(regions[1].guest_addr, layout::HIGH_RAM_START);
        assert_eq!(regions[1].file_offset, layout::MMIO32_START);
        assert_eq!(regions[0].size + regions[1].size, 8 * GIB);
    }

    #[test]
    fn sizes_that_do_not_fit_are_refused() {
        assert!(matches!(ram_regions(0), Err(Error::TooSmall { .. })));
        assert!(matches!(ram_regions(MIB), Err(Error::TooSmall { .. })));
        assert!(matches!(ram_regions(2 << 40), Err(Error::TooLarge { .. })));
        assert!(matches!(ram_regions(u64::MAX), Err(Error::TooLarge { .. })));
        assert!(matches!(ram_regions(16 * MIB + 1), Err(Error::NotPageAligned(_))));
    }

    #[test]
    fn e820_skips_the_bios_area_and_the_mmio_window() {
        let ram = GuestRam::new(4 * GIB).unwrap();
        let map = ram.e820();
        assert_eq!(map[0], E820Entry { addr: 0, size: layout::EBDA_START, kind: E820Kind::Ram });
        assert_eq!(map[1].addr, layout::HIMEM_START);
        assert_eq!(map[1].end(), layout::MMIO32_START);
        assert_eq!(map[2], E820Entry { addr: layout::HIGH_RAM_START, size: GIB, kind: E820Kind::Ram });
        for entry in &map {
            assert!(entry.end() <= layout::MMIO32_START || entry.addr >= layout::HIGH_RAM_START);
        }
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn sixty_four_gib_is_sparse() {
        let before = rss_kib();
        let ram = GuestRam::new(64 * GIB).unwrap();
        let last = GuestAddress(layout::HIGH_RAM_START + 64 * GIB - layout::MMIO32_START - 8);
        ram.memory().write_obj(0x1234_5678_u64, last).unwrap();
        assert_eq!(ram.memory().read_obj::<u64>(last).unwrap(), 0x1234_5678);
        // One page was touched: far less than a GiB may be resident.
        assert!(rss_kib() - before.min(rss_kib()) < 64 * 1024);
    }

    #[test]
    fn memfd_shares_the_pages() {
        let ram = GuestRam::new(16 * MIB).unwrap();
        ram.memory().write_obj(0xabcd_u16, GuestAddress(0x2000)).unwrap();
        let mut buf = [0u8; 2];
        // SAFETY: plain pread on a valid fd into a valid buffer.
        let n = unsafe { libc::pread(ram.memfd().as_raw_fd(), buf.as_mut_ptr().cast(), 2, 0x2000) };
        assert_eq!(n, 2);
        assert_eq!(u16::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn nobody_holding_the_memfd_can_resize_it() {
        let ram = GuestRam::new(16 * MIB).unwrap();
        let handed = File::from(ram.memfd().try_clone_to_owned().unwrap());
        for size in [4096, 32 * MIB] {
            let error = handed.set_len(size).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::EPERM), "resize to {size}");
        }
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(handed.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & libc::F_SEAL_SEAL, libc::F_SEAL_SEAL, "the seals themselves are sealed");
    }
}
