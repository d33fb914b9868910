//! The hypervisor side: a vhost-user frontend behind splitvisor's virtio-mmio transport.
//!
//! The transport keeps the register file; at DRIVER_OK the frontend hands the backend
//! everything the data path needs and then stays out of it: the guest memory memfd
//! (SET_MEM_TABLE), the queue addresses, the KVM ioeventfd of the doorbell as the kick fd
//! and the KVM irqfd as the call fd. A kick goes from KVM straight to the backend, a
//! completion from the backend straight to KVM.
//!
//! The frontend also keeps what it takes to replace the backend under a running guest
//! ([`VhostUserVirtio::reconnect`]): the activation (features, memory, queue addresses and
//! eventfds) and the inflight region of the INFLIGHT_SHMFD protocol feature, which the
//! backend journals every request in. A new backend, after a crash or for an upgrade,
//! gets the same fds and region, completes exactly the requests the old one owed, and
//! the guest sees nothing.
//!
//! Because completions bypass this process, the transport answers InterruptStatus with
//! "used buffer" set while the device runs (see [`VirtioInterrupt::set_bypassed`]): drivers
//! check their used rings anyway, and the guest's interrupt handler never waits on a
//! backend.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitvisor_devices::virtio::block;
use splitvisor_devices::virtio::{
    ActivateError, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, device_type,
};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::deadline::Deadline;

/// How long one exchange with a backend (a handshake, an activation, a stop) may take. A
/// silent backend costs a vCPU at most this (the frontend talks to it only when the driver
/// changes the device status); then its connection is shut down and it is replaced.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What kind of virtio device a vhost-user backend serves: what the transport shows the
/// driver, which the frontend cannot learn from the backend alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// The virtio device ID.
    pub device_type: u32,
    /// The largest size of each queue.
    pub queue_sizes: Vec<u16>,
    /// How many of the first queues a driver must set up before it starts the device (a
    /// multi-queue block device works with fewer than it has; a NIC needs both).
    pub required_queues: u16,
    /// Bytes of configuration space to read from the backend (GET_CONFIG).
    pub config_size: u32,
    /// Per queue, whether the watchdog may take requests that wait without progress as a
    /// hung backend (not so for a network receive queue, whose buffers wait for frames).
    pub watched: Vec<bool>,
}

impl DeviceShape {
    /// virtio-blk: one request queue, or as many as the backend's configuration says
    /// (VIRTIO_BLK_F_MQ; [`VhostUserVirtio::with_shape`] counts them).
    pub fn block() -> Self {
        Self {
            device_type: device_type::BLOCK,
            queue_sizes: vec![block::QUEUE_SIZE],
            required_queues: 1,
            config_size: block::CONFIG_SIZE as u32,
            watched: vec![true],
        }
    }

