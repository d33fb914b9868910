//! Starting driver partitions.
//!
//! A partition is a fresh process running `splitvisor-driver` (or a program that hosts it
//! behind a sub-command), handed exactly the fds it serves with, as fds 3, 4, ...: the
//! hypervisor's end of a socket pair is the vhost-user or proxy connection, so no socket
//! ever appears in the filesystem, and the disk image is opened (and locked) here, so the
//! partition never needs to open a file.
//!
//! A partition never outlives the hypervisor, even when the hypervisor is killed with
//! SIGKILL: it is started with a parent-death signal, and the kernel sends that signal when
//! the *thread* that started the child ends. Every partition is therefore started from one
//! thread that lives as long as the process ([`Partition::spawn`] hands the work to it), never from a
//! thread that may end before the VM (a supervisor, a vCPU, a short-lived builder).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use splitvisor_bus::threads::{self, ThreadKind};
use vmm_sys_util::eventfd::EventFd;

use crate::proxy::ProxyConnection;
use crate::sandbox::ReadySignal;

/// Longest a partition may take from its start to its sandbox being in place.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors starting a partition.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The driver program cannot be started.
    #[error("cannot start the driver partition {driver}: {source}")]
    Spawn {
        /// The program.
        driver: PathBuf,
        /// The OS error.
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

/// A running driver partition: the process and its pidfd. Dropping it kills and reaps it.
#[derive(Debug)]
pub struct Partition {
    child: Child,
    pidfd: OwnedFd,
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
        let partition = Self::spawn(driver, &args, &[theirs.as_fd(), tap.as_fd()])?;
        Ok((partition, ours))
    }

    /// Starts a partition serving a plain bus device (`serial` or `i8042`) over the proxy
    /// protocol; `irqfd` is its interrupt, raised straight into KVM. Returns the partition
    /// and the hypervisor's end of the connection.
    pub fn spawn_proxy(
        driver: &DriverProgram,
        device: &str,
        irqfd: Option<&EventFd>,
    ) -> Result<(Self, ProxyConnection), PartitionError> {
        let (starting, ours) = Self::start_proxy(driver, device, irqfd)?;
        Ok((starting.wait()?, ours))
    }

    /// [`spawn_proxy`](Self::spawn_proxy) without waiting for the partition's sandbox: it
    /// sets itself up while the caller goes on; [`StartingPartition::wait`] waits for it.
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

    /// [`spawn`](Self::spawn) without waiting for the sandbox: returns once the process
    /// runs the driver program, which then sets itself up while the caller goes on. Several
    /// partitions started one after the other set themselves up side by side; each
    /// [`StartingPartition::wait`] then waits for its own.
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
        let (reply, result) = mpsc::channel();
        spawner().lock().unwrap_or_else(|e| e.into_inner()).send((request, reply)).map_err(|_| {
            setup("reach the partition spawner")(io::Error::other("the spawner thread is gone"))
        })?;
        result
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| setup("hear from the partition spawner")(io::ErrorKind::TimedOut.into()))?
    }

    /// The partition's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pidfd: readable once the process has ended.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The exit status, if the process has ended (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `timeout` for the partition to end by itself; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut pidfd = [libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, bounded wait.
        unsafe { libc::poll(pidfd.as_mut_ptr(), 1, millis) };
        self.try_wait()
    }

    /// Kills the partition with SIGKILL (a stopped process dies too) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Waits at most `timeout` for the partition to end by itself, then kills it.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_exit(timeout).or_else(|| self.kill())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A partition whose process runs but whose sandbox may not be in place yet
/// ([`Partition::start`]). Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct StartingPartition {
    partition: Partition,
    ready: ReadySignal,
    /// The command line, for the log.
    command: String,
}

impl StartingPartition {
    /// The partition's process ID.
    pub fn pid(&self) -> u32 {
        self.partition.pid()
    }

