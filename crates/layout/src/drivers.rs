//! The driver slots: how each kind of out-of-process driver fails, is replaced and is
//! upgraded ([`DriverSlot`]).
//!
//! * [`VhostUserSlot`]: a virtio device whose queues a vhost-user backend serves, either a
//!   partition splitvisor starts (kept with a spare, started and sandboxed ahead of need)
//!   or an external backend on a socket (reconnected when it comes back).
//! * [`ProxySlot`]: a plain bus device (8250, i8042) served by a partition behind the proxy.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use splitvisor_devices::virtio::block::Block;
use splitvisor_devices::virtio::{GuestMemoryMmap, MmioTransport, VirtioInterrupt};
use splitvisor_isolation::frontend::{DeviceShape, Handshake, Probes, QueueProbe, Resume, VhostUserVirtio};
use splitvisor_isolation::liveness::{DeviceQueue, Threads};
use splitvisor_isolation::partition::{
    BlockOptions, DriverProgram, NetOptions, Partition, PartitionError, StartingPartition,
};
use splitvisor_isolation::proxy::{Probe, ProxyConnection, ProxyDevice, ProxyLink};
use splitvisor_isolation::supervisor::{Interest, Watch, eventfd_fd};
use vmm_sys_util::eventfd::EventFd;

use crate::lifecycle::{DriverSlot, Fault, RestartError, SlotEvent, UpgradeError, Watchdog};

const EXITED: u32 = 0;
const HUNG_UP: u32 = 1;
const QUEUE_ERROR: u32 = 2;
const REQUEST_FAILED: u32 = 3;
const SPARE_EXITED: u32 = 4;
const SPARE_STARTING: u32 = 5;

/// How long a partition that hung up may take to be seen dead (its exit status is the
/// better report).
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// How long a restart waits for the killed partition to end before it tries again at the
/// supervisor's next tick.
const KILL_WAIT: Duration = Duration::from_millis(50);

/// How long to wait before trying again to start a spare partition that failed to start.
const SPARE_RETRY: Duration = Duration::from_secs(1);

/// How a partition ended (killed first if it had not), as text: its exit status and the
/// cause it reported, if any.
fn status(partition: &mut Partition) -> String {
    partition.try_wait().or_else(|| partition.kill());
    partition.end().map_or_else(|| "unknown status".into(), |end| end.to_string())
}

/// Longest the supervisor waits for a partition a restart needs (when no spare is up) to
/// have its sandbox in place once its process runs: it handles every device's faults, and
/// none meanwhile. Also how long a spare, which the supervisor watches rather than waits
/// for ([`Spare`]), may take to come up. A partition takes milliseconds; this is for a host
/// so busy that it takes much longer.
const SUPERVISED_START: Duration = Duration::from_secs(10);

/// The same for a partition of the program an upgrade names, which may never get there (a
/// program that is not a driver, or hangs). The supervisor watches it come up
/// ([`PendingUpgrade`]) rather than wait; this bounds the upgrade.
pub(crate) const UPGRADE_START: Duration = Duration::from_secs(3);

/// What a spawned partition serves, with the resources it is handed.
pub(crate) enum Served {
    /// A virtio-blk disk: the open (and locked) image.
    Block {
        /// The image.
        image: File,
        /// What each partition serves.
        options: BlockOptions,
    },
    /// A virtio-net device: the open TAP.
    Net {
        /// The TAP device.
        tap: File,
        /// What each partition serves.
        options: NetOptions,
    },
}

impl Served {
    /// Starts a partition serving this; returns it with the hypervisor's end of its socket.
    /// Its sandbox may take `ready_within` once the process runs.
    pub(crate) fn spawn(
        &self,
        driver: &DriverProgram,
        ready_within: Duration,
    ) -> Result<(Partition, std::os::unix::net::UnixStream), PartitionError> {
        let (starting, stream) = self.start(driver)?;
        Ok((starting.wait_within(ready_within)?, stream))
    }

    /// Asks for a partition serving this, without waiting for it.
    fn start(
        &self,
        driver: &DriverProgram,
    ) -> Result<(StartingPartition, std::os::unix::net::UnixStream), PartitionError> {
        match self {
            Self::Block { image, options } => Partition::start_block(driver, image, options),
            Self::Net { tap, options } => Partition::start_net(driver, tap, options),
        }
    }
}

