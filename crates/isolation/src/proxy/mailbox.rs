//! The proxy's transport: one page of shared memory per partition, two eventfds as its
//! doorbells, and the proxy socket for liveness.
//!
//! A register access forwarded over a socket costs a send, a wake-up of the partition, its
//! answer and a wake-up of the vCPU: two trips through the scheduler, which on a quiet
//! machine cost more than the exit itself. Here the request and its answer are frames of
//! the [`wire`](super::wire) protocol written into a page both processes map, published
//! by a sequence number. Each side spins on the other's number for a bounded time before
//! it sleeps, so a guest's burst of accesses (a console line: a status read and a data
//! write per byte) is served without a wake-up, at the cost of a partition spinning for
//! at most [`PARTITION_SPIN`] after its last request. Only in a burst: a request that came
//! alone (the first, or after a pause of more than [`BURST_GAP`]) is served and the
//! partition sleeps, leaving its CPU to others, such as whoever reads the byte the guest
//! just wrote (on a two-CPU host, the reader of a lone console byte otherwise waited
//! behind the vCPU, its other CPU taken by the spin, for a scheduler slice: 2-5 ms).
//!
//! A side that sleeps says so in the page and waits on its doorbell, an eventfd the other
//! side writes when it publishes and sees it asleep. The socket carries liveness: a
//! partition that dies hangs up, and the hypervisor's wait ends at once.
//!
//! Spinning only pays when the two sides run on different CPUs. The scheduler may well
//! wake the partition on the CPU of the vCPU that woke it, and then keep them there
//! (the other CPU idle, each waiting for the other to stop spinning); on a two-CPU host
//! that happened in about one run in three, and made an access ten times slower. So the
//! hypervisor writes the CPU it runs on into the page with each request, and a partition
//! that finds itself on that CPU moves off it ([`PartitionEnd::next_request`]).
//!
//! The hypervisor creates the page (a sealed memfd: nobody can shrink it under the other)
//! and trusts nothing in it: an answer is copied out (bounded by the area) before it is
//! decoded, and every wait ends by a deadline.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::liveness::{Liveness, ThreadState};
use crate::supervisor::eventfd_fd;

use super::wire::MAX_FRAME;

/// How long the hypervisor spins for an answer from a partition that was awake.
pub const ANSWER_SPIN: Duration = Duration::from_micros(20);

/// How long a partition spins for the next request after serving one of a burst, before it
/// sleeps.
pub const PARTITION_SPIN: Duration = Duration::from_micros(200);

/// A request that comes within this long of the one before is part of a burst: the
/// partition spins for the next one after serving it. A burst's accesses come an exit
/// apart (10-60 µs on the build machines), so its second request is the only one that
/// wakes the partition.
pub const BURST_GAP: Duration = Duration::from_millis(1);

/// Bytes of one frame area: a frame with its length word.
pub(crate) const AREA: usize = (4 + MAX_FRAME).next_multiple_of(64);

/// Bytes of the shared memory (one page).
const PAGE_SIZE: usize = 4096;

/// The shared page. Every field is an atomic: the other process may write any of them at
/// any time.
#[repr(C, align(64))]
struct Page {
    /// Written by the hypervisor: the number of the request in `request`.
    request_seq: AtomicU32,
    /// Bytes of the frame in `request`.
    request_len: AtomicU32,
    /// Written by the partition, only when it changes (a store takes the line from the
    /// hypervisor even when it writes the same value): it sleeps and needs its doorbell
    /// rung to see the next request.
    partition_asleep: AtomicU32,
    /// Written by the hypervisor: the CPU the request was published from.
    hypervisor_cpu: AtomicU32,
    _hypervisor_line: [u32; 12],
    /// Written by the partition: the number of the request `answer` answers.
    answer_seq: AtomicU32,
    /// Bytes of the frame in `answer`.
    answer_len: AtomicU32,
    /// Written by the hypervisor: it sleeps and needs its doorbell rung to see the answer.
    hypervisor_asleep: AtomicU32,
    _partition_line: [u32; 13],
    request: [AtomicU8; AREA],
    answer: [AtomicU8; AREA],
}

