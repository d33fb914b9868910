//! The hypervisor side: a vhost-user frontend behind splitvisor's virtio-mmio transport.
//!
//! The transport keeps the register file; at DRIVER_OK the frontend hands the backend
//! everything the data path needs and then stays out of it: the guest memory memfd
//! (SET_MEM_TABLE), the queue addresses, the KVM ioeventfd of the doorbell as the kick fd
//! and the KVM irqfd as the call fd. A kick goes from KVM straight to the partition, a
//! completion from the partition straight to KVM.
//!
//! Because completions bypass this process, the transport answers InterruptStatus with
//! "used buffer" set while the device runs (see [`VirtioInterrupt::set_bypassed`]): drivers
//! check their used rings anyway, and the guest's interrupt handler never waits on a
//! partition.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use splitvisor_devices::virtio::{
    ActivateError, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, device_type,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;

/// How long any reply from a partition may take. A silent partition costs a vCPU at most
/// this (the frontend talks to it only when the driver changes the device status).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of virtio-blk configuration space the frontend caches.
const CONFIG_SIZE: u32 = 24;

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket cannot be reached or configured.
    #[error("cannot connect to the vhost-user backend: {0}")]
    Connect(#[source] std::io::Error),
    /// The backend refused or failed a request.
    #[error("vhost-user backend: {what}: {source}")]
    Request {
        /// The request.
        what: &'static str,
        /// What vhost said.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something this frontend needs.
    #[error("vhost-user backend does not support {0}")]
    Unsupported(&'static str),
}

fn request<T>(what: &'static str, result: vhost::Result<T>) -> Result<T, FrontendError> {
    result.map_err(|source| FrontendError::Request { what, source })
}

/// A virtio-blk device whose queue is served by a vhost-user backend.
pub struct VhostUserBlk {
    frontend: Frontend,
    features: u64,
    config: Vec<u8>,
    queue_sizes: [u16; 1],
    active: bool,
}

impl VhostUserBlk {
    /// Connects to the backend listening at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, FrontendError> {
        let stream = UnixStream::connect(socket).map_err(FrontendError::Connect)?;
        Self::from_stream(stream)
    }

    /// Talks to the backend on an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self, FrontendError> {
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(FrontendError::Connect)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(FrontendError::Connect)?;
        let mut frontend = Frontend::from_stream(stream, 1);
        request("SET_OWNER", frontend.set_owner())?;
        let features = request("GET_FEATURES", frontend.get_features())?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(FrontendError::Unsupported("protocol features"));
        }
        let protocol = request("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Unsupported("GET_CONFIG"));
        }
        let wanted = protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
        request("SET_PROTOCOL_FEATURES", frontend.set_protocol_features(wanted))?;
        let (_, config) = request(
            "GET_CONFIG",
            frontend.get_config(0, CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &[0; CONFIG_SIZE as usize]),
        )?;
        let queues = request("GET_QUEUE_NUM", frontend.get_queue_num()).unwrap_or(1);
        if queues == 0 {
            return Err(FrontendError::Unsupported("any queue"));
        }
        Ok(Self {
            frontend,
            features,
            config,
            queue_sizes: [splitvisor_devices::virtio::block::QUEUE_SIZE],
            active: false,
        })
    }

    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &VirtioInterrupt,
        queues: &[ActiveQueue],
        features: u64,
    ) -> Result<(), FrontendError> {
        let with_protocol = features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        request("SET_FEATURES", self.frontend.set_features(with_protocol))?;
        let regions = mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(|source| FrontendError::Request { what: "describe guest memory", source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        request("SET_MEM_TABLE", self.frontend.set_mem_table(&regions))?;
        let call =
            interrupt.eventfd().ok_or(FrontendError::Unsupported("an interrupt without an eventfd"))?;
        for active in queues {
            let index = usize::from(active.index);
            let queue = &active.queue;
            let host = |addr: u64| -> Result<u64, FrontendError> {
                mem.get_host_address(vm_memory::GuestAddress(addr))
                    .map(|ptr| ptr as u64)
                    .map_err(|_| FrontendError::Unsupported("rings outside guest memory"))
            };
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            request("SET_VRING_NUM", self.frontend.set_vring_num(index, queue.size()))?;
            request("SET_VRING_ADDR", self.frontend.set_vring_addr(index, &config))?;
            request("SET_VRING_BASE", self.frontend.set_vring_base(index, queue.next_avail()))?;
            request("SET_VRING_CALL", self.frontend.set_vring_call(index, call))?;
            request("SET_VRING_KICK", self.frontend.set_vring_kick(index, &active.kick))?;
            request("SET_VRING_ENABLE", self.frontend.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    fn stop(&mut self) {
        for index in 0..self.queue_sizes.len() {
            // GET_VRING_BASE stops the ring; the backend answers once it no longer uses it.
            let stopped = self
                .frontend
                .set_vring_enable(index, false)
                .and_then(|()| self.frontend.get_vring_base(index));
            if let Err(e) = stopped {
                // A dead backend was reported when it died; there is nothing left to stop.
                log::debug!("vhost-user-blk: cannot stop queue {index}: {e}");
            }
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        splitvisor_devices::virtio::copy_config(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        if queues.is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        self.start(&mem, &interrupt, &queues, features)
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e.to_string())))?;
        interrupt.set_bypassed(true);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.stop();
            self.active = false;
        }
    }
}
