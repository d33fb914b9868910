//! Guest addresses and interrupt lines for devices, allocated with vm-allocator.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

/// Errors of resource allocation.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    /// The MMIO window is full or the request is malformed.
    #[error("cannot allocate {size:#x} bytes of MMIO space: {source}")]
    Mmio {
        /// Bytes asked for.
        size: u64,
        /// What vm-allocator said.
        #[source]
        source: vm_allocator::Error,
    },
    /// No interrupt line is left.
    #[error("no interrupt line left: {0}")]
    Irq(#[source] vm_allocator::Error),
    /// The ranges given at construction are invalid.
    #[error("invalid allocator range: {0}")]
    Range(#[source] vm_allocator::Error),
}

/// Allocates MMIO ranges and IRQ lines (GSIs) for devices.
#[derive(Debug)]
pub struct ResourceAllocator {
    mmio: AddressAllocator,
    irqs: IdAllocator,
}

impl ResourceAllocator {
    /// MMIO from `mmio_base` for `mmio_size` bytes; IRQs `first_irq..=last_irq`.
    pub fn new(
        mmio_base: u64,
        mmio_size: u64,
        first_irq: u32,
        last_irq: u32,
    ) -> Result<Self, AllocatorError> {
        Ok(Self {
            mmio: AddressAllocator::new(mmio_base, mmio_size).map_err(AllocatorError::Range)?,
            irqs: IdAllocator::new(first_irq, last_irq).map_err(AllocatorError::Range)?,
        })
    }

    /// `size` bytes of MMIO space aligned to `align` (a power of two); returns the base.
    pub fn allocate_mmio(&mut self, size: u64, align: u64) -> Result<u64, AllocatorError> {
        self.mmio
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map(|range| range.start())
            .map_err(|source| AllocatorError::Mmio { size, source })
    }

    /// Reserves exactly `size` bytes at `base` (for devices at fixed addresses).
    pub fn reserve_mmio(&mut self, base: u64, size: u64) -> Result<(), AllocatorError> {
        self.mmio
            .allocate(size, 1, AllocPolicy::ExactMatch(base))
            .map(|_| ())
            .map_err(|source| AllocatorError::Mmio { size, source })
    }

    /// The next free interrupt line.
    pub fn allocate_irq(&mut self) -> Result<u32, AllocatorError> {
        self.irqs.allocate_id().map_err(AllocatorError::Irq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_ranges_are_aligned_and_disjoint() {
        let mut alloc = ResourceAllocator::new(0xc000_0000, 0x10_0000, 5, 23).unwrap();
        let a = alloc.allocate_mmio(0x200, 0x1000).unwrap();
        let b = alloc.allocate_mmio(0x200, 0x1000).unwrap();
        assert_eq!(a % 0x1000, 0);
        assert_eq!(b % 0x1000, 0);
        assert!(b >= a + 0x200 || a >= b + 0x200);
        assert!(alloc.allocate_mmio(0x20_0000, 0x1000).is_err());
    }

    #[test]
    fn irqs_run_out() {
        let mut alloc = ResourceAllocator::new(0xc000_0000, 0x1000, 5, 6).unwrap();
        assert_eq!(alloc.allocate_irq().unwrap(), 5);
        assert_eq!(alloc.allocate_irq().unwrap(), 6);
        assert!(matches!(alloc.allocate_irq(), Err(AllocatorError::Irq(_))));
    }
}
