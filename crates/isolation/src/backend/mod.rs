//! The partition side: a vhost-user backend around splitvisor's device engines.
//!
//! [`serve`] answers one frontend (splitvisor's, QEMU's, any vhost-user frontend) on a
//! connected socket until it hangs up. The device-specific part is a [`VhostUserDevice`]:
//! its features, configuration space and, per queue, a [`QueueServer`] that executes
//! requests. Everything else is here and shared by every device kind:
//!
//! * guest memory from the frontend's memory table, ring addresses translated from the
//!   frontend's address space;
//! * one thread per enabled queue, woken by the queue's kick eventfd, completing through its
//!   call eventfd, and reporting a queue the guest broke through its error eventfd
//!   (`SET_VRING_ERR`: the frontend then marks the device as needing a reset); a queue
//!   whose thread the host refuses (no thread, no descriptor left) ends the session with
//!   that cause ([`BackendError::QueueStart`]) instead of going unserved;
//! * the inflight region (`INFLIGHT_SHMFD`, [`inflight`]): every request is journaled in
//!   memory the frontend keeps, so that the backend that replaces this one after a crash
//!   completes each request that was in flight exactly once;
//! * fault injection for demonstrations and tests ([`FaultPlan`]), off unless asked for.
//!
//! The backend never blocks on the frontend: a queue thread only touches guest memory, its
//! eventfds and the device's own files.

pub mod blk;
pub mod inflight;
mod memory;
pub mod net;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use splitvisor_devices::fault::Injected;
use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::{Processed, QueueError, RequestJournal};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as ProtocolError, GpuBackend, Result as ProtocolResult,
    VhostUserBackendReqHandlerMut,
};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use inflight::{InflightRegion, Recovery};
pub use memory::MappedMemory;

/// A device served over vhost-user.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// How many queues it has.
    fn num_queues(&self) -> u16;
    /// The largest size of each queue.
    fn max_queue_size(&self) -> u16;
    /// The virtio feature bits it offers.
    fn features(&self) -> u64;
    /// Its configuration space.
    fn config(&self) -> Vec<u8>;
    /// Whether to offer VHOST_USER_PROTOCOL_F_MQ: the device has more queues than one
    /// frontend of its kind expects without it (virtio-net's one queue pair needs none).
    fn multi_queue(&self) -> bool {
        self.num_queues() > 1
    }
    /// Something that executes the requests of queue `index`, in `memory`, with the
    /// `features` the driver accepted.
    fn queue_server(&self, index: u16, memory: GuestMemoryMmap, features: u64) -> Box<dyn QueueServer>;
}