const _: () = assert!(size_of::<Page>() <= PAGE_SIZE);

/// The page mapped into this process.
struct Mapping(NonNull<Page>);

// SAFETY: the mapping is plain shared memory made only of atomics; any thread may use it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: maps PAGE_SIZE bytes of `fd` shared, at an address the kernel picks;
        // nothing else lives there. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<Page>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self(page))
    }

    fn page(&self) -> &Page {
        // SAFETY: the mapping is PAGE_SIZE bytes, page-aligned, lives as long as `self`,
        // and a Page (atomics only, no invalid bit pattern) fits in it.
        unsafe { self.0.as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no reference outlives `self`.
        unsafe { libc::munmap(self.0.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// Creates the page's memfd, sized and sealed.
fn create_page() -> io::Result<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"splitvisor-proxy-page".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and belongs to nobody else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Sized by writing it (not ftruncate, which the hypervisor's filters would then have
    // to allow on every fd, disk images included).
    std::io::Write::write_all(&mut file, &[0u8; PAGE_SIZE])?;
    let fd = OwnedFd::from(file);
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: adds seals to the memfd this function owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn store_bytes(area: &[AtomicU8; AREA], bytes: &[u8]) {
    for (cell, &byte) in area.iter().zip(bytes) {
        cell.store(byte, Ordering::Relaxed);
    }
}

/// Copies the first `len` bytes of `area` (at most all of it) into `into`.
fn load_bytes(area: &[AtomicU8; AREA], len: u32, into: &mut Vec<u8>) {
    let len = (len as usize).min(AREA);
    into.clear();
    into.extend(area[..len].iter().map(|cell| cell.load(Ordering::Relaxed)));
}

/// Rings a doorbell.
fn ring(doorbell: &EventFd) -> io::Result<()> {
    match doorbell.write(1) {
        // The counter is full: it is rung already.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other,
    }
}

/// Waits until `doorbell` rings (and resets it) or `peer` hangs up, at most `timeout`
/// (`None`: for as long as it takes). An error when the peer hung up.
fn wait(doorbell: &EventFd, peer: &UnixStream, timeout: Option<Duration>) -> io::Result<()> {
    let millis = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    let mut fds = [
        libc::pollfd { fd: doorbell.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: peer.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: two valid pollfds, a bounded (or, for a partition, hang-up-ended) wait.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(error) };
    }
    if fds[0].revents != 0 {
        let _ = doorbell.read();
    }
    if fds[1].revents != 0 {
        check_alive(peer)?;
    }
    Ok(())
}

/// Nothing travels on the socket but its end: any bytes a peer sends are dropped (a
/// bounded number per call), its hang-up is an error.
fn check_alive(peer: &UnixStream) -> io::Result<()> {
    let mut junk = [0u8; 256];
    // SAFETY: receives into a valid buffer of its length, without blocking.
    let got =
        unsafe { libc::recv(peer.as_raw_fd(), junk.as_mut_ptr().cast(), junk.len(), libc::MSG_DONTWAIT) };
    match got {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        n if n > 0 => Ok(()),
        _ => {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(error),
            }
        }
    }
}

/// The hypervisor's end: the proxy socket, the page and the doorbells, for one partition.
pub struct ProxyConnection {
    stream: UnixStream,
    page_fd: OwnedFd,
    mapping: Mapping,
    /// Rung by the hypervisor for a sleeping partition.
    to_partition: EventFd,
    /// Rung by the partition for a sleeping hypervisor.
    to_hypervisor: EventFd,
    seq: u32,
    /// The last answer, copied out of the page (kept to save an allocation per access).
    answer: Vec<u8>,
    /// Whether the partition is still at work when its answer is late; without it, a late
    /// answer is a hung partition.
    liveness: Option<Liveness>,
}

impl std::fmt::Debug for ProxyConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConnection").field("stream", &self.stream).field("seq", &self.seq).finish()
    }
}

/// How long [`ProxyConnection::call`] waits for a partition's answer.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// When a partition that has not answered is taken for hung...
    pub answer: Instant,
    /// ...unless it is still at work (runnable, or in the kernel: only slow, on a host whose
    /// CPUs are busy), which is waited for until this (no earlier than `answer`).
    pub at_work: Instant,
}

impl Deadlines {
    /// An answer within `answer` from now, or within `at_work` from now while the partition
    /// is at work.
    pub fn after(answer: Duration, at_work: Duration) -> Self {
        let now = Instant::now();
        Self { answer: now + answer, at_work: now + at_work.max(answer) }
    }
}

/// How often a late partition that is at work is looked at again.
const LIVENESS_LOOK: Duration = Duration::from_millis(20);

impl ProxyConnection {
    /// A connection over `stream` with a new page and doorbells; hand the other end of
    /// `stream` and [`partition_fds`](Self::partition_fds) to the partition.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let page_fd = create_page()?;
        let mapping = Mapping::new(page_fd.as_fd())?;
        let to_partition = EventFd::new(EFD_NONBLOCK)?;
        let to_hypervisor = EventFd::new(EFD_NONBLOCK)?;
        Ok(Self {
            stream,
            page_fd,
            mapping,
            to_partition,
            to_hypervisor,
            seq: 0,
            answer: Vec::with_capacity(AREA),
            liveness: None,
        })
    }

    /// Tells this connection how to see whether its partition is still at work
    /// ([`Partition::take_liveness`](crate::partition::Partition::take_liveness)): an answer
    /// late for its deadline is then waited for, up to the call's patience, while the
    /// partition is runnable or in the kernel.
    pub fn watch(&mut self, liveness: Option<Liveness>) {
        self.liveness = liveness;
    }

    /// A connected pair: the hypervisor's end and the partition's (in one process, for
    /// tests and fuzzing).
    pub fn pair() -> io::Result<(Self, PartitionEnd)> {
        let (ours, theirs) = UnixStream::pair()?;
        let connection = Self::new(ours)?;
        let partition = connection.partition_end(theirs)?;
        Ok((connection, partition))
    }

    /// What the partition needs besides its end of the socket, in the order
    /// [`PartitionEnd::new`] takes them: the page's memfd, its doorbell, the hypervisor's.
    pub fn partition_fds(&self) -> [BorrowedFd<'_>; 3] {
        [self.page_fd.as_fd(), eventfd_fd(&self.to_partition), eventfd_fd(&self.to_hypervisor)]
    }

    /// The partition's end of this connection over `stream`, in this process.
    pub fn partition_end(&self, stream: UnixStream) -> io::Result<PartitionEnd> {
        PartitionEnd::new(
            stream,
            self.page_fd.as_fd(),
            self.to_partition.try_clone()?,
            self.to_hypervisor.try_clone()?,
        )
    }

    /// Ends the connection: the partition sees the hang-up.
    pub fn hang_up(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Publishes the frame `request` and returns the answer's bytes (at most one frame
    /// area, copied out of the page, not yet decoded), or an error when the partition hung
    /// up, or did not answer by `deadlines.answer` and is not at work (see
    /// [`watch`](Self::watch)), or not by `deadlines.at_work`.
    pub fn call(&mut self, request: &[u8], deadlines: Deadlines) -> io::Result<&[u8]> {
        if request.len() > AREA {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request larger than the frame area"));
        }
        let page = self.mapping.page();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        store_bytes(&page.request, request);
        page.request_len.store(request.len() as u32, Ordering::Relaxed);
        page.hypervisor_cpu.store(current_cpu(), Ordering::Relaxed);
        page.request_seq.store(seq, Ordering::SeqCst);
        let partition_asleep = page.partition_asleep.load(Ordering::SeqCst) != 0;
        if partition_asleep {
            ring(&self.to_partition)?;
        }
        let answered = || page.answer_seq.load(Ordering::Acquire) == seq;
        // A partition that was awake answers within microseconds; one that sleeps needs
        // a wake-up, during which spinning would only take the CPU it wakes on.
        if !partition_asleep {
            let spin_end = Instant::now() + ANSWER_SPIN;
            while !answered() && Instant::now() < spin_end {
                std::hint::spin_loop();
            }
        }
        if !answered() {
            let result = self.sleep_until(seq, deadlines);
            page.hypervisor_asleep.store(0, Ordering::Relaxed);
            result?;
        }
        load_bytes(&page.answer, page.answer_len.load(Ordering::Relaxed), &mut self.answer);
        Ok(&self.answer)
    }

    fn sleep_until(&self, seq: u32, deadlines: Deadlines) -> io::Result<()> {
        let page = self.mapping.page();
        page.hypervisor_asleep.store(1, Ordering::SeqCst);
        let answered = || page.answer_seq.load(Ordering::SeqCst) == seq;
        let mut deadline = deadlines.answer;
        while !answered() {
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Late: a partition still at work is only slow (its host's CPUs are busy);
                // look again after a while, up to the patience.
                let at_work =
                    self.liveness.as_ref().and_then(Liveness::state).is_some_and(ThreadState::at_work);
                let now = Instant::now();
                if !at_work || now >= deadlines.at_work {
                    // It may have answered and gone back to sleep since the last look.
                    if answered() {
                        return Ok(());
                    }
                    let why = match at_work {
                        true => "the partition was still at work but did not answer in time",
                        false => "the partition did not answer in time",
                    };
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                deadline = (now + LIVENESS_LOOK).min(deadlines.at_work);
                left = deadline - now;
                log::debug!("the partition's answer is late, but it is at work: waiting on");
            }
            if let Err(e) = wait(&self.to_hypervisor, &self.stream, Some(left)) {
                // An answer published just before the partition hung up still counts.
                return if answered() { Ok(()) } else { Err(e) };
            }
        }
        Ok(())
    }
}

/// The CPU the calling thread runs on (`u32::MAX` when unknown).
fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu takes nothing and returns a CPU number or -1 (glibc reads it
    // from the thread's rseq area or the vDSO).
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(u32::MAX)
}

/// Moves the calling thread off `cpu`, onto the rest of `allowed`, if that leaves it
/// anywhere to run; whether it moved.
fn move_off(allowed: &libc::cpu_set_t, cpu: u32) -> bool {
    let index = cpu as usize;
    if index >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `index` is below CPU_SETSIZE, the bits a set holds.
    if !unsafe { libc::CPU_ISSET(index, allowed) } {
        return false;
    }
    let mut set = *allowed;
    // SAFETY: as above.
    unsafe { libc::CPU_CLR(index, &mut set) };
    // SAFETY: counts the bits of a valid set.
    if unsafe { libc::CPU_COUNT(&set) } == 0 {
        return false;
    }
    // SAFETY: sets the calling thread's affinity to a valid, non-empty set of its size.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The CPUs the calling thread may run on, if it can tell.
fn allowed_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: fills `set`, whose size is passed, for the calling thread.
    let got = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    (got == 0).then_some(set)
}

/// The partition's end: takes requests from the page and publishes answers.
pub struct PartitionEnd {
    stream: UnixStream,
    mapping: Mapping,
    own_doorbell: EventFd,
    hypervisor_doorbell: EventFd,
    /// The number of the last request taken.
    seq: u32,
    /// The last request, copied out of the page.
    request: Vec<u8>,
    /// The CPUs the partition was started on, and the one it keeps off (the vCPU's).
    allowed: Option<libc::cpu_set_t>,
    kept_off: Option<u32>,
    /// When the last request was taken, and whether it came within [`BURST_GAP`] of the
    /// one before (only then does the partition spin for the next).
    last_request: Option<Instant>,
    in_burst: bool,
}

impl PartitionEnd {
    /// The end over `stream`, mapping the page `page_fd` (which may be closed afterwards:
    /// the mapping stays), woken by `own_doorbell`, waking the hypervisor with
    /// `hypervisor_doorbell`.
    pub fn new(
        stream: UnixStream,
        page_fd: BorrowedFd<'_>,
        own_doorbell: EventFd,
        hypervisor_doorbell: EventFd,
    ) -> io::Result<Self> {
        // SAFETY: fstat fills a stat buffer for a valid fd.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `stat` is a valid, writable buffer.
        if unsafe { libc::fstat(page_fd.as_raw_fd(), &mut stat) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if (stat.st_size as u64) < PAGE_SIZE as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the proxy page is too small"));
        }
        let mapping = Mapping::new(page_fd)?;
        let seq = mapping.page().request_seq.load(Ordering::Acquire);
        let allowed = allowed_cpus();
        let request = Vec::with_capacity(AREA);
        Ok(Self {
            stream,
            mapping,
            own_doorbell,
            hypervisor_doorbell,
            seq,
            request,
            allowed,
            kept_off: None,
            last_request: None,
            in_burst: false,
        })
    }

    /// The next request's frame bytes (copied out of the page): spins for
    /// [`PARTITION_SPIN`] if the last one was part of a burst ([`BURST_GAP`]), then sleeps
    /// until woken. `None` once the hypervisor hung up.
    ///
    /// Before its first request it sleeps at once: a partition has just become ready, and
    /// the VM it serves is still being set up (or runs on without this device for now, a
    /// spare). Spinning then would only take a CPU from the hypervisor, which a host with
    /// two had to share with two partitions spinning: 0.25 ms more before the VM's start.
    pub fn next_request(&mut self) -> io::Result<Option<&[u8]>> {
        let page = self.mapping.page();
        let spin = if self.in_burst { PARTITION_SPIN } else { Duration::ZERO };
        let spin_end = Instant::now() + spin;
        loop {
            let seq = page.request_seq.load(Ordering::Acquire);
            if seq != self.seq {
                let now = Instant::now();
                self.in_burst = self.last_request.is_some_and(|last| now - last <= BURST_GAP);
                self.last_request = Some(now);
                if page.partition_asleep.load(Ordering::Relaxed) != 0 {
                    page.partition_asleep.store(0, Ordering::Relaxed);
                }
                self.seq = seq;
                let theirs = page.hypervisor_cpu.load(Ordering::Relaxed);
                if theirs == current_cpu()
                    && self.kept_off != Some(theirs)
                    && self.allowed.as_ref().is_some_and(|allowed| move_off(allowed, theirs))
                {
                    self.kept_off = Some(theirs);
                }
                load_bytes(&page.request, page.request_len.load(Ordering::Relaxed), &mut self.request);
                return Ok(Some(&self.request));
            }
            if Instant::now() < spin_end {
                std::hint::spin_loop();
                continue;
            }
            page.partition_asleep.store(1, Ordering::SeqCst);
            if page.request_seq.load(Ordering::SeqCst) != self.seq {
                continue;
            }
            match wait(&self.own_doorbell, &self.stream, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the next [`next_request`](Self::next_request) spins before it sleeps.
    #[cfg(test)]
    fn spins_next(&self) -> bool {
        self.in_burst
    }

    /// Publishes `answer` (frame bytes) as the answer to the last request taken.
    pub fn answer(&mut self, answer: &[u8]) -> io::Result<()> {
        self.publish(answer, answer.len() as u32)
    }

    /// Publishes `bytes` with `claimed_len` in the length field (a hostile partition's
    /// answer, for fuzzing).
    pub(crate) fn publish(&mut self, bytes: &[u8], claimed_len: u32) -> io::Result<()> {
        let page = self.mapping.page();
        store_bytes(&page.answer, bytes);
        page.answer_len.store(claimed_len, Ordering::Relaxed);
        page.answer_seq.store(self.seq, Ordering::SeqCst);
        if page.hypervisor_asleep.load(Ordering::SeqCst) != 0 {
            ring(&self.hypervisor_doorbell)?;
        }
        Ok(())
    }

    /// Waits (at most `timeout`) for the hypervisor to hang up.
    pub(crate) fn wait_hang_up(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
            if wait(&self.own_doorbell, &self.stream, Some(left)).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_cross_in_order_awake_or_asleep() {
        let (mut hypervisor, mut partition) = ProxyConnection::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut served = 0;
            while let Some(request) = partition.next_request().unwrap() {
                let mut answer = request.to_vec();
                answer.reverse();
                partition.answer(&answer).unwrap();
                served += 1;
            }
            served
        });
        for i in 0..200u32 {
            if i % 50 == 0 {
                // Long enough for the partition to go to sleep: a token must wake it.
                std::thread::sleep(PARTITION_SPIN * 5);
            }
            let request = i.to_le_bytes();
            let answer = hypervisor
                .call(&request, Deadlines::after(Duration::from_secs(10), Duration::from_secs(10)))
                .unwrap();
            let mut expected = request.to_vec();
            expected.reverse();
            assert_eq!(answer, expected);
        }
        hypervisor.hang_up();
        assert_eq!(server.join().unwrap(), 200);
    }

    /// CPU time the calling thread has used.
    fn thread_cpu_time() -> Duration {
        // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
        let mut now: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: a valid clock and a valid, writable timespec.
        assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) }, 0);
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    #[test]
    fn a_partition_sleeps_until_its_first_request_and_spins_only_within_a_burst() {
        let (mut hypervisor, mut partition) = ProxyConnection::pair().unwrap();
        let server = std::thread::spawn(move || {
            // Per request: whether the wait for it spun first, and the CPU time it took.
            let mut waits = Vec::new();
            loop {
                let spins = partition.spins_next();
                let before = thread_cpu_time();
                let Some(request) = partition.next_request().unwrap() else { break };
                let answer = request.to_vec();
                waits.push((spins, thread_cpu_time() - before));
                partition.answer(&answer).unwrap();
            }
            waits
        });
        let deadlines = || Deadlines::after(Duration::from_secs(10), Duration::from_secs(10));
        // Long enough for a spin to have run out many times over, and to end a burst.
        let pause = || std::thread::sleep((PARTITION_SPIN * 20).max(BURST_GAP * 5));
        for request in [&b"first"[..], b"alone"] {
            pause();
            assert_eq!(hypervisor.call(request, deadlines()).unwrap(), request);
        }
        // Two requests back to back, then one after a pause. Both calls of a burst within
        // BURST_GAP put the partition's takes of the two within it too; a host too busy
        // for that makes another try.
        let mut bursts = 0;
        loop {
            pause();
            bursts += 1;
            let sent = Instant::now();
            assert_eq!(hypervisor.call(b"burst", deadlines()).unwrap(), b"burst");
            assert_eq!(hypervisor.call(b"burst", deadlines()).unwrap(), b"burst");
            let quick = sent.elapsed() < BURST_GAP;
            pause();
            assert_eq!(hypervisor.call(b"after", deadlines()).unwrap(), b"after");
            if quick {
                break;
            }
            assert!(bursts < 100, "no two calls within {BURST_GAP:?} in {bursts} tries");
        }
        hypervisor.hang_up();
        let waits = server.join().unwrap();
        // Before the first request, after it (it came alone), and after one that came alone:
        // no spin, and hardly any CPU time (a sleep is a few system calls; a spin takes
        // PARTITION_SPIN unless preempted).
        for (k, (spun, cpu)) in waits[..3].iter().enumerate() {
            assert!(!spun, "wait {k}: a spin");
            assert!(*cpu < PARTITION_SPIN, "wait {k}: {cpu:?} of CPU time");
        }
        // After the second request of the last burst: a spin.
        let (spun, _) = waits[waits.len() - 1];
        assert!(spun, "no spin after a burst ({bursts} tries): {waits:?}");
    }

    #[test]
    fn a_silent_partition_times_out_and_a_dead_one_is_seen_at_once() {
        let (mut hypervisor, partition) = ProxyConnection::pair().unwrap();
        let started = Instant::now();
        let error = hypervisor
            .call(b"x", Deadlines::after(Duration::from_millis(50), Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(partition);
        let error = hypervisor
            .call(b"y", Deadlines::after(Duration::from_secs(60), Duration::from_secs(60)))
            .unwrap_err();
        assert_ne!(error.kind(), io::ErrorKind::TimedOut, "the hang-up ends the wait");
    }

    /// A partition served by a thread of this process that takes `request` and then, before
    /// it answers, spins (at work) or sleeps (not) for `late`; the connection watches the
    /// thread's liveness if `watched`.
    fn late_partition(
        late: Duration,
        spins: bool,
        watched: bool,
    ) -> (ProxyConnection, std::thread::JoinHandle<()>) {
        let (mut hypervisor, mut partition) = ProxyConnection::pair().unwrap();
        let (tid, tid_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid.send(unsafe { libc::gettid() } as u32).unwrap();
            let Ok(Some(_)) = partition.next_request() else { return };
            let until = Instant::now() + late;
            while Instant::now() < until {
                match spins {
                    true => std::hint::spin_loop(),
                    false => std::thread::sleep(until - Instant::now()),
                }
            }
            let _ = partition.answer(b"late");
            partition.wait_hang_up(Duration::from_secs(10));
        });
        let tid = tid_rx.recv().unwrap();
        if watched {
            hypervisor.watch(Some(crate::liveness::Liveness::of_thread(std::process::id(), tid).unwrap()));
        }
        (hypervisor, server)
    }

    #[test]
    fn a_late_partition_still_at_work_is_waited_for_up_to_the_patience() {
        let short = Duration::from_millis(100);
        let (mut hypervisor, server) = late_partition(Duration::from_millis(400), true, true);
        let started = Instant::now();
        let answer = hypervisor.call(b"q", Deadlines::after(short, Duration::from_secs(20))).unwrap();
        assert_eq!(answer, b"late");
        assert!(started.elapsed() >= Duration::from_millis(400));
        hypervisor.hang_up();
        server.join().unwrap();

        // At work for longer than the patience: given up at the patience.
        let (mut hypervisor, server) = late_partition(Duration::from_secs(3), true, true);
        let started = Instant::now();
        let error = hypervisor.call(b"q", Deadlines::after(short, Duration::from_millis(500))).unwrap_err();
        let took = started.elapsed();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("still at work"), "{error}");
        assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(3), "{took:?}");
        hypervisor.hang_up();
        server.join().unwrap();
    }

    #[test]
    fn a_late_partition_asleep_or_unwatched_is_given_up_at_the_answer_deadline() {
        let short = Duration::from_millis(100);
        for (spins, watched) in [(false, true), (true, false)] {
            let (mut hypervisor, server) = late_partition(Duration::from_millis(1500), spins, watched);
            let started = Instant::now();
            let error = hypervisor.call(b"q", Deadlines::after(short, Duration::from_secs(20))).unwrap_err();
            let took = started.elapsed();
            assert_eq!(error.kind(), io::ErrorKind::TimedOut, "spins {spins} watched {watched}");
            assert!(
                took >= short && took < Duration::from_millis(1500),
                "spins {spins} watched {watched}: {took:?}"
            );
            hypervisor.hang_up();
            server.join().unwrap();
        }
    }

    #[test]
    fn a_lying_length_is_bounded_by_the_area() {
        let (mut hypervisor, mut partition) = ProxyConnection::pair().unwrap();
        let server = std::thread::spawn(move || {
            partition.next_request().unwrap().unwrap();
            partition.publish(b"abc", u32::MAX).unwrap();
            partition.wait_hang_up(Duration::from_secs(10));
        });
        let answer = hypervisor
            .call(b"q", Deadlines::after(Duration::from_secs(10), Duration::from_secs(10)))
            .unwrap();
        assert_eq!(answer.len(), AREA);
        assert_eq!(&answer[..3], b"abc");
        hypervisor.hang_up();
        server.join().unwrap();
    }

    #[test]
    fn the_partition_cannot_resize_the_page() {
        let (hypervisor, _partition) = ProxyConnection::pair().unwrap();
        let handed = std::fs::File::from(hypervisor.partition_fds()[0].try_clone_to_owned().unwrap());
        assert_eq!(handed.set_len(0).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
}
