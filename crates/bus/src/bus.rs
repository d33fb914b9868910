//! The bus: a map from address ranges to devices.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus: register reads and writes at an offset into its range.
///
/// `data.len()` is the access width (1, 2, 4 or 8 bytes, or longer for string I/O); the
/// bus guarantees `offset + data.len()` stays within the device's range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever set it up.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Which address space a bus covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// x86 I/O ports.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "PIO",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// A non-empty range of bus addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// `len` bytes from `base`; empty and wrapping ranges are refused.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        base.checked_add(len - 1).ok_or(BusError::RangeOverflow { base, len })?;
        Ok(Self { base, len })
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: empty ranges cannot be built. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address covered.
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.base, self.last())
    }
}

/// Errors of bus set-up and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero bytes.
    #[error("empty bus range at {base:#x}")]
    EmptyRange {
        /// Where it would start.
        base: u64,
    },
    /// A range that wraps past the end of the address space.
    #[error("bus range of {len:#x} bytes at {base:#x} wraps around the address space")]
    RangeOverflow {
        /// Where it would start.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("{kind} range {range} for {device} overlaps {existing} of {existing_device}")]
    Overlap {
        /// The bus.
        kind: BusKind,
        /// The refused range.
        range: BusRange,
        /// The device it was for.
        device: String,
        /// The range it overlaps.
        existing: BusRange,
        /// The device that has it.
        existing_device: String,
    },
    /// No device covers the accessed address range.
    #[error("no {kind} device at {addr:#x} ({len} bytes)")]
    NoDevice {
        /// The bus.
        kind: BusKind,
        /// The address accessed.
        addr: u64,
        /// The access width.
        len: usize,
    },
    /// The access starts in a device's range and runs past its end.
    #[error("{kind} access at {addr:#x} ({len} bytes) runs past the end of {device} ({range})")]
    Straddle {
        /// The bus.
        kind: BusKind,
        /// The address accessed.
        addr: u64,
        /// The access width.
        len: usize,
        /// The device.
        device: String,
        /// Its range.
        range: BusRange,
    },
}

/// How often a device was accessed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device's name.
    pub name: String,
    /// Its range.
    pub range: BusRange,
    /// Reads dispatched to it.
    pub reads: u64,
    /// Writes dispatched to it.
    pub writes: u64,
}

struct Entry {
    range: BusRange,
    name: String,
    device: SharedDevice,
    reads: AtomicU64,
    writes: AtomicU64,
}