    /// virtio-net: a receive and a transmit queue; only the transmit queue is watched.
    pub fn net() -> Self {
        use splitvisor_devices::virtio::net;
        Self {
            device_type: device_type::NET,
            queue_sizes: vec![net::QUEUE_SIZE, net::QUEUE_SIZE],
            required_queues: 2,
            config_size: net::CONFIG_SIZE as u32,
            watched: vec![false, true],
        }
    }
}

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket cannot be reached or configured.
    #[error("cannot connect to the vhost-user backend: {0}")]
    Connect(#[source] std::io::Error),
    /// The backend refused or failed a request, or went away.
    #[error("vhost-user backend: {what}: {source}")]
    Request {
        /// The request.
        what: &'static str,
        /// What vhost said.
        #[source]
        source: vhost::Error,
    },
    /// The backend closed the connection during the handshake: it may serve another
    /// frontend already.
    #[error("the vhost-user backend closed the connection at {what} (is another VMM using it?)")]
    Refused {
        /// The request it closed on.
        what: &'static str,
    },
    /// The backend lacks something this frontend needs.
    #[error("vhost-user backend does not support {0}")]
    Unsupported(&'static str),
    /// A replacement backend offers less than the guest's driver accepted.
    #[error("the new vhost-user backend lacks features {missing:#x} the driver uses")]
    FeaturesLost {
        /// The feature bits missing.
        missing: u64,
    },
    /// The device is not connected to any backend.
    #[error("no vhost-user backend is connected")]
    NotConnected,
    /// Nothing could bound the wait for the backend's answers (the host refused the
    /// deadline's thread or a descriptor): the exchange was not started.
    #[error("cannot bound the wait for the vhost-user backend: {0}")]
    Deadline(#[source] std::io::Error),
}

fn request<T>(what: &'static str, result: vhost::Result<T>) -> Result<T, FrontendError> {
    result.map_err(|source| FrontendError::Request { what, source })
}

/// A request of the handshake: a backend that hangs up at once most likely serves another
/// frontend already (splitvisor-driver refuses a second one that way).
fn handshake_request<T>(what: &'static str, result: vhost::Result<T>) -> Result<T, FrontendError> {
    use vhost::vhost_user::Error as Protocol;
    result.map_err(|source| match source {
        vhost::Error::VhostUserProtocol(
            Protocol::Disconnected | Protocol::PartialMessage | Protocol::SocketBroken(_),
        ) => FrontendError::Refused { what },
        source => FrontendError::Request { what, source },
    })
}

/// A connected backend after the handshake: owner set, features and configuration known.
/// A hot-standby partition waits in this state until it is needed.
pub struct Handshake {
    frontend: Frontend,
    /// A duplicate of the socket, to watch for the backend hanging up.
    watch: OwnedFd,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").field("features", &self.features).finish_non_exhaustive()
    }
}

impl Handshake {
    /// Connects to the virtio-blk backend listening at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, FrontendError> {
        Self::connect_for(socket, &DeviceShape::block())
    }

    /// Connects to the backend of a `shape` device listening at `socket`.
    pub fn connect_for(socket: &Path, shape: &DeviceShape) -> Result<Self, FrontendError> {
        Self::for_device(UnixStream::connect(socket).map_err(FrontendError::Connect)?, shape)
    }

    /// Talks to a virtio-blk backend on an already connected stream.
    pub fn new(stream: UnixStream) -> Result<Self, FrontendError> {
        Self::for_device(stream, &DeviceShape::block())
    }

    /// Talks to the backend of a `shape` device on an already connected stream.
    pub fn for_device(stream: UnixStream, shape: &DeviceShape) -> Result<Self, FrontendError> {
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(FrontendError::Connect)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(FrontendError::Connect)?;
        let watch = OwnedFd::from(stream.try_clone().map_err(FrontendError::Connect)?);
        let _deadline = Deadline::arm(watch.as_fd(), REPLY_TIMEOUT).map_err(FrontendError::Deadline)?;
        // Queue indices are checked against the device's own queue count (a block device's
        // backend says how many it has only in its configuration space, read below).
        let max_queues = match shape.device_type {
            device_type::BLOCK => usize::from(block::MAX_QUEUES),
            _ => shape.queue_sizes.len(),
        };
        let mut frontend = Frontend::from_stream(stream, max_queues as u64);
        handshake_request("SET_OWNER", frontend.set_owner())?;
        let features = handshake_request("GET_FEATURES", frontend.get_features())?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(FrontendError::Unsupported("protocol features"));
        }
        let offered = request("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Unsupported("GET_CONFIG"));
        }
        let protocol = offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::MQ);
        request("SET_PROTOCOL_FEATURES", frontend.set_protocol_features(protocol))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request is acknowledged: a backend's refusal is seen where it happens,
            // and a queue is known to be running once SET_VRING_ENABLE returns.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let size = shape.config_size;
        let (_, config) = request(
            "GET_CONFIG",
            frontend.get_config(0, size, VhostUserConfigFlags::WRITABLE, &vec![0; size as usize]),
        )?;
        Ok(Self { frontend, watch, features, protocol, config })
    }

    /// The connection's socket, to watch for the backend hanging up (POLLRDHUP).
    pub fn hangup_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.watch.as_fd()
    }

    /// The virtio features the backend offers.
    pub fn features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The request queues a virtio-blk backend's device has: `num_queues` of its
    /// configuration space if it offers VIRTIO_BLK_F_MQ (at most [`block::MAX_QUEUES`]),
    /// else one.
    pub fn block_queues(&self) -> u16 {
        if self.features & block::feature::MQ == 0 {
            return 1;
        }
        let num_queues = self.config.get(34..36).map_or(1, |b| u16::from_le_bytes([b[0], b[1]]));
        num_queues.clamp(1, block::MAX_QUEUES)
    }
}

