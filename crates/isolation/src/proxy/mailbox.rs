//! The proxy's transport: one page of shared memory per partition, with the proxy socket
//! as its doorbell.
//!
//! A register access forwarded over a socket costs a send, a wake-up of the partition, its
//! answer and a wake-up of the vCPU: two trips through the scheduler, which on a quiet
//! machine cost more than the exit itself. Here the request and its answer are frames of
//! the [`wire`](super::wire) protocol written into a page both processes map, published
//! by a sequence number. Each side spins on the other's number for a bounded time before
//! it sleeps, so a guest's burst of accesses (a console line: a status read and a data
//! write per byte) is served without a wake-up, at the cost of a partition spinning for
//! at most [`PARTITION_SPIN`] after its last request.
//!
//! A side that sleeps says so in the page and waits for a one-byte token on the socket;
//! the other sends one when it publishes and sees it asleep. The socket also carries
//! liveness: a partition that dies hangs up, and the hypervisor's wait ends at once.
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

use super::wire::MAX_FRAME;

/// How long the hypervisor spins for an answer from a partition that was awake.
pub const ANSWER_SPIN: Duration = Duration::from_micros(100);

/// How long a partition spins for the next request after serving one, before it sleeps.
pub const PARTITION_SPIN: Duration = Duration::from_micros(200);

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
    /// Written by the partition: it sleeps and needs a token to see the next request.
    partition_asleep: AtomicU32,
    _hypervisor_line: [u32; 13],
    /// Written by the partition: the number of the request `answer` answers.
    answer_seq: AtomicU32,
    /// Bytes of the frame in `answer`.
    answer_len: AtomicU32,
    /// Written by the hypervisor: it sleeps and needs a token to see the answer.
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes the memfd this function owns.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE_SIZE as libc::off_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
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

fn load_bytes(area: &[AtomicU8; AREA], len: u32) -> Vec<u8> {
    let len = (len as usize).min(AREA);
    area[..len].iter().map(|cell| cell.load(Ordering::Relaxed)).collect()
}

/// Sends a wake-up token; a full socket already holds one.
fn send_token(stream: &UnixStream) -> io::Result<()> {
    // SAFETY: sends one byte from a valid buffer on a valid socket, without blocking.
    let sent = unsafe {
        libc::send(stream.as_raw_fd(), [1u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::WouldBlock {
            return Err(error);
        }
    }
    Ok(())
}

/// Waits until the socket has tokens (and drains them), at most `timeout` (`None`: for as
/// long as it takes). An error when the peer hung up.
fn wait_token(stream: &UnixStream, timeout: Option<Duration>) -> io::Result<()> {
    let millis = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    let mut fd = [libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd, a bounded (or, for a partition, hang-up-ended) wait.
    let ready = unsafe { libc::poll(fd.as_mut_ptr(), 1, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(error) };
    }
    if ready == 0 {
        return Ok(());
    }
    let mut tokens = [0u8; 64];
    // SAFETY: receives into a valid buffer of its length, without blocking.
    let got = unsafe {
        libc::recv(stream.as_raw_fd(), tokens.as_mut_ptr().cast(), tokens.len(), libc::MSG_DONTWAIT)
    };
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

/// The hypervisor's end: the proxy socket and the page, for one partition.
pub struct ProxyConnection {
    stream: UnixStream,
    page_fd: OwnedFd,
    mapping: Mapping,
    seq: u32,
}

impl std::fmt::Debug for ProxyConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConnection").field("stream", &self.stream).field("seq", &self.seq).finish()
    }
}

impl ProxyConnection {
    /// A connection over `stream` with a new page; hand [`page_fd`](Self::page_fd) and the
    /// other end of `stream` to the partition.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let page_fd = create_page()?;
        let mapping = Mapping::new(page_fd.as_fd())?;
        Ok(Self { stream, page_fd, mapping, seq: 0 })
    }

    /// A connected pair: the hypervisor's end and the partition's (in one process, for
    /// tests and fuzzing).
    pub fn pair() -> io::Result<(Self, PartitionEnd)> {
        let (ours, theirs) = UnixStream::pair()?;
        let connection = Self::new(ours)?;
        let partition = PartitionEnd::new(theirs, connection.page_fd.as_fd())?;
        Ok((connection, partition))
    }

    /// The page's memfd, for the partition.
    pub fn page_fd(&self) -> BorrowedFd<'_> {
        self.page_fd.as_fd()
    }

    /// Ends the connection: the partition sees the hang-up.
    pub fn hang_up(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Publishes the frame `request` and returns the answer's bytes (at most one frame
    /// area, not yet decoded), or an error when the partition hung up or `deadline` passed.
    pub fn call(&mut self, request: &[u8], deadline: Instant) -> io::Result<Vec<u8>> {
        if request.len() > AREA {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request larger than the frame area"));
        }
        let page = self.mapping.page();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        store_bytes(&page.request, request);
        page.request_len.store(request.len() as u32, Ordering::Relaxed);
        page.request_seq.store(seq, Ordering::SeqCst);
        let partition_asleep = page.partition_asleep.load(Ordering::SeqCst) != 0;
        if partition_asleep {
            send_token(&self.stream)?;
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
            let result = self.sleep_until(seq, deadline);
            page.hypervisor_asleep.store(0, Ordering::Relaxed);
            result?;
        }
        Ok(load_bytes(&page.answer, page.answer_len.load(Ordering::Relaxed)))
    }

    fn sleep_until(&self, seq: u32, deadline: Instant) -> io::Result<()> {
        let page = self.mapping.page();
        page.hypervisor_asleep.store(1, Ordering::SeqCst);
        while page.answer_seq.load(Ordering::SeqCst) != seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the partition did not answer in time"));
            }
            wait_token(&self.stream, Some(left))?;
        }
        Ok(())
    }
}

