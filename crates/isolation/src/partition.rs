//! Starting driver partitions.
//!
//! A partition is a fresh process running `splitvisor-driver` (or a program that hosts it
//! behind a sub-command), handed exactly the fds it serves with, as fds 3, 4, ...: the
//! hypervisor's end of a socket pair is the vhost-user or proxy connection, so no socket
//! ever appears in the filesystem, and the disk image is opened (and locked) here, so the
//! partition never needs to open a file.
//!
//! A partition is one process, created as PID 1 of a PID namespace of its own (with a user
//! namespace of its own too when the hypervisor is not root), which then sandboxes itself
//! ([`crate::sandbox`]) and serves as that namespace's init: no second process waits to keep
//! the namespace alive. Between the clone and the exec of the driver the child only makes
//! system calls on data prepared beforehand (the hypervisor has threads).
//!
//! A partition never outlives the hypervisor, even when the hypervisor is killed with
//! SIGKILL: it is started with a parent-death signal, and the kernel sends that signal when
//! the *thread* that started the child ends. Every partition is therefore started from one
//! thread that lives as long as the process ([`Partition::spawn`] hands the work to it), never from a
//! thread that may end before the VM (a supervisor, a vCPU, a short-lived builder).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use splitvisor_bus::threads::{self, StartingThread, ThreadKind};
use vmm_sys_util::eventfd::EventFd;

use crate::liveness::{Liveness, Threads};
use crate::proxy::ProxyConnection;
use crate::sandbox::{ABORTED_EXIT_CODE, ReadySignal};

/// Longest a partition may take to have its sandbox in place, counted from when it is
/// waited for (it was started before).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Partition::kill`] waits for the partition to end: a killed process ends in
/// milliseconds (seconds on a host under heavy load), unless a thread of it is in an
/// uninterruptible wait in the kernel.
pub const KILL_REAP: Duration = Duration::from_secs(2);

/// Errors starting a partition. Those about one partition name what it was to serve (the
/// driver's sub-command: `blk`, `net`, `serial`, ...), the program and what happened.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The driver program cannot be started.
    #[error("cannot start the {role} driver partition: {}: {source}", driver.display())]
    Spawn {
        /// What it was to serve.
        role: String,
        /// The program.
        driver: PathBuf,
        /// Why (a file that is not there, or cannot be run, is said so).
        #[source]
        source: io::Error,
    },
    /// The partition's process ended before its sandbox was in place (the driver's own
    /// message, if it wrote one, went to the hypervisor's standard error before, and is the
    /// cause if it reported one).
    #[error(
        "the {role} driver partition ({}, pid {pid}) ended before its sandbox was in place: {}{}",
        driver.display(),
        PartitionEnd { status: *status, cause: cause.clone() },
        forbidden_call_hint(*status)
    )]
    Ended {
        /// What it was to serve.
        role: String,
        /// The program.
        driver: PathBuf,
        /// Its process ID.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// Why, as the partition said ([`PartitionEnd::cause`]).
        cause: Option<String>,
    },
    /// The partition did not get its sandbox in place (in time, or said something else);
    /// it was killed.
    #[error("the {role} driver partition ({}, pid {pid}) was killed: {source}", driver.display())]
    NotReady {
        /// What it was to serve.
        role: String,
        /// The program.
        driver: PathBuf,
        /// Its process ID.
        pid: u32,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Setting up the socket, an fd or the pidfd failed.
    #[error("cannot set up the driver partition: {what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a partition killed by SIGSYS before its sandbox was in place most likely means.
fn forbidden_call_hint(status: ExitStatus) -> &'static str {
    if status.signal() == Some(libc::SIGSYS) {
        " (a system call its seccomp filter forbids: is the program splitvisor-driver?)"
    } else {
        ""
    }
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> PartitionError {
    move |source| PartitionError::Setup { what, source }
}

/// The program a driver partition runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverProgram {
    /// The executable.
    pub path: PathBuf,
    /// Arguments before the driver's own (for a program that hosts the driver behind a
    /// sub-command).
    pub prefix: Vec<String>,
}

impl DriverProgram {
    /// The `splitvisor-driver` binary at `path`.
    pub fn at(path: &Path) -> Self {
        Self { path: path.to_path_buf(), prefix: Vec::new() }
    }

    /// `SPLITVISOR_DRIVER` if set, else a `splitvisor-driver` next to this executable (or
    /// one directory up, as for cargo's examples).
    pub fn find() -> Option<Self> {
        if let Some(path) = std::env::var_os("SPLITVISOR_DRIVER") {
            return Some(Self::at(Path::new(&path)));
        }
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        [dir.join("splitvisor-driver"), dir.parent()?.join("splitvisor-driver")]
            .into_iter()
            .find(|candidate| candidate.is_file())
            .map(|path| Self { path, prefix: Vec::new() })
    }
}

/// What a block partition serves.
#[derive(Clone, Debug, Default)]
pub struct BlockOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// The device ID the guest reads (GET_ID).
    pub serial: String,
    /// A fault to inject (`crash-after=N`, `hang-after=N`), for demonstrations and tests.
    pub fault: Option<String>,
    /// The guest's RAM size: the partition maps all of it; its address-space limit is
    /// sized from it.
    pub guest_ram: u64,
    /// Request queues the device offers (VIRTIO_BLK_F_MQ above 1).
    pub queues: u16,
    /// Test hook: the partition tries this when its first request arrives (and must die).
    #[cfg(feature = "test-hooks")]
    pub attempt: Option<crate::sandbox::testing::Forbidden>,
}

/// What a network partition serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The MAC address and MTU the guest sees.
    pub params: splitvisor_devices::virtio::net::NetParams,
    /// A fault to inject (`crash-after=N`, `hang-after=N` frames), for demonstrations and
    /// tests.
    pub fault: Option<String>,
    /// The guest's RAM size: the partition maps all of it; its address-space limit is
    /// sized from it.
    pub guest_ram: u64,
}

/// How a partition ended: its exit status and, if it ended on an error it could name (a
/// queue whose thread the host refused, a sandbox it could not set up), that cause as the
/// driver said it. Shown as `exit status: 1: cannot start queue 0: ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionEnd {
    /// The exit status (a partition that aborted shows as killed by SIGABRT).
    pub status: ExitStatus,
    /// What the driver said was the cause, at most [`MAX_CAUSE_BYTES`] of it.
    pub cause: Option<String>,
}