/// A partition of the program an upgrade names, asked for ([`DriverSlot::start_upgrade`])
/// but not waited for: the supervisor, which handles every device's faults, watches it
/// come up ([`PendingUpgrade`]) instead of waiting for it, and switches the device over
/// only once it is ([`DriverSlot::upgrade`]). A program that starts slowly, or never,
/// then holds up only the upgrade.
pub(crate) struct UpgradeStart {
    program: DriverProgram,
    starting: StartingPartition,
    link: StartingLink,
}

/// The hypervisor's end of a starting partition.
enum StartingLink {
    /// A vhost-user backend's socket, and what the device is, for the handshake.
    VhostUser { stream: std::os::unix::net::UnixStream, shape: DeviceShape },
    /// A proxied bus device's connection.
    Proxy(ProxyConnection),
}

impl UpgradeStart {
    /// Waits until the partition's process runs the program (the spawner's answer, which
    /// takes about a millisecond); its sandbox is then watched for.
    pub(crate) fn spawned(self) -> Result<PendingUpgrade, String> {
        let pending = PendingPartition::spawned(self.starting, self.link).map_err(kept_driver)?;
        Ok(PendingUpgrade { program: self.program, pending })
    }
}

/// A partition whose process runs its program but whose sandbox is not in place yet:
/// watched ([`Self::watched`]) rather than waited for, then finished
/// ([`Self::finish`]) once a watched fd turned readable.
pub(crate) struct PendingPartition {
    partition: Partition,
    link: StartingLink,
    /// When its process was found running its program.
    since: Instant,
}

/// How long [`PendingPartition::finish`] waits, once a watched fd turned readable, for
/// the end of the partition's readiness pipe (the partition closes it right after its
/// byte).
const READINESS_END: Duration = Duration::from_millis(200);

impl PendingPartition {
    fn spawned(starting: StartingPartition, link: StartingLink) -> Result<Self, String> {
        let partition = starting.wait_spawned().map_err(|e| e.to_string())?;
        Ok(Self { partition, link, since: Instant::now() })
    }

    /// What to watch: the partition's readiness (its byte), and its pidfd (it ended first).
    pub(crate) fn watched(&self) -> [Option<BorrowedFd<'_>>; 2] {
        [self.partition.readiness_fd(), Some(self.partition.pidfd())]
    }

    /// Waits (at most `within`) for the partition's sandbox (or its end, the error), then
    /// its vhost-user handshake. A partition that does not get there is killed.
    fn finish(mut self, within: Duration) -> Result<(Partition, ReadyLink), String> {
        self.partition.wait_ready(within).map_err(|e| e.to_string())?;
        let mut partition = self.partition;
        let link = match self.link {
            StartingLink::VhostUser { stream, shape } => ReadyLink::VhostUser(
                Handshake::for_device(stream, &shape)
                    .map_err(|e| format!("partition {}: {e}", partition.pid()))?,
            ),
            StartingLink::Proxy(mut connection) => {
                connection.watch(partition.take_liveness());
                ReadyLink::Proxy(connection)
            }
        };
        Ok((partition, link))
    }
}

/// A partition of an upgrade's program whose sandbox is not in place yet.
pub(crate) struct PendingUpgrade {
    program: DriverProgram,
    pending: PendingPartition,
}

impl PendingUpgrade {
    /// What to watch (see [`PendingPartition::watched`]).
    pub(crate) fn watched(&self) -> [Option<BorrowedFd<'_>>; 2] {
        self.pending.watched()
    }

    /// The program whose partition this is.
    pub(crate) fn program(&self) -> &DriverProgram {
        &self.program
    }

    /// Once a watched fd turned readable: the partition, up, or why not.
    pub(crate) fn finish(self) -> Result<NewDriver, String> {
        let (partition, link) = self.pending.finish(READINESS_END).map_err(kept_driver)?;
        Ok(NewDriver { program: self.program, partition, link })
    }
}

/// A partition of an upgrade's program, up and ready to take the device over.
pub(crate) struct NewDriver {
    program: DriverProgram,
    partition: Partition,
    link: ReadyLink,
}

/// The hypervisor's end of a partition that is up.
pub(crate) enum ReadyLink {
    /// A vhost-user backend past its handshake.
    VhostUser(Handshake),
    /// A proxied bus device's connection.
    Proxy(ProxyConnection),
}

/// What links a slot to its partitions once they are up.
pub(crate) trait PartitionLink: Sized {
    /// `link`, if it is of this kind.
    fn from_ready(link: ReadyLink) -> Option<Self>;
}