/// The partition's end: takes requests from the page and publishes answers.
pub struct PartitionEnd {
    stream: UnixStream,
    mapping: Mapping,
    /// The number of the last request taken.
    seq: u32,
}

impl PartitionEnd {
    /// The end over `stream`, mapping the page `page_fd` (which may be closed afterwards:
    /// the mapping stays).
    pub fn new(stream: UnixStream, page_fd: BorrowedFd<'_>) -> io::Result<Self> {
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
        Ok(Self { stream, mapping, seq })
    }

    /// The next request's frame bytes: spins for [`PARTITION_SPIN`], then sleeps until
    /// woken. `None` once the hypervisor hung up.
    pub fn next_request(&mut self) -> io::Result<Option<Vec<u8>>> {
        let page = self.mapping.page();
        let spin_end = Instant::now() + PARTITION_SPIN;
        loop {
            let seq = page.request_seq.load(Ordering::Acquire);
            if seq != self.seq {
                page.partition_asleep.store(0, Ordering::Relaxed);
                self.seq = seq;
                return Ok(Some(load_bytes(&page.request, page.request_len.load(Ordering::Relaxed))));
            }
            if Instant::now() < spin_end {
                std::hint::spin_loop();
                continue;
            }
            page.partition_asleep.store(1, Ordering::SeqCst);
            if page.request_seq.load(Ordering::SeqCst) != self.seq {
                continue;
            }
            match wait_token(&self.stream, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
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
            send_token(&self.stream)?;
        }
        Ok(())
    }

    /// Waits (at most `timeout`) for the hypervisor to hang up.
    pub(crate) fn wait_hang_up(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
            if wait_token(&self.stream, Some(left)).is_err() {
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
                let mut answer = request.clone();
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
            let answer = hypervisor.call(&request, Instant::now() + Duration::from_secs(10)).unwrap();
            let mut expected = request.to_vec();
            expected.reverse();
            assert_eq!(answer, expected);
        }
        hypervisor.hang_up();
        assert_eq!(server.join().unwrap(), 200);
    }

    #[test]
    fn a_silent_partition_times_out_and_a_dead_one_is_seen_at_once() {
        let (mut hypervisor, partition) = ProxyConnection::pair().unwrap();
        let started = Instant::now();
        let error = hypervisor.call(b"x", Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(partition);
        let error = hypervisor.call(b"y", Instant::now() + Duration::from_secs(60)).unwrap_err();
        assert_ne!(error.kind(), io::ErrorKind::TimedOut, "the hang-up ends the wait");
    }

    #[test]
    fn a_lying_length_is_bounded_by_the_area() {
        let (mut hypervisor, mut partition) = ProxyConnection::pair().unwrap();
        let server = std::thread::spawn(move || {
            partition.next_request().unwrap().unwrap();
            partition.publish(b"abc", u32::MAX).unwrap();
            partition.wait_hang_up(Duration::from_secs(10));
        });
        let answer = hypervisor.call(b"q", Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!(answer.len(), AREA);
        assert_eq!(&answer[..3], b"abc");
        hypervisor.hang_up();
        server.join().unwrap();
    }

    #[test]
    fn the_partition_cannot_resize_the_page() {
        let (hypervisor, _partition) = ProxyConnection::pair().unwrap();
        let handed = std::fs::File::from(hypervisor.page_fd().try_clone_to_owned().unwrap());
        assert_eq!(handed.set_len(0).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
}
