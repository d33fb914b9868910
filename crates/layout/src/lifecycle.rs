//! The driver lifecycle: one mechanism for every device whose driver can fail.
//!
//! A [`ManagedDriver`] is one device's driver under supervision. What differs between
//! device kinds (a vhost-user partition, an external vhost-user backend, a proxied 8250)
//! sits behind [`DriverSlot`]: which fds tell that the driver failed, how a new driver
//! takes over with the device's state, how an upgrade hands over, how the device fails.
//! What is common is here: the fault policy (halt the VM, fail the device, or restart
//! within a budget and with a back-off), the record of what happened, and the commands
//! of the control socket. Every restart, upgrade and failure runs on the supervisor thread
//! ([`splitvisor_isolation::supervisor`]), so a slot's fds only change between two waits.

use std::collections::VecDeque;
use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitvisor_isolation::partition::{DriverProgram, PartitionError};
use splitvisor_isolation::supervisor::{Interest, Supervised, SupervisorHandle, Watch};
use splitvisor_vcpu::StopHandle;

use crate::drivers::{NewDriver, PendingUpgrade, UPGRADE_START, UpgradeStart, kept_driver};
use crate::placement::{FaultPolicy, Placement};

/// Why a device's driver is not upgraded.
const NOT_UPGRADABLE: &str = "this device's driver cannot be upgraded";

/// Longest wait between two restarts, whatever the back-off says.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long requests may make no progress while their driver waits in the kernel, before
/// the watchdog takes it for hung all the same. Storage that stalls this long (a stuck
/// device, a filesystem frozen for a snapshot) would hold up any new driver as well;
/// Linux warns of a hung task after twice as long.
pub(crate) const STORAGE_PATIENCE: Duration = Duration::from_secs(60);

/// How a driver failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Its process ended (crashed, was killed, exited).
    Exited(String),
    /// Its backend closed the connection.
    HungUp,
    /// Requests waited and none completed for the watchdog's time.
    Hung(Duration),
    /// A request to it failed or got no answer.
    Failed(String),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Exited(status) => write!(f, "its process ended ({status})"),
            Fault::HungUp => f.write_str("its backend hung up"),
            Fault::Hung(after) => write!(f, "no request completed for {} ms", after.as_millis()),
            Fault::Failed(why) => write!(f, "{why}"),
        }
    }
}

/// What one of a slot's watched fds meant.
#[derive(Debug)]
pub(crate) enum SlotEvent {
    /// The driver failed.
    Fault(Fault),
    /// The guest broke a queue: not the driver's fault; the device needs a reset.
    GuestBrokeQueue,
}

/// Why a restart did not happen.
#[derive(Debug)]
pub(crate) enum RestartError {
    /// Not possible yet (an external backend not back on its socket): try again at the
    /// next tick, without spending the restart budget.
    NotYet(String),
    /// This attempt failed.
    Failed(String),
}

/// Why an upgrade did not happen.
#[derive(Debug)]
pub(crate) enum UpgradeError {
    /// The device keeps the driver it had.
    Kept(String),
    /// The old driver no longer serves the device and the new one cannot take over yet
    /// (the old one has not ended): the device restarts, as a restart asked for.
    Restarting(String),
}

impl From<String> for UpgradeError {
    fn from(why: String) -> Self {
        Self::Kept(why)
    }
}

impl From<&str> for UpgradeError {
    fn from(why: &str) -> Self {
        Self::Kept(why.to_string())
    }
}

/// One device kind's driver, as the lifecycle drives it.
pub(crate) trait DriverSlot: Send {
    /// What serves the device now: `pid 1234`, `external vhost-user /run/x.sock`, ...
    fn describe(&self) -> String;
    /// The process ID of the driver, if it is a partition.
    fn pid(&self) -> Option<u32>;
    /// Calls `watch` for each fd to watch now. After a slot reports a fault it stops
    /// watching what failed.
    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>));
    /// The fd of `token` is ready.
    fn event(&mut self, token: u32) -> Option<SlotEvent>;
    /// Time-based checks: the watchdog.
    fn check(&mut self, now: Instant, watchdog: Duration) -> Option<Fault> {
        let _ = (now, watchdog);
        None
    }
    /// Whether the driver is waiting in the kernel now (a thread of its process in an
    /// uninterruptible wait): its storage is holding it up (a slow disk, a frozen
    /// filesystem), and the watchdog gives it [`STORAGE_PATIENCE`] rather than replacing a
    /// driver that is not at fault.
    fn waiting_in_kernel(&self) -> bool {
        false
    }
    /// Waits (at most `within`) until the sandbox of the partition the VM started the
    /// device with is in place, if the device was placed before it was (see
    /// [`Partition::wait_ready`](splitvisor_isolation::partition::Partition::wait_ready)).
    fn wait_started(&mut self, within: Duration) -> Result<(), PartitionError> {
        let _ = within;
        Ok(())
    }
    /// A new driver takes over the device, state and owed requests included.
    fn restart(&mut self) -> Result<(), RestartError>;
    /// Asks for a partition of `program` to upgrade the device to, which the supervisor
    /// then watches come up ([`UpgradeStart::spawned`]) rather than wait for; `None` if
    /// `program` is the one the device runs (the upgrade then takes a partition of it as a
    /// restart does).
    fn start_upgrade(&self, program: &DriverProgram) -> Result<Option<UpgradeStart>, String> {
        let _ = program;
        Err(NOT_UPGRADABLE.into())
    }
    /// A new driver (`new`, or one of the program the device runs) takes over a working
    /// device; returns how long the device did not serve. Until an upgrade to another
    /// program succeeds, later restarts and spares still run the program the device had.
    fn upgrade(&mut self, new: Option<NewDriver>) -> Result<Duration, UpgradeError> {
        let _ = new;
        Err(NOT_UPGRADABLE.into())
    }
    /// The device fails for good (DEVICE_NEEDS_RESET, or an empty bus).
    fn fail(&mut self);
    /// Background upkeep at each tick: e.g. starting a spare partition.
    fn maintain(&mut self) {}
    /// Each queue's (available index, used index) in guest memory now, for devices whose
    /// queues a driver serves (empty otherwise, or before the guest started the device).
    fn queue_indices(&self) -> Vec<Option<(u16, u16)>> {
        Vec::new()
    }
}

