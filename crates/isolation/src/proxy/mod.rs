//! Plain bus devices (the 8250, the i8042, the ACPI power registers) in a driver
//! partition, behind a proxy.
//!
//! [`ProxyDevice`] is a [`BusDevice`] in the hypervisor that forwards each register access
//! to the partition as a [`wire`] frame in a page of shared memory ([`mailbox`]: spinning
//! briefly on both sides, a socket as doorbell and liveness) and waits, for at most
//! [`PROXY_TIMEOUT`], for the answer. The partition runs the very same emulator
//! ([`serve`]). Interrupts bypass the proxy: the partition holds the irqfd.
//!
//! Every answer carries the device's state after the access, which the proxy keeps. When
//! the partition fails (it died, hung, or answered garbage, too much, out of order or
//! never), a proxy with a [`ProxyLink`] reports it and waits (bounded) for the supervisor
//! to offer a new partition; it restores the kept state there and asks the unanswered
//! access again, so the guest sees every access served exactly once and no console byte
//! is lost. Without a link, or once the supervisor gives up, the proxy answers reads with
//! all ones and ignores writes, so no vCPU ever waits on a dead partition again.
//!
//! A partition of a device the guest leaves alone would fail unseen until the guest's next
//! access, which would then wait out [`PROXY_TIMEOUT`]. So the supervisor
//! [probes](ProxyDevice::probe) an idle device: an empty input, a no-op for every device,
//! which a live partition answers within the same deadline.

pub mod fuzzing;
pub mod mailbox;
pub mod wire;

use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use splitvisor_bus::{BusDevice, Interrupt};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use mailbox::{Deadlines, PartitionEnd, ProxyConnection};
use wire::{DecodeError, Frame, MAX_INPUT, MAX_STATE, Request, Response};

/// Longest a register access waits for a partition, unless the partition is still at work
/// (see [`PROXY_PATIENCE`]).
pub const PROXY_TIMEOUT: Duration = Duration::from_millis(200);

/// Longest a register access waits for a partition that is late but still at work
/// (runnable, or in the kernel; see [`crate::liveness`]): on a host whose CPUs are all busy,
/// a woken partition may wait for one longer than [`PROXY_TIMEOUT`], and is only slow. A
/// partition stopped, sleeping on its request, or ended is still taken for hung at
/// [`PROXY_TIMEOUT`]; one looping forever, at this.
pub const PROXY_PATIENCE: Duration = Duration::from_secs(2);

/// Longest a vCPU waits for the supervisor to replace a failed partition.
pub const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest an access waits for its partition's start ([`ProxyLink::starting`]): past the
/// VM's own waits for its partitions ([`READY_TIMEOUT`](crate::partition::READY_TIMEOUT)
/// each, one after another), which end it first.
pub const START_WAIT: Duration = Duration::from_secs(120);

/// How many partitions one access may try before the proxy gives up on the device.
const MAX_ATTEMPTS: usize = 4;

/// Why a partition was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection failed, hung up or timed out.
    #[error("partition connection: {0}")]
    Io(#[from] io::Error),
    /// The partition sent a malformed frame.
    #[error("partition sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// The partition answered another request than the one asked.
    #[error("partition answered request {got}, expected {expected}")]
    OutOfOrder {
        /// The sequence number expected.
        expected: u32,
        /// The one received.
        got: u32,
    },
    /// The partition answered with the wrong kind of response.
    #[error("partition answered a {request} with {response:?}")]
    WrongResponse {
        /// What was asked.
        request: &'static str,
        /// What came back.
        response: Response,
    },
}

/// How a proxy and the supervisor hand over partitions.
///
/// The proxy reports a failed partition ([`ProxyLink::fault_fd`] becomes readable); the
/// supervisor answers with [`offer`](ProxyLink::offer) (a new partition's connection) or
/// [`give_up`](ProxyLink::give_up). The supervisor may also offer a new partition on its
/// own (the old one died while idle, or for an upgrade); the proxy moves to it at its next
/// access.
pub struct ProxyLink {
    state: Mutex<LinkState>,
    changed: Condvar,
    fault: EventFd,
    /// Whether the VM has stopped running (no replacement comes while it has).
    halted: Box<dyn Fn() -> bool + Send + Sync>,
    /// Whether the first partition may still be setting up (see [`ProxyLink::starting`]);
    /// read without the lock at every access.
    starting: AtomicBool,
}

impl std::fmt::Debug for ProxyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyLink").field("state", &self.state).finish_non_exhaustive()
    }
}

/// How often a proxy waiting for a replacement looks whether the VM has stopped.
const HALT_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct LinkState {
    /// Bumped at every offer.
    generation: u64,
    offered: Option<ProxyConnection>,
    gave_up: bool,
    /// The generation whose partition the proxy found failed, not yet replaced.
    reported: Option<u64>,
}