/// Executes the requests of one queue.
pub trait QueueServer: Send {
    /// Serves every available request, telling `journal` about each.
    fn serve(&mut self, queue: &mut Queue, journal: &mut dyn RequestJournal)
    -> Result<Processed, QueueError>;
    /// Re-executes the requests (by head index, oldest first) that a previous backend took
    /// but never completed, and puts them in the used ring.
    fn resubmit(
        &mut self,
        queue: &mut Queue,
        heads: &[u16],
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError>;
    /// Another fd whose readiness means work for this queue (a network device's TAP for
    /// its receive queue), watched edge-triggered next to the kick.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Whether the last pass stopped at its work budget with work left: the queue thread
    /// then serves again without waiting.
    fn more(&self) -> bool {
        false
    }
    /// `notify` interrupts the driver; a server that completes requests while others are
    /// still in flight calls it as they complete (by default completions are announced
    /// once per [`QueueServer::serve`], through [`Processed::notify`]).
    fn set_notifier(&mut self, notify: Box<dyn Fn() + Send>) {
        let _ = notify;
    }
}

pub use splitvisor_devices::fault::FaultPlan;

/// Errors serving a frontend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The frontend broke the protocol.
    #[error("vhost-user protocol: {0}")]
    Protocol(#[source] ProtocolError),
    /// Waiting for the frontend failed.
    #[error("vhost-user socket: {0}")]
    Socket(#[source] io::Error),
    /// A queue the frontend set up cannot be served: the host refused what its thread
    /// needs (the thread itself under a pids or RLIMIT_NPROC limit, a descriptor under
    /// RLIMIT_NOFILE). The session ends with this cause rather than leave the queue
    /// unserved while the frontend believes it runs; the message that started the queue
    /// is answered with a failure if the frontend asked for an answer.
    #[error("cannot start queue {queue}: cannot create {resource}: {source}")]
    QueueStart {
        /// The queue.
        queue: usize,
        /// What its thread needed: `its thread`, `its epoll`, ...
        resource: &'static str,
        /// What the host answered.
        #[source]
        source: io::Error,
    },
}

/// Serves the frontend at the other end of `stream` until it hangs up. Every thread
/// started for it is stopped and every mapping of its memory dropped before this returns.
pub fn serve<D: VhostUserDevice>(
    stream: UnixStream,
    device: Arc<D>,
    faults: Arc<FaultPlan>,
) -> Result<(), BackendError> {
    serve_refusing_others(stream, device, faults, None)
}

/// [`serve`], also refusing (accepting and closing at once, with a warning) any other
/// frontend that connects to `listener` meanwhile: one frontend at a time owns the device.
pub fn serve_refusing_others<D: VhostUserDevice>(
    stream: UnixStream,
    device: Arc<D>,
    faults: Arc<FaultPlan>,
    listener: Option<&std::os::unix::net::UnixListener>,
) -> Result<(), BackendError> {
    let connection = Arc::new(Mutex::new(Connection::new(device, faults)));
    let mut handler = BackendReqHandler::from_stream(stream, connection.clone());
    let result = loop {
        let listening = listener.map_or(-1, |listener| listener.as_raw_fd());
        {
            match wait_readable(handler.as_raw_fd(), listening) {
                Ok(Readable::Listener) => {
                    if let Some(Ok((other, _))) = listener.map(|listener| listener.accept()) {
                        log::warn!("refused a second vhost-user frontend: this backend already serves one");
                        drop(other);
                    }
                    continue;
                }
                Ok(Readable::Connection) => {}
                Err(e) => break Err(BackendError::Socket(e)),
            }
        }
        let ended = match early_vring_enable(handler.as_raw_fd(), &connection) {
            Ok(true) => None,
            Ok(false) => match handler.handle_request() {
                Ok(()) => None,
                Err(ProtocolError::Disconnected | ProtocolError::PartialMessage) => Some(Ok(())),
                Err(ProtocolError::SocketBroken(e)) if e.kind() != io::ErrorKind::InvalidData => Some(Ok(())),
                Err(e) => Some(Err(BackendError::Protocol(e))),
            },
            Err(e) => Some(Err(BackendError::Socket(e))),
        };
        // A queue the host refused what its thread needs ends the session with that cause,
        // whatever became of the message that started it (answered with a failure if the
        // frontend asked for an answer). Hanging up is the one signal every frontend acts
        // on: most send SET_VRING_KICK without asking for an answer, and QEMU disconnects
        // on a failed start anyway.
        if let Some(refused) = connection.lock().unwrap_or_else(|e| e.into_inner()).unservable.take() {
            break Err(refused);
        }
        if let Some(ended) = ended {
            break ended;
        }
    };
    connection.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
    result
}

/// vhost-user's SET_VRING_ENABLE.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, a reply, a reply wanted.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Takes a SET_VRING_ENABLE that arrives before the frontend acknowledged
/// VHOST_USER_F_PROTOCOL_FEATURES (QEMU's virtio-net enables its queues when the device is
/// realized, long before SET_FEATURES), which the vhost crate refuses as an inactive
/// feature and then ends the session on. It is applied like any other (the queue starts
/// once it is set up) and acknowledged if asked. Says whether it took a message.
fn early_vring_enable<D: VhostUserDevice>(
    socket: i32,
    connection: &Mutex<Connection<D>>,
) -> io::Result<bool> {
    let protocol_acked = connection.lock().unwrap_or_else(|e| e.into_inner()).acked_features
        & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        != 0;
    if protocol_acked {
        return Ok(false);
    }
    let mut message = [0u8; 20];
    // SAFETY: peeks into a buffer of its size, never blocking.
    let peeked = unsafe {
        libc::recv(socket, message.as_mut_ptr().cast(), message.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    let word = |message: &[u8; 20], at: usize| {
        u32::from_le_bytes([message[at], message[at + 1], message[at + 2], message[at + 3]])
    };
    if peeked != 20 || word(&message, 0) != SET_VRING_ENABLE || word(&message, 8) != 8 {
        return Ok(false);
    }
    // SAFETY: takes the 20 bytes just peeked (nothing else reads this socket meanwhile).
    let taken = unsafe { libc::recv(socket, message.as_mut_ptr().cast(), message.len(), libc::MSG_DONTWAIT) };
    if taken != 20 {
        return Err(io::Error::other("a SET_VRING_ENABLE message vanished"));
    }
    let (index, enable) = (word(&message, 12), word(&message, 16) != 0);
    log::debug!(
        "vhost-user: queue {index} {} before the features",
        if enable { "enabled" } else { "disabled" }
    );
    let status =
        connection.lock().unwrap_or_else(|e| e.into_inner()).set_vring_enable(index, enable).is_err();
    if word(&message, 4) & FLAG_NEED_REPLY != 0 {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        reply[4..8].copy_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(status).to_le_bytes());
        // SAFETY: sends a buffer of its size.
        if unsafe { libc::send(socket, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) } != 20 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

enum Readable {
    Connection,
    Listener,
}

fn wait_readable(connection: i32, listener: i32) -> io::Result<Readable> {
    loop {
        let mut fds = [
            libc::pollfd { fd: connection, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds; no timeout (the frontend's next message or hang-up ends it).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        // The connection first: its hang-up must end the session even if another waits.
        if fds[0].revents != 0 {
            return Ok(Readable::Connection);
        }
        if fds[1].revents != 0 {
            return Ok(Readable::Listener);
        }
    }
}

/// One queue as the frontend set it up.
#[derive(Default)]
struct Vring {
    size: u16,
    /// Descriptor table, available ring, used ring: the frontend's addresses.
    addresses: Option<(u64, u64, u64)>,
    base: u16,
    /// The queue's position when its thread was stopped for a reconfiguration (not by
    /// GET_VRING_BASE): it resumes from there.
    paused: Option<Queue>,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    err: Option<EventFd>,
    enabled: bool,
    worker: Option<Worker>,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<Queue>,
}

/// The state of one frontend's session.
struct Connection<D: VhostUserDevice> {
    device: Arc<D>,
    faults: Arc<FaultPlan>,
    acked_features: u64,
    acked_protocol: u64,
    memory: Option<MappedMemory>,
    inflight: Option<Arc<InflightRegion>>,
    vrings: Vec<Vring>,
    /// A queue whose thread could not be started, and why: the session ends on it.
    unservable: Option<BackendError>,
}

fn invalid(why: &'static str) -> ProtocolError {
    ProtocolError::InvalidOperation(why)
}

impl<D: VhostUserDevice> Connection<D> {
    fn new(device: Arc<D>, faults: Arc<FaultPlan>) -> Self {
        let vrings = (0..device.num_queues()).map(|_| Vring::default()).collect();
        Self {
            device,
            faults,
            acked_features: 0,
            acked_protocol: 0,
            memory: None,
            inflight: None,
            vrings,
            unservable: None,
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut features = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if self.device.multi_queue() {
            features |= VhostUserProtocolFeatures::MQ;
        }
        features
    }

    fn vring(&mut self, index: u32) -> ProtocolResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(ProtocolError::InvalidParam)
    }

    /// Stops queue `index`'s thread; returns the queue's position.
    fn stop_worker(&mut self, index: usize) -> Option<Queue> {
        let worker = self.vrings.get_mut(index)?.worker.take()?;
        let _ = worker.stop.write(1);
        match worker.thread.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                log::error!("vhost-user: the thread of queue {index} panicked");
                None
            }
        }
    }

    fn stop_all(&mut self) {
        for index in 0..self.vrings.len() {
            if let Some(queue) = self.stop_worker(index) {
                self.vrings[index].paused = Some(queue);
            }
        }
    }

    /// Stops every running queue thread, applies `change`, and starts them again where
    /// they were.
    fn reconfigure(&mut self, change: impl FnOnce(&mut Self) -> ProtocolResult<()>) -> ProtocolResult<()> {
        let running: Vec<usize> =
            (0..self.vrings.len()).filter(|&i| self.vrings[i].worker.is_some()).collect();
        for &index in &running {
            self.vrings[index].paused = self.stop_worker(index);
        }
        let result = change(self);
        for index in running {
            self.start_if_ready(index)?;
        }
        result
    }

    /// Starts queue `index`'s thread once everything it needs is there. Fails, and the
    /// session ends ([`BackendError::QueueStart`]), if the host refuses the thread or a
    /// descriptor it needs: everything the thread uses is obtained here, before the queue
    /// counts as started, so that no queue the frontend believes running goes unserved.
    fn start_if_ready(&mut self, index: usize) -> ProtocolResult<()> {
        let protocol = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let Some(memory) = self.memory.clone() else { return Ok(()) };
        let vring = &mut self.vrings[index];
        if vring.worker.is_some() || (protocol && !vring.enabled) || vring.size == 0 {
            return Ok(());
        }
        let (Some(kick), Some(call), Some((desc, avail, used))) = (&vring.kick, &vring.call, vring.addresses)
        else {
            return Ok(());
        };
        let translate = |va| memory.to_guest(va);
        let (Some(desc), Some(avail), Some(used)) = (translate(desc), translate(avail), translate(used))
        else {
            log::warn!("vhost-user: queue {index} rings are outside guest memory");
            if let Some(err) = &vring.err {
                let _ = err.write(1);
            }
            return Ok(());
        };
        let queue = match vring.paused.take() {
            Some(queue) => Ok((queue, false)),
            None => {
                new_queue(self.device.max_queue_size(), vring.size, desc, avail, used, self.acked_features)
                    .map(|queue| (queue, true))
            }
        };
        let (mut queue, recover) = match queue {
            Ok(queue) => queue,
            Err(e) => {
                log::warn!("vhost-user: queue {index} cannot be set up: {e}");
                if let Some(err) = &vring.err {
                    let _ = err.write(1);
                }
                return Ok(());
            }
        };
        if recover {
            queue.set_next_avail(vring.base);
            queue.set_next_used(vring.base);
        }
        let eventfds = QueueEventFds::duplicate(kick, call, vring.err.as_ref());
        let started = eventfds.and_then(|eventfds| {
            let server = self.device.queue_server(index as u16, memory.memory.clone(), self.acked_features);
            let worker = QueueWorker {
                index: index as u16,
                server,
                memory: memory.memory,
                kick: eventfds.kick,
                call: eventfds.call,
                err: eventfds.err,
                inflight: self.inflight.clone(),
                faults: self.faults.clone(),
                recover,
                broken: false,
            };
            worker.start(queue)
        });
        match started {
            Ok(worker) => {
                vring.worker = Some(worker);
                Ok(())
            }
            Err((resource, source)) => {
                let answer = io::Error::new(source.kind(), format!("cannot start queue {index}"));
                self.unservable.get_or_insert(BackendError::QueueStart { queue: index, resource, source });
                Err(ProtocolError::ReqHandlerError(answer))
            }
        }
    }
}

/// What the host refused a queue's thread: the resource, and its answer.
type Refused = (&'static str, io::Error);

/// A queue thread's own copies of the queue's eventfds (the frontend may replace the
/// vring's while the thread runs).
struct QueueEventFds {
    kick: EventFd,
    call: EventFd,
    err: Option<EventFd>,
}

impl QueueEventFds {
    fn duplicate(kick: &EventFd, call: &EventFd, err: Option<&EventFd>) -> Result<Self, Refused> {
        let duplicate = |fd: &EventFd| fd.try_clone().map_err(|e| ("a copy of its eventfds", e));
        Ok(Self { kick: duplicate(kick)?, call: duplicate(call)?, err: err.map(duplicate).transpose()? })
    }
}

fn new_queue(
    max: u16,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    features: u64,
) -> Result<Queue, virtio_queue::Error> {
    let mut queue = Queue::new(max)?;
    queue.try_set_size(size)?;
    queue.try_set_desc_table_address(desc)?;
    queue.try_set_avail_ring_address(avail)?;
    queue.try_set_used_ring_address(used)?;
    queue.set_event_idx(features & splitvisor_devices::virtio::features::RING_EVENT_IDX != 0);
    queue.set_ready(true);
    Ok(queue)
}

/// Serves one queue on a thread of its own.
struct QueueWorker {
    index: u16,
    server: Box<dyn QueueServer>,
    memory: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    err: Option<EventFd>,
    inflight: Option<Arc<InflightRegion>>,
    faults: Arc<FaultPlan>,
    /// The queue is new to this process: find out what a predecessor owes first.
    recover: bool,
    /// The guest broke the queue: nothing more is served until the frontend resets it.
    broken: bool,
}

/// The journal a queue thread keeps: the inflight region if the frontend gave one, and
/// the fault plan's request count.
struct Journal<'a, 'b> {
    inflight: Option<&'a mut inflight::InflightQueue<'b>>,
    faults: &'a FaultPlan,
}

impl RequestJournal for Journal<'_, '_> {
    fn fetched(&mut self, head: u16) {
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.fetched(head);
        }
        // In a partition, a crash is the process dying.
        match self.faults.request() {
            Some(Injected::Crash) => {
                log::error!("fault injection: crashing after {} requests", self.faults.requests() - 1);
                std::process::abort();
            }
            Some(Injected::Hang) => {
                log::error!("fault injection: hanging after {} requests", self.faults.requests() - 1);
                splitvisor_devices::fault::hang();
            }
            None => {}
        }
    }

    fn completing(&mut self, head: u16) {
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.completing(head);
        }
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.completed(head, used_idx);
        }
    }
}

/// The epoll tokens of a queue thread.
const KICK: u64 = 0;
const STOP: u64 = 1;
const WAKE: u64 = 2;

impl QueueWorker {
    /// Obtains what the thread needs from the host (its stop eventfd, its epoll and what
    /// it watches, the thread itself) and starts it serving `queue`. Nothing fails once the
    /// thread runs but the wait itself.
    fn start(mut self, queue: Queue) -> Result<Worker, Refused> {
        let index = self.index;
        match self.call.try_clone() {
            // Completions reach the driver as they happen, not only once a batch is done.
            Ok(notify) => self.server.set_notifier(Box::new(move || {
                if let Err(e) = notify.write(1) {
                    log::warn!("vhost-user queue {index}: cannot signal the driver: {e}");
                }
            })),
            Err(e) => log::warn!("vhost-user queue {index}: completions announced per batch only: {e}"),
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| ("its stop eventfd", e))?;
        let stop_watched = stop.try_clone().map_err(|e| ("its stop eventfd", e))?;
        let epoll = Epoll::new().map_err(|e| ("its epoll", e))?;
        let mut watches =
            vec![(self.kick.as_raw_fd(), KICK, EventSet::IN), (stop_watched.as_raw_fd(), STOP, EventSet::IN)];
        if let Some(fd) = self.server.wake_fd() {
            // Edge-triggered: work the server leaves waiting (no buffers for a frame) must
            // not wake the thread again and again; the kick brings it back.
            watches.push((fd, WAKE, EventSet::IN | EventSet::EDGE_TRIGGERED));
        }
        for (fd, token, events) in watches {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(|e| ("its epoll", e))?;
        }
        let thread = std::thread::Builder::new()
            .name(format!("vhost-queue{index}"))
            .spawn(move || {
                // Held for as long as the thread waits: the epoll watches this fd.
                let _stop = stop_watched;
                self.run(queue, &epoll)
            })
            .map_err(|e| ("its thread", e))?;
        Ok(Worker { stop, thread })
    }

    fn run(mut self, mut queue: Queue, epoll: &Epoll) -> Queue {
        let region = self.inflight.clone();
        let mut inflight = region.as_deref().and_then(|region| region.queue(self.index, queue.size()));
        if self.recover {
            if let Some(inflight) = inflight.as_mut() {
                self.recover(&mut queue, inflight);
            }
        }
        // Requests may be waiting already (a backend replacing another one).
        self.serve(&mut queue, inflight.as_mut());
        let mut events = [EpollEvent::default(); 3];
        loop {
            let timeout = if self.server.more() && !self.broken { 0 } else { -1 };
            let ready = match epoll.wait(timeout, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user queue {}: epoll_wait failed: {e}", self.index);
                    return queue;
                }
            };
            if events[..ready].iter().any(|event| event.data() == STOP) {
                return queue;
            }
            let _ = self.kick.read();
            self.serve(&mut queue, inflight.as_mut());
        }
    }

    /// Completes what a predecessor took but never returned, and resumes the available
    /// ring after it.
    fn recover(&mut self, queue: &mut Queue, inflight: &mut inflight::InflightQueue<'_>) {
        let used = match queue.used_idx(&self.memory, Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                self.fail(&format!("cannot read the used index: {e}"));
                return;
            }
        };
        let Recovery { resubmit, next_avail, next_used } = inflight.recover(used, queue.next_avail());
        queue.set_next_used(next_used);
        queue.set_next_avail(next_avail);
        if resubmit.is_empty() {
            return;
        }
        log::info!(
            "vhost-user queue {}: completing {} requests a previous backend owed",
            self.index,
            resubmit.len()
        );
        let mut journal = Journal { inflight: Some(inflight), faults: &self.faults };
        match self.server.resubmit(queue, &resubmit, &mut journal) {
            Ok(processed) => self.notify(processed),
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn serve(&mut self, queue: &mut Queue, inflight: Option<&mut inflight::InflightQueue<'_>>) {
        if self.broken {
            return;
        }
        let mut journal = Journal { inflight, faults: &self.faults };
        // One pass serves at most a budget's worth; what is left is served at the next
        // turn of the loop (`QueueServer::more`), after a look at the stop event.
        match self.server.serve(queue, &mut journal) {
            Ok(processed) => self.notify(processed),
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn notify(&self, processed: Processed) {
        if processed.notify {
            if let Err(e) = self.call.write(1) {
                log::warn!("vhost-user queue {}: cannot signal the driver: {e}", self.index);
            }
        }
    }

    /// The guest broke the queue: stop serving it and tell the frontend, which marks the
    /// device as needing a reset.
    fn fail(&mut self, why: &str) {
        log::warn!("vhost-user queue {}: {why}; queue stopped until the device is reset", self.index);
        self.broken = true;
        match &self.err {
            Some(err) => {
                if let Err(e) = err.write(1) {
                    log::warn!("vhost-user queue {}: cannot report the error: {e}", self.index);
                }
            }
            None => log::warn!("vhost-user queue {}: the frontend gave no error eventfd", self.index),
        }
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for Connection<D> {
    fn set_owner(&mut self) -> ProtocolResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtocolResult<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> ProtocolResult<()> {
        for index in 0..self.vrings.len() {
            self.stop_worker(index);
        }
        self.vrings = (0..self.device.num_queues()).map(|_| Vring::default()).collect();
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> ProtocolResult<u64> {
        Ok(self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> ProtocolResult<()> {
        let offered = self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & !offered != 0 {
            log::warn!(
                "vhost-user: the frontend acked features {:#x} this device does not offer",
                features & !offered
            );
            return Err(ProtocolError::InvalidParam);
        }
        self.reconfigure(|this| {
            this.acked_features = features;
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let memory = MappedMemory::map(regions, files).map_err(|e| {
            log::warn!("vhost-user: {e}");
            ProtocolError::InvalidParam
        })?;
        self.reconfigure(|this| {
            this.memory = Some(memory);
            Ok(())
        })?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtocolResult<()> {
        let max = u32::from(self.device.max_queue_size());
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(ProtocolError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtocolResult<()> {
        self.vring(index)?.addresses = Some((descriptor, available, used));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtocolResult<()> {
        let vring = self.vring(index)?;
        vring.base = u16::try_from(base).map_err(|_| ProtocolError::InvalidParam)?;
        vring.paused = None;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtocolResult<VhostUserVringState> {
        self.vring(index)?;
        let position = self.stop_worker(index as usize);
        let vring = self.vring(index)?;
        let next_avail =
            position.map(|queue| queue.next_avail()).or(vring.paused.take().map(|q| q.next_avail()));
        // The ring is stopped until the frontend kicks it off again.
        vring.kick = None;
        vring.paused = None;
        Ok(VhostUserVringState::new(index, u32::from(next_avail.unwrap_or(vring.base))))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        let fd = fd.ok_or(invalid("a queue without a kick eventfd (polling) is not supported"))?;
        let index = u32::from(index);
        self.reconfigure(|this| {
            this.vring(index)?.kick = Some(eventfd(fd));
            Ok(())
        })?;
        self.start_if_ready(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        let index = u32::from(index);
        self.reconfigure(|this| {
            this.vring(index)?.call = fd.map(eventfd);
            Ok(())
        })?;
        self.start_if_ready(index as usize)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        let index = u32::from(index);
        self.reconfigure(|this| {
            this.vring(index)?.err = fd.map(eventfd);
            Ok(())
        })
    }

    fn get_protocol_features(&mut self) -> ProtocolResult<VhostUserProtocolFeatures> {
        Ok(self.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> ProtocolResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtocolResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtocolResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.start_if_ready(index as usize)?;
        } else if let Some(queue) = self.stop_worker(index as usize) {
            self.vrings[index as usize].paused = Some(queue);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> ProtocolResult<Vec<u8>> {
        let config = self.device.config();
        let mut bytes = vec![0; (size as usize).min(config.len().max(256))];
        splitvisor_devices::virtio::copy_config(&config, u64::from(offset), &mut bytes);
        Ok(bytes)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> ProtocolResult<()> {
        Err(invalid("the configuration space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtocolResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtocolResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> ProtocolResult<(VhostUserInflight, File)> {
        let (region, file) =
            InflightRegion::allocate(inflight.num_queues, inflight.queue_size).map_err(|e| {
                log::warn!("vhost-user: {e}");
                ProtocolError::InvalidParam
            })?;
        let size = usize::from(inflight.num_queues) * inflight::queue_region_size(inflight.queue_size);
        self.reconfigure(|this| {
            this.inflight = Some(Arc::new(region));
            Ok(())
        })?;
        Ok((VhostUserInflight::new(size as u64, 0, inflight.num_queues, inflight.queue_size), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> ProtocolResult<()> {
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            log::warn!("vhost-user: {e}");
            ProtocolError::InvalidParam
        })?;
        self.reconfigure(|this| {
            this.inflight = Some(Arc::new(region));
            Ok(())
        })
    }

    fn get_max_mem_slots(&mut self) -> ProtocolResult<u64> {
        Err(invalid("memory slots are not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("memory slots are not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> ProtocolResult<()> {
        Err(invalid("memory slots are not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> ProtocolResult<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> ProtocolResult<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> ProtocolResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtocolResult<()> {
        Err(invalid("dirty logging is not supported"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}
}

fn eventfd(file: File) -> EventFd {
    // SAFETY: the frontend sent this fd for an eventfd; we own it from here on.
    unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(file))) }
}