impl std::fmt::Display for PartitionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.status)?;
        match &self.cause {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

pub use crate::driver::MAX_CAUSE_BYTES;

/// Reads the cause a partition that has ended left in its report pipe, if any.
fn read_cause(report: &OwnedFd) -> Option<String> {
    let mut bytes = [0u8; MAX_CAUSE_BYTES];
    // The pipe is non-blocking and every write end is closed once the process has ended:
    // this returns what is there (a single write of at most MAX_CAUSE_BYTES), at once.
    // SAFETY: reads at most `bytes.len()` bytes into a live buffer.
    let read = unsafe { libc::read(report.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
    let read = usize::try_from(read).ok()?;
    let cause = printable(String::from_utf8_lossy(&bytes[..read]).trim());
    (!cause.is_empty()).then_some(cause)
}

/// `text` with its control characters escaped: what a partition says goes into one line of
/// the hypervisor's log, and must not make lines (or terminal sequences) of its own.
fn printable(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

/// A running driver partition: the process and its pidfd. Dropping it kills and reaps it.
///
/// The process is PID 1 of a PID namespace of its own and the partition's only process
/// (unless the kernel refused the spawner the namespaces, see [`Partition::start`]).
#[derive(Debug)]
pub struct Partition {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// Its exit status, once reaped.
    status: Option<ExitStatus>,
    /// Whether it was created as PID 1 of its own PID namespace: it then reports an abort
    /// by [`ABORTED_EXIT_CODE`] (an init cannot die of its own SIGABRT).
    own_pid_namespace: bool,
    /// The read end of the pipe where the driver says why it ended (`--report-fd`), until
    /// it is read.
    report: Option<OwnedFd>,
    /// What was read from it.
    cause: Option<String>,
    /// Its main thread's scheduler state, opened at its start, until a proxy takes it
    /// ([`take_liveness`](Self::take_liveness)).
    liveness: Option<Liveness>,
    /// Its threads, opened at its start.
    threads: Option<Threads>,
    /// Whether its sandbox is known to be in place ([`Partition::wait_ready`]).
    sandbox: Sandbox,
    /// What it serves and runs.
    started: Started,
}

/// A partition's sandbox, as far as the hypervisor knows.
#[derive(Debug)]
enum Sandbox {
    /// In place.
    Ready,
    /// Not waited for yet ([`StartingPartition::wait_spawned`]).
    Unconfirmed(ReadySignal),
    /// Never came: why.
    Failed(String),
}

/// What a partition serves and runs, for its errors and the log.
#[derive(Debug)]
struct Started {
    role: String,
    driver: PathBuf,
    command: String,
}

impl Partition {
    /// Starts `driver` serving a virtio-blk device on `disk` over vhost-user; returns the
    /// partition and the hypervisor's end of the connection.
    pub fn spawn_block(
        driver: &DriverProgram,
        disk: &File,
        options: &BlockOptions,
    ) -> Result<(Self, UnixStream), PartitionError> {
        let (starting, ours) = Self::start_block(driver, disk, options)?;
        Ok((starting.wait()?, ours))
    }

    /// [`spawn_block`](Self::spawn_block) without waiting for the partition's sandbox: it
    /// sets itself up while the caller goes on; [`StartingPartition::wait`] waits for it.
    pub fn start_block(
        driver: &DriverProgram,
        disk: &File,
        options: &BlockOptions,
    ) -> Result<(StartingPartition, UnixStream), PartitionError> {
        let (ours, theirs) = UnixStream::pair().map_err(setup("create the vhost-user socket pair"))?;
        let mut args: Vec<String> = ["blk", "--fd", "3", "--disk-fd", "4", "--serial", &options.serial]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if options.read_only {
            args.push("--read-only".into());
        }
        if let Some(fault) = &options.fault {
            args.extend(["--inject-fault".to_string(), fault.clone()]);
        }
        if options.guest_ram > 0 {
            args.extend(["--guest-ram".to_string(), options.guest_ram.to_string()]);
        }
        if options.queues > 1 {
            args.extend(["--queues".to_string(), options.queues.to_string()]);
        }
        #[cfg(feature = "test-hooks")]
        if let Some(what) = &options.attempt {
            args.extend(["--test-attempt".to_string(), what.to_string()]);
        }
        let starting = Self::start(driver, &args, &[theirs.as_fd(), disk.as_fd()])?;
        Ok((starting, ours))
    }

    /// Starts `driver` serving a virtio-net device on the open TAP device `tap` over
    /// vhost-user; returns the partition and the hypervisor's end of the connection. The
    /// partition gets the TAP as an fd and never opens one.
    pub fn spawn_net(
        driver: &DriverProgram,
        tap: &File,
        options: &NetOptions,
    ) -> Result<(Self, UnixStream), PartitionError> {
        let (starting, ours) = Self::start_net(driver, tap, options)?;
        Ok((starting.wait()?, ours))
    }

    /// [`spawn_net`](Self::spawn_net) without waiting for the partition's sandbox;
    /// [`StartingPartition::wait`] waits for it.
    pub fn start_net(
        driver: &DriverProgram,
        tap: &File,
        options: &NetOptions,
    ) -> Result<(StartingPartition, UnixStream), PartitionError> {
        use splitvisor_devices::virtio::net::format_mac;
        let (ours, theirs) = UnixStream::pair().map_err(setup("create the vhost-user socket pair"))?;
        let mut args: Vec<String> = vec![
            "net".into(),
            "--fd".into(),
            "3".into(),
            "--tap-fd".into(),
            "4".into(),
            "--mac".into(),
            format_mac(&options.params.mac),
            "--mtu".into(),
            options.params.mtu.to_string(),
        ];
        if let Some(fault) = &options.fault {
            args.extend(["--inject-fault".to_string(), fault.clone()]);
        }
        if options.guest_ram > 0 {
            args.extend(["--guest-ram".to_string(), options.guest_ram.to_string()]);
        }
        let starting = Self::start(driver, &args, &[theirs.as_fd(), tap.as_fd()])?;
        Ok((starting, ours))
    }

    /// Starts a partition serving a plain bus device (`serial` or `i8042`) over the proxy
    /// protocol; `irqfd` is its interrupt, raised straight into KVM. Returns the partition
    /// and the hypervisor's end of the connection, which watches the partition's liveness.
    pub fn spawn_proxy(
        driver: &DriverProgram,
        device: &str,
        irqfd: Option<&EventFd>,
    ) -> Result<(Self, ProxyConnection), PartitionError> {
        let (starting, mut ours) = Self::start_proxy(driver, device, irqfd)?;
        let mut partition = starting.wait()?;
        ours.watch(partition.take_liveness());
        Ok((partition, ours))
    }

    /// [`spawn_proxy`](Self::spawn_proxy) without waiting for the partition's sandbox: it
    /// sets itself up while the caller goes on; [`StartingPartition::wait`] waits for it.
    /// Then hand the connection the partition's liveness
    /// (`connection.watch(partition.take_liveness())`), as `spawn_proxy` does.
    pub fn start_proxy(
        driver: &DriverProgram,
        device: &str,
        irqfd: Option<&EventFd>,
    ) -> Result<(StartingPartition, ProxyConnection), PartitionError> {
        let (ours, theirs) = UnixStream::pair().map_err(setup("create the proxy socket pair"))?;
        let ours = ProxyConnection::new(ours).map_err(setup("create the proxy's shared page"))?;
        let mut args: Vec<String> =
            [device, "--fd", "3", "--page-fd", "4", "--doorbell-fd", "5", "--hypervisor-doorbell-fd", "6"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let mut fds = vec![theirs.as_fd()];
        fds.extend(ours.partition_fds());
        if let Some(irqfd) = irqfd {
            args.extend(["--irq-fd".to_string(), "7".to_string()]);
            // SAFETY: the eventfd outlives this call, which only duplicates it.
            fds.push(unsafe { BorrowedFd::borrow_raw(irqfd.as_raw_fd()) });
        }
        let starting = Self::start(driver, &args, &fds)?;
        Ok((starting, ours))
    }

    /// Runs `driver prefix.. args.. --ready-fd N` with `fds` as its fds 3, 4, ... (and the
    /// readiness pipe as N) and nothing else; returns once the partition's sandbox is in
    /// place.
    pub fn spawn(
        driver: &DriverProgram,
        args: &[String],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Self, PartitionError> {
        Self::start(driver, args, fds)?.wait()
    }

    /// [`spawn`](Self::spawn) without waiting: returns once the request is in the spawner
    /// thread's queue, which it serves once it has set itself up. The process starts and
    /// sets itself up while the caller goes on; several partitions started one after the
    /// other start side by side, and each [`StartingPartition::wait`] then waits for its
    /// own (and reports a spawner that could not set itself up).
    pub fn start(
        driver: &DriverProgram,
        args: &[String],
        fds: &[BorrowedFd<'_>],
    ) -> Result<StartingPartition, PartitionError> {
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned().map_err(setup("duplicate an fd")))
            .collect::<Result<Vec<_>, _>>()?;
        let request = SpawnRequest { driver: driver.clone(), args: args.to_vec(), fds };
        let (reply, spawned) = mpsc::channel();
        let (requests, spawner) = spawner().map_err(setup("start the partition spawner thread"))?;
        requests.send((request, reply)).map_err(|_| {
            spawner_failure(spawner).unwrap_or_else(|| {
                setup("reach the partition spawner")(io::Error::other("the spawner thread is gone"))
            })
        })?;
        Ok(StartingPartition { spawned, spawner })
    }

    /// The partition's process ID.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Its main thread's [`Liveness`], for the proxy that waits on its answers (once: the
    /// partition keeps no copy); `None` where /proc could not be read.
    pub fn take_liveness(&mut self) -> Option<Liveness> {
        self.liveness.take()
    }

    /// Its [`Threads`], for a watchdog that tells storage holding its requests up from a
    /// hang; `None` where /proc could not be read.
    pub fn threads(&self) -> Option<&Threads> {
        self.threads.as_ref()
    }

    /// The pidfd: readable once the process has ended.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// While its sandbox has not been waited for ([`Self::wait_ready`]), an fd that turns
    /// readable when the partition says it is in place: a supervisor that must not wait
    /// watches it (with [`Self::pidfd`], for a partition that ends first), then calls
    /// `wait_ready`, which no longer waits. `None` once waited for.
    pub fn readiness_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.sandbox {
            Sandbox::Unconfirmed(ready) => Some(ready.watch_fd()),
            Sandbox::Ready | Sandbox::Failed(_) => None,
        }
    }

    /// The exit status, if the process has ended (reaps it). A partition that aborted is
    /// reported as killed by SIGABRT, as it would be if it were not an init.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.reap(libc::WNOHANG)
    }

    /// Reaps the process with waitpid `options`; its status if it has ended.
    fn reap(&mut self, options: libc::c_int) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut status = 0;
            let reaped = loop {
                // SAFETY: waits for our own child, writing into `status`.
                let reaped = unsafe { libc::waitpid(self.pid, &mut status, options) };
                if reaped >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break reaped;
                }
            };
            if reaped == self.pid {
                self.status = Some(self.decode(status));
            }
        }
        self.status
    }

    /// The status the supervisor sees for the wait status `raw`.
    fn decode(&self, raw: libc::c_int) -> ExitStatus {
        if self.own_pid_namespace && libc::WIFEXITED(raw) && libc::WEXITSTATUS(raw) == ABORTED_EXIT_CODE {
            return ExitStatus::from_raw(libc::SIGABRT);
        }
        ExitStatus::from_raw(raw)
    }

    /// How the partition ended, if it has (reaps it): the status and the cause the driver
    /// gave, if it gave one.
    pub fn end(&mut self) -> Option<PartitionEnd> {
        let status = self.try_wait()?;
        if let Some(report) = self.report.take() {
            self.cause = read_cause(&report);
        }
        Some(PartitionEnd { status, cause: self.cause.clone() })
    }

    /// Waits at most `timeout` for the partition to end by itself; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut pidfd = [libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, bounded wait.
            unsafe { libc::poll(pidfd.as_mut_ptr(), 1, millis) };
        }
        self.try_wait()
    }

    /// Kills the partition with SIGKILL (a stopped process dies too) and reaps it, waiting
    /// at most [`KILL_REAP`]. One that has not ended by then has a thread in a kernel wait
    /// that no signal ends (storage that stalled): it is left to end by itself, with a
    /// warning, so that the caller (a VM that ends, a supervisor) is not held until then.
    /// It still holds its disk image's lock meanwhile, so no other writer can start on it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let status = self.kill_within(KILL_REAP);
        if status.is_none() {
            log::warn!(
                "driver partition {} was killed but has not ended after {KILL_REAP:?}: a thread of it waits \
                 in the kernel (stalled storage?); it ends once that wait does",
                self.pid
            );
        }
        status
    }

    /// Kills the partition with SIGKILL and waits at most `timeout` for it to end; its
    /// status if it did. A process in an uninterruptible wait in the kernel (a write to
    /// storage that stalls) dies only once that wait is over: a caller that must know it
    /// ended (before another driver takes over) asks again later.
    pub fn kill_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            // SAFETY: a signal to our own child, not reaped yet (so its pid is still its own).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        self.wait_exit(timeout)
    }

    /// Waits at most `timeout` for the partition to end by itself, then kills it.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_exit(timeout).or_else(|| self.kill())
    }

    /// Waits (at most `within`) until the sandbox of a partition returned by
    /// [`StartingPartition::wait_spawned`] is in place in every process of it; then nothing
    /// it does can reach beyond it. At once for one whose sandbox was waited for already. A
    /// partition that exits first, or takes longer, is killed, and the error says which
    /// (again at every later call).
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), PartitionError> {
        let pid = self.pid();
        let Started { role, driver, command } = &self.started;
        let (role, driver) = (role.clone(), driver.clone());
        let ready = match std::mem::replace(&mut self.sandbox, Sandbox::Ready) {
            Sandbox::Ready => return Ok(()),
            Sandbox::Failed(why) => {
                let source = io::Error::other(format!("its start failed: {why}"));
                self.sandbox = Sandbox::Failed(why);
                return Err(PartitionError::NotReady { role, driver, pid, source });
            }
            Sandbox::Unconfirmed(ready) => ready,
        };
        let Err(source) = ready.wait(within) else {
            log::debug!("driver partition {pid} started: {command}");
            return Ok(());
        };
        // A partition that closed its end before its byte has usually ended: say how.
        let ended = match source.kind() {
            io::ErrorKind::UnexpectedEof => self.wait_exit(EXIT_GRACE).and_then(|_| self.end()),
            _ => None,
        };
        let error = match ended {
            Some(PartitionEnd { status, cause }) => {
                PartitionError::Ended { role, driver, pid, status, cause }
            }
            None => {
                self.kill();
                PartitionError::NotReady { role, driver, pid, source }
            }
        };
        self.sandbox = Sandbox::Failed(error.to_string());
        Err(error)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A partition being started ([`Partition::start`]): its process may not run the driver
/// program yet, nor its sandbox be in place. Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct StartingPartition {
    /// The spawner's answer: the process running the driver program, or why there is none.
    spawned: mpsc::Receiver<Result<Partition, PartitionError>>,
    /// Which spawner thread has the request (see [`spawner_failure`]).
    spawner: SpawnerId,
}