/// The state of a managed driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Running,
    /// Failed; a new driver takes over at the given time.
    Restarting,
    /// Failed for good.
    Failed(String),
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Running => f.write_str("running"),
            Health::Restarting => f.write_str("restarting"),
            Health::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Something that happened to a device's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEvent {
    /// The device.
    pub device: String,
    /// When, from the VM's creation.
    pub at: Duration,
    /// What.
    pub what: String,
}

/// Device events a VM keeps from its start ([`EventLog`]).
const KEPT_FIRST: usize = 32;
/// Device events a VM keeps from its end.
const KEPT_LAST: usize = 224;

/// A VM's device events, in order: the first [`KEPT_FIRST`] and the last [`KEPT_LAST`],
/// so that a VM whose drivers restart again and again (a control client asking for it
/// in a loop) keeps a bounded log. Every event goes to the `log` crate as well.
#[derive(Debug)]
pub(crate) struct EventLog {
    start: Instant,
    events: Mutex<KeptEvents>,
}

#[derive(Debug, Default)]
struct KeptEvents {
    first: Vec<DeviceEvent>,
    last: VecDeque<DeviceEvent>,
    left_out: u64,
}

impl EventLog {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), events: Mutex::new(KeptEvents::default()) })
    }

    pub(crate) fn record(&self, device: &str, what: String) {
        log::warn!("{device}: {what}");
        let event = DeviceEvent { device: device.to_string(), at: self.start.elapsed(), what };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.first.len() < KEPT_FIRST {
            events.first.push(event);
            return;
        }
        if events.last.len() == KEPT_LAST {
            events.last.pop_front();
            events.left_out += 1;
        }
        events.last.push_back(event);
    }

    /// The events kept, with one in the middle (device `"*"`) saying how many were left
    /// out there, if any were.
    pub(crate) fn all(&self) -> Vec<DeviceEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = events.first.clone();
        if let Some(next) = events.last.front().filter(|_| events.left_out > 0) {
            all.push(DeviceEvent {
                device: "*".into(),
                at: next.at,
                what: format!(
                    "{} events left out of this list (all of them are in the log)",
                    events.left_out
                ),
            });
        }
        all.extend(events.last.iter().cloned());
        all
    }
}

/// A command for a device's driver, carried out on the supervisor thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Replace the driver as after a crash.
    Restart,
    /// Start a new driver (this program, or the same one) and hand the device over.
    Upgrade(Option<DriverProgram>),
    /// Fail the device.
    Fail,
}

/// Commands for a running VM's drivers, from any thread (the control socket uses it).
#[derive(Clone)]
pub struct DriverControl {
    drivers: Arc<Vec<Arc<ManagedDriver>>>,
    devices: Arc<Vec<String>>,
}

impl DriverControl {
    pub(crate) fn new(drivers: Vec<Arc<ManagedDriver>>, devices: Vec<String>) -> Self {
        Self { drivers: Arc::new(drivers), devices: Arc::new(devices) }
    }

    /// Every supervised driver now.
    pub fn status(&self) -> Vec<DriverStatus> {
        self.drivers.iter().map(|driver| driver.status()).collect()
    }

    /// One device's driver now.
    pub fn driver(&self, device: &str) -> Option<DriverStatus> {
        self.drivers.iter().find(|driver| driver.name() == device).map(|driver| driver.status())
    }

    /// Each queue's (available index, used index) in guest memory now: how many requests
    /// the guest has made and how many its driver has completed, read without disturbing
    /// either (monitoring, the watchdog, measuring a stall).
    pub fn queue_indices(&self, device: &str) -> Vec<Option<(u16, u16)>> {
        self.drivers
            .iter()
            .find(|driver| driver.name() == device)
            .map(|driver| driver.lock().slot.queue_indices())
            .unwrap_or_default()
    }

    /// Carries out `command` on `device`'s driver, waiting at most `timeout`.
    ///
    /// Only a driver partition (or an external backend) can be restarted, upgraded or
    /// failed: a device whose driver runs in the hypervisor is refused with
    /// [`CommandError::InHypervisor`], whatever its fault policy, and goes on as it was.
    pub fn command(
        &self,
        device: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let Some(driver) = self.drivers.iter().find(|driver| driver.name() == device) else {
            return Err(if self.devices.iter().any(|known| known == device) {
                CommandError::InHypervisor(device.to_string())
            } else {
                CommandError::UnknownDevice { device: device.to_string(), known: self.devices.join(", ") }
            });
        };
        driver.command(command, timeout)
    }
}

/// Why a [`Command`] was not carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The VM has no such device.
    #[error("unknown device '{device}' (devices: {known})")]
    UnknownDevice {
        /// The name given.
        device: String,
        /// The VM's devices.
        known: String,
    },
    /// The device's driver runs inside the hypervisor: there is no partition to restart,
    /// upgrade or fail (a fault of that driver is the hypervisor's own).
    #[error("{0} runs in the hypervisor: it has no driver partition to restart, upgrade or fail")]
    InHypervisor(String),
    /// The VM is not running (yet, or any more): nothing carries out commands.
    #[error("{0}: the VM is not running")]
    NotRunning(String),
    /// The supervisor did not answer in time.
    #[error("{device}: no answer from the supervisor within {timeout:?}")]
    NoAnswer {
        /// The device.
        device: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The command was carried out and failed; the device's state is as the message says.
    #[error("{0}")]
    Failed(String),
}