impl ProxyLink {
    /// A link whose first partition is generation 0 (the proxy's initial connection).
    pub fn new() -> io::Result<Arc<Self>> {
        Self::halted_when(|| false)
    }

    /// [`new`](Self::new), for a VM that can stop: while `halted` says it has, a proxy
    /// whose partition fails waits for no replacement (the supervisor offers none to a
    /// stopped VM, and the vCPU making the access is wanted back to end). That access
    /// is dropped, as the VM's end drops it, but the device stays usable: if the VM runs
    /// again (a guest reset restarts it), its next access reports the failure and waits.
    pub fn halted_when(halted: impl Fn() -> bool + Send + Sync + 'static) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: Mutex::new(LinkState::default()),
            changed: Condvar::new(),
            fault: EventFd::new(EFD_NONBLOCK)?,
            halted: Box::new(halted),
            starting: AtomicBool::new(false),
        }))
    }

    /// The proxy's first partition may still be setting up its sandbox (a VM runs its
    /// guest meanwhile): until [`started`](Self::started), an access waits for that (not
    /// past the VM's stop, and at most [`START_WAIT`]) rather than take the partition for
    /// hung at [`PROXY_TIMEOUT`]. A partition sleeps while it sets up, and does not read its
    /// requests before its sandbox is in place. Whoever marks a link starting must end it:
    /// with `started`, or by stopping the VM.
    pub fn starting(self: Arc<Self>) -> Arc<Self> {
        self.starting.store(true, Ordering::Release);
        self
    }

    /// The first partition's sandbox is in place: waiting accesses go on. (If it failed,
    /// the VM stops instead, which ends their wait.)
    pub fn started(&self) {
        let _state = self.lock();
        self.starting.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Proxy side: waits while the first partition may still be setting up. False if the
    /// VM stopped meanwhile (its start failed, or the host stopped it), or the start
    /// outlasted [`START_WAIT`]: the access is dropped, as the VM's end drops it (the
    /// partition's error is the VM's to report).
    fn wait_started(&self) -> bool {
        if !self.starting.load(Ordering::Acquire) {
            return true;
        }
        let deadline = Instant::now() + START_WAIT;
        let mut state = self.lock();
        while self.starting.load(Ordering::Acquire) {
            if (self.halted)() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::debug!(
                    "the partition did not set itself up within {START_WAIT:?}: the access is dropped"
                );
                return false;
            }
            state =
                self.changed.wait_timeout(state, left.min(HALT_POLL)).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readable when the proxy reported a failed partition.
    pub fn fault_fd(&self) -> BorrowedFd<'_> {
        crate::supervisor::eventfd_fd(&self.fault)
    }

    /// The generation the proxy reported failed, if one is waiting for a replacement
    /// (clears the fd's readiness).
    pub fn reported_fault(&self) -> Option<u64> {
        let _ = self.fault.read();
        let state = self.lock();
        state.reported.filter(|&generation| generation == state.generation)
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Offers a new partition's connection; the proxy moves to it at its next access.
    pub fn offer(&self, connection: ProxyConnection) -> u64 {
        let mut state = self.lock();
        state.generation += 1;
        state.offered = Some(connection);
        state.reported = None;
        self.changed.notify_all();
        state.generation
    }

    /// No more partitions: the device fails.
    pub fn give_up(&self) {
        self.lock().gave_up = true;
        self.changed.notify_all();
    }

    /// Proxy side: reports `generation` failed and waits for what comes next.
    fn report_and_wait(&self, generation: u64) -> Replacement {
        let deadline = Instant::now() + REPLACEMENT_TIMEOUT;
        let mut state = self.lock();
        if state.generation == generation && !state.gave_up {
            state.reported = Some(generation);
            let _ = self.fault.write(1);
        }
        loop {
            if state.gave_up {
                return Replacement::None;
            }
            if state.generation > generation {
                return match state.offered.take() {
                    Some(connection) => Replacement::Offered(state.generation, connection),
                    None => Replacement::None,
                };
            }
            if (self.halted)() {
                return Replacement::Halted;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("no replacement partition within {REPLACEMENT_TIMEOUT:?}");
                return Replacement::None;
            }
            state =
                self.changed.wait_timeout(state, left.min(HALT_POLL)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Proxy side: a partition newer than `generation`, if one was offered.
    fn take_offer(&self, generation: u64) -> Option<(u64, ProxyConnection)> {
        let mut state = self.lock();
        if state.generation > generation {
            state.offered.take().map(|connection| (state.generation, connection))
        } else {
            None
        }
    }
}

/// What came of a proxy's wait for a new partition.
enum Replacement {
    /// This generation's connection.
    Offered(u64, ProxyConnection),
    /// None will come: the device fails.
    None,
    /// The VM stopped: this access is dropped, the device kept.
    Halted,
}

/// The hypervisor's stand-in for a device that runs in a partition.
pub struct ProxyDevice {
    name: String,
    connection: Option<ProxyConnection>,
    generation: u64,
    seq: u32,
    dead: bool,
    /// The device's state as the partition last reported it.
    state: Vec<u8>,
    output: Box<dyn Write + Send>,
    reset: Option<Arc<dyn Interrupt>>,
    power_off: Option<Arc<dyn Interrupt>>,
    on_dead: Option<Box<dyn FnOnce(String) + Send>>,
    link: Option<Arc<ProxyLink>>,
    /// When the partition last answered anything.
    last_answer: Instant,
}

/// What a liveness probe ([`ProxyDevice::probe`]) found.
#[derive(Debug)]
pub enum Probe {
    /// The partition answered within the idle time asked for: nothing was sent.
    Recent,
    /// The partition answered the probe.
    Answered,
    /// There is no partition to probe: a replacement is under way, or the device was
    /// dropped for good.
    NoPartition,
    /// The partition did not answer properly. It was hung up; the next access moves to
    /// the partition the supervisor offers (it must replace this one).
    Failed(ProxyError),
}

impl ProxyDevice {
    /// A proxy to the partition at the other end of `connection`. Output the device
    /// produces goes to `output`; a reset it asks for raises `reset`; `on_dead` hears once
    /// if the partition has to be dropped for good.
    pub fn new(
        name: &str,
        connection: ProxyConnection,
        output: Box<dyn Write + Send>,
        reset: Option<Arc<dyn Interrupt>>,
        on_dead: Option<Box<dyn FnOnce(String) + Send>>,
    ) -> Self {
        Self {
            name: name.to_string(),
            connection: Some(connection),
            generation: 0,
            seq: 0,
            dead: false,
            state: Vec::new(),
            output,
            reset,
            power_off: None,
            on_dead,
            link: None,
            last_answer: Instant::now(),
        }
    }

    /// A power-off the device asks for (the ACPI power device's S5) raises `line`.
    pub fn with_power_off(mut self, line: Arc<dyn Interrupt>) -> Self {
        self.power_off = Some(line);
        self
    }

    /// Failed partitions are replaced through `link` instead of being dropped.
    pub fn with_link(mut self, link: Arc<ProxyLink>) -> Self {
        self.generation = link.generation();
        self.link = Some(link);
        self
    }

    /// Whether the partition was dropped for good.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Feeds host input to the device; returns how many bytes it took.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let bytes = &bytes[..bytes.len().min(MAX_INPUT)];
        match self.call(Request::Input { bytes: bytes.to_vec() }) {
            Some(Response::Done { accepted, output, reset, power_off, .. }) => {
                self.apply(&output, reset, power_off);
                usize::from(accepted).min(bytes.len())
            }
            _ => 0,
        }
    }

    /// Proves the partition alive if it has not answered anything for `idle`: an empty
    /// input, which changes nothing in any device, must be answered within
    /// [`PROXY_TIMEOUT`]. Unlike an access, a failed probe never waits for a replacement
    /// (the caller is the one to provide it): the partition is hung up, and the next
    /// access moves to whichever partition the supervisor offers.
    pub fn probe(&mut self, idle: Duration) -> Probe {
        if self.last_answer.elapsed() < idle {
            return Probe::Recent;
        }
        let offered = self.link.as_ref().is_some_and(|link| link.generation() > self.generation);
        if self.dead || offered {
            return Probe::NoPartition;
        }
        let Some(mut connection) = self.connection.take() else {
            return Probe::NoPartition;
        };
        match self.exchange(&mut connection, &Request::Input { bytes: Vec::new() }) {
            Ok(response) => {
                self.connection = Some(connection);
                if let Response::Done { output, reset, power_off, .. } = response {
                    self.apply(&output, reset, power_off);
                }
                Probe::Answered
            }
            Err(e) => {
                log::warn!("{}: driver partition failed a liveness probe: {e}", self.name);
                connection.hang_up();
                Probe::Failed(e)
            }
        }
    }

    /// Sends `request` and returns the partition's answer, moving to a new partition as
    /// often as needed (and allowed).
    fn call(&mut self, request: Request) -> Option<Response> {
        if self.link.as_ref().is_some_and(|link| !link.wait_started()) {
            return None;
        }
        for _ in 0..MAX_ATTEMPTS {
            if self.dead {
                return None;
            }
            if let Some(link) = &self.link {
                if let Some((generation, connection)) = link.take_offer(self.generation) {
                    self.adopt(generation, connection);
                    continue;
                }
            }
            let Some(mut connection) = self.connection.take() else {
                if !self.replace(None) {
                    return None;
                }
                continue;
            };
            match self.exchange(&mut connection, &request) {
                Ok(response) => {
                    self.connection = Some(connection);
                    return Some(response);
                }
                Err(e) => {
                    if !self.replace(Some(e)) {
                        return None;
                    }
                }
            }
        }
        self.drop_partition(format!("no partition served the access after {MAX_ATTEMPTS} attempts"));
        None
    }

    /// One request and its checked answer; keeps the state it carries.
    fn exchange(
        &mut self,
        connection: &mut ProxyConnection,
        request: &Request,
    ) -> Result<Response, ProxyError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let answer =
            connection.call(&request.encode(seq), Deadlines::after(PROXY_TIMEOUT, PROXY_PATIENCE))?;
        let body = wire::frame_body(answer)?;
        let Frame { seq: got, message } = Response::decode(body)?;
        if got != seq {
            return Err(ProxyError::OutOfOrder { expected: seq, got });
        }
        let state = match (request, &message) {
            (Request::Read { len, .. }, Response::ReadDone { data, state })
                if data.len() == usize::from(*len) =>
            {
                state
            }
            (
                Request::Write { .. } | Request::Input { .. } | Request::Restore { .. },
                Response::Done { state, .. },
            ) => state,
            (request, _) => {
                let request = match request {
                    Request::Read { .. } => "read",
                    Request::Write { .. } => "write",
                    Request::Input { .. } => "input",
                    Request::Restore { .. } => "restore",
                };
                return Err(ProxyError::WrongResponse { request, response: message });
            }
        };
        self.state.clone_from(state);
        self.last_answer = Instant::now();
        Ok(message)
    }

    /// The partition failed (or there is none): report it and wait for a replacement.
    /// False if the VM stopped meanwhile: the access is given up, the device kept.
    fn replace(&mut self, why: Option<ProxyError>) -> bool {
        if let Some(why) = &why {
            // The supervisor ends a partition it has replaced already (an upgrade, a restart
            // asked for) without waiting for an access under way: that access moves to the
            // new one, and nothing failed.
            if self.link.as_ref().is_some_and(|link| link.generation() > self.generation) {
                log::debug!("{}: the replaced partition ended during an access: {why}", self.name);
            } else {
                log::warn!("{}: driver partition failed: {why}", self.name);
            }
        }
        let Some(link) = self.link.clone() else {
            self.drop_partition(why.map_or_else(|| "no partition".to_string(), |e| e.to_string()));
            return true;
        };
        match link.report_and_wait(self.generation) {
            Replacement::Offered(generation, connection) => self.adopt(generation, connection),
            Replacement::None => {
                self.drop_partition("the supervisor gave no replacement partition".to_string())
            }
            Replacement::Halted => {
                log::info!("{}: the VM stopped: the access waits for no replacement partition", self.name);
                return false;
            }
        }
        true
    }

    /// Moves to a new partition: it takes up the last state the old one reported.
    fn adopt(&mut self, generation: u64, mut connection: ProxyConnection) {
        self.generation = generation;
        // The supervisor replaced the old partition (it ends when its connection closes):
        // if the new one proves unusable, that is this generation's failure to report,
        // never a reason to go back to the old one.
        if let Some(old) = self.connection.take() {
            old.hang_up();
        }
        let restore = Request::Restore { state: self.state.clone() };
        match self.exchange(&mut connection, &restore) {
            Ok(_) => {
                log::info!("{}: a new driver partition took over (generation {generation})", self.name);
                self.connection = Some(connection);
            }
            Err(e) => log::warn!("{}: new partition refused the state: {e}", self.name),
        }
    }

    fn apply(&mut self, output: &[u8], reset: bool, power_off: bool) {
        if !output.is_empty() {
            let _ = self.output.write_all(output);
        }
        for (asked, line) in [(reset, &self.reset), (power_off, &self.power_off)] {
            if let (true, Some(line)) = (asked, line) {
                let _ = line.trigger();
            }
        }
    }

    fn drop_partition(&mut self, why: String) {
        if self.dead {
            return;
        }
        log::warn!("{}: dropping its driver partition: {why}", self.name);
        self.dead = true;
        if let Some(connection) = self.connection.take() {
            connection.hang_up();
        }
        if let Some(on_dead) = self.on_dead.take() {
            on_dead(why);
        }
    }
}

impl BusDevice for ProxyDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len().min(wire::MAX_ACCESS) as u8;
        match self.call(Request::Read { offset, len }) {
            Some(Response::ReadDone { data: got, .. }) => {
                data.fill(0);
                data[..got.len()].copy_from_slice(&got);
            }
            // A dead partition reads as an empty bus.
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let data = data[..data.len().min(wire::MAX_ACCESS)].to_vec();
        if let Some(Response::Done { output, reset, power_off, .. }) =
            self.call(Request::Write { offset, data })
        {
            self.apply(&output, reset, power_off);
        }
    }
}

impl InputSink for ProxyDevice {
    fn input(&mut self, bytes: &[u8]) -> usize {
        ProxyDevice::input(self, bytes)
    }
}

/// Output a device produces between two responses, and its reset and power-off lines.
#[derive(Clone, Default)]
pub struct Effects {
    output: Arc<std::sync::Mutex<Vec<u8>>>,
    reset: Arc<AtomicBool>,
    power_off: Arc<AtomicBool>,
}

/// What a device did besides answering: output and requests to the machine.
struct Taken {
    output: Vec<u8>,
    reset: bool,
    power_off: bool,
}

impl Effects {
    /// A writer for the device's output.
    pub fn writer(&self) -> EffectsWriter {
        EffectsWriter(self.output.clone())
    }

    /// An interrupt line that records a reset request.
    pub fn reset_line(&self) -> Arc<dyn Interrupt> {
        Arc::new(RequestFlag(self.reset.clone()))
    }

    /// An interrupt line that records a power-off request.
    pub fn power_off_line(&self) -> Arc<dyn Interrupt> {
        Arc::new(RequestFlag(self.power_off.clone()))
    }

    fn take(&self) -> Taken {
        let mut output = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let output = if output.len() > MAX_INPUT {
            output.drain(..MAX_INPUT).collect()
        } else {
            std::mem::take(&mut *output)
        };
        Taken {
            output,
            reset: self.reset.swap(false, Ordering::AcqRel),
            power_off: self.power_off.swap(false, Ordering::AcqRel),
        }
    }
}

/// Collects a device's output for the next response.
pub struct EffectsWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for EffectsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A request to the machine (reset, power-off), carried by the next response.
struct RequestFlag(Arc<AtomicBool>);

impl Interrupt for RequestFlag {
    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// Something a partition can feed host input to.
pub trait InputSink: Send {
    /// Takes what fits of `bytes`; returns how many.
    fn input(&mut self, bytes: &[u8]) -> usize;
}

impl<W: Write + Send> InputSink for splitvisor_devices::serial::Serial<W> {
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.enqueue_input(bytes).unwrap_or(0)
    }
}

/// A device a partition serves: a bus device whose state can be saved after every access
/// and taken up by another partition.
pub trait ProxiedDevice: BusDevice + InputSink {
    /// The state, at most [`MAX_STATE`] bytes.
    fn save_state(&self) -> Vec<u8>;
    /// Takes up a state [`save_state`](Self::save_state) produced (possibly in another
    /// process).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String>;
}

/// The 8250 of a partition: the UART, and what it takes to rebuild it from a state.
pub struct ProxiedSerial {
    serial: splitvisor_devices::serial::Serial<EffectsWriter>,
    interrupt: Arc<dyn Interrupt>,
    effects: Effects,
}

impl ProxiedSerial {
    /// A UART in its power-on state.
    pub fn new(interrupt: Arc<dyn Interrupt>, effects: &Effects) -> Self {
        let serial = splitvisor_devices::serial::Serial::new(interrupt.clone(), effects.writer());
        Self { serial, interrupt, effects: effects.clone() }
    }
}

impl BusDevice for ProxiedSerial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.serial.read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.serial.write(offset, data)
    }
}