/// How long a partition that closed its readiness pipe before its byte may take to be seen
/// ended (its exit status is the better report).
const EXIT_GRACE: Duration = Duration::from_secs(1);

impl StartingPartition {
    /// Waits (at most 30 s each) until the partition's process runs the driver program and
    /// then until its sandbox is in place in every process of it; then nothing it does can
    /// reach beyond it. A partition that exits first, or takes longer, is killed, and the
    /// error says which.
    pub fn wait(self) -> Result<Partition, PartitionError> {
        self.wait_within(READY_TIMEOUT)
    }

    /// [`wait`](Self::wait), with `ready_within` instead of 30 s for the sandbox once the
    /// process runs (a supervisor that handles other devices meanwhile cannot wait that long).
    pub fn wait_within(self, ready_within: Duration) -> Result<Partition, PartitionError> {
        let mut partition = self.wait_spawned()?;
        partition.wait_ready(ready_within)?;
        Ok(partition)
    }

    /// Waits (at most 30 s) only until the partition's process runs the driver program: its
    /// pid, pidfd and liveness are known, its sandbox maybe not in place yet. The driver
    /// reads no request before it is, so the partition may be handed its device's traffic
    /// already; [`Partition::wait_ready`] says whether the sandbox came (a VM starts its
    /// guest meanwhile).
    pub fn wait_spawned(self) -> Result<Partition, PartitionError> {
        self.spawned.recv_timeout(SPAWN_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                setup("hear from the partition spawner")(io::ErrorKind::TimedOut.into())
            }
            // The spawner dropped the request unanswered: it could not set itself up.
            mpsc::RecvTimeoutError::Disconnected => spawner_failure(self.spawner).unwrap_or_else(|| {
                setup("hear from the partition spawner")(io::ErrorKind::BrokenPipe.into())
            }),
        })?
    }
}