impl fmt::Debug for DriverControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverControl").field("devices", &self.devices).finish_non_exhaustive()
    }
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// A new driver serves the device: what it is.
    Restarted(String),
    /// A new driver serves the device; the device did not serve for this long.
    Upgraded {
        /// What serves it now.
        driver: String,
        /// How long the device's queues were stopped for the switch.
        paused: Duration,
    },
    /// The device failed.
    Failed,
}

type Reply = mpsc::Sender<Result<CommandOutcome, CommandError>>;

/// An upgrade to another program whose partition is coming up: the supervisor watches
/// it rather than wait for it, and answers once the device is switched over (or the
/// partition failed, or `deadline` passed).
struct Upgrading {
    pending: PendingUpgrade,
    reply: Reply,
    deadline: Instant,
}

/// The tokens of a pending upgrade's fds (apart from every slot's own).
const UPGRADE_READY: u32 = u32::MAX - 1;
const UPGRADE_EXITED: u32 = u32::MAX;

/// One device's driver under supervision.
pub(crate) struct ManagedDriver {
    name: String,
    kind: &'static str,
    placement: Placement,
    policy: FaultPolicy,
    watchdog: Duration,
    stop: StopHandle,
    log: Arc<EventLog>,
    supervisor: Mutex<Option<SupervisorHandle>>,
    inner: Mutex<Inner>,
    commands: Mutex<Vec<(Command, Reply)>>,
}

struct Inner {
    slot: Box<dyn DriverSlot>,
    health: Health,
    /// When the pending restart may happen, and since when the device has been waiting.
    restart_at: Option<(Instant, Instant)>,
    /// Restarts within the policy's window.
    recent: VecDeque<Instant>,
    restarts: u32,
    last_fault: Option<String>,
    /// Since when requests have been waiting on a driver that waits in the kernel, once
    /// the watchdog would otherwise have fired.
    storage_wait: Option<Instant>,
    /// The pending restart was asked for (an upgrade that has to finish as a restart), so
    /// it does not count against the fault policy's budget.
    restart_asked: bool,
    /// An upgrade whose partition is coming up.
    upgrading: Option<Upgrading>,
}

/// What the control socket shows of a device.
#[derive(Clone, Debug)]
pub struct DriverStatus {
    /// The device.
    pub device: String,
    /// What it is.
    pub kind: String,
    /// Where it runs.
    pub placement: Placement,
    /// Its fault policy.
    pub policy: FaultPolicy,
    /// What serves it now.
    pub driver: String,
    /// The partition's process ID.
    pub pid: Option<u32>,
    /// Its health.
    pub health: Health,
    /// How many times a new driver took over after a fault.
    pub restarts: u32,
    /// The last fault.
    pub last_fault: Option<String>,
}

