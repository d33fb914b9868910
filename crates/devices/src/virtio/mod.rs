//! Virtio 1.x devices and their MMIO transport.
//!
//! A virtio device is split in two:
//! * the **transport and configuration part** ([`MmioTransport`] around a
//!   [`VirtioDevice`]): the register file the guest programs, feature negotiation, device
//!   status, configuration space. It runs wherever the bus is.
//! * the **queue worker** (for example [`block::BlockWorker`]): needs only guest memory,
//!   the queue state, the kick eventfd and the interrupt. It runs on its own thread, woken by
//!   the guest's QueueNotify write through a KVM ioeventfd, and signals used buffers through
//!   an irqfd, so a vCPU never waits for device I/O. A later layout runs the worker in
//!   another process.

pub mod block;
pub mod block_io;
pub mod chain;
mod image_lock;
mod interrupt;
mod mmio;
pub mod net;
mod ram;
pub mod tap;
pub mod testing;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::VirtioInterrupt;
pub use mmio::{MMIO_REGION_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, reg};

/// Guest memory as the virtio devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Feature bits common to all devices.
pub mod features {
    /// The descriptor `INDIRECT` flag is understood.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The `used_event` / `avail_event` fields suppress notifications.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (not legacy).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Device IDs (virtio 1.x, 5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Network device.
    pub const NET: u32 = 1;
}

/// Copies the part of a configuration space `config` at `offset` into `data`; bytes past
/// its end are left as they are (the transport zeroes them first).
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// A queue the driver set up, handed to the device when it becomes ready.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Its index.
    pub index: u16,
    /// The queue state (addresses, size, indices).
    pub queue: Queue,
    /// Written when the guest notifies the queue.
    pub kick: EventFd,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device needs queues the driver did not set up.
    #[error("queue {0} was not set up by the driver")]
    MissingQueue(u16),
    /// Duplicating an eventfd or spawning the worker failed.
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] std::io::Error),
}

/// The device-specific part of a virtio device, behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// The largest size of each queue the device offers.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default: read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver set DRIVER_OK: start serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving queues. Returns once no worker touches
    /// guest memory any more.
    fn reset(&mut self);
}
