//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2).

use std::sync::Arc;

use splitvisor_bus::{BusDevice, Interrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, features, status};

/// Bytes of MMIO space a virtio-mmio device occupies (registers and configuration space).
pub const MMIO_REGION_SIZE: u64 = 0x200;
/// Offset of QueueNotify: the doorbell a KVM ioeventfd serves.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio 1.x (non-legacy) MMIO register layout.
const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "SPLV".
const VENDOR_ID: u32 = 0x5650_4c53;

/// Register offsets of the virtio-mmio transport (virtio 1.x, 4.2.2).
pub mod reg {
    /// MagicValue: "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version: 2.
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (the page DeviceFeaturesSel picks).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (the page DriverFeaturesSel picks).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify: the doorbell.
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (available ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// One queue as the driver programs it.
struct QueueSlot {
    queue: Queue,
    /// The guest wrote a value the queue refused: a size that is not a power of two (index
    /// 0) or a misaligned descriptor table, available or used ring (1, 2, 3). Activation
    /// then fails and the device asks for a reset.
    refused: [bool; 4],
    kick: EventFd,
}

/// A virtio device behind the virtio-mmio register file.
///
/// Guest register accesses arrive through [`BusDevice`]. The QueueNotify doorbell is meant
/// to be a KVM ioeventfd on each of [`MmioTransport::queue_notify_eventfds`]; if a notify
/// write reaches the transport instead (no ioeventfd, or a test), it kicks the same eventfd.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queues: Vec<QueueSlot>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind the transport; it reaches guest memory through `mem` and
    /// interrupts on `line`.
    pub fn new(device: D, mem: GuestMemoryMmap, line: Arc<dyn Interrupt>) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Ok(QueueSlot {
                    queue: Queue::new(max)
                        .map_err(|e| std::io::Error::other(format!("queue size {max}: {e}")))?,
                    refused: [false; 4],
                    kick: EventFd::new(EFD_NONBLOCK)?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: VirtioInterrupt::new(line),
            queues,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The device's interrupt (and status) state, e.g. for a supervisor that must mark the
    /// device as needing a reset when its driver partition dies.
    pub fn interrupt(&self) -> VirtioInterrupt {
        self.interrupt.clone()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The (available ring, used ring) addresses of each queue the device serves, while
    /// it is active: what a watchdog reads to tell a busy device from a hung one.
    pub fn active_rings(&self) -> Vec<(GuestAddress, GuestAddress)> {
        if !self.active {
            return Vec::new();
        }
        self.queues
            .iter()
            .filter(|slot| slot.queue.ready())
            .map(|slot| (GuestAddress(slot.queue.avail_ring()), GuestAddress(slot.queue.used_ring())))
            .collect()
    }

    /// The device behind the transport, to reconfigure it (a supervisor replacing the
    /// process that serves its queues).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The Status register, with DEVICE_NEEDS_RESET if a worker found the queue broken.
    pub fn device_status(&self) -> u32 {
        let worker_failed = if self.interrupt.reset_requested() { status::DEVICE_NEEDS_RESET } else { 0 };
        self.device_status | worker_failed
    }

    /// The eventfd of each queue's doorbell, with the QueueNotify value (the queue index)
    /// that should ring it: register each as an ioeventfd at `base + QUEUE_NOTIFY_OFFSET`.
    pub fn queue_notify_eventfds(&self) -> Vec<(u32, &EventFd)> {
        self.queues.iter().enumerate().map(|(i, slot)| (i as u32, &slot.kick)).collect()
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only before the queue is enabled and the driver is ready.
    fn queue_writable(&mut self) -> Option<&mut QueueSlot> {
        let driver_ok = self.device_status & status::DRIVER_OK != 0;
        self.selected_queue().filter(|slot| !driver_ok && !slot.queue.ready())
    }

    /// Marks the device as needing a reset and tells the driver.
    fn needs_reset(&mut self, why: &str) {
        log::warn!("virtio device type {}: {why}; device needs reset", self.device.device_type());
        self.device_status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            log::warn!("virtio: cannot signal the configuration change: {e}");
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.refused = [false; 4];
            // Drain a kick left from before the reset.
            let _ = slot.kick.read();
        }
        self.device_status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // The driver may only add bits; DEVICE_NEEDS_RESET belongs to the device.
        let driver_bits = value & !status::DEVICE_NEEDS_RESET;
        let old_driver_bits = old & !status::DEVICE_NEEDS_RESET;
        let mut new = driver_bits | (old & status::DEVICE_NEEDS_RESET);
        if driver_bits & old_driver_bits != old_driver_bits {
            log::warn!(
                "virtio: driver cleared status bits ({old:#x} -> {value:#x}) without a reset; ignored"
            );
            return;
        }
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.device_features();
            if self.driver_features & !offered != 0 || self.driver_features & features::VERSION_1 == 0 {
                // Not accepted: the driver reads FEATURES_OK back and sees it unset.
                log::warn!(
                    "virtio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.device_status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.device_status & status::FEATURES_OK == 0 {
            self.needs_reset("DRIVER_OK without FEATURES_OK");
            return;
        }
        let mut active = Vec::new();
        for (index, slot) in self.queues.iter_mut().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if slot.refused.contains(&true) || !slot.queue.is_valid(&self.mem) {
                self.needs_reset(&format!("queue {index} is not valid"));
                return;
            }
            let kick = match slot.kick.try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    self.needs_reset(&format!("cannot duplicate the kick eventfd: {e}"));
                    return;
                }
            };
            // The worker gets its own copy of the queue state; the transport's stays as the
            // driver programmed it, for the next reset.
            let mut queue = match Queue::try_from(slot.queue.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    self.needs_reset(&format!("queue {index}: {e}"));
                    return;
                }
            };
            queue.set_event_idx(self.driver_features & features::RING_EVENT_IDX != 0);
            queue.set_ready(true);
            active.push(ActiveQueue { index: index as u16, queue, kick });
        }
        match self.device.activate(self.mem.clone(), self.interrupt.clone(), active, self.driver_features) {
            Ok(()) => self.active = true,
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |slot| u32::from(slot.queue.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |slot| u32::from(slot.queue.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.device_status(),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_writable =
            self.device_status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if features_writable => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => log::debug!("virtio-mmio: driver features page {} ignored", self.driver_features_sel),
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(slot) = self.queue_writable() {
                    let size = u16::try_from(value).unwrap_or(0);
                    slot.refused[0] = slot.queue.try_set_size(size).is_err();
                }
            }
            reg::QUEUE_READY => {
                if let Some(slot) = self.selected_queue() {
                    slot.queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                self.write_queue_address(offset, value, |q, a| q.try_set_desc_table_address(a))
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                self.write_queue_address(offset, value, |q, a| q.try_set_avail_ring_address(a))
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                self.write_queue_address(offset, value, |q, a| q.try_set_used_ring_address(a))
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            _ => log::debug!(
                "virtio-mmio: write of {value:#x} to read-only, locked or unknown register {offset:#x} ignored"
            ),
        }
    }

    /// Updates the low or high half of one of the selected queue's ring addresses.
    fn write_queue_address(
        &mut self,
        offset: u64,
        value: u32,
        set: impl Fn(&mut Queue, GuestAddress) -> Result<(), virtio_queue::Error>,
    ) {
        let high = offset & 0x4 != 0;
        let Some(slot) = self.queue_writable() else {
            return;
        };
        let (field, current) = match offset {
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => (1, slot.queue.desc_table()),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => (2, slot.queue.avail_ring()),
            _ => (3, slot.queue.used_ring()),
        };
        let address = if high {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(value)
        };
        // The latest value written counts; a refused one fails activation at DRIVER_OK.
        slot.refused[field] = set(&mut slot.queue, GuestAddress(address)).is_err();
    }

    fn notify(&mut self, queue: u32) {
        let status = self.device_status();
        if status & status::DRIVER_OK == 0 || status & status::DEVICE_NEEDS_RESET != 0 {
            log::debug!("virtio-mmio: notify of queue {queue} before DRIVER_OK (or after an error) ignored");
            return;
        }
        match self.queues.get(queue as usize) {
            Some(slot) => {
                if let Err(e) = slot.kick.write(1) {
                    log::warn!("virtio-mmio: cannot kick queue {queue}: {e}");
                }
            }
            None => log::debug!("virtio-mmio: notify of nonexistent queue {queue} ignored"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                log::debug!("virtio-mmio: {}-byte read at {offset:#x} is not a register access", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => {
                log::debug!("virtio-mmio: {}-byte write at {offset:#x} is not a register access", data.len())
            }
        }
    }
}

impl<D: VirtioDevice> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}