impl ManagedDriver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        kind: &'static str,
        placement: Placement,
        policy: FaultPolicy,
        watchdog: Duration,
        stop: StopHandle,
        log: Arc<EventLog>,
        slot: Box<dyn DriverSlot>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            kind,
            placement,
            policy,
            watchdog,
            stop,
            log,
            supervisor: Mutex::new(None),
            inner: Mutex::new(Inner {
                slot,
                health: Health::Running,
                restart_at: None,
                recent: VecDeque::new(),
                restarts: 0,
                last_fault: None,
                storage_wait: None,
                restart_asked: false,
                upgrading: None,
            }),
            commands: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// [`DriverSlot::wait_started`]; before the supervisor runs.
    pub(crate) fn wait_started(&self, within: Duration) -> Result<(), PartitionError> {
        self.lock().slot.wait_started(within)
    }

    /// The supervisor that runs this driver's commands.
    pub(crate) fn attach(&self, supervisor: SupervisorHandle) {
        *self.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(supervisor);
    }

    /// What the control socket shows.
    pub(crate) fn status(&self) -> DriverStatus {
        let inner = self.lock();
        DriverStatus {
            device: self.name.clone(),
            kind: self.kind.to_string(),
            placement: self.placement,
            policy: self.policy,
            driver: inner.slot.describe(),
            pid: inner.slot.pid(),
            health: inner.health.clone(),
            restarts: inner.restarts,
            last_fault: inner.last_fault.clone(),
        }
    }

    /// Runs `command` on the supervisor thread and waits (at most `timeout`) for its outcome.
    pub(crate) fn command(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        // Checked before the supervisor sees the command: restarting a driver inside the
        // hypervisor fails, and that failure would be a fault, which its policy (halt, by
        // default) turns into the end of the VM.
        if self.placement == Placement::InHypervisor {
            return Err(CommandError::InHypervisor(self.name.clone()));
        }
        let supervisor = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(supervisor) = supervisor else {
            return Err(CommandError::NotRunning(self.name.clone()));
        };
        let (reply, outcome) = mpsc::channel();
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).push((command, reply));
        supervisor.wake();
        outcome
            .recv_timeout(timeout)
            .unwrap_or_else(|_| Err(CommandError::NoAnswer { device: self.name.clone(), timeout }))
    }

    /// A fault: what the policy says.
    fn fault(&self, inner: &mut Inner, fault: Fault, now: Instant) {
        inner.storage_wait = None;
        let description = fault.to_string();
        inner.last_fault = Some(description.clone());
        match self.policy {
            FaultPolicy::HaltVm => {
                self.log
                    .record(&self.name, format!("driver failed: {description}; the VM ends (policy halt)"));
                inner.health = Health::Failed(description.clone());
                self.stop.device_fault(&self.name, &description);
            }
            FaultPolicy::FailDevice => {
                self.log.record(
                    &self.name,
                    format!("driver failed: {description}; the device fails (policy fail)"),
                );
                self.fail(inner, description);
            }
            FaultPolicy::Restart { max, window, backoff } => {
                if inner.health == Health::Restarting && inner.restart_at.is_some() {
                    // The driver that failed is already being replaced: this is another
                    // report of the same failure (a proxy that stopped getting answers,
                    // then the exit of its process), not a second one to back off for.
                    log::debug!("{}: {description}: a restart is already pending", self.name);
                    return;
                }
                while inner.recent.front().is_some_and(|at| now.duration_since(*at) > window) {
                    inner.recent.pop_front();
                }
                if inner.recent.len() >= max as usize {
                    self.log.record(
                        &self.name,
                        format!("driver failed: {description}; {max} restarts within {window:?} already: the device fails"),
                    );
                    self.fail(inner, format!("restart limit reached ({max} within {window:?})"));
                    return;
                }
                let delay = match inner.recent.len() {
                    0 => Duration::ZERO,
                    n => backoff.saturating_mul(1 << (n - 1).min(16)).min(MAX_BACKOFF),
                };
                self.log.record(&self.name, format!("driver failed: {description}; restarting"));
                inner.health = Health::Restarting;
                inner.restart_at = Some((now + delay, now));
                if delay.is_zero() {
                    self.restart(inner, now, false);
                }
            }
        }
    }

    fn fail(&self, inner: &mut Inner, why: String) {
        inner.slot.fail();
        inner.health = Health::Failed(why);
        inner.restart_at = None;
    }

    /// Carries out a pending restart: one after a fault, which counts against the policy's
    /// `max` within its window, or one `asked` for (the control socket's), which does not
    /// (it would leave the next real fault without a restart).
    fn restart(&self, inner: &mut Inner, now: Instant, asked: bool) {
        let Some((_, since)) = inner.restart_at else { return };
        let asked = asked || inner.restart_asked;
        let started = Instant::now();
        match inner.slot.restart() {
            Ok(()) => {
                inner.restart_asked = false;
                inner.storage_wait = None;
                if !asked {
                    inner.recent.push_back(now);
                }
                inner.restarts += 1;
                inner.health = Health::Running;
                inner.restart_at = None;
                self.log.record(
                    &self.name,
                    format!(
                        "a new driver took over ({}) in {:.2} ms, {:.2} ms after the fault",
                        inner.slot.describe(),
                        started.elapsed().as_secs_f64() * 1e3,
                        since.elapsed().as_secs_f64() * 1e3,
                    ),
                );
            }
            Err(RestartError::NotYet(why)) => {
                // Tried again at the next tick (a restart asked for, too).
                if inner.health != Health::Restarting {
                    log::info!("{}: the restart waits: {why}", self.name);
                }
                inner.health = Health::Restarting;
                let FaultPolicy::Restart { window, .. } = self.policy else { return };
                if now.duration_since(since) > window {
                    self.log.record(&self.name, format!("no driver came back within {window:?} ({why})"));
                    self.fail(inner, format!("no driver came back within {window:?}"));
                }
            }
            Err(RestartError::Failed(why)) => {
                inner.restart_asked = false;
                inner.recent.push_back(now);
                // A new failure, with its own back-off.
                inner.restart_at = None;
                self.fault(inner, Fault::Failed(format!("restart failed: {why}")), now);
            }
        }
    }

    /// Carries out `command` and answers `reply`, or, for an upgrade to another program,
    /// starts its partition and answers once it is up and has taken over (see
    /// [`Self::upgrade_progress`]).
    fn run_command(&self, inner: &mut Inner, command: Command, reply: Reply, now: Instant) {
        let answer = match command {
            Command::Upgrade(Some(program)) => match self.start_upgrade(inner, &program) {
                Ok(Some(pending)) => {
                    inner.upgrading = Some(Upgrading { pending, reply, deadline: now + UPGRADE_START });
                    return;
                }
                Ok(None) => self.carry_out(inner, Command::Upgrade(None), now),
                Err(why) => Err(why),
            },
            command => self.carry_out(inner, command, now),
        };
        let _ = reply.send(answer.map_err(CommandError::Failed));
    }

    /// Asks for a partition of `program` to upgrade to; `None` if the device runs it.
    fn start_upgrade(
        &self,
        inner: &Inner,
        program: &DriverProgram,
    ) -> Result<Option<PendingUpgrade>, String> {
        if let Health::Failed(why) = &inner.health {
            return Err(format!("{} has failed ({why})", self.name));
        }
        if let Some(upgrading) = &inner.upgrading {
            return Err(format!(
                "an upgrade to {} is under way; ask again once it is answered",
                upgrading.pending.program().path.display()
            ));
        }
        inner.slot.start_upgrade(program)?.map(UpgradeStart::spawned).transpose()
    }

    /// A pending upgrade's partition is up, or ended (`ready`), or its time ran out:
    /// switches the device over, or drops the partition, and answers. Nothing happens
    /// otherwise.
    fn upgrade_progress(&self, inner: &mut Inner, ready: bool, now: Instant) {
        let Some(upgrading) = inner.upgrading.take() else { return };
        let answer = if let Health::Failed(why) = &inner.health {
            Err(format!("{} has failed ({why})", self.name))
        } else if ready {
            upgrading.pending.finish().and_then(|new| self.switch(inner, Some(new), now))
        } else if now >= upgrading.deadline || self.stop.has_ended() {
            Err(kept_driver(format!(
                "the partition of {} was not sandboxed within {UPGRADE_START:?}",
                upgrading.pending.program().path.display()
            )))
        } else {
            inner.upgrading = Some(upgrading);
            return;
        };
        let _ = upgrading.reply.send(answer.map_err(CommandError::Failed));
    }

    fn carry_out(&self, inner: &mut Inner, command: Command, now: Instant) -> Result<CommandOutcome, String> {
        if let Health::Failed(why) = &inner.health {
            return Err(format!("{} has failed ({why})", self.name));
        }
        match command {
            Command::Restart => {
                self.log.record(&self.name, "restart asked for".into());
                inner.restart_at = Some((now, now));
                self.restart(inner, now, true);
                match &inner.health {
                    Health::Running => Ok(CommandOutcome::Restarted(inner.slot.describe())),
                    Health::Restarting => Err("the restart goes on at the next tick".into()),
                    other => Err(format!("restart did not complete: {other}")),
                }
            }
            Command::Upgrade(None) => self.switch(inner, None, now),
            // `run_command` starts the partition first, and switches once it is up.
            Command::Upgrade(Some(_)) => {
                Err("an upgrade to another program starts its partition first".into())
            }
            Command::Fail => {
                self.log.record(&self.name, "failed on request".into());
                self.fail(inner, "failed on request".into());
                Ok(CommandOutcome::Failed)
            }
        }
    }

    /// A new driver (`new`, or one of the program the device runs) takes over the device,
    /// which has not failed.
    fn switch(
        &self,
        inner: &mut Inner,
        new: Option<NewDriver>,
        now: Instant,
    ) -> Result<CommandOutcome, String> {
        let stall = match inner.slot.upgrade(new) {
            Ok(stall) => stall,
            Err(UpgradeError::Kept(why)) => return Err(why),
            Err(UpgradeError::Restarting(why)) => {
                self.log.record(&self.name, format!("upgrade: {why}"));
                inner.health = Health::Restarting;
                inner.restart_at = Some((now, now));
                inner.restart_asked = true;
                return Err(why);
            }
        };
        inner.storage_wait = None;
        self.log.record(
            &self.name,
            format!(
                "upgraded to {} (device paused {:.2} ms)",
                inner.slot.describe(),
                stall.as_secs_f64() * 1e3
            ),
        );
        Ok(CommandOutcome::Upgraded { driver: inner.slot.describe(), paused: stall })
    }
}

