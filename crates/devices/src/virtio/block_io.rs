//! The I/O engines of virtio-blk: how the transfers of the requests in flight reach the
//! image.
//!
//! The request engine ([`super::block::BlockRequests`]) parses a request, points iovecs
//! at the guest's buffers and hands the transfer to an [`IoEngine`] under a *tag* (its
//! slot). The transfers of one kick are pushed, then started together with one
//! [`IoEngine::submit`] (with cache=none, [`Uring`] starts each as it is pushed);
//! [`IoEngine::wait`] returns completions in whatever order the kernel finishes them.
//!
//! * [`Uring`]: io_uring. The ring is created disabled, the image is its only registered
//!   file, and a restriction set allows only READV, WRITEV and FSYNC on registered files
//!   before the ring is enabled: whatever writes to the ring's memory (a bug, or a
//!   compromised partition) can make the ring do nothing else, on no other file.
//!   Writes through the page cache (cache=writeback) do not go through the ring: the
//!   engine runs them at once with `pwritev`; nor does a small transfer that is alone in
//!   flight (a driver at queue depth 1), which runs with one system call (see [`Uring`]).
//! * [`ThreadPool`]: where io_uring is missing or refused (an old kernel, a container
//!   whose seccomp profile blocks it, `io_uring_disabled`), a few threads run `preadv`
//!   (`pread` for one buffer), `pwritev` (`pwrite`) and `fdatasync`.
//!
//! [`open`] probes io_uring and falls back to the thread pool ([`EngineKind::Auto`]).
//! Neither engine allocates per request: their queues are sized at creation for
//! [`MAX_IN_FLIGHT`] transfers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, register::Restriction, squeue, types};
use splitvisor_bus::threads::{self, ThreadKind};

use super::block::{CacheMode, DiskImage, RingPoll};

/// Most transfers one queue has in flight (the tags are `0..MAX_IN_FLIGHT`).
pub const MAX_IN_FLIGHT: usize = 64;
/// Threads of the fallback engine, per queue.
pub const POOL_THREADS: usize = 4;
/// Longest the io_uring engine looks at its completion ring before it sleeps until a
/// transfer completes ([`IoEngine::set_poll_limit`]; with cache=none only): about the time
/// of a 4 KiB O_DIRECT transfer on a fast disk.
pub const COMPLETION_POLL_LIMIT: Duration = Duration::from_micros(200);

/// Which engine to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel offers it, the thread pool otherwise.
    #[default]
    Auto,
    /// io_uring, or an error.
    IoUring,
    /// The thread pool.
    Threads,
}

/// What a transfer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// `preadv` into the iovecs.
    Read,
    /// `pwritev` from the iovecs.
    Write,
    /// `fdatasync` of the image.
    Sync,
}

/// One transfer handed to an engine.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Returned with its completion; below [`MAX_IN_FLIGHT`].
    pub tag: u16,
    /// What to do.
    pub op: IoOp,
    /// Byte offset in the image.
    pub offset: u64,
    /// The buffers (unused for [`IoOp::Sync`]).
    pub iovecs: *const libc::iovec,
    /// How many iovecs.
    pub count: u32,
}

// SAFETY: a transfer carries pointers for the kernel only; whoever pushes it keeps what
// they point to valid until its completion (the contract of `IoEngine::push`).
unsafe impl Send for Transfer {}

/// A finished transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The transfer's tag.
    pub tag: u16,
    /// Bytes moved (0 for a sync), or a negative errno.
    pub result: i64,
}

/// Moves the transfers of the requests in flight.
pub trait IoEngine: Send {
    /// The engine's name, for logs and benchmarks ("io_uring", "threads").
    fn name(&self) -> &'static str;

    /// Queues `transfer`; it starts at the next [`IoEngine::submit`] (or earlier). At most
    /// [`MAX_IN_FLIGHT`] transfers may be outstanding, one per tag.
    ///
    /// # Safety
    /// The iovec array and the memory it describes must stay valid, and not be used by
    /// anyone else, until `wait` has returned this tag's completion.
    unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()>;

    /// Starts every queued transfer (one system call for io_uring).
    fn submit(&mut self) -> io::Result<()>;

    /// Waits until at least one transfer finished (returns at once if none is
    /// outstanding) and appends every finished one to `done`.
    fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()>;

    /// As [`IoEngine::wait`], but while the engine looks for a completion before it sleeps
    /// (see [`IoEngine::set_poll_limit`]) it also asks `more_work`, and returns with nothing
    /// appended once that says yes: the driver offered a request that can start now, which
    /// would otherwise wait for the next completion. An engine that does not look waits as
    /// `wait` does.
    fn wait_or(&mut self, done: &mut Vec<Completion>, more_work: &mut dyn FnMut() -> bool) -> io::Result<()> {
        let _ = more_work;
        self.wait(done)
    }