/// The longest wait for the spawner to start a partition's process.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);

struct SpawnRequest {
    driver: DriverProgram,
    args: Vec<String>,
    fds: Vec<OwnedFd>,
}

/// Where the spawner answers. If the [`StartingPartition`] is gone by then, the answer is
/// dropped on the spawner's thread, and with it the process (killed and reaped).
type SpawnReply = mpsc::Sender<Result<Partition, PartitionError>>;

/// The spawner thread's queue of requests.
type SpawnQueue = mpsc::Sender<(SpawnRequest, SpawnReply)>;

/// Starts the process-wide thread that starts partitions, if it is not running yet. It
/// starts by itself at the first partition; a VM starts it first thing, so that it sets
/// itself up (its filter, its network namespace) while the VM is; a hypervisor that
/// sandboxes itself starts it before it enters its jail, which the spawner stays out of
/// (see [`crate::sandbox::hypervisor`]).
///
/// This does not wait for the thread's set-up, and neither does a partition's start: the
/// first partition's [`StartingPartition::wait`] does, and reports its failure. A new thread
/// leaves the partitions' network namespace to the caller, who makes it with the
/// [`NamespaceMaker`] returned while the thread installs its filter (the two take about as
/// long), best once the first partitions are asked for. An error if the host refused the
/// thread.
pub fn start_spawner() -> io::Result<NamespaceMaker> {
    let (hand_over, handed) = mpsc::sync_channel(1);
    let (_, _, started) = spawner_with(Some(handed))?;
    Ok(NamespaceMaker { hand_over: started.then_some(hand_over) })
}

/// Makes the network namespace of the partitions a new spawner thread starts, on the
/// thread that started the spawner ([`start_spawner`]). Dropped unused, it leaves the
/// spawner to make its own.
#[derive(Debug)]
#[must_use = "the spawner waits for its network namespace until this is used or dropped"]
pub struct NamespaceMaker {
    /// Where the spawner waits for it; `None` if no thread was started.
    hand_over: Option<mpsc::SyncSender<OwnedFd>>,
}

impl NamespaceMaker {
    /// Makes the namespace from the calling thread, which ends up back in its own, and
    /// hands it to the spawner (see `make_empty_network_namespace`).
    pub fn make(self) {
        let Some(hand_over) = self.hand_over else { return };
        match make_empty_network_namespace() {
            Ok(namespace) => {
                let _ = hand_over.send(namespace);
            }
            // Dropping `hand_over` tells the spawner to make its own.
            Err(e) => log::debug!("the spawner makes the partitions' network namespace itself: {e}"),
        }
    }
}

/// The spawner thread's queue, and the thread while it may still be setting itself up.
struct Spawner {
    id: SpawnerId,
    requests: SpawnQueue,
    starting: Option<StartingThread<()>>,
}

/// Which of the spawner threads a process started over time (one, unless a set-up failed).
type SpawnerId = u64;

/// The spawner thread, and why the last one whose set-up failed did (it is replaced at the
/// next start, maybe before the requests it dropped are waited for).
struct Spawners {
    current: Option<Spawner>,
    started: SpawnerId,
    failed: Option<(SpawnerId, String)>,
}

static SPAWNER: Mutex<Spawners> = Mutex::new(Spawners { current: None, started: 0, failed: None });

impl Spawners {
    /// Whether the thread failed its set-up (only a thread that ended, or dropped its
    /// queue, has reported it, so this does not block): its error is kept as the reason of
    /// its id's failure. Otherwise the spawner comes back, its set-up known to be done.
    fn failed_set_up(&mut self, mut spawner: Spawner) -> Option<Spawner> {
        match spawner.starting.take().map(StartingThread::started) {
            Some(Err(e)) => {
                self.failed = Some((spawner.id, e.to_string()));
                None
            }
            Some(Ok(_)) | None => Some(spawner),
        }
    }
}

/// The process-wide spawner thread's queue, the thread started first if it is not running
/// (or if its set-up failed: a thread whose filter failed ends, and the next call tries
/// again). A start the host refused (its task limit reached) is an error. Requests wait in
/// the queue while the thread sets itself up: the caller goes on meanwhile (a VM creates
/// its vCPUs while the first partitions start). The thread never ends once set up, so the
/// parent-death signal of the partitions it starts fires only when the whole process dies.
fn spawner() -> io::Result<(SpawnQueue, SpawnerId)> {
    spawner_with(None).map(|(requests, id, _)| (requests, id))
}