impl PartitionLink for Handshake {
    fn from_ready(link: ReadyLink) -> Option<Self> {
        match link {
            ReadyLink::VhostUser(handshake) => Some(handshake),
            ReadyLink::Proxy(_) => None,
        }
    }
}

impl PartitionLink for ProxyConnection {
    fn from_ready(link: ReadyLink) -> Option<Self> {
        match link {
            ReadyLink::Proxy(connection) => Some(connection),
            ReadyLink::VhostUser(_) => None,
        }
    }
}

/// A slot's spare partition, started ahead of need so that a restart only switches to it.
/// The supervisor watches it come up rather than wait for it: it handles every device's
/// faults meanwhile. A restart that finds it still coming up waits for it then.
pub(crate) struct Spare<L> {
    keep: bool,
    ready: Option<(Partition, L)>,
    starting: Option<PendingPartition>,
    /// When to try again after a spare failed to start.
    retry_at: Option<Instant>,
}

impl<L: PartitionLink> Spare<L> {
    /// No spare yet; one is kept from the first [`Self::maintain`] if `keep`.
    pub(crate) fn new(keep: bool) -> Self {
        Self { keep, ready: None, starting: None, retry_at: None }
    }

    /// The spare's fds: its pidfd once up, its readiness and pidfd while it comes up.
    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
        if let Some((partition, _)) = &self.ready {
            watch(Watch { fd: partition.pidfd(), interest: Interest::Readable, token: SPARE_EXITED });
        }
        if let Some(pending) = &self.starting {
            for fd in pending.watched().into_iter().flatten() {
                watch(Watch { fd, interest: Interest::Readable, token: SPARE_STARTING });
            }
        }
    }

    /// Handles the event of `token` if it is the spare's; says whether it was.
    fn event(&mut self, token: u32) -> bool {
        match token {
            SPARE_EXITED => {
                if let Some((mut partition, _)) = self.ready.take() {
                    log::warn!("the spare partition {} ended ({})", partition.pid(), status(&mut partition));
                }
                true
            }
            SPARE_STARTING => {
                if let Some(pending) = self.starting.take() {
                    match pending.finish(READINESS_END).map(|(p, link)| (p, L::from_ready(link))) {
                        Ok((partition, Some(link))) => {
                            log::debug!("spare partition {} ready", partition.pid());
                            self.ready = Some((partition, link));
                        }
                        Ok((partition, None)) => {
                            self.failed(format!("partition {}: not this device's kind", partition.pid()))
                        }
                        Err(e) => self.failed(e),
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn failed(&mut self, why: String) {
        log::warn!("cannot start a spare partition: {why}");
        self.retry_at = Some(Instant::now() + SPARE_RETRY);
    }

    /// A partition for a restart or an upgrade of the same program: the spare if one is up,
    /// else the one coming up, waited for (at most [`SUPERVISED_START`] since its process
    /// ran), else (or if that one failed) a new one from `start`.
    fn take_or(
        &mut self,
        start: impl FnOnce() -> Result<(Partition, L), String>,
    ) -> Result<(Partition, L), String> {
        if let Some(ready) = self.ready.take() {
            return Ok(ready);
        }
        if let Some(pending) = self.starting.take() {
            let left = SUPERVISED_START.saturating_sub(pending.since.elapsed());
            match pending.finish(left).map(|(partition, link)| (partition, L::from_ready(link))) {
                Ok((partition, Some(link))) => return Ok((partition, link)),
                Ok((partition, None)) => {
                    log::warn!("spare partition {}: not this device's kind", partition.pid())
                }
                Err(e) => log::warn!("the spare partition did not come up ({e}): starting another"),
            }
        }
        start()
    }

    /// Drops the spare (it runs a program the device no longer does, or the device failed).
    fn clear(&mut self) {
        self.ready = None;
        self.starting = None;
    }

    /// Starts a spare if one is kept and none is up or coming up (`start` asks for it); gives
    /// up on one that did not come up within [`SUPERVISED_START`].
    fn maintain(&mut self, start: impl FnOnce() -> Result<PendingPartition, String>) {
        if self.starting.as_ref().is_some_and(|pending| pending.since.elapsed() > SUPERVISED_START) {
            self.starting = None;
            self.failed(format!("it was not sandboxed within {SUPERVISED_START:?}"));
        }
        if !self.keep
            || self.ready.is_some()
            || self.starting.is_some()
            || self.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        match start() {
            Ok(pending) => {
                self.starting = Some(pending);
                self.retry_at = None;
            }
            Err(e) => self.failed(e),
        }
    }
}

/// Where a vhost-user device's backend comes from.
#[allow(clippy::large_enum_variant)] // one per device, never moved on a hot path
pub(crate) enum Backend {
    /// Partitions splitvisor starts.
    Spawned {
        /// The program.
        driver: DriverProgram,
        /// What every partition serves, and the fds it is handed.
        served: Served,
        /// The partition serving now.
        active: Option<Partition>,
        /// A partition started ahead of need, to take over.
        spare: Spare<Handshake>,
    },
    /// An external backend listening on a socket.
    External {
        /// Its socket.
        socket: PathBuf,
    },
}

/// A virtio device served over vhost-user.
pub(crate) struct VhostUserSlot {
    transport: Arc<Mutex<MmioTransport<VhostUserVirtio>>>,
    shape: DeviceShape,
    interrupt: VirtioInterrupt,
    probes: Probes,
    queue_error: EventFd,
    request_failed: EventFd,
    /// A duplicate of the current backend's socket, watched for a hang-up.
    hangup: Option<OwnedFd>,
    backend: Backend,
    watchdog: Watchdog,
    /// The queue of the block device under a disk's image, opened while sysfs is in sight.
    storage: Option<DeviceQueue>,
}

impl VhostUserSlot {
    /// `transport`'s device was built from a backend whose socket `hangup` duplicates;
    /// `request_failed` is the fault signal its frontend writes.
    pub(crate) fn new(
        transport: Arc<Mutex<MmioTransport<VhostUserVirtio>>>,
        hangup: OwnedFd,
        request_failed: EventFd,
        backend: Backend,
    ) -> std::io::Result<Self> {
        let (interrupt, probes, queue_error, shape) = {
            let transport = transport.lock().unwrap_or_else(|e| e.into_inner());
            (
                transport.interrupt(),
                transport.device().probes(),
                transport.device().queue_error().try_clone()?,
                transport.device().shape().clone(),
            )
        };
        let storage = match &backend {
            Backend::Spawned { served: Served::Block { image, .. }, .. } => DeviceQueue::of(image),
            _ => None,
        };
        Ok(Self {
            transport,
            shape,
            interrupt,
            probes,
            queue_error,
            request_failed,
            hangup: Some(hangup),
            backend,
            watchdog: Watchdog::default(),
            storage,
        })
    }

    /// Starts a partition and takes it through the handshake.
    fn start_partition(
        driver: &DriverProgram,
        served: &Served,
        shape: &DeviceShape,
        ready_within: Duration,
    ) -> Result<(Partition, Handshake), String> {
        let (partition, stream) = served.spawn(driver, ready_within).map_err(|e| e.to_string())?;
        let handshake = Handshake::for_device(stream, shape)
            .map_err(|e| format!("partition {}: {e}", partition.pid()))?;
        Ok((partition, handshake))
    }

    /// Hands the device to `handshake`'s backend.
    fn take_over(&mut self, handshake: Handshake, resume: Resume) -> Result<(), String> {
        let hangup = handshake.hangup_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        transport.device_mut().reconnect(handshake, resume).map_err(|e| e.to_string())?;
        drop(transport);
        self.hangup = Some(hangup);
        self.watchdog.reset();
        // A request that failed meanwhile was for the old backend.
        let _ = self.request_failed.read();
        Ok(())
    }

    /// `why` the active partition could not take over, with how it ended if it did (a
    /// partition that cannot serve says why as it ends).
    fn with_how_it_ended(&mut self, why: String) -> String {
        if let Backend::Spawned { active: Some(partition), .. } = &mut self.backend {
            if partition.wait_exit(EXIT_GRACE).is_some() {
                return format!("{why}; its process ended ({})", status(partition));
            }
        }
        why
    }
}

/// Why an external backend is not upgraded here.
const EXTERNAL_UPGRADE: &str = "an external backend is upgraded by whoever runs it (splitvisor reconnects)";

/// An upgrade's error when the new program's partition did not start.
pub(crate) fn kept_driver(error: String) -> String {
    format!("{error} (the device keeps its driver)")
}

impl DriverSlot for VhostUserSlot {
    fn describe(&self) -> String {
        match &self.backend {
            Backend::Spawned { active: Some(partition), .. } => format!("pid {}", partition.pid()),
            Backend::Spawned { active: None, .. } => "no partition".into(),
            Backend::External { socket } => format!("external vhost-user {}", socket.display()),
        }
    }

    fn pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::Spawned { active, .. } => active.as_ref().map(Partition::pid),
            Backend::External { .. } => None,
        }
    }

    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
        if let Some(hangup) = &self.hangup {
            watch(Watch { fd: hangup.as_fd(), interest: Interest::Hangup, token: HUNG_UP });
        }
        watch(Watch { fd: eventfd_fd(&self.queue_error), interest: Interest::Readable, token: QUEUE_ERROR });
        watch(Watch {
            fd: eventfd_fd(&self.request_failed),
            interest: Interest::Readable,
            token: REQUEST_FAILED,
        });
        if let Backend::Spawned { active, spare, .. } = &self.backend {
            if let Some(partition) = active {
                watch(Watch { fd: partition.pidfd(), interest: Interest::Readable, token: EXITED });
            }
            spare.watches(watch);
        }
    }

    fn event(&mut self, token: u32) -> Option<SlotEvent> {
        if let Backend::Spawned { spare, .. } = &mut self.backend
            && spare.event(token)
        {
            return None;
        }
        match token {
            EXITED => {
                let Backend::Spawned { active, .. } = &mut self.backend else { return None };
                let mut partition = active.take()?;
                self.hangup = None;
                Some(SlotEvent::Fault(Fault::Exited(status(&mut partition))))
            }
            HUNG_UP => {
                self.hangup = None;
                // A partition that dies closes its connection first: say how it died.
                if let Backend::Spawned { active, .. } = &mut self.backend {
                    if let Some(mut partition) = active.take() {
                        if partition.wait_exit(EXIT_GRACE).is_some() {
                            return Some(SlotEvent::Fault(Fault::Exited(status(&mut partition))));
                        }
                        *active = Some(partition);
                    }
                }
                Some(SlotEvent::Fault(Fault::HungUp))
            }
            QUEUE_ERROR => {
                self.queue_error.read().ok()?;
                if let Err(e) = self.interrupt.request_reset() {
                    log::warn!("cannot tell the driver its device needs a reset: {e}");
                }
                Some(SlotEvent::GuestBrokeQueue)
            }
            REQUEST_FAILED => {
                self.request_failed.read().ok()?;
                Some(SlotEvent::Fault(Fault::Failed("a request to the backend failed".into())))
            }
            _ => None,
        }
    }

    fn check(&mut self, now: Instant, watchdog: Duration) -> Option<Fault> {
        let indices = self.queue_indices();
        self.watchdog.check(indices.into_iter(), now, watchdog).map(Fault::Hung)
    }

    /// A thread of the partition in a kernel wait, or requests in flight on the device
    /// under the image (an O_DIRECT transfer leaves no thread waiting for it).
    fn waiting_in_kernel(&self) -> bool {
        match &self.backend {
            Backend::Spawned { active: Some(partition), .. } => {
                partition.threads().is_some_and(Threads::any_in_kernel_wait)
                    || self.storage.as_ref().is_some_and(DeviceQueue::busy)
            }
            // An external backend's process is not known.
            _ => false,
        }
    }

    fn queue_indices(&self) -> Vec<Option<(u16, u16)>> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|probe| probe.indices()).collect()
    }

    fn restart(&mut self) -> Result<(), RestartError> {
        match &mut self.backend {
            Backend::Spawned { driver, served, active, spare, .. } => {
                // A hung partition (stopped, or looping) is killed first: it must not touch
                // guest memory or the image once another serves them. One in a kernel wait
                // (storage stalled past the watchdog's patience) dies only once that is
                // over; a write of its landing after a new driver's would undo the newer
                // one, so the device waits for it, with the supervisor free meanwhile.
                if let Some(mut old) = active.take() {
                    if old.kill_within(KILL_WAIT).is_none() {
                        let pid = old.pid();
                        *active = Some(old);
                        return Err(RestartError::NotYet(format!(
                            "partition {pid} has not ended yet (it is waiting in the kernel)"
                        )));
                    }
                }
                let (partition, handshake) = spare
                    .take_or(|| Self::start_partition(driver, served, &self.shape, SUPERVISED_START))
                    .map_err(RestartError::Failed)?;
                *active = Some(partition);
                let taken = self.take_over(handshake, Resume::AfterCrash);
                taken.map_err(|why| RestartError::Failed(self.with_how_it_ended(why)))
            }
            Backend::External { socket } => {
                let handshake = Handshake::connect_for(socket, &self.shape)
                    .map_err(|e| RestartError::NotYet(e.to_string()))?;
                self.take_over(handshake, Resume::AfterCrash).map_err(RestartError::Failed)
            }
        }
    }

    fn start_upgrade(&self, program: &DriverProgram) -> Result<Option<UpgradeStart>, String> {
        let Backend::Spawned { driver, served, .. } = &self.backend else {
            return Err(EXTERNAL_UPGRADE.into());
        };
        if program == driver {
            return Ok(None);
        }
        let (starting, stream) = served.start(program).map_err(|e| kept_driver(e.to_string()))?;
        let link = StartingLink::VhostUser { stream, shape: self.shape.clone() };
        Ok(Some(UpgradeStart { program: program.clone(), starting, link }))
    }

    fn upgrade(&mut self, new: Option<NewDriver>) -> Result<Duration, UpgradeError> {
        let Backend::Spawned { driver, served, active, spare, .. } = &mut self.backend else {
            return Err(EXTERNAL_UPGRADE.into());
        };
        // The new partition is ready before the old one stops serving. Another program is
        // adopted (and the spare, which runs the old one, dropped) only once a partition
        // of it is up: one that cannot start leaves the device as it was.
        let (partition, handshake) = match new {
            Some(NewDriver { program, partition, link: ReadyLink::VhostUser(handshake) }) => {
                *driver = program;
                spare.clear();
                (partition, handshake)
            }
            Some(NewDriver { link: ReadyLink::Proxy(_), .. }) => {
                return Err("a bus device's partition cannot serve a virtio device".into());
            }
            None => spare.take_or(|| Self::start_partition(driver, served, &self.shape, SUPERVISED_START))?,
        };
        let hangup = handshake.hangup_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        let paused = Instant::now();
        {
            let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
            let device = transport.device_mut();
            let resume = device.quiesce().unwrap_or_else(|e| {
                log::warn!("the old backend did not stop cleanly ({e}); taking over as after a crash");
                Resume::AfterCrash
            });
            if resume == Resume::AfterCrash {
                // As in a restart, the new driver must not take over while the old one can
                // still write; the supervisor does not wait for a kernel wait to end. The
                // old backend's connection is shut down, so the device is restarted once
                // its partition has ended.
                if let Some(old) = active.as_mut() {
                    if old.kill_within(KILL_WAIT).is_none() {
                        return Err(UpgradeError::Restarting(format!(
                            "the old driver (partition {}) did not stop, and has not ended yet: it is waiting \
                             in the kernel; the device restarts with the new driver once it has",
                            old.pid()
                        )));
                    }
                }
            }
            device.reconnect(handshake, resume).map_err(|e| e.to_string())?;
        }
        let pause = paused.elapsed();
        self.hangup = Some(hangup);
        self.watchdog.reset();
        if let Some(mut old) = active.replace(partition) {
            // Its connection is closed: it leaves by itself.
            old.finish(Duration::from_secs(1));
        }
        Ok(pause)
    }

    fn fail(&mut self) {
        if let Backend::Spawned { active, spare, .. } = &mut self.backend {
            spare.clear();
            if let Some(mut partition) = active.take() {
                if partition.kill_within(KILL_WAIT).is_none() {
                    // Still in a kernel wait: it ends once that is over, and is reaped
                    // with the VM; the supervisor does not wait for it here.
                    *active = Some(partition);
                }
            }
        }
        self.hangup = None;
        if let Err(e) = self.interrupt.request_reset() {
            log::warn!("cannot tell the driver its device needs a reset: {e}");
        }
    }

    fn maintain(&mut self) {
        let Backend::Spawned { driver, served, active: Some(_), spare, .. } = &mut self.backend else {
            return;
        };
        spare.maintain(|| {
            let (starting, stream) = served.start(driver).map_err(|e| e.to_string())?;
            PendingPartition::spawned(starting, StartingLink::VhostUser { stream, shape: self.shape.clone() })
        });
    }
}