impl InputSink for ProxiedSerial {
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.serial.input(bytes)
    }
}

/// Receive FIFO bytes a UART state may hold (vm-superio's FIFO is 64 bytes).
const MAX_SERIAL_FIFO: usize = 64;

impl ProxiedDevice for ProxiedSerial {
    fn save_state(&self) -> Vec<u8> {
        let state = self.serial.state();
        let fifo = &state.in_buffer[..state.in_buffer.len().min(MAX_SERIAL_FIFO)];
        let mut bytes = vec![
            state.baud_divisor_low,
            state.baud_divisor_high,
            state.interrupt_enable,
            state.interrupt_identification,
            state.line_control,
            state.line_status,
            state.modem_control,
            state.modem_status,
            state.scratch,
            fifo.len() as u8,
        ];
        bytes.extend_from_slice(fifo);
        bytes
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(()); // nothing was ever reported: the power-on state
        }
        let (registers, fifo) = bytes.split_at_checked(10).ok_or("UART state too short")?;
        if usize::from(registers[9]) != fifo.len() || fifo.len() > MAX_SERIAL_FIFO {
            return Err("UART state FIFO length mismatch".into());
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: registers[0],
            baud_divisor_high: registers[1],
            interrupt_enable: registers[2],
            interrupt_identification: registers[3],
            line_control: registers[4],
            line_status: registers[5],
            modem_control: registers[6],
            modem_status: registers[7],
            scratch: registers[8],
            in_buffer: fifo.to_vec(),
        };
        self.serial = splitvisor_devices::serial::Serial::from_state(
            &state,
            self.interrupt.clone(),
            self.effects.writer(),
        )
        .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A device without input.
pub struct NoInput<D>(pub D);

impl<D: BusDevice> BusDevice for NoInput<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data)
    }
}