impl Supervised for ManagedDriver {
    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
        let inner = self.lock();
        // Nothing is handled for a VM that has ended (see `ready`): a dead partition's
        // fds, which stay readable, would wake the supervisor again and again. If the VM
        // runs again (a guest reset restarts it), they are watched again.
        if !matches!(inner.health, Health::Failed(_)) && !self.stop.has_ended() {
            inner.slot.watches(watch);
            if let Some(upgrading) = &inner.upgrading {
                let [readiness, pidfd] = upgrading.pending.watched();
                for (fd, token) in [(readiness, UPGRADE_READY), (pidfd, UPGRADE_EXITED)] {
                    if let Some(fd) = fd {
                        watch(Watch { fd, interest: Interest::Readable, token });
                    }
                }
            }
        }
    }

    fn ready(&self, token: u32) {
        let mut inner = self.lock();
        if matches!(inner.health, Health::Failed(_)) || self.stop.has_ended() {
            return;
        }
        if token == UPGRADE_READY || token == UPGRADE_EXITED {
            self.upgrade_progress(&mut inner, true, Instant::now());
            return;
        }
        match inner.slot.event(token) {
            Some(SlotEvent::Fault(fault)) => self.fault(&mut inner, fault, Instant::now()),
            Some(SlotEvent::GuestBrokeQueue) => {
                self.log.record(&self.name, "the guest broke a queue; the device needs a reset".into());
            }
            None => {}
        }
    }

    fn tick(&self, now: Instant) {
        let commands = std::mem::take(&mut *self.commands.lock().unwrap_or_else(|e| e.into_inner()));
        let mut inner = self.lock();
        for (command, reply) in commands {
            self.run_command(&mut inner, command, reply, now);
        }
        // A pending upgrade's time runs out (or the device failed, or the VM ended).
        self.upgrade_progress(&mut inner, false, now);
        if self.stop.has_ended() {
            return;
        }
        match inner.health {
            Health::Failed(_) => return,
            Health::Restarting => {
                if inner.restart_at.is_some_and(|(at, _)| now >= at) {
                    self.restart(&mut inner, now, false);
                }
            }
            Health::Running => match inner.slot.check(now, self.watchdog) {
                Some(Fault::Hung(stuck)) if stuck < STORAGE_PATIENCE && inner.slot.waiting_in_kernel() => {
                    if inner.storage_wait.is_none() {
                        self.log.record(
                            &self.name,
                            format!(
                                "no request completed for {} ms, but its driver is waiting in the kernel \
                                 (slow or frozen storage?): it gets up to {} s",
                                stuck.as_millis(),
                                STORAGE_PATIENCE.as_secs()
                            ),
                        );
                        inner.storage_wait = Some(now.checked_sub(stuck).unwrap_or(now));
                    }
                }
                Some(fault) => self.fault(&mut inner, fault, now),
                None => {
                    // Once stuck past the watchdog's time, the check says so until a
                    // request completes.
                    if let Some(since) = inner.storage_wait.take() {
                        self.log.record(
                            &self.name,
                            format!(
                                "requests complete again after {} ms",
                                now.duration_since(since).as_millis()
                            ),
                        );
                    }
                }
            },
        }
        if inner.health == Health::Running {
            inner.slot.maintain();
        }
    }
}

/// Tells a hung queue from a busy one: requests waiting (available index ahead of the used
/// index) while the used index does not move, for the watchdog's time.
#[derive(Debug, Default)]
pub(crate) struct Watchdog {
    /// Per queue: the used index last seen, and since when it has not moved with requests
    /// waiting.
    stuck: Vec<Option<(u16, Instant)>>,
}