/// A plain bus device (8250, i8042) served by a partition behind the proxy.
pub(crate) struct ProxySlot {
    link: Arc<ProxyLink>,
    /// The proxy, to probe the partition while the guest leaves the device alone.
    device: Arc<Mutex<ProxyDevice>>,
    driver: DriverProgram,
    kind: &'static str,
    irqfd: Option<EventFd>,
    active: Option<Partition>,
    spare: Spare<ProxyConnection>,
}

impl ProxySlot {
    pub(crate) fn new(
        link: Arc<ProxyLink>,
        device: Arc<Mutex<ProxyDevice>>,
        driver: DriverProgram,
        kind: &'static str,
        irqfd: Option<EventFd>,
        active: Partition,
        keep_spare: bool,
    ) -> Self {
        Self { link, device, driver, kind, irqfd, active: Some(active), spare: Spare::new(keep_spare) }
    }

    fn start_partition(
        driver: &DriverProgram,
        kind: &'static str,
        irqfd: Option<&EventFd>,
    ) -> Result<(Partition, ProxyConnection), String> {
        let (starting, mut connection) =
            Partition::start_proxy(driver, kind, irqfd).map_err(|e| e.to_string())?;
        let mut partition = starting.wait_within(SUPERVISED_START).map_err(|e| e.to_string())?;
        connection.watch(partition.take_liveness());
        Ok((partition, connection))
    }
}