/// [`spawner`]; also says whether it started the thread, which then takes the network
/// namespace `handed` to it, if one is, or else makes its own.
fn spawner_with(handed: Option<mpsc::Receiver<OwnedFd>>) -> io::Result<(SpawnQueue, SpawnerId, bool)> {
    let mut spawners = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
    // A thread still setting itself up has not ended; one that ended did so because its
    // set-up failed (once set up, it never ends): it is replaced.
    if let Some(ended) = spawners
        .current
        .take_if(|current| current.starting.as_ref().is_some_and(|thread| thread.is_finished()))
    {
        log::debug!("the partition spawner ended while it set itself up: starting another");
        let _ = spawners.failed_set_up(ended);
    }
    let (current, started) = match spawners.current.take() {
        Some(current) => (current, false),
        None => {
            let (requests, incoming) = mpsc::channel::<(SpawnRequest, SpawnReply)>();
            let starting = threads::start(ThreadKind::PartitionSpawner, "partition-spawner", move || {
                let empty_netns = enter_empty_network_namespace(handed);
                let mut empty_root = EmptyRoot::default();
                while let Some((request, reply)) = empty_root.next_request(&incoming) {
                    let _ = reply.send(start(request, empty_netns, empty_root.fd()));
                }
            })?;
            spawners.started += 1;
            (Spawner { id: spawners.started, requests, starting: Some(starting) }, true)
        }
    };
    let (requests, id) = (current.requests.clone(), current.id);
    spawners.current = Some(current);
    Ok((requests, id, started))
}

/// Why spawner thread `id` dropped a request unanswered: the error of its set-up (its
/// filter), if that is what ended it. The thread is forgotten, so that the next partition
/// starts another.
fn spawner_failure(id: SpawnerId) -> Option<PartitionError> {
    let mut spawners = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(current) = spawners.current.take_if(|current| current.id == id) {
        spawners.current = spawners.failed_set_up(current);
    }
    let (_, why) = spawners.failed.as_ref().filter(|(failed, _)| *failed == id)?;
    Some(setup("set up the partition spawner thread")(io::Error::other(why.clone())))
}

/// The partitions' empty root, as the spawner thread of a root hypervisor has it: made
/// once, in the spawner's first pause after a request, so after the VM's first partitions,
/// which make their own. Made before them, it took CPU
/// time from them and from the VM's set-up just when every CPU is busy, and the VM
/// started later (first guest byte 4.84 against 4.38 ms on two CPUs). Every partition
/// started after it (a spare, a replacement, an upgrade) enters it instead of making its
/// own ([`crate::sandbox::EMPTY_ROOT_FD_ENV`]).
#[derive(Debug, Default)]
struct EmptyRoot {
    /// Whether a request was served (the pause counts only after one).
    served: bool,
    /// Whether it was tried (it is tried once).
    tried: bool,
    made: Option<OwnedFd>,
}

/// How long the spawner's queue stays empty before the spawner takes it for the pause after
/// a VM's first partitions.
const EMPTY_ROOT_PAUSE: Duration = Duration::from_millis(20);

impl EmptyRoot {
    /// The next request from `incoming`; in the first pause of [`EMPTY_ROOT_PAUSE`], makes
    /// the root first. `None` once the queue is closed.
    fn next_request<T>(&mut self, incoming: &mpsc::Receiver<T>) -> Option<T> {
        if !self.served {
            self.served = true;
            return incoming.recv().ok();
        }
        if !self.tried {
            match incoming.recv_timeout(EMPTY_ROOT_PAUSE) {
                Ok(request) => return Some(request),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tried = true;
                    // A thread of its own, which inherits this one's filter, and is named
                    // as the spawner is (`comm` keeps 15 bytes): it is one of its kind,
                    // outside the jail by design (see `crate::sandbox::hypervisor`).
                    self.made = std::thread::Builder::new()
                        .name("partition-spawner-root".into())
                        .spawn(make_empty_root)
                        .and_then(|maker| {
                            maker.join().unwrap_or_else(|_| Err(io::Error::other("it panicked")))
                        })
                        .map_err(|e| log::debug!("every partition makes its own empty root: {e}"))
                        .ok();
                }
            }
        }
        incoming.recv().ok()
    }

    fn fd(&self) -> Option<&OwnedFd> {
        self.made.as_ref()
    }
}