/// A queue as the driver set it up.
struct QueueSetup {
    index: usize,
    size: u16,
    max_size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Where the ring starts for a fresh backend (SET_VRING_BASE).
    base: u16,
    kick: EventFd,
}

/// What the driver set up at DRIVER_OK, kept to be replayed to a new backend.
struct Activation {
    memory: GuestMemoryMmap,
    features: u64,
    call: EventFd,
    queues: Vec<QueueSetup>,
}

/// The inflight region a backend gave us; kept for its successors.
struct Inflight {
    file: File,
    shape: VhostUserInflight,
}

/// How a new backend takes over the queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The previous backend died: each queue resumes at the guest's used index, and the
    /// backend completes what its predecessor owed from the inflight region.
    AfterCrash,
    /// The previous backend was stopped with GET_VRING_BASE ([`VhostUserVirtio::quiesce`]):
    /// each queue resumes where it said.
    Handover(Vec<u16>),
}

/// Reads a queue's indices in guest memory, without the transport's lock: the watchdog
/// tells a busy backend from a hung one by whether the used index moves while requests
/// wait.
#[derive(Clone)]
pub struct QueueProbe {
    memory: GuestMemoryMmap,
    avail: GuestAddress,
    used: GuestAddress,
}

impl QueueProbe {
    /// A probe of the queue whose rings are at `avail` and `used` in `memory`.
    pub fn new(memory: GuestMemoryMmap, avail: GuestAddress, used: GuestAddress) -> Self {
        Self { memory, avail, used }
    }

    /// (available index, used index) now.
    pub fn indices(&self) -> Option<(u16, u16)> {
        let avail = self.memory.read_obj::<u16>(self.avail.checked_add(2)?).ok()?;
        let used = self.memory.read_obj::<u16>(self.used.checked_add(2)?).ok()?;
        Some((u16::from_le(avail), u16::from_le(used)))
    }
}

/// The probes of an active device's queues, readable from any thread.
pub type Probes = Arc<Mutex<Vec<QueueProbe>>>;

/// A virtio-blk device served over vhost-user (the name it had when it was the only kind).
pub type VhostUserBlk = VhostUserVirtio;

/// A virtio device whose queues are served by a vhost-user backend: virtio-blk, virtio-net
/// or any other kind its [`DeviceShape`] describes.
pub struct VhostUserVirtio {
    backend: Option<Handshake>,
    features: u64,
    config: Vec<u8>,
    shape: DeviceShape,
    inflight: Option<Inflight>,
    activation: Option<Activation>,
    /// Written by a backend that finds the queue broken by the guest.
    queue_error: EventFd,
    /// Written when a request to the backend failed on a vCPU's behalf: a supervisor
    /// replaces the backend and replays the activation. Without one, the error goes to the
    /// driver.
    fault: Option<EventFd>,
    probes: Probes,
}

