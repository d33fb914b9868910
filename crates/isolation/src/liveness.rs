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
//!
//! [`Threads`] looks at every thread of a process, through its `/proc/PID/task`
//! directory opened the same way. A disk's driver whose requests make no progress while
//! one of its threads (or the kernel's io_uring workers, which are its threads too) is in
//! a kernel wait is held up by its storage (a slow device, a frozen filesystem), not hung:
//! replacing it would not help, and the watchdog gives it longer.
//!
//! A request can also wait in the kernel with no thread waiting for it: an O_DIRECT
//! transfer on io_uring is in the block layer, and nothing of the driver sleeps in `D`
//! while a slow device (or one stacked on a frozen filesystem: a loop device) holds it.
//! [`DeviceQueue`] reads how many requests the block device under the image has in flight.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

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

/// The most threads [`Threads`] looks at: a driver has a few, and whatever a partition
/// does to its own thread count, a look costs a bounded amount of work.
const MAX_THREADS: usize = 256;

/// Every thread of a process: its `/proc/PID/task` directory, opened when it started.
#[derive(Debug)]
pub struct Threads {
    dir: OwnedFd,
}

impl Threads {
    /// The threads of process `pid`, their directory opened now.
    pub fn of_process(pid: u32) -> io::Result<Self> {
        let dir =
            File::options().read(true).custom_flags(libc::O_DIRECTORY).open(format!("/proc/{pid}/task"))?;
        Ok(Self { dir: dir.into() })
    }

    /// The state of each thread now (of the first `MAX_THREADS`); empty once the process
    /// was reaped.
    pub fn states(&self) -> Vec<ThreadState> {
        let mut states = Vec::new();
        self.each_thread_id(|tid| {
            if let Some(state) = self.state_of(tid) {
                states.push(state);
            }
            states.len() < MAX_THREADS
        });
        states
    }

    /// Whether one of the threads is in a kernel wait (`D`) now: on I/O, a frozen
    /// filesystem, a page fault.
    pub fn any_in_kernel_wait(&self) -> bool {
        self.states().contains(&ThreadState::KernelWait)
    }

    /// Calls `each` with the name of each entry of the directory that is a thread id,
    /// until it returns false.
    fn each_thread_id(&self, mut each: impl FnMut(&CStr) -> bool) {
        // The directory is read from its start at each look.
        // SAFETY: an lseek on a directory fd this struct owns.
        if unsafe { libc::lseek(self.dir.as_raw_fd(), 0, libc::SEEK_SET) } < 0 {
            return;
        }
        // Entries are aligned to 8 bytes; so is this buffer.
        let mut buf = [0u64; 512];
        let mut entries = 0;
        loop {
            // SAFETY: the buffer is writable for its whole length and outlives the call.
            let len = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.dir.as_raw_fd(),
                    buf.as_mut_ptr(),
                    std::mem::size_of_val(&buf),
                )
            };
            if len <= 0 {
                return;
            }
            // SAFETY: the kernel wrote `len` bytes of the buffer, which is plain memory.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len as usize) };
            let mut at = 0;
            // Each entry: d_ino (8), d_off (8), d_reclen (2), d_type (1), then the name,
            // NUL-terminated, padded to d_reclen.
            while at + 19 < bytes.len() {
                let reclen = u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]) as usize;
                if reclen < 20 || at + reclen > bytes.len() {
                    return;
                }
                let Ok(name) = CStr::from_bytes_until_nul(&bytes[at + 19..at + reclen]) else { return };
                at += reclen;
                entries += 1;
                if entries > MAX_THREADS + 2 {
                    return;
                }
                if name.to_bytes().first().is_some_and(u8::is_ascii_digit) && !each(name) {
                    return;
                }
            }
        }
    }

    /// The state of thread `tid`, from its `stat` in the directory.
    fn state_of(&self, tid: &CStr) -> Option<ThreadState> {
        let mut path = tid.to_bytes().to_vec();
        path.extend_from_slice(b"/stat\0");
        let path = CStr::from_bytes_with_nul(&path).ok()?;
        // SAFETY: a directory fd this struct owns and a NUL-terminated relative path; the
        // flags the sandbox allows a thread that looks (read-only, close-on-exec).
        let fd =
            unsafe { libc::openat(self.dir.as_raw_fd(), path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            // The thread ended since the directory was read.
            return None;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let stat = Liveness { stat: unsafe { File::from_raw_fd(fd) } };
        stat.state()
    }
}

/// The requests in flight on the block device that holds a file, as the kernel counts them
/// (`/sys/dev/block/MAJOR:MINOR/inflight`: reads, then writes), through that file opened
/// once (while sysfs is in sight: before a jail). The count is the whole device's, other
/// processes' requests included: a disk driver whose requests make no progress while its
/// device has requests in flight is taken as held up by its storage, and given longer.
#[derive(Debug)]
pub struct DeviceQueue {
    inflight: File,
}

impl DeviceQueue {
    /// The queue of the block device `file` lies on; `None` where there is none (a
    /// filesystem without a block device: tmpfs, overlayfs, NFS, ...).
    pub fn of(file: &File) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let device = file.metadata().ok()?.dev();
        let path = format!("/sys/dev/block/{}:{}/inflight", libc::major(device), libc::minor(device));
        let inflight = File::options().read(true).custom_flags(libc::O_CLOEXEC).open(path).ok()?;
        Some(Self { inflight })
    }

    /// Whether the device has a request in flight now.
    pub fn busy(&self) -> bool {
        let mut text = [0u8; 64];
        // sysfs renders the attribute anew at each read from its start.
        let read = self.inflight.read_at(&mut text, 0).unwrap_or(0);
        in_flight(&text[..read]).is_some_and(|count| count > 0)
    }
}

