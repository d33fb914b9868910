//! A bounded walker over split-virtqueue descriptor chains (virtio 1.x, 2.7.5).
//!
//! virtio-queue's `DescriptorChain` follows indirect tables of up to 65,535 entries whether
//! or not the driver negotiated VIRTIO_F_INDIRECT_DESC, and cannot be built from a head
//! index by a device that manages the available ring itself. This walker reads one
//! descriptor at a time into a caller-owned, bounded list of segments, and refuses, before
//! reading further, everything a well-formed chain cannot be:
//!
//! * longer than the queue size (a direct chain) or than the device's limit (an indirect
//!   table), which also catches loops;
//! * an indirect descriptor when the feature was not negotiated, anywhere but at the head,
//!   with NEXT set, inside an indirect table, or whose table is empty, not a multiple of 16
//!   bytes or longer than the limit;
//! * a `next` index beyond its table, a descriptor outside guest memory;
//! * a device-readable buffer after a device-writable one (2.7.4.2).
//!
//! The walker never allocates: `segments` keeps its capacity between chains and never
//! grows beyond the limit.

use super::GuestMemoryMmap;

/// Descriptor flag: the chain continues at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
const F_INDIRECT: u16 = 4;
/// Bytes of one descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// One buffer of a chain, as the driver described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is not below the queue size.
    #[error("head index {head} beyond a queue of {size}")]
    HeadOutOfRange {
        /// The head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A `next` index beyond its table.
    #[error("next index {next} beyond a table of {entries} descriptors")]
    NextOutOfRange {
        /// The index.
        next: u16,
        /// Entries in the table.
        entries: u32,
    },
    /// More descriptors than allowed (or a loop).
    #[error("chain longer than {limit} descriptors")]
    TooLong {
        /// The limit that was hit.
        limit: u32,
    },
    /// An indirect descriptor without VIRTIO_F_INDIRECT_DESC.
    #[error("indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    #[error("nested indirect descriptor")]
    NestedIndirect,
    /// An indirect descriptor that is not the head, or that has NEXT set.
    #[error("indirect descriptor chained to other descriptors")]
    IndirectNotAlone,
    /// An indirect table of a length that is 0, not a multiple of 16 or beyond the limit.
    #[error("indirect table of {len} bytes")]
    IndirectTableSize {
        /// Its length in bytes.
        len: u32,
    },
    /// A descriptor (in the ring's table or an indirect table) outside guest memory.
    #[error("descriptor at {addr:#x} is outside guest memory")]
    DescriptorOutsideMemory {
        /// Where it should be.
        addr: u64,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
}

/// What a chain may be.
#[derive(Clone, Copy, Debug)]
pub struct ChainLimits {
    /// Guest address of the queue's descriptor table.
    pub desc_table: u64,
    /// The queue size: entries of the descriptor table, and the longest direct chain.
    pub queue_size: u16,
    /// Most buffers in one chain, direct or indirect.
    pub max_segments: u32,
    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
}

fn read_descriptor(mem: &GuestMemoryMmap, at: u64) -> Result<(u64, u32, u16, u16), ChainError> {
    let mut raw = [0u8; 16];
    super::ram::read(mem, at, &mut raw).map_err(|_| ChainError::DescriptorOutsideMemory { addr: at })?;
    // Fixed offsets: each field is one load (a byte-by-byte fold was a loop of dependent
    // shifts, three descriptors a request).
    let addr = u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]);
    let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    Ok((addr, len, u16::from_le_bytes([raw[12], raw[13]]), u16::from_le_bytes([raw[14], raw[15]])))
}

