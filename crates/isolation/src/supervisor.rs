//! One thread that watches every driver of a VM.
//!
//! Each supervised device says, each time round, which fds it wants watched (a
//! partition's pidfd, a backend's socket for hang-up, a queue's error eventfd, ...) and
//! gets called when one is ready, and on every tick (the watchdog's clock). Whatever a
//! device does about it (restart its driver, fail, halt the VM) it does on this thread, so
//! the fds it watches only ever change between two waits.
//!
//! Other threads (a vCPU that found a driver dead, the control socket) ask for attention
//! with [`SupervisorHandle::wake`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use splitvisor_bus::threads::{self, ThreadKind};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Which events of an fd to watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Readable (a pidfd whose process ended, an eventfd written).
    Readable,
    /// The peer hung up (a socket whose other end closed), without consuming data.
    Hangup,
}

/// One fd a device wants watched, and the token it gets back.
#[derive(Debug)]
pub struct Watch<'a> {
    /// The fd.
    pub fd: BorrowedFd<'a>,
    /// What to wait for.
    pub interest: Interest,
    /// Handed back to [`Supervised::ready`].
    pub token: u32,
}

/// A device under supervision.
pub trait Supervised: Send + Sync {
    /// Calls `watch` for every fd to watch now.
    fn watches(&self, watch: &mut dyn FnMut(Watch<'_>));
    /// The fd of `token` is ready.
    fn ready(&self, token: u32);
    /// Called at least every tick: time-based checks (the watchdog) and work asked for
    /// through [`SupervisorHandle::wake`].
    fn tick(&self, now: Instant);
}

/// Wakes the supervisor thread from any thread.
#[derive(Clone, Debug)]
pub struct SupervisorHandle {
    wake: Arc<EventFd>,
}

impl SupervisorHandle {
    /// Makes the supervisor call every device's [`Supervised::tick`] and re-read what to
    /// watch, now.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// The supervisor thread; dropping it stops it.
#[derive(Debug)]
pub struct Supervisor {
    stop: EventFd,
    handle: SupervisorHandle,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts watching `devices`, ticking every `tick`.
    pub fn start(devices: Vec<Arc<dyn Supervised>>, tick: Duration) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopped = stop.try_clone()?;
        let handle = SupervisorHandle { wake: Arc::new(EventFd::new(EFD_NONBLOCK)?) };
        let woken = handle.wake.clone();
        let thread = threads::spawn(ThreadKind::Supervisor, "supervisor", move || {
            supervise(&devices, tick, &stopped, &woken)
        })?;
        Ok(Self { stop, handle, thread: Some(thread) })
    }

    /// A handle that wakes the thread.
    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the supervisor thread panicked");
            }
        }
    }
}

fn supervise(devices: &[Arc<dyn Supervised>], tick: Duration, stop: &EventFd, wake: &EventFd) {
    let tick_millis = tick.as_millis().clamp(1, i32::MAX as u128) as i32;
    let mut next_tick = Instant::now() + tick;
    loop {
        let mut fds = vec![
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let mut owners: Vec<(usize, u32)> = Vec::new();
        for (index, device) in devices.iter().enumerate() {
            device.watches(&mut |watch| {
                let events = match watch.interest {
                    Interest::Readable => libc::POLLIN,
                    Interest::Hangup => libc::POLLRDHUP,
                };
                fds.push(libc::pollfd { fd: raw(watch.fd), events, revents: 0 });
                owners.push((index, watch.token));
            });
        }
        let wait =
            next_tick.saturating_duration_since(Instant::now()).as_millis().min(tick_millis as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfds for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                log::error!("supervisor: poll failed: {error}");
                std::thread::sleep(tick);
            }
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        let woken = fds[1].revents != 0;
        if woken {
            let _ = wake.read();
        }
        // One event per device per round: handling it may replace the very fds the
        // device's other events came from (a restart replaces the partition whose pidfd
        // and socket both reported its death), and what is still ready after is seen at
        // the next poll, on the fds as they are then.
        let mut handled = vec![false; devices.len()];
        for (pollfd, &(device, token)) in fds[2..].iter().zip(&owners) {
            if pollfd.revents != 0 && !handled[device] {
                handled[device] = true;
                devices[device].ready(token);
            }
        }
        let now = Instant::now();
        if woken || now >= next_tick {
            next_tick = now + tick;
            for device in devices {
                device.tick(now);
            }
        }
    }
}

/// An eventfd as a borrowed fd, to watch it (vmm-sys-util's `EventFd` has no `AsFd`).
pub fn eventfd_fd(eventfd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd's fd is valid for as long as the eventfd, which the borrow is tied to.
    unsafe { BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}

fn raw(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}