/// Moves the spawner thread (only it: a network namespace is a thread's) into a network
/// namespace of its own, made once for every partition it starts: they are born in it, and
/// their drivers need not make one each ([`crate::sandbox::EMPTY_NETNS_ENV`]), which costs
/// about 0.35 ms of CPU time at every partition start. The namespace stays empty: no
/// interface but its loopback, down, which only a process with CAP_NET_ADMIN in the host's
/// user namespace could raise, and no partition keeps a capability. It is the one
/// `handed` over, if the thread that started the spawner made one, or else made here.
/// False if the kernel refuses (a hypervisor that is not root): each driver then makes its
/// own.
fn enter_empty_network_namespace(handed: Option<mpsc::Receiver<OwnedFd>>) -> bool {
    // The maker is busy with nothing else: it answers within a millisecond or so, or drops
    // its end. The bound only keeps a stuck maker from holding every partition back.
    if let Some(namespace) = handed.and_then(|handed| handed.recv_timeout(Duration::from_secs(1)).ok()) {
        // SAFETY: setns takes a namespace fd this thread owns and a plain flag, and
        // changes only this thread's namespace.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
            return true;
        }
        log::debug!(
            "cannot enter the network namespace made for the partitions: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: unshare takes a plain flag and changes only this thread's namespace.
    let entered = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
    if !entered {
        log::debug!(
            "partitions get a network namespace each: the spawner cannot make one for all ({})",
            io::Error::last_os_error()
        );
    }
    entered
}

/// Makes a new, empty network namespace from the calling thread, and returns it with the
/// thread back in its own: the VM's main thread makes the partitions' one, once it asked for
/// its first partitions, while the spawner thread installs its filter, which takes about as
/// long (0.3-0.5 ms each on the build machines; made on the spawner, the namespace came
/// after the filter, on the way to every first partition). Fails as a non-root hypervisor,
/// where /proc is not mounted, or where the thread could make a namespace but not come
/// back to its own: root in a user namespace of its own that shares the host's network
/// (a rootless container on the host's network) may leave it but not enter it again.
fn make_empty_network_namespace() -> io::Result<OwnedFd> {
    let own = File::open("/proc/thread-self/ns/net")?;
    // Entering the namespace the thread is in changes nothing, and is allowed exactly when
    // coming back to it later is: asked first, so that the thread never leaves it for good.
    // SAFETY: setns takes a namespace fd this thread owns and a plain flag.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unshare takes a plain flag and changes only this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let made = File::open("/proc/thread-self/ns/net");
    // SAFETY: as above. The same call just succeeded: only a kernel that changed its mind
    // could refuse it, and a thread left in an empty namespace would open its TAP devices
    // there, so that ends the process rather than going on.
    let back = unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(back, 0, "cannot return to its network namespace: {}", io::Error::last_os_error());
    Ok(made?.into())
}

/// Makes the mount namespace of the partitions' empty root (see
/// [`crate::sandbox::EMPTY_ROOT_FD_ENV`]): a new one, whose root is an empty read-only
/// tmpfs with the host's mount tree detached, as a partition makes its own. Run on a
/// thread of its own, which ends once it is made (a thread that unshares its mount
/// namespace gets its own root and working directory; the spawner needs the host's to
/// find the driver program); the namespace lives on through the returned fd. Fails where
/// the kernel refuses (a hypervisor that is not root) or /proc is not mounted.
fn make_empty_root() -> io::Result<OwnedFd> {
    // SAFETY: unshare takes a plain flag and changes only this thread's mount namespace and
    // filesystem information (root, working directory), which it unshares first.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let namespace = File::open("/proc/thread-self/ns/mnt")?;
    crate::sandbox::pivot_into_empty_root().map_err(|e| io::Error::other(e.to_string()))?;
    Ok(namespace.into())
}

/// Starts one partition's process (on the spawner thread), without waiting for its sandbox.
///
/// The process is created as PID 1 of a PID namespace of its own ([`namespace_clone_flags`]):
/// it serves as that namespace's init itself, so a partition is one process. Only if the
/// kernel refuses the namespaces is it started as a plain child; the driver then tries to
/// create them itself, and refuses to run when that fails too (unless it was told to run
/// without its sandbox).
///
/// `empty_netns`: the spawner is in the empty network namespace of
/// [`enter_empty_network_namespace`], which the process inherits; the driver is told so.
/// `empty_root`: the partitions' empty root ([`EmptyRoot`]), if made, handed to the driver.
fn start(
    request: SpawnRequest,
    empty_netns: bool,
    empty_root: Option<&OwnedFd>,
) -> Result<Partition, PartitionError> {
    let SpawnRequest { driver, mut args, mut fds } = request;
    let ready = ReadySignal::new().map_err(setup("create the readiness pipe"))?;
    args.extend(["--ready-fd".to_string(), (3 + fds.len()).to_string()]);
    // SAFETY: the readiness pipe's end lives until this function returns.
    let ready_end = unsafe { BorrowedFd::borrow_raw(ready.partition_fd()) };
    fds.push(ready_end.try_clone_to_owned().map_err(setup("duplicate an fd"))?);
    // Non-blocking at both ends: the partition's one write never waits, nor does the read
    // of whatever it wrote once it has ended. This process keeps no copy of the write end.
    let (report, report_end) =
        pipe_flags(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(setup("create the report pipe"))?;
    args.extend(["--report-fd".to_string(), (3 + fds.len()).to_string()]);
    fds.push(report_end);
    // Only a root partition may enter it; one that is not root closes it unused.
    // SAFETY: geteuid has no preconditions.
    let empty_root = empty_root.filter(|_| unsafe { libc::geteuid() } == 0);
    let empty_root_fd = match empty_root {
        Some(root) => {
            fds.push(root.try_clone().map_err(setup("duplicate an fd"))?);
            Some(2 + fds.len())
        }
        None => None,
    };
    // Moved out of the way first (above every target, close-on-exec), so that moving them to
    // 3, 4, ... never clobbers one not moved yet, nor another fd the child still needs.
    let floor = 10.max(3 + fds.len() as RawFd);
    let high = fds
        .iter()
        .map(|fd| dup_above(fd.as_raw_fd(), floor))
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup("duplicate an fd"))?;
    drop(fds);
    let moves: Vec<(RawFd, RawFd)> =
        high.iter().enumerate().map(|(i, fd)| (fd.as_raw_fd(), 3 + i as RawFd)).collect();
    let low_dev_null =
        File::options().read(true).write(true).open("/dev/null").map_err(setup("open /dev/null"))?;
    let dev_null = dup_above(low_dev_null.as_raw_fd(), floor).map_err(setup("duplicate an fd"))?;
    drop(low_dev_null);

    let mut strings = vec![c_string(driver.path.as_os_str())?];
    for arg in driver.prefix.iter().chain(&args) {
        strings.push(c_string(arg.as_ref())?);
    }
    let argc = strings.len();
    if let Ok(log) = std::env::var("RUST_LOG") {
        strings.push(c_string(format!("RUST_LOG={log}").as_ref())?);
    }
    if empty_netns {
        // In the environment, not the arguments: a driver that does not know it (another
        // binary, for an upgrade) ignores it and makes its own namespace.
        strings.push(c_string(format!("{}=1", crate::sandbox::EMPTY_NETNS_ENV).as_ref())?);
    }
    #[cfg(feature = "test-hooks")]
    if let Ok(delay) = std::env::var(crate::sandbox::testing::READY_DELAY_ENV) {
        strings.push(c_string(format!("{}={delay}", crate::sandbox::testing::READY_DELAY_ENV).as_ref())?);
    }
    if let Some(fd) = empty_root_fd {
        // Likewise: a driver that does not know it closes the fd with the others it was
        // not meant to keep.
        strings.push(c_string(format!("{}={fd}", crate::sandbox::EMPTY_ROOT_FD_ENV).as_ref())?);
    }
    let pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    let argv: Vec<_> = pointers[..argc].iter().copied().chain([std::ptr::null()]).collect();
    let envp: Vec<_> = pointers[argc..].iter().copied().chain([std::ptr::null()]).collect();
    let flags = namespace_clone_flags();
    let id_maps = own_id_maps()?;
    let mut plan = ExecPlan {
        path: &strings[0],
        argv: &argv,
        envp: &envp,
        moves: &moves,
        dev_null: dev_null.as_raw_fd(),
        ready_read: ready.read_fd(),
        ready_write: ready.partition_fd(),
        id_maps: if flags & libc::CLONE_NEWUSER as libc::c_ulong != 0 { &id_maps } else { &[] },
    };
    let role = args.first().cloned().unwrap_or_else(|| "driver".into());
    let spawn_error = |source| PartitionError::Spawn {
        role: role.clone(),
        driver: driver.path.clone(),
        source: explain_exec_error(&driver.path, source),
    };
    let (pid, pidfd, own_pid_namespace) = match clone_and_exec(&plan, PARTITION_CLONE_FLAGS | flags, floor) {
        Ok(child) => (child.0, child.1, true),
        Err(CloneError::Refused(error)) => {
            log::debug!("the kernel refused the partition's namespaces ({error}); the driver tries itself");
            plan.id_maps = &[];
            let (pid, pidfd) =
                clone_and_exec(&plan, PARTITION_CLONE_FLAGS, floor).map_err(|e| spawn_error(e.into()))?;
            (pid, pidfd, false)
        }
        Err(error) => return Err(spawn_error(error.into())),
    };
    drop((high, dev_null));
    // Opened now, while the process surely is the partition: a thread that reads it later
    // needs no path lookup, and a pid reused after the partition ended cannot be mistaken
    // for it (the file then reads nothing).
    let liveness = Liveness::of_process(pid as u32)
        .map_err(|e| log::debug!("partition {pid}: no liveness ({e}): taken for hung at its deadline"))
        .ok();
    let threads = Threads::of_process(pid as u32)
        .map_err(|e| log::debug!("partition {pid}: its threads cannot be looked at ({e})"))
        .ok();
    let partition = Partition {
        pid,
        pidfd,
        status: None,
        own_pid_namespace,
        report: Some(report),
        cause: None,
        liveness,
        threads,
        sandbox: Sandbox::Unconfirmed(ready),
        started: Started {
            role,
            command: format!("{} {}", driver.path.display(), args.join(" ")),
            driver: driver.path,
        },
    };
    Ok(partition)
}

/// `error` from exec'ing `program`, said plainly where the OS's word is vague: EACCES for a
/// directory or a file without an execute bit.
fn explain_exec_error(program: &Path, error: io::Error) -> io::Error {
    use std::os::unix::fs::PermissionsExt;
    if error.raw_os_error() != Some(libc::EACCES) {
        return error;
    }
    match std::fs::metadata(program) {
        Ok(meta) if meta.is_dir() => io::Error::new(error.kind(), "a directory, not a program"),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => io::Error::new(
            error.kind(),
            format!("not executable (mode {:o})", meta.permissions().mode() & 0o7777),
        ),
        _ => error,
    }
}

fn c_string(text: &std::ffi::OsStr) -> Result<CString, PartitionError> {
    CString::new(text.as_bytes()).map_err(|e| setup("pass an argument")(io::Error::other(e)))
}

/// The namespaces a partition is born into: a PID namespace, and for a hypervisor that is
/// not root a user namespace too (an unprivileged process needs one to create the other).
/// Created by root, the PID namespace belongs to the host's user namespace, as the ones the
/// partition creates itself do.
fn namespace_clone_flags() -> libc::c_ulong {
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { 0 } else { libc::CLONE_NEWUSER };
    (libc::CLONE_NEWPID | user) as libc::c_ulong
}

/// The clone flags of a partition's process besides its namespaces: a child that shares
/// the hypervisor's memory until its exec, while the spawner waits (as `posix_spawn` does):
/// nothing is copied, and the hypervisor's pages are not made copy-on-write under its
/// running threads, as a fork would. It reports its end with SIGCHLD; the parent gets a
/// pidfd.
pub(crate) const PARTITION_CLONE_FLAGS: libc::c_ulong =
    (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong;

/// Bytes of stack for the child between clone and exec (it runs [`exec_child`], a few
/// system calls on data prepared beforehand).
const CHILD_STACK_SIZE: usize = 64 << 10;

/// The lines that map this process's own ids in a user namespace it creates: no
/// supplementary groups (which an unprivileged map requires), the uid and the gid to
/// themselves. The driver then creates the rest of its sandbox inside.
fn own_id_maps() -> Result<[(&'static CStr, CString); 3], PartitionError> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let line = |text: String| c_string(text.as_ref());
    Ok([
        (c"/proc/self/setgroups", line("deny".into())?),
        (c"/proc/self/uid_map", line(format!("{uid} {uid} 1"))?),
        (c"/proc/self/gid_map", line(format!("{gid} {gid} 1"))?),
    ])
}

/// Everything the new process needs between clone and exec, prepared beforehand: the child
/// of a multithreaded process may not allocate, so it only reads this and makes system calls.
struct ExecPlan<'a> {
    path: &'a CStr,
    /// NULL-terminated.
    argv: &'a [*const libc::c_char],
    /// NULL-terminated.
    envp: &'a [*const libc::c_char],
    /// (from, to): the partition's fds moved into place.
    moves: &'a [(RawFd, RawFd)],
    /// /dev/null, for stdin and stdout.
    dev_null: RawFd,
    /// The readiness pipe: the hypervisor's end (closed in the child) and the partition's.
    ready_read: RawFd,
    ready_write: RawFd,
    /// For a new user namespace: the files and lines that map the process's own ids.
    id_maps: &'a [(&'static CStr, CString)],
}

