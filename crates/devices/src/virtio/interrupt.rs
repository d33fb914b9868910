//! The virtio-mmio interrupt: an interrupt line plus the InterruptStatus register.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use splitvisor_bus::Interrupt;

/// InterruptStatus bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// The interrupt of one virtio device, shared by its transport and its queue workers.
///
/// The status register lives here, next to the line, so the guest's InterruptStatus reads
/// and InterruptACK writes are answered by the transport from shared state, never by a
/// round trip to a worker.
///
/// It also carries the one thing a queue worker must tell the transport: that the driver
/// broke the queue and the device needs a reset.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    needs_reset: Arc<AtomicBool>,
    bypassed: Arc<AtomicBool>,
    line: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// A device interrupt raised on `line`.
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            bypassed: Arc::new(AtomicBool::new(false)),
            line,
        }
    }

    /// Signals that a queue has used buffers.
    pub fn signal_used_buffer(&self) -> io::Result<()> {
        self.signal(INTERRUPT_USED_BUFFER)
    }

    /// Signals a configuration or status change.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.line.trigger()
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        let bypassed = if self.bypassed.load(Ordering::Acquire) { INTERRUPT_USED_BUFFER } else { 0 };
        self.status.load(Ordering::Acquire) | bypassed
    }

    /// The line's eventfd, if it has one, for a device in another process to raise the
    /// interrupt directly.
    pub fn eventfd(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.line.eventfd()
    }

    /// Used-buffer interrupts now bypass this status register (another process raises the
    /// line's eventfd directly); InterruptStatus then always shows "used buffer", which a
    /// driver answers by checking its used rings.
    pub fn set_bypassed(&self, bypassed: bool) {
        self.bypassed.store(bypassed, Ordering::Release);
    }

    /// InterruptACK: clears `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// A worker found the queue broken: the device shows DEVICE_NEEDS_RESET, and the
    /// driver is told through a configuration-change interrupt.
    pub fn request_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::Release);
        self.signal_config_change()
    }

    /// Whether a worker asked for a reset since the last one.
    pub fn reset_requested(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.bypassed.store(false, Ordering::Release);
    }
}