impl<D: Send> InputSink for NoInput<D> {
    fn input(&mut self, _bytes: &[u8]) -> usize {
        0
    }
}

/// The i8042 keeps no state between accesses (vm-superio's emulation only has a reset line).
impl ProxiedDevice for NoInput<splitvisor_devices::i8042::I8042> {
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() { Ok(()) } else { Err("the i8042 has no state".into()) }
    }
}

/// The ACPI power registers of a partition ([`AcpiPower`](splitvisor_devices::acpi::AcpiPower)):
/// a guest's power-off and reset travel back as the response's effect flags.
pub struct ProxiedPower {
    power: splitvisor_devices::acpi::AcpiPower,
    effects: Effects,
}

impl ProxiedPower {
    /// The registers in their power-on state.
    pub fn new(effects: &Effects) -> Self {
        let power = splitvisor_devices::acpi::AcpiPower::new(effects.power_off_line(), effects.reset_line());
        Self { power, effects: effects.clone() }
    }
}

impl BusDevice for ProxiedPower {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.power.read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.power.write(offset, data)
    }
}

impl InputSink for ProxiedPower {
    fn input(&mut self, _bytes: &[u8]) -> usize {
        0
    }
}

impl ProxiedDevice for ProxiedPower {
    fn save_state(&self) -> Vec<u8> {
        vec![u8::from(self.power.state().woke)]
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let woke = match state {
            [] => false, // nothing was ever reported: the power-on state
            [0] => false,
            [1] => true,
            _ => return Err("invalid ACPI power state".into()),
        };
        self.power = splitvisor_devices::acpi::AcpiPower::from_state(
            &splitvisor_devices::acpi::AcpiPowerState { woke },
            self.effects.power_off_line(),
            self.effects.reset_line(),
        );
        Ok(())
    }
}

