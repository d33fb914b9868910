//! Spawning and supervising driver partitions.
//!
//! A partition is a fresh process running `splitvisor-driver`, handed exactly two fds: a
//! listening vhost-user socket and the disk image (opened here, so the partition never
//! needs to open a file). The hypervisor connects to the socket, and learns at once when
//! the partition dies: a supervisor thread waits on its pidfd.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::sandbox::ReadySignal;

/// Longest a partition may take from its start to its sandbox being in place.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Errors spawning a partition.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The disk image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The driver program cannot be started.
    #[error("cannot start the driver partition {driver}: {source}")]
    Spawn {
        /// The program.
        driver: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up the socket or the pidfd failed.
    #[error("cannot set up the driver partition: {what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a block partition serves.
#[derive(Clone, Debug)]
pub struct BlockPartitionSpec {
    /// The `splitvisor-driver` program.
    pub driver: PathBuf,
    /// Arguments before the driver's own, for a program that hosts the driver behind a
    /// sub-command.
    pub driver_prefix: Vec<String>,
    /// The disk image.
    pub disk: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// The guest's RAM size: the partition maps all of it, its address-space limit is
    /// sized from it.
    pub guest_ram: u64,
    /// Test hook: the partition tries this when the first request arrives (and must die).
    #[cfg(feature = "test-hooks")]
    pub attempt: Option<crate::sandbox::testing::Forbidden>,
}

/// A running driver partition.
#[derive(Debug)]
pub struct Partition {
    child: Child,
    pidfd: OwnedFd,
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> PartitionError {
    move |source| PartitionError::Setup { what, source }
}

/// Duplicates `fd` to a number of at least 10, close-on-exec, so the child can move it to
/// its final number without clobbering the other.
fn dup_high(fd: RawFd) -> Result<OwnedFd, PartitionError> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd and returns a new one or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(setup("duplicate an fd")(io::Error::last_os_error()));
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Partition {
    /// Starts a block partition and connects to it; returns the partition and the
    /// vhost-user connection.
    pub fn spawn_block(spec: &BlockPartitionSpec) -> Result<(Self, UnixStream), PartitionError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let disk = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.disk)
            .map_err(|source| PartitionError::Disk { path: spec.disk.clone(), source })?;
        let dir = std::env::temp_dir().join(format!(
            "splitvisor-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(setup("create the socket directory"))?;
        let result = Self::spawn_in(spec, &disk, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn spawn_in(
        spec: &BlockPartitionSpec,
        disk: &std::fs::File,
        dir: &Path,
    ) -> Result<(Self, UnixStream), PartitionError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(setup("protect the socket"))?;
        let socket = dir.join("vhost-user.sock");
        let listener = UnixListener::bind(&socket).map_err(setup("bind the vhost-user socket"))?;
        let mut args: Vec<String> =
            vec!["blk".into(), "--listen-fd".into(), "3".into(), "--disk-fd".into(), "4".into()];
        if spec.read_only {
            args.push("--read-only".into());
        }
        args.extend(["--guest-ram".into(), spec.guest_ram.to_string()]);
        #[cfg(feature = "test-hooks")]
        if let Some(what) = &spec.attempt {
            args.extend(["--test-attempt".into(), what.to_string()]);
        }
        let partition =
            Self::spawn(&spec.driver, &spec.driver_prefix, &args, &[listener.as_raw_fd(), disk.as_raw_fd()])?;
        // The listening socket lives on in the partition; the connection waits in its
        // backlog until the partition accepts it.
        let stream = UnixStream::connect(&socket).map_err(setup("connect to the partition"))?;
        drop(listener);
        log::info!("driver partition {} serves {}", partition.pid(), spec.disk.display());
        Ok((partition, stream))
    }

    /// Starts a partition serving a plain bus device (`serial` or `i8042`) over the proxy
    /// protocol; `irqfd` is its interrupt, raised straight into KVM. Returns the partition
    /// and the connection.
    pub fn spawn_proxy(
        driver: &Path,
        prefix: &[String],
        device: &str,
        irqfd: Option<&EventFd>,
    ) -> Result<(Self, UnixStream), PartitionError> {
        let (ours, theirs) = UnixStream::pair().map_err(setup("create the proxy socket"))?;
        let mut args = vec![device.to_string(), "--fd".to_string(), "3".to_string()];
        let mut fds = vec![theirs.as_raw_fd()];
        if let Some(irqfd) = irqfd {
            args.extend(["--irq-fd".to_string(), "4".to_string()]);
            fds.push(irqfd.as_raw_fd());
        }
        let partition = Self::spawn(driver, prefix, &args, &fds)?;
        Ok((partition, ours))
    }

    /// Runs `driver prefix.. args.. --ready-fd N` with `fds` as its fds 3, 4, ... and
    /// nothing else; returns once the partition is sandboxed.
    fn spawn(
        driver: &Path,
        prefix: &[String],
        args: &[String],
        fds: &[RawFd],
    ) -> Result<Self, PartitionError> {
        let ready = ReadySignal::new().map_err(setup("create the readiness pipe"))?;
        let ready_arg = ["--ready-fd".to_string(), (3 + fds.len()).to_string()];
        let fds = [fds, &[ready.partition_fd()]].concat();
        let sources = fds.iter().map(|fd| dup_high(*fd)).collect::<Result<Vec<_>, _>>()?;
        let moves: Vec<(RawFd, RawFd)> =
            sources.iter().enumerate().map(|(i, fd)| (fd.as_raw_fd(), 3 + i as RawFd)).collect();
        let mut command = Command::new(driver);
        command
            .args(prefix)
            .args(args)
            .args(ready_arg)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Ok(log) = std::env::var("RUST_LOG") {
            command.env("RUST_LOG", log);
        }
        let move_fds = move || {
            for (from, to) in &moves {
                // SAFETY: dup2 on fds this process owns; async-signal-safe, as required
                // between fork and exec.
                if unsafe { libc::dup2(*from, *to) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the closure only calls dup2, which is async-signal-safe.
        unsafe { command.pre_exec(move_fds) };
        let mut child = command
            .spawn()
            .map_err(|source| PartitionError::Spawn { driver: driver.to_path_buf(), source })?;
        drop(sources);
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if pidfd < 0 {
            let error = io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            return Err(setup("open a pidfd")(error));
        }
        // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
        let mut partition = Self { child, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) } };
        if let Err(e) = ready.wait(READY_TIMEOUT) {
            partition.kill();
            return Err(setup("wait for the partition's sandbox")(e));
        }
        Ok(partition)
    }

    /// The partition's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills and reaps the partition.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Watches the partition from a thread of its own; `on_exit` runs at once when it dies
    /// (not when the supervisor is dropped).
    pub fn supervise(
        self,
        name: String,
        on_exit: Box<dyn FnOnce(String) + Send>,
    ) -> Result<Supervisor, PartitionError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(setup("create the supervisor eventfd"))?;
        let stop_watch = stop.try_clone().map_err(setup("create the supervisor eventfd"))?;
        let pid = self.pid();
        let mut partition = self;
        let thread = std::thread::Builder::new()
            .name(format!("supervise-{pid}"))
            .spawn(move || {
                let mut fds = [
                    libc::pollfd { fd: partition.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: stop_watch.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                loop {
                    // SAFETY: two valid pollfds, no timeout.
                    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                if fds[1].revents != 0 {
                    // The VM is going away: the partition may finish on its own (its
                    // connection closes), else it is killed.
                    let mut pidfd =
                        [libc::pollfd { fd: partition.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
                    // SAFETY: one valid pollfd, bounded wait.
                    unsafe { libc::poll(pidfd.as_mut_ptr(), 1, 1000) };
                    partition.kill();
                    return;
                }
                let status = partition.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                log::warn!("driver partition {pid} ({name}) died: {status}");
                on_exit(status);
            })
            .map_err(setup("start the supervisor"))?;
        Ok(Supervisor { pid, stop, thread: Some(thread) })
    }
}

/// Watches one partition; dropping it kills the partition.
#[derive(Debug)]
pub struct Supervisor {
    pid: u32,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// The partition's process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VM is ending: the partition's exit is expected from now on, not a fault. It gets
    /// a moment to finish once its connection closes, then it is killed.
    pub fn disarm(&self) {
        let _ = self.stop.write(1);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.disarm();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
