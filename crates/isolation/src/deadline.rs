//! Bounded exchanges with a peer that may never answer.
//!
//! A socket's receive timeout does not bound a vhost-user request: the vhost crate retries
//! a receive that timed out (it takes the timeout for a transient error), so a backend
//! that stops answering (SIGSTOP, a hang) would hold the asking thread, a vCPU perhaps,
//! for ever. A [`Deadline`] armed around an exchange makes sure it ends: when it passes,
//! one process-wide thread shuts the socket down, the blocked receive returns, and the
//! exchange fails like one with a dead peer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use splitvisor_bus::threads::{self, ThreadKind};

struct Armed {
    id: u64,
    at: Instant,
    /// A duplicate of the socket, so that the fd the watcher shuts down is the one armed,
    /// however the owner's copy lives.
    socket: OwnedFd,
}

#[derive(Default)]
struct Watcher {
    armed: Mutex<(u64, Vec<Armed>)>,
    changed: Condvar,
}

impl Watcher {
    fn run(&self) {
        let mut state = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            state.1.retain(|armed| {
                if armed.at > now {
                    return true;
                }
                log::warn!("a peer did not answer in time: its connection is shut down");
                // SAFETY: shutdown on a socket this watcher holds a duplicate of.
                unsafe { libc::shutdown(armed.socket.as_raw_fd(), libc::SHUT_RDWR) };
                false
            });
            state = match state.1.iter().map(|armed| armed.at).min() {
                Some(next) => {
                    let wait = next.saturating_duration_since(Instant::now());
                    self.changed.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0
                }
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The process-wide watcher, its thread started first if it is not running. A start the
/// host refused (its task limit reached) is an error, tried again at the next call.
fn watcher() -> io::Result<Arc<Watcher>> {
    static WATCHER: Mutex<Option<Arc<Watcher>>> = Mutex::new(None);
    let mut watcher = WATCHER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(watcher) = watcher.as_ref() {
        return Ok(watcher.clone());
    }
    let started = Arc::new(Watcher::default());
    let running = started.clone();
    threads::spawn(ThreadKind::Supervisor, "deadlines", move || running.run())?;
    Ok(watcher.insert(started).clone())
}

/// Shuts `socket` down if it is still armed after `timeout`; disarmed on drop.
pub struct Deadline {
    id: u64,
    watcher: Arc<Watcher>,
}

impl Deadline {
    /// Arms a deadline `timeout` from now on `socket`. An error (the watcher's thread or
    /// the socket's duplicate refused by the host) means nothing would end the exchange:
    /// the caller must not start it.
    pub fn arm(socket: BorrowedFd<'_>, timeout: Duration) -> io::Result<Self> {
        let socket = socket.try_clone_to_owned()?;
        let watcher = watcher()?;
        let mut state = watcher.armed.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += 1;
        let id = state.0;
        state.1.push(Armed { id, at: Instant::now() + timeout, socket });
        watcher.changed.notify_all();
        drop(state);
        Ok(Self { id, watcher })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let mut state = self.watcher.armed.lock().unwrap_or_else(|e| e.into_inner());
        state.1.retain(|armed| armed.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_silent_peer_ends_the_exchange_at_the_deadline() {
        let (mut ours, _silent) = UnixStream::pair().unwrap();
        let _deadline = Deadline::arm(ours.as_fd(), Duration::from_millis(50)).unwrap();
        let mut byte = [0u8];
        // Blocks until the deadline shuts the socket down, then reads end-of-file.
        assert_eq!(ours.read(&mut byte).unwrap(), 0);
    }

    #[test]
    fn a_disarmed_deadline_leaves_the_socket_alone() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        drop(Deadline::arm(ours.as_fd(), Duration::from_millis(10)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        std::io::Write::write_all(&mut &ours, b"x").unwrap();
        let mut byte = [0u8];
        peer.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }
}