/// The step of [`exec_child`] that failed, reported with the errno.
#[derive(Clone, Copy, Debug)]
enum ExecStep {
    DeathSignal = 1,
    MapIds = 2,
    MoveFds = 3,
    Exec = 4,
}

impl ExecStep {
    fn from_code(code: u32) -> Self {
        match code {
            1 => Self::DeathSignal,
            2 => Self::MapIds,
            3 => Self::MoveFds,
            _ => Self::Exec,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::DeathSignal => "set the parent-death signal",
            Self::MapIds => "map the ids of its user namespace",
            Self::MoveFds => "move its fds into place",
            Self::Exec => "exec",
        }
    }
}

/// What [`child_main`] gets.
struct ChildArgs<'a> {
    plan: &'a ExecPlan<'a>,
    report: RawFd,
}

/// The child's entry from `clone`, on its own stack.
extern "C" fn child_main(args: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `clone_and_exec` passes a ChildArgs that outlives the child's use of it (the
    // parent waits, CLONE_VFORK, until the child has exec'd or exited).
    let args = unsafe { &*args.cast::<ChildArgs<'_>>() };
    exec_child(args.plan, args.report)
}

/// The child between clone and exec, in the hypervisor's memory (CLONE_VM): only
/// async-signal-safe system calls on data prepared by the parent, no allocation, no lock; a
/// failure is reported on `report` as the step and the errno. Never returns.
fn exec_child(plan: &ExecPlan<'_>, report: RawFd) -> ! {
    let fail = |step: ExecStep| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        bytes[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writes from a live buffer.
        unsafe { libc::write(report, bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: ends the process without running anything else.
        unsafe { libc::_exit(127) }
    };
    // The partition dies with the thread that started it, which lives as long as the
    // hypervisor.
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
        fail(ExecStep::DeathSignal);
    }
    // The hypervisor may have died before the signal was armed. getppid cannot tell (the
    // parent is outside the new PID namespace), the readiness pipe can: with this copy of
    // the hypervisor's end closed, it has no reader left once the hypervisor's last thread
    // released its fds, which a thread does before it hands its children on (and sends them
    // their parent-death signal).
    // SAFETY: closes this process's copy of an fd it never uses.
    unsafe { libc::close(plan.ready_read) };
    let mut pollfd = libc::pollfd { fd: plan.ready_write, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&mut pollfd, 1, 0) } < 0 || pollfd.revents & libc::POLLERR != 0 {
        // SAFETY: ends the process; nobody is left to tell.
        unsafe { libc::_exit(1) };
    }
    // A clean signal state for the program: nothing blocked, SIGPIPE back to its default.
    // SAFETY: a zeroed sigset_t is a valid empty set, which sigemptyset makes sure of.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: initialises the set above.
    unsafe { libc::sigemptyset(&mut none) };
    // SAFETY: reads the set; the old mask is not asked for.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) };
    // SAFETY: restores a default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    for (file, line) in plan.id_maps {
        // SAFETY: a NUL-terminated path; the fd is closed below.
        let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            fail(ExecStep::MapIds);
        }
        let bytes = line.as_bytes();
        // SAFETY: writes from a live buffer to the fd just opened.
        if unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) } != bytes.len() as isize {
            fail(ExecStep::MapIds);
        }
        // SAFETY: the fd was opened above.
        unsafe { libc::close(fd) };
    }
    for &(from, to) in plan.moves.iter().chain(&[(plan.dev_null, 0), (plan.dev_null, 1)]) {
        // SAFETY: dup2 on fds this process owns.
        if unsafe { libc::dup2(from, to) } < 0 {
            fail(ExecStep::MoveFds);
        }
    }
    // SAFETY: a NUL-terminated path and NULL-terminated arrays of NUL-terminated strings,
    // all alive in this process's copy of the parent's memory.
    unsafe { libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
    fail(ExecStep::Exec)
}