/// The partition side: serves `device` on `end` until the hypervisor hangs up or sends
/// a malformed frame.
pub fn serve<D: ProxiedDevice>(
    device: &mut D,
    effects: &Effects,
    end: &mut PartitionEnd,
) -> Result<(), ProxyError> {
    loop {
        let Some(request) = end.next_request()? else {
            return Ok(());
        };
        let Frame { seq, message } = Request::decode(wire::frame_body(request)?)?;
        let response = match message {
            Request::Read { offset, len } => {
                let mut data = vec![0u8; usize::from(len)];
                device.read(offset, &mut data);
                Response::ReadDone { data, state: state_of(device) }
            }
            Request::Write { offset, data } => {
                device.write(offset, &data);
                let Taken { output, reset, power_off } = effects.take();
                Response::Done { accepted: 0, output, reset, power_off, state: state_of(device) }
            }
            Request::Input { bytes } => {
                let accepted = device.input(&bytes) as u16;
                let Taken { output, reset, power_off } = effects.take();
                Response::Done { accepted, output, reset, power_off, state: state_of(device) }
            }
            Request::Restore { state } => {
                if let Err(e) = device.restore_state(&state) {
                    log::warn!("proxy: cannot take up the state: {e}");
                    return Err(ProxyError::Decode(DecodeError::BadField("device state")));
                }
                Response::Done {
                    accepted: 0,
                    output: Vec::new(),
                    reset: false,
                    power_off: false,
                    state: state_of(device),
                }
            }
        };
        end.answer(&response.encode(seq))?;
    }
}

