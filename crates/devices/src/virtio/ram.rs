//! Guest memory accesses of the request path, at the cost of one region lookup each.
//!
//! vm-memory's `Bytes<GuestAddress>` on a whole `GuestMemoryMmap` is written for accesses
//! that may span regions: every one goes through a slice iterator and a closure, which
//! costs 16-32 ns for a 2- to 16-byte access on the machines this project is measured on,
//! where the same access on the region that holds it costs 3-6 ns (`find_region`, then the
//! region's own `Bytes<MemoryRegionAddress>`). A virtio-blk request at queue depth 1 makes
//! about eight such accesses (the available index and entry, three descriptors, the
//! header, the status byte), and a 4 KiB read from the page cache takes about 1 µs: the
//! difference was a tenth of every request.
//!
//! Each function here takes the region's path when the access lies inside one region, and
//! vm-memory's general one otherwise (an access across a region boundary, or outside guest
//! memory, which then fails as before): the results, and the errors, are vm-memory's.

use std::sync::atomic::Ordering;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestMemoryResult, MemoryRegionAddress,
    VolatileSlice,
};

use super::GuestMemoryMmap;

/// The region holding `addr`, and `addr`'s offset in it.
fn locate(mem: &GuestMemoryMmap, addr: u64) -> Option<(&vm_memory::GuestRegionMmap, MemoryRegionAddress)> {
    let region = mem.find_region(GuestAddress(addr))?;
    Some((region, MemoryRegionAddress(addr - region.start_addr().0)))
}

/// Reads `buf.len()` bytes at `addr` (as `Bytes::read_slice`).
pub fn read(mem: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) -> GuestMemoryResult<()> {
    if let Some((region, offset)) = locate(mem, addr) {
        if region.read_slice(buf, offset).is_ok() {
            return Ok(());
        }
    }
    mem.read_slice(buf, GuestAddress(addr))
}

/// Writes `buf` at `addr` (as `Bytes::write_slice`).
pub fn write(mem: &GuestMemoryMmap, addr: u64, buf: &[u8]) -> GuestMemoryResult<()> {
    if let Some((region, offset)) = locate(mem, addr) {
        if region.write_slice(buf, offset).is_ok() {
            return Ok(());
        }
    }
    mem.write_slice(buf, GuestAddress(addr))
}

/// Loads the little-endian `u16` at `addr` atomically with `order` (as `Bytes::load`): a
/// ring index the driver publishes.
pub fn load_u16(mem: &GuestMemoryMmap, addr: u64, order: Ordering) -> GuestMemoryResult<u16> {
    let value = match locate(mem, addr) {
        Some((region, offset)) => match region.load::<u16>(offset, order) {
            Ok(value) => value,
            Err(_) => mem.load::<u16>(GuestAddress(addr), order)?,
        },
        None => mem.load::<u16>(GuestAddress(addr), order)?,
    };
    Ok(u16::from_le(value))
}

/// Stores `value` at `addr` as a little-endian `u16`, atomically with `order` (as
/// `Bytes::store`): a ring index the device publishes.
pub fn store_u16(mem: &GuestMemoryMmap, addr: u64, value: u16, order: Ordering) -> GuestMemoryResult<()> {
    if let Some((region, offset)) = locate(mem, addr) {
        if region.store(value.to_le(), offset, order).is_ok() {
            return Ok(());
        }
    }
    mem.store(value.to_le(), GuestAddress(addr), order)
}

/// The `len` bytes at `addr` as one slice, if they lie inside one region (most buffers
/// do); `None` sends the caller to vm-memory's `get_slices`, which also reports why an
/// address is refused.
pub fn slice(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<VolatileSlice<'_, ()>> {
    let (region, offset) = locate(mem, addr)?;
    region.get_slice(offset, len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two regions with a hole between them: 0x0..0x2000 and 0x3000..0x4000.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x3000), 0x1000)]).unwrap()
    }

    #[test]
    fn accesses_inside_a_region_match_vm_memory() {
        let mem = memory();
        write(&mem, 0x3ff0, &[1, 2, 3, 4]).unwrap();
        let mut four = [0u8; 4];
        mem.read_slice(&mut four, GuestAddress(0x3ff0)).unwrap();
        assert_eq!(four, [1, 2, 3, 4]);
        read(&mem, 0x3ff1, &mut four[..2]).unwrap();
        assert_eq!(&four[..2], &[2, 3]);
        mem.write_obj(0xbeefu16.to_le(), GuestAddress(0x10)).unwrap();
        assert_eq!(load_u16(&mem, 0x10, Ordering::Acquire).unwrap(), 0xbeef);
        store_u16(&mem, 0x3ffe, 0xcafe, Ordering::Release).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3ffe)).unwrap(), 0xcafeu16.to_le());
        assert_eq!(slice(&mem, 0x1000, 0x1000).map(|s| s.len()), Some(0x1000));
    }

    #[test]
    fn accesses_across_or_outside_regions_fail_as_vm_memory_s_do() {
        let mem = memory();
        let mut buf = [0u8; 16];
        // Across the hole, past the end, and wholly outside.
        for addr in [0x1ff8, 0x3ff8, 0x2000, 0x5000, u64::MAX - 4] {
            assert_eq!(
                read(&mem, addr, &mut buf).is_err(),
                mem.read_slice(&mut buf, GuestAddress(addr)).is_err()
            );
            assert!(read(&mem, addr, &mut buf).is_err(), "{addr:#x}");
            assert!(write(&mem, addr, &buf).is_err(), "{addr:#x}");
            assert!(slice(&mem, addr, buf.len()).is_none(), "{addr:#x}");
        }
        assert!(load_u16(&mem, 0x1fff, Ordering::Acquire).is_err());
        assert!(load_u16(&mem, 0x2000, Ordering::Acquire).is_err());
        for addr in [0x1fff, 0x2000, 0x3fff, 0x5000] {
            assert!(store_u16(&mem, addr, 1, Ordering::Release).is_err(), "{addr:#x}");
        }
    }

    #[test]
    fn adjacent_regions_are_read_across_as_vm_memory_reads_them() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
        mem.write_slice(&[7; 8], GuestAddress(0xffc)).unwrap();
        let mut buf = [0u8; 8];
        read(&mem, 0xffc, &mut buf).unwrap();
        assert_eq!(buf, [7; 8]);
        write(&mem, 0xffe, &[9; 4]).unwrap();
        mem.read_slice(&mut buf[..4], GuestAddress(0xffe)).unwrap();
        assert_eq!(&buf[..4], &[9; 4]);
        // One slice cannot hold bytes of two regions: the caller takes vm-memory's path.
        assert!(slice(&mem, 0xffc, 8).is_none());
    }
}
