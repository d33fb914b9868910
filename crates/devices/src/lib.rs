//! Device emulators for splitvisor.
//!
//! Each emulator is a state machine behind [`splitvisor_bus::BusDevice`]: it sees register
//! reads and writes at offsets into its range, raises interrupts through
//! [`splitvisor_bus::Interrupt`], and writes its output to any `io::Write`. It does not know
//! whether it runs inside the hypervisor or in a driver partition, nor whether its
//! interrupt is a KVM irqfd, a message or a test counter.
//!
//! ```
//! use std::sync::Arc;
//! use splitvisor_bus::{BusDevice, CountingInterrupt};
//! use splitvisor_devices::serial::Serial;
//!
//! let irq = Arc::new(CountingInterrupt::new());
//! let mut com1 = Serial::new(irq.clone(), Vec::new());
//! com1.write(1, &[0x02]); // IER: transmitter-empty interrupt on
//! let mut iir = [0];
//! com1.read(2, &mut iir); // IIR: the guest identifies (acknowledges) it
//! com1.write(0, b"A");    // THR: sent, and the transmitter is empty again
//! assert_eq!(com1.output(), b"A");
//! assert_eq!(irq.count(), 2);
//! ```

pub mod acpi;
pub mod fault;
pub mod fuzzing;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::Arc;

use splitvisor_bus::Interrupt;

/// Adapts an [`Interrupt`] to vm-superio's `Trigger`.
#[derive(Clone)]
pub(crate) struct InterruptTrigger(pub(crate) Arc<dyn Interrupt>);

impl vm_superio::Trigger for InterruptTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}