impl VhostUserVirtio {
    /// Connects to the virtio-blk backend listening at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, FrontendError> {
        Self::from_handshake(Handshake::connect(socket)?)
    }

    /// Talks to a virtio-blk backend on an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self, FrontendError> {
        Self::from_handshake(Handshake::new(stream)?)
    }

    /// A virtio-blk device, served by the backend of `handshake`.
    pub fn from_handshake(handshake: Handshake) -> Result<Self, FrontendError> {
        Self::with_shape(handshake, DeviceShape::block())
    }

    /// A `shape` device, served by the backend of `handshake` (made for that shape).
    pub fn with_shape(handshake: Handshake, mut shape: DeviceShape) -> Result<Self, FrontendError> {
        if shape.device_type == device_type::BLOCK {
            // As many request queues as the backend's device says it has.
            let queues = usize::from(handshake.block_queues());
            shape.queue_sizes = vec![block::QUEUE_SIZE; queues];
            shape.watched = vec![true; queues];
        }
        Ok(Self {
            features: handshake.features,
            config: handshake.config.clone(),
            backend: Some(handshake),
            shape,
            inflight: None,
            activation: None,
            queue_error: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Connect)?,
            fault: None,
            probes: Probes::default(),
        })
    }

    /// Shows the driver `bytes` at `offset` of the configuration space instead of what the
    /// backend said (a MAC the VMM assigns to an external network backend).
    pub fn override_config(mut self, offset: usize, bytes: &[u8]) -> Self {
        let end = offset.saturating_add(bytes.len());
        if self.config.len() < end {
            self.config.resize(end, 0);
        }
        self.config[offset..end].copy_from_slice(bytes);
        self
    }

    /// What the device is.
    pub fn shape(&self) -> &DeviceShape {
        &self.shape
    }

    /// Failed requests on a vCPU's behalf are reported on `fault` (for a supervisor that
    /// replaces the backend) instead of failing the device.
    pub fn with_fault_signal(mut self, fault: EventFd) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Readable once a backend reported a queue broken by the guest (SET_VRING_ERR).
    pub fn queue_error(&self) -> &EventFd {
        &self.queue_error
    }

    /// The socket of the current backend, to watch for it hanging up (POLLRDHUP).
    pub fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.backend.as_ref().map(|backend| backend.watch.as_fd())
    }

    /// The queue probes of the active device (empty while the driver has not started it).
    pub fn probes(&self) -> Probes {
        self.probes.clone()
    }

    /// Whether the driver has started the device.
    pub fn is_active(&self) -> bool {
        self.activation.is_some()
    }

    /// Forgets the current backend (it died); the device waits for [`reconnect`](Self::reconnect).
    pub fn disconnect(&mut self) {
        self.backend = None;
    }

    /// Stops the current backend's queues for a handover (GET_VRING_BASE, which a backend
    /// answers once it no longer touches them); returns where each resumes.
    pub fn quiesce(&mut self) -> Result<Resume, FrontendError> {
        let backend = self.backend.as_mut().ok_or(FrontendError::NotConnected)?;
        let _deadline =
            Deadline::arm(backend.watch.as_fd(), REPLY_TIMEOUT).map_err(FrontendError::Deadline)?;
        let mut bases = Vec::new();
        if let Some(activation) = &self.activation {
            for queue in &activation.queues {
                let base = request("GET_VRING_BASE", backend.frontend.get_vring_base(queue.index))?;
                bases.push(
                    u16::try_from(base)
                        .map_err(|_| FrontendError::Unsupported("a vring base above 65535"))?,
                );
            }
        }
        Ok(Resume::Handover(bases))
    }

    /// Makes the backend of `handshake` serve this device from now on, resuming the
    /// driver's queues as `resume` says. The old backend must be gone or quiesced.
    pub fn reconnect(&mut self, handshake: Handshake, resume: Resume) -> Result<(), FrontendError> {
        let missing = self.activation.as_ref().map_or(0, |a| a.features) & !handshake.features;
        if missing != 0 {
            return Err(FrontendError::FeaturesLost { missing });
        }
        self.backend = Some(handshake);
        if self.activation.is_some() {
            if let Err(e) = self.start(&resume) {
                self.backend = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Hands the activation to the current backend.
    fn start(&mut self, resume: &Resume) -> Result<(), FrontendError> {
        let backend = self.backend.as_mut().ok_or(FrontendError::NotConnected)?;
        let activation = self.activation.as_ref().ok_or(FrontendError::NotConnected)?;
        let _deadline =
            Deadline::arm(backend.watch.as_fd(), REPLY_TIMEOUT).map_err(FrontendError::Deadline)?;
        let frontend = &mut backend.frontend;
        // The whole set-up goes out without waiting for each acknowledgement (one wake-up of
        // the backend instead of a dozen: this is the time a restart keeps the device from
        // serving), and one request with a reply at the end makes sure all of it was taken.
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        let result = Self::replay(
            frontend,
            backend.protocol,
            activation,
            &mut self.inflight,
            &self.queue_error,
            resume,
        );
        if backend.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        result?;
        request("GET_FEATURES (barrier)", frontend.get_features())?;
        Ok(())
    }

    /// Sends everything a backend needs to serve the activated queues.
    fn replay(
        frontend: &mut Frontend,
        protocol: VhostUserProtocolFeatures,
        activation: &Activation,
        inflight: &mut Option<Inflight>,
        queue_error: &EventFd,
        resume: &Resume,
    ) -> Result<(), FrontendError> {
        let with_protocol = activation.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        request("SET_FEATURES", frontend.set_features(with_protocol))?;
        let regions = activation
            .memory
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(|source| FrontendError::Request { what: "describe guest memory", source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        request("SET_MEM_TABLE", frontend.set_mem_table(&regions))?;
        if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if inflight.is_none() {
                let max = activation.queues.iter().map(|q| q.max_size).max().unwrap_or(1);
                // Every queue the device has: the region is indexed by queue index.
                let queues = activation.queues.iter().map(|q| q.index + 1).max().unwrap_or(1) as u16;
                let asked = VhostUserInflight::new(0, 0, queues, max);
                let (shape, file) = request("GET_INFLIGHT_FD", frontend.get_inflight_fd(&asked))?;
                *inflight = Some(Inflight { file, shape });
            }
            if let Some(inflight) = inflight {
                request(
                    "SET_INFLIGHT_FD",
                    frontend.set_inflight_fd(&inflight.shape, inflight.file.as_raw_fd()),
                )?;
            }
        }
        let host = |addr: GuestAddress| -> Result<u64, FrontendError> {
            activation
                .memory
                .get_host_address(addr)
                .map(|ptr| ptr as u64)
                .map_err(|_| FrontendError::Unsupported("rings outside guest memory"))
        };
        for (position, queue) in activation.queues.iter().enumerate() {
            let base = match resume {
                Resume::Handover(bases) => bases.get(position).copied().unwrap_or(queue.base),
                // The backend owes everything after the used index; with an inflight region it
                // finds the rest itself.
                Resume::AfterCrash => {
                    let used =
                        queue.used.checked_add(2).ok_or(FrontendError::Unsupported("rings at the top"))?;
                    activation.memory.read_obj::<u16>(used).map(u16::from_le).unwrap_or(queue.base)
                }
            };
            let config = VringConfigData {
                queue_max_size: queue.max_size,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: host(queue.desc)?,
                used_ring_addr: host(queue.used)?,
                avail_ring_addr: host(queue.avail)?,
                log_addr: None,
            };
            let index = queue.index;
            request("SET_VRING_NUM", frontend.set_vring_num(index, queue.size))?;
            request("SET_VRING_ADDR", frontend.set_vring_addr(index, &config))?;
            request("SET_VRING_BASE", frontend.set_vring_base(index, base))?;
            request("SET_VRING_CALL", frontend.set_vring_call(index, &activation.call))?;
            request("SET_VRING_ERR", frontend.set_vring_err(index, queue_error))?;
            request("SET_VRING_KICK", frontend.set_vring_kick(index, &queue.kick))?;
            request("SET_VRING_ENABLE", frontend.set_vring_enable(index, true))?;
        }
        if *resume == Resume::AfterCrash {
            // Whatever the guest queued meanwhile rang a doorbell nobody listened to.
            for queue in &activation.queues {
                let _ = queue.kick.write(1);
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        let Some(backend) = self.backend.as_mut() else { return };
        let _deadline = match Deadline::arm(backend.watch.as_fd(), REPLY_TIMEOUT) {
            Ok(deadline) => deadline,
            Err(e) => {
                // Unbounded, the exchange could hold this vCPU for ever. Hanging up stops
                // the backend's queues as surely: it ends its session.
                log::warn!("vhost-user: cannot bound stopping the queues ({e}): hanging up on the backend");
                self.backend = None;
                if let Some(fault) = &self.fault {
                    let _ = fault.write(1);
                }
                return;
            }
        };
        let started: Vec<usize> =
            self.activation.as_ref().map(|a| a.queues.iter().map(|q| q.index).collect()).unwrap_or_default();
        for index in started {
            // GET_VRING_BASE stops the ring; the backend answers once it no longer uses it.
            let stopped = backend
                .frontend
                .set_vring_enable(index, false)
                .and_then(|()| backend.frontend.get_vring_base(index));
            if let Err(e) = stopped {
                log::debug!("vhost-user: cannot stop queue {index}: {e}");
            }
        }
    }

    /// A request failed on a vCPU's behalf: report it to the supervisor if there is one.
    fn backend_failed(&mut self, error: FrontendError) -> Result<(), FrontendError> {
        match &self.fault {
            Some(fault) => {
                // The connection stays until the supervisor replaces it: the supervisor may
                // be watching its socket right now.
                log::warn!("vhost-user: {error}; the backend will be replaced");
                let _ = fault.write(1);
                Ok(())
            }
            None => Err(error),
        }
    }
}

impl VirtioDevice for VhostUserVirtio {
    fn device_type(&self) -> u32 {
        self.shape.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.shape.queue_sizes
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
        if let Some(missing) =
            (0..self.shape.required_queues).find(|index| !queues.iter().any(|q| q.index == *index))
        {
            return Err(ActivateError::MissingQueue(missing));
        }
        let call = interrupt
            .eventfd()
            .ok_or(ActivateError::Worker(std::io::Error::other("an interrupt without an eventfd")))?
            .try_clone()
            .map_err(ActivateError::Worker)?;
        let setups = queues
            .into_iter()
            .map(|active| QueueSetup {
                index: usize::from(active.index),
                size: active.queue.size(),
                max_size: active.queue.max_size(),
                desc: GuestAddress(active.queue.desc_table()),
                avail: GuestAddress(active.queue.avail_ring()),
                used: GuestAddress(active.queue.used_ring()),
                base: active.queue.next_avail(),
                kick: active.kick,
            })
            .collect::<Vec<_>>();
        *self.probes.lock().unwrap_or_else(|e| e.into_inner()) = setups
            .iter()
            .filter(|q| self.shape.watched.get(q.index).copied().unwrap_or(true))
            .map(|q| QueueProbe { memory: mem.clone(), avail: q.avail, used: q.used })
            .collect();
        self.activation = Some(Activation { memory: mem, features, call, queues: setups });
        interrupt.set_bypassed(true);
        let started = match self.backend {
            Some(_) => self.start(&Resume::Handover(Vec::new())),
            None => Err(FrontendError::NotConnected),
        };
        match started {
            Ok(()) => Ok(()),
            Err(e) => self
                .backend_failed(e)
                .map_err(|e| ActivateError::Worker(std::io::Error::other(e.to_string()))),
        }
    }

    fn reset(&mut self) {
        if self.activation.is_some() {
            self.stop();
        }
        self.activation = None;
        self.probes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // A reset device owes nothing: the next activation gets a fresh region.
        self.inflight = None;
        let _ = self.queue_error.read();
    }
}