    /// Transfers pushed and not yet returned by `wait`.
    fn outstanding(&self) -> usize;

    /// Before `wait` sleeps, look for a completion for up to `limit` (adapted to how soon
    /// transfers complete; zero, the default, never looks). An engine that cannot look
    /// ignores it.
    fn set_poll_limit(&mut self, limit: Duration) {
        let _ = limit;
    }
}

/// The engine `kind` for `disk`; [`EngineKind::Auto`] falls back to the thread pool where
/// io_uring cannot be set up.
pub fn open(disk: &Arc<DiskImage>, kind: EngineKind) -> io::Result<Box<dyn IoEngine>> {
    match kind {
        EngineKind::IoUring => Ok(Box::new(Uring::new(disk)?)),
        EngineKind::Threads => Ok(Box::new(ThreadPool::new(disk, POOL_THREADS)?)),
        EngineKind::Auto => match Uring::new(disk) {
            Ok(uring) => Ok(Box::new(uring)),
            Err(e) => {
                log::info!(
                    "virtio-blk: io_uring unavailable ({e}); using a pool of {POOL_THREADS} I/O threads"
                );
                Ok(Box::new(ThreadPool::new(disk, POOL_THREADS)?))
            }
        },
    }
}

/// The io_uring engine (see the [module docs](self)).
///
/// With cache=writeback a write only copies the guest's data into the page cache, and
/// [`IoEngine::push`] runs it at once with `pwritev`: io_uring cannot start a buffered
/// write without blocking on file systems that do not offer non-blocking buffered writes
/// (ext4 among them), and hands every one to a kernel worker thread, which cost 13-23 µs
/// per 4 KiB write where `pwritev` takes 5 µs on the machines this project is measured
/// on. Reads, O_DIRECT writes and syncs go through the ring.
///
/// A transfer that arrives alone while nothing is in flight (a driver at queue depth 1)
/// runs with one `preadv`/`pwritev` in [`IoEngine::submit`] instead: the worker sleeps in
/// the system call and the disk's interrupt wakes it, where a completion through the ring
/// is posted by task work that must first reach the worker (an IPI while it looks at the
/// ring, a wake-up while it sleeps), which on a virtualised host costs more than the
/// transfer. Only a small transfer is held this way, so that a request arriving behind it
/// waits at most one small transfer; a sync always goes through the ring.
///
/// With cache=none (O_DIRECT) a transfer on the ring starts as it is pushed, with a system
/// call of its own, rather than with the rest of its kick at [`IoEngine::submit`]. The
/// kernel plugs the transfers of one `io_uring_enter`: it hands them to the disk together,
/// and a disk that serves such a batch as one (the virtio disk of the machines this
/// project is measured on) completes them together, so the driver's next batch comes back
/// as one too, and the queue moves in waves: there the guest's random 4 KiB reads at queue
/// depth 16 spent 230 µs each in the disk where fio's, started one by one, spent 150, and
/// ran at 0.80 of fio's rate. Started as pushed, they run at 0.95 of it, writes at 0.92
/// instead of 0.79 (4 rounds, fio in each). A buffered transfer, which mostly completes in
/// the system call that starts it, still starts with the rest of its kick, one system call
/// for all.
pub struct Uring {
    ring: IoUring,
    /// The registered file's image (its lock lives as long as the ring).
    disk: Arc<DiskImage>,
    /// Writes go through the page cache: run them in `push`.
    writes_inline: bool,
    /// Transfers finished in `push` or `submit`, returned by the next `wait`; capacity
    /// MAX_IN_FLIGHT.
    finished: Vec<Completion>,
    /// A small transfer pushed while nothing was in flight: run in `submit` if it is still
    /// alone then, put on the ring when another one is pushed.
    held: Option<Transfer>,
    outstanding: usize,
    /// How long `wait` looks at the completion ring before it sleeps.
    poll: RingPoll,
    /// Transfers reach the disk itself (O_DIRECT): start each as it is pushed.
    start_at_push: bool,
    /// What each tag on the ring does, to run it here if the kernel cancels it.
    on_ring: [Option<Transfer>; MAX_IN_FLIGHT],
}

