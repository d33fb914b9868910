//! The socket keeper of a driver started by hand: it removes the socket the driver bound
//! when the driver stops (SIGINT, SIGTERM, SIGHUP, or the serving process ending), so that
//! nothing is left at the path the user named.
//!
//! The serving process cannot do it: its sandbox takes away the host's filesystem and, for a
//! driver started as root, the ids that may write the socket's directory. So the process
//! the user started binds the socket, then forks ([`keep_socket`]): the child sandboxes
//! itself and serves as before, and the process the user knows stays outside the sandbox as
//! the keeper. The keeper holds no fd but a signalfd and its child's pidfd (the listening
//! socket and the image, with its lock, are the child's alone), reads nothing from the
//! child but its exit status, and only ever removes the socket it bound: the file at the
//! path must still be that socket (same device and inode), not one another process put
//! there since.
//!
//! The stop signals are blocked before the socket is bound ([`block_stop_signals`]) and
//! never handled: one that arrives before the keeper runs waits, and the keeper reads it
//! from a signalfd. It then passes the signal on to its child, waits (bounded) for it to
//! end, removes the socket and dies of the same signal, as it would have without a keeper.
//! If the child ends first, the keeper removes the socket and ends the way the child did.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The signals that stop a driver started by hand.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How long the serving process may take to end once told to stop; then it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The set of [`STOP_SIGNALS`].
fn stop_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage for a signal set.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in STOP_SIGNALS {
        // SAFETY: `set` is initialised and `signal` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// The stop signals blocked on this (still single-threaded) process; the mask it had.
pub(super) struct StopSignalsBlocked {
    previous: libc::sigset_t,
}

/// Blocks the [`STOP_SIGNALS`]: from now on a stop signal waits for the keeper. Call it
/// before binding the socket, while the process has one thread.
pub(super) fn block_stop_signals() -> io::Result<StopSignalsBlocked> {
    let set = stop_set();
    // SAFETY: a zeroed sigset_t is valid storage; pthread_sigmask fills it.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid signal set, and valid storage for the old mask.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
    if result != 0 {
        return Err(io::Error::from_raw_os_error(result));
    }
    Ok(StopSignalsBlocked { previous })
}

/// A socket this process bound: where, and which file it is.
#[derive(Debug)]
pub(super) struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    /// The socket just bound at `path`.
    pub(super) fn at(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() })
    }

    /// Removes the socket if the file at its path is still the one bound; says whether it
    /// did.
    pub(super) fn remove(&self) -> bool {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|meta| {
            meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino
        });
        if !ours {
            log::warn!("{} is no longer the socket this driver bound: left as it is", self.path.display());
            return false;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot remove the socket {}: {e}", self.path.display());
                false
            }
        }
    }
}

/// Forks into the serving process and the keeper of `socket`. Returns in the child, with
/// the stop signals as they were before [`block_stop_signals`] and a parent-death signal,
/// so that the child, its sandbox and whatever it starts end with the keeper. In this
/// process, never returns (see the [module docs](self)). Needs a single-threaded process.
/// If the fork fails, the socket is removed and the error returned.
pub(super) fn keep_socket(socket: BoundSocket, blocked: StopSignalsBlocked) -> io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let keeper = unsafe { libc::getpid() };
    // SAFETY: the process is single-threaded here (the driver starts no thread before its
    // sandbox), so the child may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    if child < 0 {
        let error = io::Error::last_os_error();
        socket.remove();
        return Err(error);
    }
    if child > 0 {
        keep(&socket, child)
    }
    // SAFETY: PR_SET_PDEATHSIG takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The keeper may have died before the signal was armed.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != keeper {
        return Err(io::Error::other("the process keeping the socket ended"));
    }
    // SAFETY: the mask saved by `block_stop_signals`; the old one is not asked for.
    let restored =
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &blocked.previous, std::ptr::null_mut()) };
    if restored != 0 {
        return Err(io::Error::from_raw_os_error(restored));
    }
    Ok(())
}