impl DriverSlot for ProxySlot {
    fn describe(&self) -> String {
        self.active.as_ref().map_or_else(|| "no partition".into(), |p| format!("pid {}", p.pid()))
    }

    fn pid(&self) -> Option<u32> {
        self.active.as_ref().map(Partition::pid)
    }

    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
        watch(Watch { fd: self.link.fault_fd(), interest: Interest::Readable, token: REQUEST_FAILED });
        if let Some(partition) = &self.active {
            watch(Watch { fd: partition.pidfd(), interest: Interest::Readable, token: EXITED });
        }
        self.spare.watches(watch);
    }

    fn event(&mut self, token: u32) -> Option<SlotEvent> {
        if self.spare.event(token) {
            return None;
        }
        match token {
            EXITED => {
                let mut partition = self.active.take()?;
                Some(SlotEvent::Fault(Fault::Exited(status(&mut partition))))
            }
            REQUEST_FAILED => {
                let generation = self.link.reported_fault()?;
                Some(SlotEvent::Fault(Fault::Failed(format!("partition {generation} stopped answering"))))
            }
            _ => None,
        }
    }

    /// A partition that hangs while the guest leaves its device alone is found here, within
    /// the watchdog's time plus the proxy's deadline, not at the guest's next access (which
    /// would wait out the deadline first).
    fn check(&mut self, _now: Instant, watchdog: Duration) -> Option<Fault> {
        self.active.as_ref()?;
        let mut device = match self.device.try_lock() {
            Ok(device) => device,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // A vCPU is in the middle of an access, which has its own deadline.
            Err(TryLockError::WouldBlock) => return None,
        };
        match device.probe(watchdog) {
            Probe::Failed(e) => Some(Fault::Failed(format!("the partition failed a liveness probe: {e}"))),
            Probe::Recent | Probe::Answered | Probe::NoPartition => None,
        }
    }

    fn wait_started(&mut self, within: Duration) -> Result<(), PartitionError> {
        self.active.as_mut().map_or(Ok(()), |partition| partition.wait_ready(within))?;
        // The accesses waiting for it go on. (If it failed, the VM stops, which ends theirs.)
        self.link.started();
        Ok(())
    }

    fn restart(&mut self) -> Result<(), RestartError> {
        if let Some(mut old) = self.active.take() {
            old.kill();
        }
        let driver = &self.driver;
        let (partition, stream) = self
            .spare
            .take_or(|| Self::start_partition(driver, self.kind, self.irqfd.as_ref()))
            .map_err(RestartError::Failed)?;
        self.link.offer(stream);
        self.active = Some(partition);
        Ok(())
    }

    fn start_upgrade(&self, program: &DriverProgram) -> Result<Option<UpgradeStart>, String> {
        if *program == self.driver {
            return Ok(None);
        }
        let (starting, connection) = Partition::start_proxy(program, self.kind, self.irqfd.as_ref())
            .map_err(|e| kept_driver(e.to_string()))?;
        Ok(Some(UpgradeStart { program: program.clone(), starting, link: StartingLink::Proxy(connection) }))
    }

    fn upgrade(&mut self, new: Option<NewDriver>) -> Result<Duration, UpgradeError> {
        // Another program is adopted (and the spare, which runs the old one, dropped) only
        // once a partition of it is up: one that cannot start leaves the device as it was.
        let (partition, stream) = match new {
            Some(NewDriver { program, partition, link: ReadyLink::Proxy(connection) }) => {
                self.driver = program;
                self.spare.clear();
                (partition, connection)
            }
            Some(NewDriver { link: ReadyLink::VhostUser(_), .. }) => {
                return Err("a virtio device's partition cannot serve a bus device".into());
            }
            None => {
                let driver = &self.driver;
                self.spare.take_or(|| Self::start_partition(driver, self.kind, self.irqfd.as_ref()))?
            }
        };
        // The proxy moves to the new partition at its next access, handing it the state;
        // the old one ends when its connection closes.
        self.link.offer(stream);
        if let Some(mut old) = self.active.replace(partition) {
            old.kill();
        }
        Ok(Duration::ZERO)
    }

    fn fail(&mut self) {
        self.link.give_up();
        self.spare.clear();
        if let Some(mut partition) = self.active.take() {
            partition.kill();
        }
    }

    fn maintain(&mut self) {
        if self.active.is_none() {
            return;
        }
        let (driver, kind, irqfd) = (&self.driver, self.kind, self.irqfd.as_ref());
        self.spare.maintain(|| {
            let (starting, connection) =
                Partition::start_proxy(driver, kind, irqfd).map_err(|e| e.to_string())?;
            PendingPartition::spawned(starting, StartingLink::Proxy(connection))
        });
    }
}