/// Walks the chain at `head` into `segments` (cleared first). `walked` counts every
/// descriptor read, the indirect one included, so the caller can bound its work.
pub fn walk(
    mem: &GuestMemoryMmap,
    limits: &ChainLimits,
    head: u16,
    segments: &mut Vec<Segment>,
    walked: &mut usize,
) -> Result<(), ChainError> {
    segments.clear();
    if head >= limits.queue_size {
        return Err(ChainError::HeadOutOfRange { head, size: limits.queue_size });
    }
    let mut table = limits.desc_table;
    let mut entries = u32::from(limits.queue_size);
    let mut limit = u32::from(limits.queue_size).min(limits.max_segments);
    let mut in_indirect = false;
    let mut index = head;
    let mut read_in_table = 0u32;
    let mut writable_seen = false;
    loop {
        if read_in_table >= limit {
            return Err(ChainError::TooLong { limit });
        }
        read_in_table += 1;
        // index < entries <= 2^16 and tables are at most 2^16 * 16 bytes: no overflow but
        // at the very top of the address space.
        let at = table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .ok_or(ChainError::DescriptorOutsideMemory { addr: table })?;
        let (addr, len, flags, next) = read_descriptor(mem, at)?;
        *walked += 1;
        if flags & F_INDIRECT != 0 {
            if !limits.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if flags & F_NEXT != 0 || read_in_table != 1 {
                return Err(ChainError::IndirectNotAlone);
            }
            let count = len / DESCRIPTOR_SIZE as u32;
            if len == 0 || len % DESCRIPTOR_SIZE as u32 != 0 || count > limits.max_segments {
                return Err(ChainError::IndirectTableSize { len });
            }
            table = addr;
            entries = count;
            limit = count;
            in_indirect = true;
            index = 0;
            read_in_table = 0;
            continue;
        }
        let writable = flags & F_WRITE != 0;
        if writable_seen && !writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        writable_seen |= writable;
        segments.push(Segment { addr, len, writable });
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        if u32::from(next) >= entries {
            return Err(ChainError::NextOutOfRange { next, entries });
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, write_descriptor_at};

    const TABLE: u64 = 0x1000;
    const INDIRECT: u64 = 0x8000;

    fn limits(indirect: bool) -> ChainLimits {
        ChainLimits { desc_table: TABLE, queue_size: 16, max_segments: 256, indirect }
    }

    fn run(
        mem: &GuestMemoryMmap,
        limits: &ChainLimits,
        head: u16,
    ) -> (Result<Vec<Segment>, ChainError>, usize) {
        let mut segments = Vec::new();
        let mut walked = 0;
        let result = walk(mem, limits, head, &mut segments, &mut walked).map(|()| segments);
        (result, walked)
    }

    #[test]
    fn a_direct_chain_in_order() {
        let mem = guest_memory(0x10_0000);
        write_descriptor_at(&mem, TABLE + 3 * 16, 0x100, 16, F_NEXT, 5);
        write_descriptor_at(&mem, TABLE + 5 * 16, 0x200, 512, F_NEXT | F_WRITE, 0);
        write_descriptor_at(&mem, TABLE, 0x300, 1, F_WRITE, 0);
        let (segments, walked) = run(&mem, &limits(false), 3);
        assert_eq!(
            segments.unwrap(),
            [
                Segment { addr: 0x100, len: 16, writable: false },
                Segment { addr: 0x200, len: 512, writable: true },
                Segment { addr: 0x300, len: 1, writable: true },
            ]
        );
        assert_eq!(walked, 3);
    }

    #[test]
    fn loops_and_long_chains_stop_at_the_queue_size() {
        let mem = guest_memory(0x10_0000);
        write_descriptor_at(&mem, TABLE, 0x100, 16, F_NEXT, 0);
        let (result, walked) = run(&mem, &limits(false), 0);
        assert_eq!(result, Err(ChainError::TooLong { limit: 16 }));
        assert_eq!(walked, 16);
        write_descriptor_at(&mem, TABLE, 0x100, 16, F_NEXT, 16);
        assert_eq!(run(&mem, &limits(false), 0).0, Err(ChainError::NextOutOfRange { next: 16, entries: 16 }));
        assert_eq!(run(&mem, &limits(false), 16).0, Err(ChainError::HeadOutOfRange { head: 16, size: 16 }));
    }

    #[test]
    fn indirect_tables_need_the_feature_and_a_sane_size() {
        let mem = guest_memory(0x10_0000);
        write_descriptor_at(&mem, INDIRECT, 0x100, 16, F_NEXT, 1);
        write_descriptor_at(&mem, INDIRECT + 16, 0x200, 1, F_WRITE, 0);
        write_descriptor_at(&mem, TABLE, INDIRECT, 32, F_INDIRECT, 0);
        assert_eq!(run(&mem, &limits(false), 0).0, Err(ChainError::IndirectNotNegotiated));
        let (segments, walked) = run(&mem, &limits(true), 0);
        assert_eq!(segments.unwrap().len(), 2);
        assert_eq!(walked, 3);
        // The self-chaining entry 0 of a huge table: refused before any entry is read.
        write_descriptor_at(&mem, INDIRECT, 0x100, 16, F_NEXT, 0);
        write_descriptor_at(&mem, TABLE, INDIRECT, 0xf_fff0, F_INDIRECT, 0);
        let (result, walked) = run(&mem, &limits(true), 0);
        assert_eq!(result, Err(ChainError::IndirectTableSize { len: 0xf_fff0 }));
        assert_eq!(walked, 1);
        // A table within bounds whose entry 0 chains to itself: a loop, bounded by the table.
        write_descriptor_at(&mem, TABLE, INDIRECT, 16 * 256, F_INDIRECT, 0);
        let (result, walked) = run(&mem, &limits(true), 0);
        assert_eq!(result, Err(ChainError::TooLong { limit: 256 }));
        assert_eq!(walked, 257);
        for len in [0, 24] {
            write_descriptor_at(&mem, TABLE, INDIRECT, len, F_INDIRECT, 0);
            assert_eq!(run(&mem, &limits(true), 0).0, Err(ChainError::IndirectTableSize { len }));
        }
    }

    #[test]
    fn nested_or_chained_indirect_descriptors_are_refused() {
        let mem = guest_memory(0x10_0000);
        write_descriptor_at(&mem, INDIRECT, INDIRECT, 32, F_INDIRECT, 0);
        write_descriptor_at(&mem, TABLE, INDIRECT, 32, F_INDIRECT, 0);
        assert_eq!(run(&mem, &limits(true), 0).0, Err(ChainError::NestedIndirect));
        write_descriptor_at(&mem, TABLE, INDIRECT, 32, F_INDIRECT | F_NEXT, 1);
        assert_eq!(run(&mem, &limits(true), 0).0, Err(ChainError::IndirectNotAlone));
        write_descriptor_at(&mem, TABLE, 0x100, 16, F_NEXT, 1);
        write_descriptor_at(&mem, TABLE + 16, INDIRECT, 32, F_INDIRECT, 0);
        assert_eq!(run(&mem, &limits(true), 0).0, Err(ChainError::IndirectNotAlone));
    }

    #[test]
    fn readable_after_writable_and_tables_outside_memory() {
        let mem = guest_memory(0x10_0000);
        write_descriptor_at(&mem, TABLE, 0x100, 16, F_WRITE | F_NEXT, 1);
        write_descriptor_at(&mem, TABLE + 16, 0x200, 16, 0, 0);
        assert_eq!(run(&mem, &limits(false), 0).0, Err(ChainError::ReadableAfterWritable));
        write_descriptor_at(&mem, TABLE, 0x20_0000, 32, F_INDIRECT, 0);
        assert_eq!(
            run(&mem, &limits(true), 0).0,
            Err(ChainError::DescriptorOutsideMemory { addr: 0x20_0000 })
        );
        write_descriptor_at(&mem, TABLE, u64::MAX - 8, 32, F_INDIRECT, 0);
        assert!(matches!(run(&mem, &limits(true), 0).0, Err(ChainError::DescriptorOutsideMemory { .. })));
    }
}