    /// Waits (at most 30 s) until the partition's sandbox is in place in every process of
    /// it; then nothing it does can reach beyond it. A partition that exits first, or
    /// takes longer, is killed, and the error says which.
    pub fn wait(self) -> Result<Partition, PartitionError> {
        let Self { mut partition, ready, command } = self;
        if let Err(e) = ready.wait(READY_TIMEOUT) {
            partition.kill();
            return Err(setup("wait for the partition's sandbox")(e));
        }
        log::debug!("driver partition {} started: {command}", partition.pid());
        Ok(partition)
    }
}

struct SpawnRequest {
    driver: DriverProgram,
    args: Vec<String>,
    fds: Vec<OwnedFd>,
}

type SpawnReply = mpsc::Sender<Result<StartingPartition, PartitionError>>;

/// Starts the process-wide thread that starts partitions, if it is not running yet. It
/// starts by itself at the first partition; a hypervisor that sandboxes itself starts it
/// before it enters its jail, which the spawner stays out of (see
/// [`crate::sandbox::hypervisor`]).
pub fn start_spawner() {
    spawner();
}

/// The process-wide spawner thread's queue. The thread never ends, so the parent-death
/// signal of the partitions it starts fires only when the whole process dies.
fn spawner() -> &'static Mutex<mpsc::Sender<(SpawnRequest, SpawnReply)>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(SpawnRequest, SpawnReply)>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<(SpawnRequest, SpawnReply)>();
        let started = threads::spawn(ThreadKind::PartitionSpawner, "partition-spawner", move || {
            for (request, reply) in incoming {
                let _ = reply.send(start(request));
            }
        });
        if let Err(e) = started {
            log::error!("cannot start the partition spawner thread: {e}");
        }
        Mutex::new(requests)
    })
}

/// Starts one partition's process (on the spawner thread), without waiting for its sandbox.
fn start(request: SpawnRequest) -> Result<StartingPartition, PartitionError> {
    let SpawnRequest { driver, mut args, mut fds } = request;
    let ready = ReadySignal::new().map_err(setup("create the readiness pipe"))?;
    args.extend(["--ready-fd".to_string(), (3 + fds.len()).to_string()]);
    // SAFETY: the readiness pipe's end lives until this function returns.
    let ready_end = unsafe { BorrowedFd::borrow_raw(ready.partition_fd()) };
    fds.push(ready_end.try_clone_to_owned().map_err(setup("duplicate an fd"))?);
    // Moved out of the way first (to 10 and up, close-on-exec), so that moving them to 3, 4,
    // ... never clobbers one not moved yet.
    let high = fds.iter().map(|fd| dup_high(fd.as_raw_fd())).collect::<Result<Vec<_>, _>>()?;
    drop(fds);
    let moves: Vec<(RawFd, RawFd)> =
        high.iter().enumerate().map(|(i, fd)| (fd.as_raw_fd(), 3 + i as RawFd)).collect();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut command = Command::new(&driver.path);
    command
        .args(&driver.prefix)
        .args(&args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Ok(log) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", log);
    }
    let before_exec = move || {
        // SAFETY: prctl with plain integers; async-signal-safe, as required between fork and exec.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // The hypervisor may have died before the signal was armed.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::other("the hypervisor is gone"));
        }
        for (from, to) in &moves {
            // SAFETY: dup2 on fds this process owns; async-signal-safe.
            if unsafe { libc::dup2(*from, *to) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only calls prctl, getppid and dup2, which are async-signal-safe.
    unsafe { command.pre_exec(before_exec) };
    let mut child =
        command.spawn().map_err(|source| PartitionError::Spawn { driver: driver.path.clone(), source })?;
    drop(high);
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if pidfd < 0 {
        let error = io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        return Err(setup("open a pidfd")(error));
    }
    // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let partition = Partition { child, pidfd };
    let command = format!("{} {}", driver.path.display(), args.join(" "));
    Ok(StartingPartition { partition, ready, command })
}

/// Duplicates `fd` to a number of at least 10, close-on-exec.
fn dup_high(fd: RawFd) -> Result<OwnedFd, PartitionError> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd and returns a new one or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(setup("duplicate an fd")(io::Error::last_os_error()));
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