fn state_of<D: ProxiedDevice>(device: &D) -> Vec<u8> {
    let mut state = device.save_state();
    state.truncate(MAX_STATE);
    state
}

#[cfg(test)]
mod tests {
    use splitvisor_bus::CountingInterrupt;

    use super::*;

    /// THR, IER, LCR, SCR.
    const THR: u64 = 0;
    const LCR: u64 = 3;
    const SCR: u64 = 7;

    #[test]
    fn a_uart_state_moves_to_another_device_intact() {
        let effects = Effects::default();
        let mut first = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
        first.write(LCR, &[0x03]);
        first.write(SCR, &[0x5a]);
        assert_eq!(first.input(b"abc"), 3);
        let state = first.save_state();
        assert!(state.len() <= MAX_STATE);

        let mut second = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
        second.restore_state(&state).unwrap();
        assert_eq!(second.save_state(), state);
        let mut byte = [0u8];
        second.read(SCR, &mut byte);
        assert_eq!(byte, [0x5a]);
        second.read(THR, &mut byte);
        assert_eq!(byte, [b'a'], "the receive FIFO came along");
        assert!(second.restore_state(&state[..5]).is_err());
    }

    /// Waits (at most 10 s) until the proxy reports a failed partition on `link`.
    fn wait_for_fault(link: &ProxyLink) {
        let mut fd = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&link.fault_fd()),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, bounded wait.
        assert_eq!(unsafe { libc::poll(fd.as_mut_ptr(), 1, 10_000) }, 1, "no fault reported");
    }

    /// The supervisor's part: offers a healthy partition on `link` and serves the UART there.
    fn offer_and_serve(link: &ProxyLink) {
        let (ours, mut theirs) = ProxyConnection::pair().unwrap();
        link.offer(ours);
        let effects = Effects::default();
        let mut serial = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
        let _ = serve(&mut serial, &effects, &mut theirs);
    }

    /// A partition that answers `answered` requests, then reads one more and dies.
    fn dying_partition(mut end: PartitionEnd, answered: usize) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let effects = Effects::default();
            let mut serial = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
            for _ in 0..answered {
                let request = end.next_request().unwrap().unwrap();
                let body = wire::frame_body(request).unwrap().to_vec();
                let Frame { seq, message } = Request::decode(&body).unwrap();
                let response = match message {
                    Request::Write { offset, data } => {
                        serial.write(offset, &data);
                        let Taken { output, reset, power_off } = effects.take();
                        Response::Done { accepted: 0, output, reset, power_off, state: serial.save_state() }
                    }
                    other => panic!("unexpected {other:?}"),
                };
                end.answer(&response.encode(seq)).unwrap();
            }
            let _ = end.next_request();
        })
    }

    #[test]
    fn a_replacement_partition_gets_the_state_and_the_unanswered_access() {
        let link = ProxyLink::new().unwrap();
        let (ours, theirs) = ProxyConnection::pair().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut proxy = ProxyDevice::new("com1", ours, Box::new(SharedSink(output.clone())), None, None)
            .with_link(link.clone());
        let first = dying_partition(theirs, 2);

        // The supervisor's part: on a reported fault, offer a healthy partition.
        let supervisor_link = link.clone();
        let supervisor = std::thread::spawn(move || {
            wait_for_fault(&supervisor_link);
            assert_eq!(supervisor_link.reported_fault(), Some(0));
            offer_and_serve(&supervisor_link);
        });

        proxy.write(SCR, &[0x77]);
        proxy.write(THR, b"a");
        proxy.write(THR, b"b"); // the first partition dies on this one
        proxy.write(THR, b"c");
        let mut scratch = [0u8];
        proxy.read(SCR, &mut scratch);
        assert_eq!(scratch, [0x77], "the state came along");
        assert_eq!(&*output.lock().unwrap(), b"abc", "every byte exactly once");
        assert!(!proxy.is_dead());
        drop(proxy);
        first.join().unwrap();
        supervisor.join().unwrap();
    }

    #[test]
    fn a_probe_proves_an_idle_partition_alive_and_hands_over_a_silent_one_without_waiting() {
        let link = ProxyLink::new().unwrap();
        let (ours, mut theirs) = ProxyConnection::pair().unwrap();
        let mut proxy =
            ProxyDevice::new("com1", ours, Box::new(io::sink()), None, None).with_link(link.clone());
        let partition = std::thread::spawn(move || {
            let effects = Effects::default();
            let mut serial = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
            let _ = serve(&mut serial, &effects, &mut theirs);
        });
        proxy.write(SCR, &[0x5a]);
        assert!(matches!(proxy.probe(Duration::from_secs(60)), Probe::Recent), "an access just answered");
        assert!(matches!(proxy.probe(Duration::ZERO), Probe::Answered));
        let mut scratch = [0u8];
        proxy.read(SCR, &mut scratch);
        assert_eq!(scratch, [0x5a], "the probe changed nothing");
        drop(proxy);
        partition.join().unwrap();

        // A partition that never answers (stopped): the probe fails within the access
        // deadline, waits for no replacement (its caller is the supervisor, who provides
        // one), and leaves the next access to move to whatever partition is offered.
        let (ours, silent) = ProxyConnection::pair().unwrap();
        let mut proxy =
            ProxyDevice::new("com1", ours, Box::new(io::sink()), None, None).with_link(link.clone());
        let started = Instant::now();
        let probe = proxy.probe(Duration::ZERO);
        assert!(matches!(probe, Probe::Failed(_)), "{probe:?}");
        assert!(started.elapsed() < REPLACEMENT_TIMEOUT, "the probe waited for a replacement");
        assert!(matches!(proxy.probe(Duration::ZERO), Probe::NoPartition));
        assert!(!proxy.is_dead());
        assert_eq!(link.reported_fault(), None, "the probe's caller reports, not the proxy");
        let (ours, mut theirs) = ProxyConnection::pair().unwrap();
        link.offer(ours);
        let replacement = std::thread::spawn(move || {
            let effects = Effects::default();
            let mut serial = ProxiedSerial::new(Arc::new(CountingInterrupt::new()), &effects);
            let _ = serve(&mut serial, &effects, &mut theirs);
        });
        proxy.write(SCR, &[0xa5]);
        proxy.read(SCR, &mut scratch);
        assert_eq!(scratch, [0xa5], "the next accesses went to the replacement");
        drop((proxy, silent));
        replacement.join().unwrap();
    }

    #[test]
    fn a_stopped_vm_waits_for_no_replacement_and_keeps_the_device() {
        let halted = Arc::new(AtomicBool::new(false));
        let link = {
            let halted = halted.clone();
            ProxyLink::halted_when(move || halted.load(Ordering::Acquire)).unwrap()
        };
        let (ours, theirs) = ProxyConnection::pair().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut proxy = ProxyDevice::new("com1", ours, Box::new(SharedSink(output.clone())), None, None)
            .with_link(link.clone());
        let first = dying_partition(theirs, 1);
        proxy.write(THR, b"a");

        // The partition dies on this access while the VM stops: nobody offers a
        // replacement, and the vCPU is wanted back at once, not after the wait's bound.
        let stopper = {
            let (halted, link) = (halted.clone(), link.clone());
            std::thread::spawn(move || {
                wait_for_fault(&link);
                halted.store(true, Ordering::Release);
            })
        };
        let started = Instant::now();
        proxy.write(THR, b"b");
        assert!(started.elapsed() < REPLACEMENT_TIMEOUT, "the access waited for a replacement");
        stopper.join().unwrap();
        first.join().unwrap();
        assert!(!proxy.is_dead(), "the device outlives the stop");

        // The VM runs again (a guest reset restarted it): the next access reports the
        // failure, and the supervisor's replacement serves it.
        halted.store(false, Ordering::Release);
        let supervisor = std::thread::spawn(move || {
            wait_for_fault(&link);
            offer_and_serve(&link);
        });
        proxy.write(THR, b"c");
        assert_eq!(&*output.lock().unwrap(), b"ac", "the access made while the VM stopped was dropped");
        drop(proxy);
        supervisor.join().unwrap();
    }

    #[test]
    fn without_a_replacement_the_device_reads_as_an_empty_bus() {
        let link = ProxyLink::new().unwrap();
        let (ours, theirs) = ProxyConnection::pair().unwrap();
        let mut proxy =
            ProxyDevice::new("com1", ours, Box::new(io::sink()), None, None).with_link(link.clone());
        drop(theirs);
        link.give_up();
        let mut byte = [0u8];
        proxy.read(SCR, &mut byte);
        assert_eq!(byte, [0xff]);
        assert!(proxy.is_dead());
    }

    #[test]
    fn the_power_device_asks_for_power_off_and_reset_through_the_proxy() {
        use splitvisor_devices::acpi::{
            RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_OFFSET, SLP_EN,
        };
        let (ours, mut theirs) = ProxyConnection::pair().unwrap();
        let partition = std::thread::spawn(move || {
            let effects = Effects::default();
            let mut power = ProxiedPower::new(&effects);
            let _ = serve(&mut power, &effects, &mut theirs);
        });
        let (power_off, reset) = (Arc::new(CountingInterrupt::new()), Arc::new(CountingInterrupt::new()));
        let mut proxy = ProxyDevice::new("power", ours, Box::new(io::sink()), Some(reset.clone()), None)
            .with_power_off(power_off.clone());
        proxy.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        assert_eq!((power_off.count(), reset.count()), (0, 0), "no SLP_EN, no power-off");
        proxy.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!((power_off.count(), reset.count()), (1, 0));
        proxy.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!((power_off.count(), reset.count()), (1, 1));
        drop(proxy);
        partition.join().unwrap();
    }

    #[test]
    fn a_power_device_state_moves_to_another_partition() {
        use splitvisor_devices::acpi::{SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, SLP_EN, WAK_STS};
        let effects = Effects::default();
        let mut first = ProxiedPower::new(&effects);
        first.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]); // S3: wakes at once
        let state = first.save_state();
        let mut second = ProxiedPower::new(&effects);
        second.restore_state(&state).unwrap();
        let mut status = [0u8];
        second.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAK_STS]);
        assert!(second.restore_state(&[2]).is_err());
        assert!(second.restore_state(&[0, 0]).is_err());
        second.restore_state(&[]).unwrap();
        second.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }

    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