impl Uring {
    /// A ring for the transfers of `disk`, restricted to READV, WRITEV and FSYNC on it.
    pub fn new(disk: &Arc<DiskImage>) -> io::Result<Self> {
        let entries = MAX_IN_FLIGHT as u32;
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let submitter = ring.submitter();
        submitter.register_files(&[disk.file().as_raw_fd()])?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
            // Only for Drop (a restricted ring refuses every register operation not listed).
            Restriction::register_op(IORING_UNREGISTER_FILES),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            disk: disk.clone(),
            writes_inline: disk.cache() == CacheMode::Writeback,
            finished: Vec::with_capacity(MAX_IN_FLIGHT),
            held: None,
            outstanding: 0,
            poll: RingPoll::default(),
            start_at_push: disk.cache() == CacheMode::None,
            on_ring: [None; MAX_IN_FLIGHT],
        })
    }

    fn enter(&mut self, wait_for: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(wait_for) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is full: reap, then try again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Uring {
    /// Runs `transfer` with one system call; `wait` returns its completion.
    fn run_now(&mut self, transfer: &Transfer) {
        // Capacity for MAX_IN_FLIGHT completions was reserved: this never allocates.
        let result = run(self.disk.file().as_raw_fd(), transfer);
        self.finished.push(Completion { tag: transfer.tag, result });
    }

    /// Puts `transfer` on the submission ring (started by the next `enter`).
    ///
    /// # Safety
    /// As for [`IoEngine::push`].
    unsafe fn queue(&mut self, transfer: Transfer) -> io::Result<()> {
        let file = types::Fixed(0);
        let entry = match transfer.op {
            IoOp::Read => {
                opcode::Readv::new(file, transfer.iovecs, transfer.count).offset(transfer.offset).build()
            }
            IoOp::Write => {
                opcode::Writev::new(file, transfer.iovecs, transfer.count).offset(transfer.offset).build()
            }
            IoOp::Sync => opcode::Fsync::new(file).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(u64::from(transfer.tag));
        if self.ring.submission().is_full() {
            self.enter(0)?;
        }
        // SAFETY: the pusher keeps the iovecs and their buffers valid until the completion
        // (`IoEngine::push`'s contract); the entry names only the registered image.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
        self.on_ring[usize::from(transfer.tag)] = Some(transfer);
        Ok(())
    }

    /// The completion of `tag` whose ring result is `result`. The kernel cancels a
    /// transfer it hands to a worker thread when it cannot create one (a pids limit,
    /// RLIMIT_NPROC): nothing of it ran, and this engine never cancels, so it runs here,
    /// as the guest's request must not fail for the host's lack of a thread.
    fn completion(&mut self, tag: u16, result: i32) -> Completion {
        let transfer = self.on_ring.get_mut(usize::from(tag)).and_then(Option::take);
        match transfer {
            Some(transfer) if result == -libc::ECANCELED => {
                log::debug!(
                    "virtio-blk: the kernel cancelled a transfer (no worker thread?); running it here"
                );
                Completion { tag, result: run(self.disk.file().as_raw_fd(), &transfer) }
            }
            _ => Completion { tag, result: i64::from(result) },
        }
    }

    /// Looks at the completion ring for the poll window, and asks `more_work` as it
    /// looks.
    fn look_for_completion(&mut self, more_work: &mut dyn FnMut() -> bool) -> Look {
        let window = self.poll.window();
        if window.is_zero() {
            return Look::Nothing;
        }
        let start = Instant::now();
        loop {
            if !self.ring.completion().is_empty() {
                self.poll.found();
                return Look::Completion;
            }
            if more_work() {
                // Not a miss: the window is left as it is.
                return Look::MoreWork;
            }
            if start.elapsed() >= window {
                self.poll.missed();
                return Look::Nothing;
            }
            std::hint::spin_loop();
        }
    }
}

/// What a look at the completion ring found.
enum Look {
    Completion,
    /// `more_work` said yes first.
    MoreWork,
    Nothing,
}

/// Largest transfer [`Uring`] runs with one system call when it is alone: a request
/// that arrives behind it waits for it.
const HELD_TRANSFER_MAX: u64 = 64 << 10;

/// The bytes `transfer` moves.
fn bytes(transfer: &Transfer) -> u64 {
    if transfer.iovecs.is_null() {
        return 0;
    }
    // SAFETY: the pusher keeps the iovec array valid until the transfer's completion
    // (`IoEngine::push`'s contract), and this is called from `push`.
    let iovecs = unsafe { std::slice::from_raw_parts(transfer.iovecs, transfer.count as usize) };
    iovecs.iter().map(|iovec| iovec.iov_len as u64).sum()
}

/// `IORING_UNREGISTER_FILES` of the kernel's io_uring ABI.
pub const IORING_UNREGISTER_FILES: u8 = 3;

impl IoEngine for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()> {
        if usize::from(transfer.tag) >= MAX_IN_FLIGHT || self.outstanding >= MAX_IN_FLIGHT {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many transfers in flight"));
        }
        if transfer.op == IoOp::Write && self.writes_inline {
            self.run_now(&transfer);
            self.outstanding += 1;
            return Ok(());
        }
        if self.outstanding == 0 && transfer.op != IoOp::Sync && bytes(&transfer) <= HELD_TRANSFER_MAX {
            self.held = Some(transfer);
            self.outstanding += 1;
            return Ok(());
        }
        if let Some(held) = self.held.take() {
            // Not alone after all: it starts on the ring with the others.
            // SAFETY: pushed under this function's contract, which still holds.
            if let Err(e) = unsafe { self.queue(held) } {
                // Still owed: `submit` or `wait` runs it.
                self.held = Some(held);
                return Err(e);
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.queue(transfer) }?;
        self.outstanding += 1;
        if self.start_at_push
            && let Err(e) = self.enter(0)
        {
            // The transfer is pushed all the same: it stays on the submission ring, and
            // `submit` (or `wait`) starts it or reports why it cannot.
            log::debug!("virtio-blk: io_uring could not start a transfer at once: {e}");
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if let Some(held) = self.held.take() {
            self.run_now(&held);
        }
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter(0)
    }

    fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
        self.wait_or(done, &mut || false)
    }

    fn wait_or(&mut self, done: &mut Vec<Completion>, more_work: &mut dyn FnMut() -> bool) -> io::Result<()> {
        if self.outstanding == 0 {
            return Ok(());
        }
        if let Some(held) = self.held.take() {
            self.run_now(&held);
        }
        let mut looked = false;
        // Transfers finished in `push` or `submit` are returned at once, with whatever the
        // ring finished.
        let finished = self.finished.len();
        if finished > 0 {
            self.outstanding -= finished;
            done.append(&mut self.finished);
            self.submit()?;
        }
        loop {
            let before = done.len();
            loop {
                // One entry at a time: a cancelled one runs here before the next is taken.
                let entry = self.ring.completion().next();
                let Some(entry) = entry else { break };
                done.push(self.completion(entry.user_data() as u16, entry.result()));
            }
            let reaped = done.len() - before;
            self.outstanding = self.outstanding.saturating_sub(reaped);
            if reaped > 0 || finished > 0 || self.outstanding == 0 {
                return Ok(());
            }
            if !looked && self.ring.submission().is_empty() {
                // A transfer that completes within the window is found without sleeping:
                // no wake-up, which on a busy host can cost more than the transfer.
                looked = true;
                match self.look_for_completion(more_work) {
                    Look::Completion => continue,
                    Look::MoreWork => return Ok(()),
                    Look::Nothing => {}
                }
            }
            self.enter(1)?;
        }
    }

    fn set_poll_limit(&mut self, limit: Duration) {
        // Only O_DIRECT transfers complete without a CPU: a buffered one io_uring could not
        // finish in the submission runs on a kernel worker, which the look would starve
        // of a CPU on a small host.
        if self.disk.cache() == CacheMode::None {
            self.poll = RingPoll::new(limit);
        }
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for a transfer in flight: wait for
        // every one before the caller can unmap it.
        let mut done = Vec::with_capacity(MAX_IN_FLIGHT);
        while self.outstanding > 0 {
            done.clear();
            if let Err(e) = self.wait(&mut done) {
                log::error!(
                    "virtio-blk: io_uring wait failed with {} transfers in flight: {e}",
                    self.outstanding
                );
                break;
            }
        }
        // A ring's registered files are released by its deferred teardown, which the kernel
        // may run after this process has exited: the image's lock would outlive the VM, and
        // a VM started again at once would find its image locked. Unregistering waits for
        // the file's last use and releases it now.
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!("io_uring: cannot release the image's registered file: {e}");
        }
    }
}

struct PoolState {
    jobs: VecDeque<Transfer>,
    done: Vec<Completion>,
    closing: bool,
}

struct PoolShared {
    state: Mutex<PoolState>,
    /// Signalled when jobs are queued or the pool closes.
    work: Condvar,
    /// Signalled when a job finished.
    finished: Condvar,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The fallback engine: [`POOL_THREADS`] threads running one system call per transfer.
pub struct ThreadPool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
    /// Pushed since the last submit: the workers are woken once for all of them.
    queued: usize,
    outstanding: usize,
}

impl ThreadPool {
    /// `threads` threads serving transfers on `disk`.
    pub fn new(disk: &Arc<DiskImage>, threads: usize) -> io::Result<Self> {
        let shared = Arc::new(PoolShared {
            state: Mutex::new(PoolState {
                jobs: VecDeque::with_capacity(MAX_IN_FLIGHT),
                done: Vec::with_capacity(MAX_IN_FLIGHT),
                closing: false,
            }),
            work: Condvar::new(),
            finished: Condvar::new(),
        });
        let mut pool = Self { shared, threads: Vec::with_capacity(threads), queued: 0, outstanding: 0 };
        for _ in 0..threads.max(1) {
            let (shared, disk) = (pool.shared.clone(), disk.clone());
            let thread = threads::spawn(ThreadKind::DeviceWorker, "virtio-blk-io", move || {
                pool_worker(&shared, &disk);
            })?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }
}

fn pool_worker(shared: &PoolShared, disk: &DiskImage) {
    let fd = disk.file().as_raw_fd();
    let mut state = shared.lock();
    loop {
        if let Some(transfer) = state.jobs.pop_front() {
            drop(state);
            let result = run(fd, &transfer);
            state = shared.lock();
            state.done.push(Completion { tag: transfer.tag, result });
            shared.finished.notify_one();
        } else if state.closing {
            return;
        } else {
            state = shared.work.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Runs `transfer` on `fd` with one system call (what the pool's threads do): the bytes
/// moved, or a negative errno.
///
/// # Safety
/// The transfer's iovecs must describe memory valid for the kernel to write (a read) or
/// read (a write) for the duration of the call.
pub unsafe fn execute(fd: i32, transfer: &Transfer) -> i64 {
    run(fd, transfer)
}

/// One system call for `transfer`: bytes moved or a negative errno.
fn run(fd: i32, transfer: &Transfer) -> i64 {
    let Ok(offset) = libc::off_t::try_from(transfer.offset) else {
        return -i64::from(libc::EINVAL);
    };
    let count = transfer.count as libc::c_int;
    if count == 1 && transfer.op != IoOp::Sync {
        // One buffer (most requests: a guest's page or block): pread/pwrite spare the kernel
        // copying in and checking an iovec array, a few percent of a 4 KiB request.
        // SAFETY: `iovecs` holds `count` = 1 valid entry (`IoEngine::push`'s contract).
        let buffer = unsafe { *transfer.iovecs };
        let result = match transfer.op {
            // SAFETY: the pusher keeps the buffer valid until the completion; the kernel
            // writes only into it.
            IoOp::Read => unsafe { libc::pread(fd, buffer.iov_base, buffer.iov_len, offset) },
            // SAFETY: as above; the kernel only reads it.
            _ => unsafe { libc::pwrite(fd, buffer.iov_base, buffer.iov_len, offset) },
        };
        return outcome(result);
    }
    let result = match transfer.op {
        // SAFETY: the pusher keeps the iovecs and their buffers valid until the completion;
        // the kernel writes only into them.
        IoOp::Read => unsafe { libc::preadv(fd, transfer.iovecs, count, offset) },
        // SAFETY: as above; the kernel only reads them.
        IoOp::Write => unsafe { libc::pwritev(fd, transfer.iovecs, count, offset) },
        // SAFETY: fdatasync takes only the fd.
        IoOp::Sync => unsafe { libc::fdatasync(fd) as isize },
    };
    outcome(result)
}

/// A system call's result as a transfer's: bytes moved, or a negative errno.
fn outcome(result: isize) -> i64 {
    if result < 0 {
        -i64::from(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        result as i64
    }
}

impl IoEngine for ThreadPool {
    fn name(&self) -> &'static str {
        "threads"
    }

    unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()> {
        if usize::from(transfer.tag) >= MAX_IN_FLIGHT || self.outstanding >= MAX_IN_FLIGHT {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many transfers in flight"));
        }
        // Capacity for MAX_IN_FLIGHT jobs was reserved: this never allocates.
        self.shared.lock().jobs.push_back(transfer);
        self.queued += 1;
        self.outstanding += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        match self.queued {
            0 => {}
            1 => self.shared.work.notify_one(),
            _ => self.shared.work.notify_all(),
        }
        self.queued = 0;
        Ok(())
    }

    fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
        self.submit()?;
        if self.outstanding == 0 {
            return Ok(());
        }
        let mut state = self.shared.lock();
        while state.done.is_empty() {
            state = self.shared.finished.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        self.outstanding = self.outstanding.saturating_sub(state.done.len());
        done.append(&mut state.done);
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let mut done = Vec::with_capacity(MAX_IN_FLIGHT);
        while self.outstanding > 0 {
            done.clear();
            let _ = self.wait(&mut done);
        }
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::virtio::testing::memory_disk;

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
    }

    /// A scratch file, removed on drop (also when an assertion fails).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Two O_DIRECT reads of a fresh 64-sector image in the temporary directory (O_DIRECT
    /// needs a real file system), pushed on a ring engine and submitted.
    fn two_direct_reads(name: &str, poll: Duration) -> (Uring, crate::virtio::GuestMemoryMmap, Scratch) {
        let (mut engine, mem, path) = two_direct_reads_pushed(name, poll);
        engine.submit().unwrap();
        (engine, mem, path)
    }

    /// As [`two_direct_reads`], without the submit.
    fn two_direct_reads_pushed(
        name: &str,
        poll: Duration,
    ) -> (Uring, crate::virtio::GuestMemoryMmap, Scratch) {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let path =
            Scratch(std::env::temp_dir().join(format!("splitvisor-io-{}-{name}.img", std::process::id())));
        // Written out, not sparse: an O_DIRECT read of a hole completes in the submission.
        let file = std::fs::File::create(&path.0).unwrap();
        file.write_all_at(&[0x5a; 64 * 512], 0).unwrap();
        file.sync_all().unwrap();
        let disk = Arc::new(DiskImage::open_with(&path.0, false, CacheMode::None).unwrap());
        let mut engine = Uring::new(&disk).unwrap();
        engine.set_poll_limit(poll);
        // Guest memory is page-aligned, as O_DIRECT wants its buffers.
        let mem = crate::virtio::testing::guest_memory(0x10000);
        let base = mem.get_host_address(GuestAddress(0)).unwrap();
        let iovecs = Box::leak(Box::new(
            // SAFETY: both buffers lie inside the 64 KiB just mapped.
            [0, 1].map(|i| libc::iovec { iov_base: unsafe { base.add(4096 * i) }.cast(), iov_len: 4096 }),
        ));
        for (tag, iov) in iovecs.iter().enumerate() {
            let transfer = Transfer { tag: tag as u16, op: IoOp::Read, offset: 0, iovecs: iov, count: 1 };
            // SAFETY: the iovecs are leaked and `mem`, returned, outlives the engine's waits.
            unsafe { engine.push(transfer) }.unwrap();
        }
        (engine, mem, path)
    }

    #[test]
    fn with_cache_none_a_transfer_on_the_ring_starts_as_it_is_pushed() {
        let (mut engine, _mem, _path) = two_direct_reads_pushed("at-push", Duration::ZERO);
        // Both reads were handed to the kernel (none left on the submission ring) before
        // any submit.
        assert!(engine.ring.submission().is_empty());
        let mut done = Vec::new();
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        assert!(done.len() == 2 && done.iter().all(|c| c.result == 4096), "{done:?}");
    }

    #[test]
    fn with_cache_writeback_the_transfers_of_a_kick_start_together_at_submit() {
        let (disk, _inspect) = memory_disk(64, false);
        let mut engine = Uring::new(&Arc::new(disk)).unwrap();
        let mut bufs = [[0u8; 512]; 2];
        let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iovec(b)).collect();
        for (tag, iov) in iovecs.iter().enumerate() {
            let transfer =
                Transfer { tag: tag as u16, op: IoOp::Read, offset: 512 * tag as u64, iovecs: iov, count: 1 };
            // SAFETY: `bufs` and `iovecs` outlive the waits below.
            unsafe { engine.push(transfer) }.unwrap();
        }
        // The first read was held (alone in flight); the second put both on the ring, and
        // there they wait for the submit.
        assert_eq!(engine.ring.submission().len(), 2);
        engine.submit().unwrap();
        let mut done = Vec::new();
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        assert!(done.len() == 2 && done.iter().all(|c| c.result == 512), "{done:?}");
    }

    /// One `wait_or` whose question always says yes: the completions it returned and how
    /// many times it asked.
    fn wait_offering_more_work(engine: &mut Uring) -> (Vec<Completion>, usize) {
        let mut done = Vec::new();
        let mut asked = 0;
        engine
            .wait_or(&mut done, &mut || {
                asked += 1;
                true
            })
            .unwrap();
        (done, asked)
    }

    #[test]
    fn a_look_for_a_completion_ends_as_soon_as_more_work_is_offered() {
        // The look ends at its first question with both transfers still in flight: an
        // O_DIRECT read takes tens of microseconds, and the look begins within one of the
        // submission. A test thread the host deschedules in between finds them done; that
        // is why there are a few attempts. A look that ignored the question would wait for
        // a read every time.
        let mut seen = Vec::new();
        for attempt in 0..5 {
            let (mut engine, _mem, path) =
                two_direct_reads(&format!("more-work-{attempt}"), Duration::from_secs(1));
            let (mut done, asked) = wait_offering_more_work(&mut engine);
            let outcome = (asked, done.len(), engine.outstanding());
            while engine.outstanding() > 0 {
                engine.wait(&mut done).unwrap();
            }
            assert!(done.len() == 2 && done.iter().all(|c| c.result == 4096), "{done:?}");
            drop((engine, path));
            if outcome == (1, 0, 2) {
                return;
            }
            seen.push(outcome);
        }
        panic!("the look never ended at the offer of more work: (asked, done, in flight) {seen:?}");
    }

    #[test]
    fn without_a_look_more_work_is_never_asked_and_the_wait_returns_a_completion() {
        let (mut engine, _mem, _path) = two_direct_reads("no-look", Duration::ZERO);
        let (mut done, asked) = wait_offering_more_work(&mut engine);
        assert_eq!(asked, 0);
        assert!(!done.is_empty());
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        assert_eq!(done.len(), 2);
    }

    /// Writes 16 sectors as 16 transfers in one batch, syncs, reads them back in one batch.
    fn batch_round_trip(kind: EngineKind) {
        let (disk, inspect) = memory_disk(64, false);
        let disk = Arc::new(disk);
        let mut engine = open(&disk, kind).unwrap();
        // Completions found by looking at the ring are reaped as those waited for.
        engine.set_poll_limit(COMPLETION_POLL_LIMIT);
        let mut data: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i.wrapping_mul(17) | 1; 512]).collect();
        let iovecs: Vec<libc::iovec> = data.iter_mut().map(|d| iovec(d)).collect();
        for (tag, iov) in iovecs.iter().enumerate() {
            let transfer = Transfer {
                tag: tag as u16,
                op: IoOp::Write,
                offset: 512 * tag as u64,
                iovecs: iov,
                count: 1,
            };
            // SAFETY: `data` and `iovecs` outlive the waits below.
            unsafe { engine.push(transfer) }.unwrap();
        }
        assert_eq!(engine.outstanding(), 16);
        engine.submit().unwrap();
        let mut done = Vec::new();
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        let mut tags: Vec<u16> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..16).collect::<Vec<_>>());
        assert!(done.iter().all(|c| c.result == 512), "{done:?}");
        // SAFETY: a sync has no buffers.
        unsafe {
            engine.push(Transfer { tag: 3, op: IoOp::Sync, offset: 0, iovecs: std::ptr::null(), count: 0 })
        }
        .unwrap();
        done.clear();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 3, result: 0 }]);
        for (tag, expected) in data.iter().enumerate() {
            let mut on_disk = [0u8; 512];
            inspect.read_exact_at(&mut on_disk, 512 * tag as u64).unwrap();
            assert_eq!(&on_disk[..], &expected[..], "sector {tag}");
        }

        let mut back = vec![0u8; 16 * 512];
        let iovecs: Vec<libc::iovec> = back.chunks_mut(512).map(iovec).collect();
        for (tag, iov) in iovecs.iter().enumerate() {
            let transfer =
                Transfer { tag: tag as u16, op: IoOp::Read, offset: 512 * tag as u64, iovecs: iov, count: 1 };
            // SAFETY: `back` and `iovecs` outlive the waits below.
            unsafe { engine.push(transfer) }.unwrap();
        }
        done.clear();
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        assert_eq!(done.len(), 16);
        assert!(back.chunks(512).zip(&data).all(|(a, b)| a == &b[..]));
        // A read past the end of the image moves nothing.
        let mut beyond = [0u8; 512];
        let iov = iovec(&mut beyond);
        // SAFETY: `beyond` outlives the wait.
        unsafe { engine.push(Transfer { tag: 0, op: IoOp::Read, offset: 64 * 512, iovecs: &iov, count: 1 }) }
            .unwrap();
        done.clear();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 0, result: 0 }]);
        // Tags are bounded.
        // SAFETY: refused before anything is queued.
        let refused = unsafe {
            engine.push(Transfer {
                tag: MAX_IN_FLIGHT as u16,
                op: IoOp::Sync,
                offset: 0,
                iovecs: std::ptr::null(),
                count: 0,
            })
        };
        assert!(refused.is_err());
    }

    #[test]
    fn io_uring_moves_a_batch_and_completes_every_tag() {
        batch_round_trip(EngineKind::IoUring);
    }

    #[test]
    fn the_thread_pool_moves_a_batch_and_completes_every_tag() {
        batch_round_trip(EngineKind::Threads);
    }

    /// With cache=writeback a write is done when `push` returns (io_uring would hand it
    /// to a kernel worker on ext4); the wait returns it without blocking.
    #[test]
    fn io_uring_runs_writes_through_the_page_cache_at_once() {
        let (disk, inspect) = memory_disk(8, false);
        assert_eq!(disk.cache(), CacheMode::Writeback);
        let mut engine = Uring::new(&Arc::new(disk)).unwrap();
        let mut data = vec![0x5au8; 1024];
        let iov = iovec(&mut data);
        // SAFETY: `data` outlives the wait below.
        unsafe { engine.push(Transfer { tag: 9, op: IoOp::Write, offset: 1024, iovecs: &iov, count: 1 }) }
            .unwrap();
        // Not submitted, yet already in the file.
        let mut on_disk = [0u8; 1024];
        inspect.read_exact_at(&mut on_disk, 1024).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x5a));
        assert_eq!(engine.outstanding(), 1);
        let mut done = Vec::new();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 9, result: 1024 }]);
        assert_eq!(engine.outstanding(), 0);
    }

    /// A small transfer pushed while nothing is in flight waits in `push` and runs with one
    /// system call in `submit` (or `wait`); one pushed behind it sends both to the ring; a
    /// large transfer and a sync always go through the ring.
    #[test]
    fn io_uring_runs_a_lone_small_transfer_in_submit_and_rings_the_rest() {
        let (disk, inspect) = memory_disk(512, false);
        let pattern: Vec<u8> = (0..512 * 512).map(|i| (i % 251) as u8).collect();
        inspect.write_all_at(&pattern, 0).unwrap();
        let mut engine = Uring::new(&Arc::new(disk)).unwrap();
        let mut bufs = vec![vec![0u8; 512]; 4];
        let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iovec(b)).collect();
        let read = |tag: usize| Transfer {
            tag: tag as u16,
            op: IoOp::Read,
            offset: 512 * tag as u64,
            iovecs: &iovecs[tag],
            count: 1,
        };
        let mut done = Vec::new();

        // SAFETY: `bufs` and `iovecs` outlive every wait below.
        unsafe { engine.push(read(0)) }.unwrap();
        assert!(engine.ring.submission().is_empty(), "a lone transfer is held");
        engine.submit().unwrap();
        assert_eq!(engine.finished, [Completion { tag: 0, result: 512 }], "it ran in submit");
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 0, result: 512 }]);

        // SAFETY: as above.
        unsafe { engine.push(read(1)) }.unwrap();
        // SAFETY: as above.
        unsafe { engine.push(read(2)) }.unwrap();
        assert_eq!(engine.ring.submission().len(), 2, "the held transfer joins the second");
        assert!(engine.held.is_none());
        engine.submit().unwrap();
        done.clear();
        while engine.outstanding() > 0 {
            engine.wait(&mut done).unwrap();
        }
        done.sort_unstable_by_key(|c| c.tag);
        assert_eq!(done, [Completion { tag: 1, result: 512 }, Completion { tag: 2, result: 512 }]);

        // Waited for without a submit, a held transfer still runs.
        // SAFETY: as above.
        unsafe { engine.push(read(3)) }.unwrap();
        done.clear();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 3, result: 512 }]);
        assert!(bufs.iter().enumerate().all(|(tag, b)| b[..] == pattern[512 * tag..512 * (tag + 1)]));

        let mut large = vec![0u8; (HELD_TRANSFER_MAX as usize) * 2];
        let iov = iovec(&mut large);
        // SAFETY: `large` outlives the wait below.
        unsafe { engine.push(Transfer { tag: 5, op: IoOp::Read, offset: 0, iovecs: &iov, count: 1 }) }
            .unwrap();
        assert_eq!(engine.ring.submission().len(), 1, "a large transfer is not held");
        done.clear();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 5, result: large.len() as i64 }]);
        assert_eq!(large[..], pattern[..large.len()]);
        // SAFETY: a sync has no buffers.
        unsafe {
            engine.push(Transfer { tag: 6, op: IoOp::Sync, offset: 0, iovecs: std::ptr::null(), count: 0 })
        }
        .unwrap();
        assert_eq!(engine.ring.submission().len(), 1, "a sync is not held");
        done.clear();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 6, result: 0 }]);
    }

    #[test]
    fn the_io_uring_ring_refuses_other_operations() {
        let (disk, _) = memory_disk(8, false);
        let mut engine = Uring::new(&Arc::new(disk)).unwrap();
        // A NOP is not on the restriction list: the kernel answers EACCES.
        let entry = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP has no buffers.
        unsafe { engine.ring.submission().push(&entry) }.unwrap();
        engine.outstanding += 1;
        engine.submit().unwrap();
        let mut done = Vec::new();
        engine.wait(&mut done).unwrap();
        assert_eq!(done, [Completion { tag: 7, result: -i64::from(libc::EACCES) }]);
    }
}