/// The sum of the counts in an `inflight` attribute's `text`.
fn in_flight(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.split_whitespace().map(|count| count.parse::<u64>().ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn a_device_queue_counts_reads_and_writes_in_flight() {
        assert_eq!(in_flight(b"       0        0\n"), Some(0));
        assert_eq!(in_flight(b"       3       14\n"), Some(17));
        assert_eq!(in_flight(b""), Some(0));
        assert_eq!(in_flight(b"x 1"), None);
        // A file on a block device has a queue (its attribute reads as counts); tmpfs has none.
        if let Some(queue) = std::env::current_exe()
            .ok()
            .and_then(|exe| File::open(exe).ok())
            .as_ref()
            .and_then(DeviceQueue::of)
        {
            let mut text = [0u8; 64];
            let read = queue.inflight.read_at(&mut text, 0).unwrap();
            assert!(in_flight(&text[..read]).is_some(), "{:?}", String::from_utf8_lossy(&text[..read]));
        }
        // procfs has no block device.
        assert!(DeviceQueue::of(&File::open("/proc/self/stat").unwrap()).is_none());
    }

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
    fn every_thread_of_a_process_is_seen_and_none_once_it_is_reaped() {
        let spin = Arc::new(AtomicBool::new(true));
        let spinners: Vec<_> = (0..3)
            .map(|_| {
                let spin = spin.clone();
                std::thread::spawn(move || {
                    while spin.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let threads = Threads::of_process(std::process::id()).unwrap();
        let states = threads.states();
        let listed = std::fs::read_dir("/proc/self/task").unwrap().count();
        // Other tests' threads come and go meanwhile; these three and this one stay.
        assert!(states.len() >= 4 && states.len() <= listed + 8, "{states:?} of {listed}");
        assert!(states.iter().filter(|&&state| state == ThreadState::Runnable).count() >= 3, "{states:?}");
        // Read again from the start.
        assert!(threads.states().len() >= 4);
        spin.store(false, Ordering::Relaxed);
        for spinner in spinners {
            spinner.join().unwrap();
        }

        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let threads = Threads::of_process(child.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads.states() != [ThreadState::Sleeping] && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(threads.states(), [ThreadState::Sleeping]);
        assert!(!threads.any_in_kernel_wait());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(threads.states(), []);
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