/// Why [`clone_and_exec`] failed.
#[derive(Debug)]
enum CloneError {
    /// The kernel refused the namespaces.
    Refused(io::Error),
    /// Anything else.
    Failed(io::Error),
}

impl From<CloneError> for io::Error {
    fn from(error: CloneError) -> Self {
        match error {
            CloneError::Refused(e) | CloneError::Failed(e) => e,
        }
    }
}

/// Creates a process with `flags` and execs `plan` in it; returns its pid and pidfd once
/// the exec happened. Fds the parent creates for it are put at `floor` or above.
fn clone_and_exec(
    plan: &ExecPlan<'_>,
    flags: libc::c_ulong,
    floor: RawFd,
) -> Result<(libc::pid_t, OwnedFd), CloneError> {
    let (report_read, low_report_write) = pipe_cloexec().map_err(CloneError::Failed)?;
    let report_write = dup_above(low_report_write.as_raw_fd(), floor).map_err(CloneError::Failed)?;
    drop(low_report_write);
    let mut pidfd: libc::c_int = -1;
    // The child's stack: with CLONE_VM it must not run on this thread's.
    let mut stack = vec![0u8; CHILD_STACK_SIZE];
    let top = stack.as_mut_ptr().wrapping_add(CHILD_STACK_SIZE);
    let top = top.wrapping_sub(top as usize % 16); // the ABI's alignment
    let args = ChildArgs { plan, report: report_write.as_raw_fd() };
    // SAFETY: the child runs child_main on its own stack in this memory and only execs or
    // exits (exec_child); with CLONE_VFORK this thread waits for that, so `args`, `plan`
    // and `stack` outlive it. The flags fit a c_int (no clone flag above bit 30 is used).
    // CLONE_PIDFD stores the pidfd through the parent-tid argument.
    let pid = unsafe {
        libc::clone(
            child_main,
            top.cast(),
            flags as libc::c_int,
            (&raw const args).cast_mut().cast(),
            &raw mut pidfd,
        )
    };
    drop(stack);
    if pid < 0 {
        let error = io::Error::last_os_error();
        let refused =
            matches!(error.raw_os_error(), Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS));
        return Err(if refused && flags & NAMESPACE_FLAGS != 0 {
            CloneError::Refused(error)
        } else {
            CloneError::Failed(error)
        });
    }
    let pid = pid as libc::pid_t;
    // SAFETY: CLONE_PIDFD returned a new fd, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The child's copy is closed by its exec: end of file then means it runs the program.
    drop(report_write);
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reads into the unfilled part of a live buffer.
        let read = unsafe {
            libc::read(report_read.as_raw_fd(), report[got..].as_mut_ptr().cast(), report.len() - got)
        };
        match read {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == 0 {
        return Ok((pid, pidfd));
    }
    let mut status = 0;
    // SAFETY: reaps our own child, which exits right after its report.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let step = ExecStep::from_code(u32::from_ne_bytes([report[0], report[1], report[2], report[3]]));
    let error =
        io::Error::from_raw_os_error(i32::from_ne_bytes([report[4], report[5], report[6], report[7]]));
    Err(CloneError::Failed(match step {
        ExecStep::Exec => error,
        _ => io::Error::new(error.kind(), format!("cannot {}: {error}", step.describe())),
    }))
}

/// Every namespace flag [`namespace_clone_flags`] may give.
const NAMESPACE_FLAGS: libc::c_ulong = (libc::CLONE_NEWPID | libc::CLONE_NEWUSER) as libc::c_ulong;

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_flags(libc::O_CLOEXEC)
}

/// A pipe with `flags` (pipe2's) on both ends: (read end, write end).
fn pipe_flags(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// Duplicates `fd` to a number of at least `floor`, close-on-exec.
fn dup_above(fd: RawFd, floor: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd and returns a new one or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Starts `program` as a blk partition with no fds; how that failed.
    fn start_failure(program: &Path) -> PartitionError {
        let args = ["blk", "--fd", "3"].map(String::from);
        Partition::spawn(&DriverProgram::at(program), &args, &[]).unwrap_err()
    }

    #[test]
    fn a_partition_that_ends_before_its_sandbox_is_in_place_says_how_it_ended() {
        let error = start_failure(Path::new("/bin/false"));
        assert!(
            matches!(&error, PartitionError::Ended { role, status, .. } if role == "blk" && status.code() == Some(1)),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("the blk driver partition (/bin/false, pid "), "{text}");
        assert!(text.ends_with("ended before its sandbox was in place: exit status: 1"), "{text}");
    }

    #[test]
    fn a_partition_that_ends_on_an_error_says_why() {
        let dir = std::env::temp_dir().join(format!("splitvisor-partition-cause-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("refused");
        // Spawned as `refused blk --fd 3 --ready-fd 3 --report-fd 4`: it reports on fd 4 as
        // the driver does, and ends before it is ready.
        std::fs::write(&program, "#!/bin/sh\nprintf 'cannot start queue 0: no thread\\n' >&4\nexit 1\n")
            .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = start_failure(&program);
        std::fs::remove_dir_all(&dir).unwrap();
        let PartitionError::Ended { status, cause, .. } = &error else { panic!("{error:?}") };
        assert_eq!((status.code(), cause.as_deref()), (Some(1), Some("cannot start queue 0: no thread")));
        let text = error.to_string();
        assert!(text.ends_with("in place: exit status: 1: cannot start queue 0: no thread"), "{text}");
    }

    #[test]
    fn a_cause_stays_on_one_line() {
        assert_eq!(printable("queue 0\nfaked: line\u{1b}[31m"), "queue 0\\nfaked: line\\u{1b}[31m");
    }

    #[test]
    fn a_program_that_cannot_be_run_is_named_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("splitvisor-partition-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_executable = dir.join("not-executable");
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
        for (program, why) in [
            (dir.join("missing"), "No such file or directory"),
            (not_executable, "not executable (mode 644)"),
            (dir.clone(), "a directory, not a program"),
        ] {
            let error = start_failure(&program);
            assert!(matches!(&error, PartitionError::Spawn { role, .. } if role == "blk"), "{error:?}");
            let text = error.to_string();
            let expected = format!("cannot start the blk driver partition: {}: {why}", program.display());
            assert!(text.starts_with(&expected), "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