/// The keeper: waits for a stop signal or for `child` to end, removes `socket`, and ends.
fn keep(socket: &BoundSocket, child: libc::pid_t) -> ! {
    // Nothing of the serving process's: the listening socket and the image (whose lock is
    // on the open file the child shares) stay open in the child only.
    // SAFETY: closes descriptors this process never uses again (its Rust owners are never
    // dropped: this function does not return).
    unsafe { libc::close_range(3, u32::MAX, 0) };
    let (signals, pidfd) = match (signalfd(), pidfd(child)) {
        (Ok(signals), Ok(pidfd)) => (signals, pidfd),
        (Err(e), _) | (_, Err(e)) => {
            // Cannot watch: wait for the child alone (a stop signal then ends this process
            // without removing the socket, as before there was a keeper).
            log::warn!("the socket keeper cannot watch for stop signals: {e}");
            // SAFETY: unblocks the signals this process blocked itself.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &stop_set(), std::ptr::null_mut()) };
            let status = reap(child);
            socket.remove();
            end_like(status)
        }
    };
    loop {
        let mut fds = [
            libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds. No timeout: the driver serves until it is stopped or
        // its serving process ends, and either ends this wait.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing left to wait with: stop the child as on SIGTERM.
            stop(socket, child, &pidfd, libc::SIGTERM)
        }
        if fds[0].revents != 0 {
            let status = reap(child);
            socket.remove();
            end_like(status)
        }
        if fds[1].revents != 0 {
            if let Some(signal) = read_signal(&signals) {
                stop(socket, child, &pidfd, signal)
            }
        }
    }
}

/// Passes `signal` on to `child`, waits (at most [`STOP_GRACE`], then kills it) for it to
/// end, removes the socket, and dies of `signal`.
fn stop(socket: &BoundSocket, child: libc::pid_t, pidfd: &OwnedFd, signal: libc::c_int) -> ! {
    log::info!("stopping on signal {signal}; removing {}", socket.path.display());
    // SAFETY: a signal to our own child, not reaped yet (its pid is still its own).
    unsafe { libc::kill(child, signal) };
    let mut pollfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, bounded wait.
    if unsafe { libc::poll(&mut pollfd, 1, STOP_GRACE.as_millis() as libc::c_int) } != 1 {
        // SAFETY: as above.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    reap(child);
    socket.remove();
    die_of(signal)
}

/// A signalfd for the [`STOP_SIGNALS`], blocked in this process.
fn signalfd() -> io::Result<OwnedFd> {
    // SAFETY: a new signalfd for a valid set.
    let fd = unsafe { libc::signalfd(-1, &stop_set(), libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd of `child` (readable once it has ended).
fn pidfd(child: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The signal waiting on `signals`, if one is.
fn read_signal(signals: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: signalfd_siginfo is plain data; zeroed is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let read = unsafe { libc::read(signals.as_raw_fd(), (&raw mut info).cast(), size) };
    (read == size as isize).then_some(info.ssi_signo as libc::c_int)
}

/// Waits for `child` to end and reaps it; its wait status.
fn reap(child: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing into `status`.
        let reaped = unsafe { libc::waitpid(child, &mut status, 0) };
        if reaped == child {
            return status;
        }
        if reaped < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Not ours to wait for any more: say it failed.
            return 1 << 8;
        }
    }
}

/// Ends this process the way a process with wait status `status` ended.
fn end_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        die_of(libc::WTERMSIG(status))
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
    // SAFETY: ends the process; nothing of it needs running destructors or flushing (it
    // wrote nothing since the fork, and must not write what it buffered before twice).
    unsafe { libc::_exit(code) }
}

/// Dies of `signal`, with its default action (no core dump: the keeper's is of no use).
fn die_of(signal: libc::c_int) -> ! {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: sets a limit from a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    // SAFETY: restores the default action of a valid signal number.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage for a signal set.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: `set` is initialised and `signal` is a valid signal number.
    unsafe { libc::sigaddset(&mut set, signal) };
    // SAFETY: unblocks one signal; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: raising a signal at ourselves has no memory effects.
    unsafe { libc::raise(signal) };
    // Only reached for a signal whose default is to be ignored.
    // SAFETY: ends the process, as above.
    unsafe { libc::_exit(128 + signal) }
}
