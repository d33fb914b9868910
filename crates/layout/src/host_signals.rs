//! Stopping a VM when the host asks it to: SIGINT (Ctrl-C), SIGTERM, SIGHUP.
//!
//! The signals are *blocked*, not handled. Blocked on the thread that builds the VM before
//! it starts any thread ([`block_stop_signals`]), they are blocked in every thread the VM
//! starts, which inherit the mask. A stop signal sent at any moment then waits, pending on
//! the process: it neither kills the hypervisor half-built nor gets lost. Once the vCPUs
//! run, a thread of the [`ThreadKind::Signals`] kind reads the pending and the later ones
//! from a signalfd and stops the VM, which then ends as it would on `--timeout` (devices
//! and partitions torn down, the report written).
//!
//! So nothing about signals sits on the way to the guest's first instruction (installing a
//! handler and its thread did, for a sandboxed hypervisor), and no handler ever runs on a
//! vCPU thread in the middle of an exit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use splitvisor_bus::threads::{self, ThreadKind};
use splitvisor_vcpu::StopHandle;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The signals that stop a VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The set of [`STOP_SIGNALS`].
fn stop_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage for a signal set.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in STOP_SIGNALS {
        // SAFETY: `set` is initialised and `signal` a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Blocks the [`STOP_SIGNALS`] on the calling thread, and so in every thread it starts
/// afterwards, for good. A program that stops its VM on them calls this first thing in
/// `main`, before any thread exists, so that a signal that comes before the VM is built
/// waits for it instead of ending the process. (Without it, a VM built with
/// [`VmBuilder::stop_on_host_signals`](crate::VmBuilder::stop_on_host_signals) blocks them
/// from the start of `build` to the end of `run`.)
pub fn block_stop_signals() -> io::Result<()> {
    block_on_this_thread().map(std::mem::forget)
}

/// The stop signals blocked on one thread by [`block_on_this_thread`]. Dropped on that
/// thread, it unblocks those that were not blocked before; elsewhere it does nothing (a
/// mask belongs to its thread).
pub(crate) struct BlockedHere {
    newly_blocked: libc::sigset_t,
    thread: std::thread::ThreadId,
}

/// Blocks the [`STOP_SIGNALS`] on the calling thread until the result is dropped.
pub(crate) fn block_on_this_thread() -> io::Result<BlockedHere> {
    let set = stop_set();
    // SAFETY: a zeroed sigset_t is valid storage; pthread_sigmask fills it.
    let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid signal set and `before` valid storage for the old mask.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before) };
    if result != 0 {
        return Err(io::Error::from_raw_os_error(result));
    }
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    let mut newly_blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `newly_blocked` is valid storage for a signal set.
    unsafe { libc::sigemptyset(&mut newly_blocked) };
    for signal in STOP_SIGNALS {
        // SAFETY: `before` was filled by pthread_sigmask; `signal` is a valid number.
        if unsafe { libc::sigismember(&before, signal) } == 0 {
            // SAFETY: `newly_blocked` is initialised; `signal` is a valid number.
            unsafe { libc::sigaddset(&mut newly_blocked, signal) };
        }
    }
    Ok(BlockedHere { newly_blocked, thread: std::thread::current().id() })
}

impl Drop for BlockedHere {
    fn drop(&mut self) {
        if std::thread::current().id() == self.thread {
            // SAFETY: a valid signal set; the old mask is not asked for. A stop signal
            // still pending is delivered now, with its default effect.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.newly_blocked, std::ptr::null_mut()) };
        }
    }
}

/// The name of a stop signal, for logs.
fn signal_name(signal: u32) -> String {
    match signal as libc::c_int {
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGHUP => "SIGHUP".to_string(),
        other => format!("signal {other}"),
    }
}

/// The thread that stops the VM on a stop signal, until the VM ends.
pub(crate) struct SignalWatcher {
    quit: Arc<EventFd>,
    thread: JoinHandle<()>,
}

impl SignalWatcher {
    /// Starts the thread that reads the stop signals (blocked on the calling thread) and
    /// stops the VM through `stop`.
    pub(crate) fn start(stop: StopHandle) -> io::Result<Self> {
        let set = stop_set();
        // SAFETY: a new signalfd for a valid set; the fd returned is owned below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let signals = unsafe { OwnedFd::from_raw_fd(fd) };
        let quit = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let quit_seen = quit.clone();
        let thread = threads::spawn(ThreadKind::Signals, "host-signals", move || {
            watch(&signals, &quit_seen, &stop);
        })?;
        Ok(Self { quit, thread })
    }

    /// Ends the thread (the VM has ended). A signal that comes later waits while it is
    /// blocked, and has its default effect once the caller's mask is given back.
    pub(crate) fn stop(self) {
        let _ = self.quit.write(1);
        let _ = self.thread.join();
    }
}

/// Stops the VM on every stop signal read from `signals`, until `quit` is written.
fn watch(signals: &OwnedFd, quit: &EventFd, stop: &StopHandle) {
    loop {
        let mut fds = [
            libc::pollfd { fd: signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: quit.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds. No timeout: `quit` ends the wait, and the VM writes
        // it as it ends.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("cannot wait for host signals: {}", io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        // SAFETY: signalfd_siginfo is plain data; zeroed is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe { libc::read(signals.as_raw_fd(), (&raw mut info).cast(), size) };
        if n != size as isize {
            continue; // another reader took it, or an interrupted read: poll again
        }
        log::info!("{} from pid {}: stopping the VM", signal_name(info.ssi_signo), info.ssi_pid);
        stop.stop();
    }
}
