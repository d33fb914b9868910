//! Whether a partition that has not answered yet is still at work, or hung.
//!
//! A deadline alone cannot tell them apart: on a host whose CPUs are all busy, a partition
//! woken for a request can wait for a CPU longer than any deadline short enough to catch a
//! hung one quickly. The kernel knows the difference: a partition that will answer is
//! runnable (waiting for a CPU, or running) or in an uninterruptible wait in the kernel
//! (a page fault on its program, I/O); one stopped by a signal, sleeping while its request
//! waits, or ended will not.
//!
//! [`Liveness`] reads the scheduler state of a partition's main thread (the thread that
//! serves a proxied device) from `/proc/PID/stat`, through a file the partition spawner
//! opens when it starts the partition (the spawner stays outside a jailed hypervisor's
//! empty root), so that a sandboxed thread reads it with one `pread` and no path lookup.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The scheduler state of a thread, as /proc shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Running, or runnable and waiting for a CPU (`R`).
    Runnable,
    /// In an uninterruptible (or killable) wait in the kernel (`D`): a page fault, I/O.
    KernelWait,
    /// Asleep until something wakes it (`S`, `I`).
    Sleeping,
    /// Stopped by a signal or a tracer (`T`, `t`).
    Stopped,
    /// Ended (`Z`, `X`, `x`), or a state this module does not know.
    Gone,
}

impl ThreadState {
    /// Whether a thread in this state is still at work on what it was asked: it will
    /// answer once it gets a CPU, or once the kernel is done.
    pub fn at_work(self) -> bool {
        matches!(self, Self::Runnable | Self::KernelWait)
    }

    /// The state in a `/proc/PID/stat` line: the field after the command, which is in
    /// parentheses and may itself hold spaces and parentheses.
    fn parse(stat: &[u8]) -> Option<Self> {
        let after_command = stat.iter().rposition(|&b| b == b')')?;
        let state = stat.get(after_command + 1..)?.iter().find(|b| !b.is_ascii_whitespace())?;
        Some(match state {
            b'R' => Self::Runnable,
            b'D' => Self::KernelWait,
            b'S' | b'I' => Self::Sleeping,
            b'T' | b't' => Self::Stopped,
            _ => Self::Gone,
        })
    }
}

/// A partition's `/proc/PID/stat`, opened when it started.
#[derive(Debug)]
pub struct Liveness {
    stat: File,
}

impl Liveness {
    /// The liveness of process `pid` (its main thread), opened now.
    pub fn of_process(pid: u32) -> io::Result<Self> {
        Self::open(&format!("{pid}/stat"))
    }

    /// The liveness of thread `tid` of process `pid`.
    pub fn of_thread(pid: u32, tid: u32) -> io::Result<Self> {
        Self::open(&format!("{pid}/task/{tid}/stat"))
    }

    fn open(relative: &str) -> io::Result<Self> {
        Ok(Self { stat: File::open(format!("/proc/{relative}"))? })
    }

    /// The thread's state now; `None` if it cannot be read (the process was reaped).
    pub fn state(&self) -> Option<ThreadState> {
        // The line is at most a few hundred bytes; the state comes right after the command
        // (at most 64 bytes with its parentheses), so the first 256 bytes hold it.
        let mut buf = [0u8; 256];
        let len = self.stat.read_at(&mut buf, 0).ok()?;
        ThreadState::parse(&buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn the_state_follows_the_command_even_with_spaces_and_parentheses_in_it() {
        let parse = |line: &str| ThreadState::parse(line.as_bytes());
        assert_eq!(parse("42 (serial) R 1 42 42 0 -1"), Some(ThreadState::Runnable));
        assert_eq!(parse("42 (a) b) S 1"), Some(ThreadState::Sleeping));
        assert_eq!(parse("42 (x (y) D 1"), Some(ThreadState::KernelWait));
        assert_eq!(parse("42 (w) t 1"), Some(ThreadState::Stopped));
        assert_eq!(parse("42 (w) Z 1"), Some(ThreadState::Gone));
        assert_eq!(parse("42 (w) I 1"), Some(ThreadState::Sleeping));
        assert_eq!(parse("42 (no end"), None);
        assert_eq!(parse("42 (w)"), None);
    }

    #[test]
    fn a_spinning_thread_is_at_work_a_sleeping_one_is_not() {
        let pid = std::process::id();
        let spin = Arc::new(AtomicBool::new(true));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let spinner = {
            let spin = spin.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
                while spin.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = tid_rx.recv().unwrap();
        let liveness = Liveness::of_thread(pid, tid).unwrap();
        assert_eq!(liveness.state(), Some(ThreadState::Runnable));
        spin.store(false, Ordering::Relaxed);
        spinner.join().unwrap();

        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (wake, asleep) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = asleep.recv();
        });
        let liveness = Liveness::of_thread(pid, tid_rx.recv().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while liveness.state() != Some(ThreadState::Sleeping) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(liveness.state(), Some(ThreadState::Sleeping));
        assert!(!ThreadState::Sleeping.at_work());
        drop(wake);
        sleeper.join().unwrap();
    }

    #[test]
    fn a_stopped_process_is_not_at_work_and_a_reaped_one_cannot_be_read() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let liveness = Liveness::of_process(child.id()).unwrap();
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while liveness.state() != Some(ThreadState::Stopped) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(liveness.state(), Some(ThreadState::Stopped));
        assert!(!ThreadState::Stopped.at_work());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(liveness.state(), None, "reaped");
    }
}