/// A virtio-blk device served by a worker thread inside the hypervisor: it cannot be
/// restarted (a fault there is the hypervisor's own), but it is watched like the others,
/// so that its fault policy (halt the VM, by default) applies and the report names it.
pub(crate) struct InHypervisorBlockSlot {
    transport: Arc<Mutex<MmioTransport<Block>>>,
    interrupt: VirtioInterrupt,
    memory: GuestMemoryMmap,
    panicked: EventFd,
    watchdog: Watchdog,
    /// The hypervisor's own threads, opened while /proc is in sight (before the jail).
    threads: Option<Threads>,
    /// The queue of the block device under the image, opened likewise.
    storage: Option<DeviceQueue>,
}

impl InHypervisorBlockSlot {
    /// `panicked` is the device's worker-panic signal; `storage`, the queue of the block
    /// device under the image.
    pub(crate) fn new(
        transport: Arc<Mutex<MmioTransport<Block>>>,
        memory: GuestMemoryMmap,
        panicked: EventFd,
        storage: Option<DeviceQueue>,
    ) -> Self {
        let interrupt = transport.lock().unwrap_or_else(|e| e.into_inner()).interrupt();
        let threads = Threads::of_process(std::process::id())
            .map_err(|e| log::debug!("the hypervisor's threads cannot be looked at ({e})"))
            .ok();
        Self { transport, interrupt, memory, panicked, watchdog: Watchdog::default(), threads, storage }
    }
}

