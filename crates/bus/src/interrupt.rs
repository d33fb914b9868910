//! How a device raises its interrupt, without knowing how it is delivered.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// An edge-triggered interrupt line as a device sees it.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;

    /// The eventfd behind the line, if there is one: another process (a driver partition)
    /// can then raise the interrupt itself, straight into KVM.
    fn eventfd(&self) -> Option<&EventFd> {
        None
    }
}

/// An interrupt delivered through an eventfd: registered with KVM as an irqfd it goes
/// straight to the in-kernel interrupt controller, and the same fd can be handed to
/// another process.
#[derive(Debug)]
pub struct EventFdInterrupt {
    eventfd: EventFd,
}

impl EventFdInterrupt {
    /// A new, non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self { eventfd: EventFd::new(EFD_NONBLOCK)? })
    }

    /// Wraps an existing eventfd.
    pub fn from_eventfd(eventfd: EventFd) -> Self {
        Self { eventfd }
    }

    /// The eventfd, to register as an irqfd or to pass on.
    pub fn irqfd(&self) -> &EventFd {
        &self.eventfd
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.eventfd.write(1)
    }

    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.eventfd)
    }
}

/// Counts triggers: for tests, and anywhere an interrupt must be observed, not delivered.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    count: AtomicU64,
}

impl CountingInterrupt {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

impl<T: Interrupt + ?Sized> Interrupt for std::sync::Arc<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }

    fn eventfd(&self) -> Option<&EventFd> {
        (**self).eventfd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_interrupt_accumulates_triggers() {
        let irq = EventFdInterrupt::new().unwrap();
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(irq.irqfd().read().unwrap(), 2);
    }

    #[test]
    fn counting_interrupt_counts() {
        let irq = std::sync::Arc::new(CountingInterrupt::new());
        irq.trigger().unwrap();
        assert_eq!(irq.count(), 1);
    }
}