/// Address ranges mapped to devices. Shared by every vCPU thread.
pub struct Bus {
    kind: BusKind,
    entries: RwLock<BTreeMap<u64, Arc<Entry>>>,
    unassigned: AtomicU64,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus").field("kind", &self.kind).field("devices", &self.stats()).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new(kind: BusKind) -> Self {
        Self { kind, entries: RwLock::new(BTreeMap::new()), unassigned: AtomicU64::new(0) }
    }

    /// The address space this bus covers.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Places `device`, called `name` in logs and statistics, at `range`.
    pub fn insert(&self, range: BusRange, name: &str, device: SharedDevice) -> Result<(), BusError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // Ranges never overlap, so only the neighbours on either side can collide.
        let before = entries.range(..=range.base).next_back();
        let after = entries.range(range.base..).next();
        for (_, existing) in before.into_iter().chain(after) {
            if existing.range.overlaps(&range) {
                return Err(BusError::Overlap {
                    kind: self.kind,
                    range,
                    device: name.to_string(),
                    existing: existing.range,
                    existing_device: existing.name.clone(),
                });
            }
        }
        entries.insert(
            range.base,
            Arc::new(Entry {
                range,
                name: name.to_string(),
                device,
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Removes the device at exactly `range`, returning it.
    pub fn remove(&self, range: BusRange) -> Option<SharedDevice> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        match entries.get(&range.base) {
            Some(entry) if entry.range == range => entries.remove(&range.base).map(|e| e.device.clone()),
            _ => None,
        }
    }

    fn lookup(&self, addr: u64, len: usize) -> Result<(Arc<Entry>, u64), BusError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let entry = entries
            .range(..=addr)
            .next_back()
            .map(|(_, entry)| entry)
            .filter(|entry| addr <= entry.range.last());
        let Some(entry) = entry else {
            self.unassigned.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::NoDevice { kind: self.kind, addr, len });
        };
        let offset = addr - entry.range.base;
        if offset.checked_add(len as u64).is_none_or(|end| end > entry.range.len) {
            self.unassigned.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::Straddle {
                kind: self.kind,
                addr,
                len,
                device: entry.name.clone(),
                range: entry.range,
            });
        }
        Ok((entry.clone(), offset))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (entry, offset) = self.lookup(addr, data.len())?;
        entry.reads.fetch_add(1, Ordering::Relaxed);
        entry.device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
        Ok(())
    }

    /// Dispatches a guest write of `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (entry, offset) = self.lookup(addr, data.len())?;
        entry.writes.fetch_add(1, Ordering::Relaxed);
        entry.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
        Ok(())
    }

    /// Access counts per device, in address order.
    pub fn stats(&self) -> Vec<DeviceStats> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .values()
            .map(|e| DeviceStats {
                name: e.name.clone(),
                range: e.range,
                reads: e.reads.load(Ordering::Relaxed),
                writes: e.writes.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Accesses that no device took.
    pub fn unassigned_accesses(&self) -> u64 {
        self.unassigned.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    fn range(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len).unwrap()
    }

    #[test]
    fn empty_and_wrapping_ranges_are_refused() {
        assert_eq!(BusRange::new(0x10, 0), Err(BusError::EmptyRange { base: 0x10 }));
        assert!(matches!(BusRange::new(u64::MAX, 2), Err(BusError::RangeOverflow { .. })));
        assert_eq!(range(u64::MAX, 1).last(), u64::MAX);
    }

    #[test]
    fn overlaps_are_refused_in_every_position() {
        let bus = Bus::new(BusKind::Mmio);
        bus.insert(range(0x1000, 0x100), "a", recorder()).unwrap();
        for (base, len) in [(0x1000, 0x100), (0xf00, 0x101), (0x10ff, 1), (0x1080, 0x10), (0, 0x2000)] {
            let err = bus.insert(range(base, len), "b", recorder()).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { ref existing_device, .. } if existing_device == "a"),
                "{err}"
            );
        }
        // Adjacent ranges are fine.
        bus.insert(range(0xf00, 0x100), "below", recorder()).unwrap();
        bus.insert(range(0x1100, 0x100), "above", recorder()).unwrap();
        assert_eq!(bus.stats().len(), 3);
    }

    #[test]
    fn dispatch_reaches_the_right_device_at_the_right_offset() {
        let bus = Bus::new(BusKind::Pio);
        let com1 = recorder();
        let other = recorder();
        bus.insert(range(0x3f8, 8), "com1", com1.clone()).unwrap();
        bus.insert(range(0x60, 5), "i8042", other.clone()).unwrap();
        bus.write(0x3fb, &[0x80]).unwrap();
        assert_eq!(com1.lock().unwrap().last_write, Some((3, vec![0x80])));
        assert_eq!(other.lock().unwrap().last_write, None);
        let mut data = [0u8; 2];
        bus.read(0x3fd, &mut data).unwrap();
        assert_eq!(data, [5, 5]);
        let stats = bus.stats();
        assert_eq!(stats[1].name, "com1");
        assert_eq!((stats[1].reads, stats[1].writes), (1, 1));
    }

    #[test]
    fn unassigned_and_straddling_accesses_fail() {
        let bus = Bus::new(BusKind::Mmio);
        bus.insert(range(0x1000, 0x10), "dev", recorder()).unwrap();
        let mut data = [0u8; 4];
        assert!(matches!(bus.read(0xfff, &mut data), Err(BusError::NoDevice { .. })));
        assert!(matches!(bus.read(0x1010, &mut data), Err(BusError::NoDevice { .. })));
        assert!(matches!(bus.read(0x100e, &mut data), Err(BusError::Straddle { .. })));
        assert!(matches!(bus.write(u64::MAX, &data), Err(BusError::NoDevice { .. })));
        assert_eq!(bus.unassigned_accesses(), 4);
        bus.read(0x100c, &mut data).unwrap();
    }

    #[test]
    fn removed_devices_stop_receiving_accesses() {
        let bus = Bus::new(BusKind::Pio);
        bus.insert(range(0x80, 1), "post", recorder()).unwrap();
        assert!(bus.remove(range(0x80, 2)).is_none());
        assert!(bus.remove(range(0x80, 1)).is_some());
        assert!(bus.write(0x80, &[1]).is_err());
    }
}