impl DriverSlot for InHypervisorBlockSlot {
    /// As the control socket lists every device whose driver runs in the hypervisor.
    fn describe(&self) -> String {
        "in hypervisor".into()
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
        watch(Watch { fd: eventfd_fd(&self.panicked), interest: Interest::Readable, token: EXITED });
    }

    fn event(&mut self, token: u32) -> Option<SlotEvent> {
        if token != EXITED || self.panicked.read().is_err() {
            return None;
        }
        let why = self.transport.lock().unwrap_or_else(|e| e.into_inner()).device().worker_panic();
        Some(SlotEvent::Fault(Fault::Failed(format!(
            "its worker thread panicked ({})",
            why.unwrap_or_else(|| "no message".into())
        ))))
    }

    fn check(&mut self, now: Instant, watchdog: Duration) -> Option<Fault> {
        let indices = self.queue_indices();
        self.watchdog.check(indices.into_iter(), now, watchdog).map(Fault::Hung)
    }

    /// The worker is a thread of the hypervisor: any of its threads in a kernel wait
    /// counts (a vCPU's page fault, too, but that passes and the wait is bounded), and so
    /// do requests in flight on the device under the image (an O_DIRECT transfer leaves no
    /// thread waiting for it).
    fn waiting_in_kernel(&self) -> bool {
        self.threads.as_ref().is_some_and(Threads::any_in_kernel_wait)
            || self.storage.as_ref().is_some_and(DeviceQueue::busy)
    }

    fn queue_indices(&self) -> Vec<Option<(u16, u16)>> {
        let rings = self.transport.lock().unwrap_or_else(|e| e.into_inner()).active_rings();
        rings
            .into_iter()
            .map(|(avail, used)| QueueProbe::new(self.memory.clone(), avail, used).indices())
            .collect()
    }

    fn restart(&mut self) -> Result<(), RestartError> {
        Err(RestartError::Failed("a driver inside the hypervisor cannot be restarted".into()))
    }

    fn fail(&mut self) {
        if let Err(e) = self.interrupt.request_reset() {
            log::warn!("cannot tell the driver its disk needs a reset: {e}");
        }
    }
}