impl Watchdog {
    /// Looks at every queue's (available, used) indices; says how long the worst has been
    /// stuck, once that passes `timeout`.
    pub(crate) fn check(
        &mut self,
        indices: impl Iterator<Item = Option<(u16, u16)>>,
        now: Instant,
        timeout: Duration,
    ) -> Option<Duration> {
        let mut worst = None;
        for (queue, seen) in indices.enumerate() {
            if self.stuck.len() <= queue {
                self.stuck.resize(queue + 1, None);
            }
            let slot = &mut self.stuck[queue];
            match seen {
                Some((avail, used)) if avail != used => match *slot {
                    Some((last, since)) if last == used => {
                        let stuck = now.duration_since(since);
                        if stuck >= timeout {
                            worst = Some(stuck);
                        }
                    }
                    _ => *slot = Some((used, now)),
                },
                _ => *slot = None,
            }
        }
        worst
    }

    /// Forgets what it saw (a new driver took over).
    pub(crate) fn reset(&mut self) {
        self.stuck.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Carries out `command` on `driver` now; its answer, which these commands give at once.
    fn answer(
        driver: &ManagedDriver,
        command: Command,
        now: Instant,
    ) -> Result<CommandOutcome, CommandError> {
        let (reply, answer) = mpsc::channel();
        driver.run_command(&mut driver.lock(), command, reply, now);
        answer.try_recv().expect("answered at once")
    }

    /// A driver that reports the faults it is given and counts its restarts.
    struct FakeSlot {
        faults: Arc<Mutex<VecDeque<Fault>>>,
        restarts: Arc<Mutex<u32>>,
    }

    impl DriverSlot for FakeSlot {
        fn describe(&self) -> String {
            "fake".into()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn watches(&self, _watch: &mut dyn FnMut(Watch<'_>)) {}
        fn event(&mut self, _token: u32) -> Option<SlotEvent> {
            self.faults.lock().unwrap().pop_front().map(SlotEvent::Fault)
        }
        fn restart(&mut self) -> Result<(), RestartError> {
            *self.restarts.lock().unwrap() += 1;
            Ok(())
        }
        fn fail(&mut self) {}
    }

    #[test]
    fn two_reports_of_one_failure_make_one_restart_with_one_back_off() {
        let faults = Arc::new(Mutex::new(VecDeque::new()));
        let restarts = Arc::new(Mutex::new(0));
        let log = EventLog::new();
        let backoff = Duration::from_millis(50);
        let driver = ManagedDriver::new(
            "com1",
            "8250",
            Placement::Partition,
            FaultPolicy::Restart { max: 10, window: Duration::from_secs(60), backoff },
            Duration::from_secs(1),
            splitvisor_vcpu::VmControl::new().stop_handle(),
            log.clone(),
            Box::new(FakeSlot { faults: faults.clone(), restarts: restarts.clone() }),
        );
        // A first failure is restarted at once; the second, soon after, waits the back-off.
        faults.lock().unwrap().push_back(Fault::Exited("killed".into()));
        driver.ready(0);
        assert_eq!(*restarts.lock().unwrap(), 1);
        faults.lock().unwrap().push_back(Fault::Failed("no answer".into()));
        driver.ready(0);
        assert_eq!(*restarts.lock().unwrap(), 1, "backing off");
        // The same dead driver reported again (its process's exit) changes nothing.
        faults.lock().unwrap().push_back(Fault::Exited("killed".into()));
        driver.ready(0);
        let restarting = log.all().iter().filter(|event| event.what.ends_with("restarting")).count();
        assert_eq!(restarting, 2, "{:?}", log.all());
        driver.tick(Instant::now() + backoff);
        assert_eq!(*restarts.lock().unwrap(), 2);
        assert_eq!(driver.lock().restarts, 2);
    }

    #[test]
    fn restarts_asked_for_do_not_use_up_the_fault_budget() {
        let faults = Arc::new(Mutex::new(VecDeque::new()));
        let restarts = Arc::new(Mutex::new(0));
        let driver = ManagedDriver::new(
            "disk0",
            "virtio-blk",
            Placement::Partition,
            FaultPolicy::Restart { max: 2, window: Duration::from_secs(60), backoff: Duration::ZERO },
            Duration::from_secs(1),
            splitvisor_vcpu::VmControl::new().stop_handle(),
            EventLog::new(),
            Box::new(FakeSlot { faults: faults.clone(), restarts: restarts.clone() }),
        );
        let now = Instant::now();
        for _ in 0..5 {
            assert!(matches!(answer(&driver, Command::Restart, now), Ok(CommandOutcome::Restarted(_))));
        }
        assert_eq!(*restarts.lock().unwrap(), 5);
        // The policy's two restarts are still there for faults; the third fault fails it.
        for round in 1..=3 {
            faults.lock().unwrap().push_back(Fault::Exited(format!("crash {round}")));
            driver.ready(0);
            driver.tick(Instant::now() + Duration::from_secs(1));
        }
        assert_eq!(*restarts.lock().unwrap(), 7);
        assert_eq!(driver.lock().restarts, 7);
        assert!(matches!(driver.status().health, Health::Failed(_)), "{:?}", driver.status().health);
    }

    /// A driver that watches one eventfd.
    struct WatchedSlot(vmm_sys_util::eventfd::EventFd);

    impl DriverSlot for WatchedSlot {
        fn describe(&self) -> String {
            "watched".into()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn watches(&self, watch: &mut dyn FnMut(Watch<'_>)) {
            watch(Watch {
                fd: splitvisor_isolation::supervisor::eventfd_fd(&self.0),
                interest: splitvisor_isolation::supervisor::Interest::Readable,
                token: 0,
            });
        }
        fn event(&mut self, _token: u32) -> Option<SlotEvent> {
            None
        }
        fn restart(&mut self) -> Result<(), RestartError> {
            Ok(())
        }
        fn fail(&mut self) {}
    }

    #[test]
    fn an_ended_vm_s_drivers_are_not_watched() {
        let vm = splitvisor_vcpu::VmControl::new();
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let driver = ManagedDriver::new(
            "com1",
            "8250",
            Placement::Partition,
            FaultPolicy::HaltVm,
            Duration::from_secs(1),
            vm.stop_handle(),
            EventLog::new(),
            Box::new(WatchedSlot(fd)),
        );
        let count = || {
            let mut watched = 0;
            driver.watches(&mut |_| watched += 1);
            watched
        };
        assert_eq!(count(), 1);
        vm.stop_handle().stop();
        assert_eq!(count(), 0, "an ended VM's fds would wake the supervisor for nothing");
    }

    /// A driver inside the hypervisor: it cannot be restarted.
    struct InHypervisorSlot;

    impl DriverSlot for InHypervisorSlot {
        fn describe(&self) -> String {
            "in hypervisor".into()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn watches(&self, _watch: &mut dyn FnMut(Watch<'_>)) {}
        fn event(&mut self, _token: u32) -> Option<SlotEvent> {
            None
        }
        fn restart(&mut self) -> Result<(), RestartError> {
            Err(RestartError::Failed("a driver inside the hypervisor cannot be restarted".into()))
        }
        fn fail(&mut self) {}
    }

    #[test]
    fn commands_for_a_driver_inside_the_hypervisor_are_refused_and_the_vm_goes_on() {
        let vm = splitvisor_vcpu::VmControl::new();
        let driver = ManagedDriver::new(
            "disk0",
            "virtio-blk",
            Placement::InHypervisor,
            FaultPolicy::HaltVm,
            Duration::from_secs(1),
            vm.stop_handle(),
            EventLog::new(),
            Box::new(InHypervisorSlot),
        );
        let supervisor = splitvisor_isolation::supervisor::Supervisor::start(
            vec![driver.clone()],
            Duration::from_millis(10),
        )
        .unwrap();
        driver.attach(supervisor.handle());
        let control = DriverControl::new(vec![driver.clone()], vec!["com1".into(), "disk0".into()]);
        for command in [Command::Restart, Command::Upgrade(None), Command::Fail] {
            let refused = control.command("disk0", command.clone(), Duration::from_secs(30));
            assert_eq!(refused, Err(CommandError::InHypervisor("disk0".into())), "{command:?}");
            assert!(refused.unwrap_err().to_string().contains("disk0 runs in the hypervisor"), "{command:?}");
            assert!(!vm.stop_handle().has_ended(), "{command:?} ended the VM");
            assert_eq!(driver.status().health, Health::Running, "{command:?}");
        }
        // A device that is not supervised at all (com1 in the hypervisor) says the same.
        assert_eq!(
            control.command("com1", Command::Restart, Duration::from_secs(30)),
            Err(CommandError::InHypervisor("com1".into()))
        );
        assert!(matches!(
            control.command("disk9", Command::Restart, Duration::from_secs(30)),
            Err(CommandError::UnknownDevice { .. })
        ));
    }

    /// A disk whose requests have been stuck for `stuck` (none if `None`), with its driver
    /// in a kernel wait or not.
    struct StalledSlot {
        stuck: Arc<Mutex<Option<Duration>>>,
        in_kernel: Arc<Mutex<bool>>,
        restarts: Arc<Mutex<u32>>,
    }

    impl DriverSlot for StalledSlot {
        fn describe(&self) -> String {
            "stalled".into()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn watches(&self, _watch: &mut dyn FnMut(Watch<'_>)) {}
        fn event(&mut self, _token: u32) -> Option<SlotEvent> {
            None
        }
        fn check(&mut self, _now: Instant, watchdog: Duration) -> Option<Fault> {
            self.stuck.lock().unwrap().filter(|stuck| *stuck >= watchdog).map(Fault::Hung)
        }
        fn waiting_in_kernel(&self) -> bool {
            *self.in_kernel.lock().unwrap()
        }
        fn restart(&mut self) -> Result<(), RestartError> {
            *self.restarts.lock().unwrap() += 1;
            *self.stuck.lock().unwrap() = None;
            Ok(())
        }
        fn fail(&mut self) {}
    }

    #[test]
    fn a_driver_held_up_by_its_storage_is_given_time_a_hung_one_is_not() {
        let stuck = Arc::new(Mutex::new(None));
        let in_kernel = Arc::new(Mutex::new(true));
        let restarts = Arc::new(Mutex::new(0));
        let log = EventLog::new();
        let driver = ManagedDriver::new(
            "disk0",
            "virtio-blk",
            Placement::Partition,
            FaultPolicy::Restart { max: 10, window: Duration::from_secs(60), backoff: Duration::ZERO },
            Duration::from_secs(1),
            splitvisor_vcpu::VmControl::new().stop_handle(),
            log.clone(),
            Box::new(StalledSlot {
                stuck: stuck.clone(),
                in_kernel: in_kernel.clone(),
                restarts: restarts.clone(),
            }),
        );
        let now = Instant::now();
        let stall = |secs| *stuck.lock().unwrap() = Some(Duration::from_secs(secs));
        // Past the watchdog, with the driver in a kernel wait: told once, not restarted.
        for secs in [1, 5, 59] {
            stall(secs);
            driver.tick(now);
        }
        assert_eq!(*restarts.lock().unwrap(), 0);
        let told = |what: &str| log.all().iter().filter(|event| event.what.contains(what)).count();
        assert_eq!(told("waiting in the kernel"), 1, "{:?}", log.all());
        // The storage came back.
        *stuck.lock().unwrap() = None;
        driver.tick(now);
        assert_eq!(told("requests complete again"), 1, "{:?}", log.all());
        // Stalled past the patience, it is taken for hung all the same.
        stall(STORAGE_PATIENCE.as_secs());
        driver.tick(now);
        assert_eq!(*restarts.lock().unwrap(), 1);
        // A driver stalled and not in a kernel wait is hung at the watchdog's time.
        *in_kernel.lock().unwrap() = false;
        stall(1);
        driver.tick(now);
        assert_eq!(*restarts.lock().unwrap(), 2);
        assert_eq!(told("waiting in the kernel"), 1, "{:?}", log.all());
        assert_eq!(told("requests complete again"), 1, "{:?}", log.all());
    }

    /// A driver whose old partition takes `pending` restart attempts to end.
    struct SlowToEndSlot {
        pending: Arc<Mutex<u32>>,
    }

    impl DriverSlot for SlowToEndSlot {
        fn describe(&self) -> String {
            "slow to end".into()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn watches(&self, _watch: &mut dyn FnMut(Watch<'_>)) {}
        fn event(&mut self, _token: u32) -> Option<SlotEvent> {
            None
        }
        fn restart(&mut self) -> Result<(), RestartError> {
            let mut pending = self.pending.lock().unwrap();
            if *pending > 0 {
                *pending -= 1;
                return Err(RestartError::NotYet("the old partition has not ended yet".into()));
            }
            Ok(())
        }
        fn upgrade(&mut self, _new: Option<NewDriver>) -> Result<Duration, UpgradeError> {
            Err(UpgradeError::Restarting("the old driver did not stop".into()))
        }
        fn fail(&mut self) {}
    }

    #[test]
    fn an_upgrade_that_ends_as_a_restart_does_not_use_up_the_fault_budget() {
        let pending = Arc::new(Mutex::new(1));
        let driver = ManagedDriver::new(
            "disk0",
            "virtio-blk",
            Placement::Partition,
            FaultPolicy::Restart { max: 1, window: Duration::from_secs(60), backoff: Duration::ZERO },
            Duration::from_secs(1),
            splitvisor_vcpu::VmControl::new().stop_handle(),
            EventLog::new(),
            Box::new(SlowToEndSlot { pending: pending.clone() }),
        );
        let now = Instant::now();
        for _ in 0..3 {
            let answer = answer(&driver, Command::Upgrade(None), now);
            assert_eq!(answer, Err(CommandError::Failed("the old driver did not stop".into())));
            assert_eq!(driver.status().health, Health::Restarting);
            // The old backend's hang-up, reported meanwhile, is the same failure.
            driver.fault(&mut driver.lock(), Fault::HungUp, now);
            for _ in 0..3 {
                driver.tick(now);
            }
            assert_eq!(driver.status().health, Health::Running);
        }
        assert_eq!(driver.lock().recent.len(), 0);
    }

    #[test]
    fn a_restart_asked_for_that_must_wait_goes_on_at_the_next_ticks() {
        let pending = Arc::new(Mutex::new(2));
        let driver = ManagedDriver::new(
            "disk0",
            "virtio-blk",
            Placement::Partition,
            FaultPolicy::Restart { max: 10, window: Duration::from_secs(60), backoff: Duration::ZERO },
            Duration::from_secs(1),
            splitvisor_vcpu::VmControl::new().stop_handle(),
            EventLog::new(),
            Box::new(SlowToEndSlot { pending: pending.clone() }),
        );
        let now = Instant::now();
        let answer = answer(&driver, Command::Restart, now);
        assert_eq!(answer, Err(CommandError::Failed("the restart goes on at the next tick".into())));
        assert_eq!(driver.status().health, Health::Restarting);
        driver.tick(now);
        assert_eq!(driver.status().health, Health::Restarting);
        driver.tick(now);
        assert_eq!(driver.status().health, Health::Running);
        assert_eq!(*pending.lock().unwrap(), 0);
    }

    #[test]
    fn the_event_log_keeps_its_first_and_last_events_and_says_how_many_it_left_out() {
        let log = EventLog::new();
        for i in 0..KEPT_FIRST + KEPT_LAST {
            log.record("disk0", format!("event {i}"));
        }
        assert_eq!(log.all().len(), KEPT_FIRST + KEPT_LAST);
        for i in KEPT_FIRST + KEPT_LAST..10_000 {
            log.record("disk0", format!("event {i}"));
        }
        let all = log.all();
        assert_eq!(all.len(), KEPT_FIRST + 1 + KEPT_LAST);
        assert_eq!(all[0].what, "event 0");
        assert_eq!(all[KEPT_FIRST - 1].what, format!("event {}", KEPT_FIRST - 1));
        let left_out = 10_000 - KEPT_FIRST - KEPT_LAST;
        assert_eq!(all[KEPT_FIRST].device, "*");
        assert!(
            all[KEPT_FIRST].what.starts_with(&format!("{left_out} events left out")),
            "{:?}",
            all[KEPT_FIRST]
        );
        assert_eq!(all[KEPT_FIRST + 1].what, format!("event {}", KEPT_FIRST + left_out));
        assert_eq!(all.last().unwrap().what, "event 9999");
    }

    #[test]
    fn the_watchdog_fires_only_when_waiting_requests_see_no_progress() {
        let mut watchdog = Watchdog::default();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let at = |ms| t0 + Duration::from_millis(ms);
        // Idle: nothing waiting, however long.
        assert_eq!(watchdog.check([Some((5, 5))].into_iter(), at(0), second), None);
        assert_eq!(watchdog.check([Some((5, 5))].into_iter(), at(5000), second), None);
        // Busy: waiting, but the used index moves.
        assert_eq!(watchdog.check([Some((9, 5))].into_iter(), at(5000), second), None);
        assert_eq!(watchdog.check([Some((12, 7))].into_iter(), at(5900), second), None);
        assert_eq!(watchdog.check([Some((12, 9))].into_iter(), at(6800), second), None);
        // Hung: waiting, and the used index stays.
        assert_eq!(watchdog.check([Some((12, 9))].into_iter(), at(7500), second), None);
        assert_eq!(
            watchdog.check([Some((12, 9))].into_iter(), at(7900), second),
            Some(Duration::from_millis(1100))
        );
        watchdog.reset();
        assert_eq!(watchdog.check([Some((12, 9))].into_iter(), at(8000), second), None);
    }
}
