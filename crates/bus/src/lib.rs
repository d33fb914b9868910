//! Buses, the device trait, interrupts and resource allocation for splitvisor.
//!
//! [`BusDevice`] is all a device knows of where it runs: reads and writes at an offset into
//! its own range. The same trait fronts an emulator inside the hypervisor and a proxy to a
//! driver partition in another process. [`Interrupt`] is all it knows of how its interrupt
//! is delivered (a KVM irqfd, a message, a counter in a test).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use splitvisor_bus::{Bus, BusDevice, BusKind, BusRange};
//!
//! struct Scratch(u8);
//! impl BusDevice for Scratch {
//!     fn read(&mut self, _offset: u64, data: &mut [u8]) { data.fill(self.0) }
//!     fn write(&mut self, _offset: u64, data: &[u8]) { self.0 = data[0] }
//! }
//!
//! let bus = Bus::new(BusKind::Pio);
//! bus.insert(BusRange::new(0x80, 1).unwrap(), "scratch", Arc::new(Mutex::new(Scratch(0)))).unwrap();
//! bus.write(0x80, &[7]).unwrap();
//! let mut byte = [0];
//! bus.read(0x80, &mut byte).unwrap();
//! assert_eq!(byte, [7]);
//! assert!(bus.read(0x81, &mut byte).is_err());
//! ```

mod allocator;
mod bus;
mod interrupt;
pub mod threads;

pub use allocator::{AllocatorError, ResourceAllocator};
pub use bus::{Bus, BusDevice, BusError, BusKind, BusRange, DeviceStats, SharedDevice};
pub use interrupt::{CountingInterrupt, EventFdInterrupt, Interrupt};
