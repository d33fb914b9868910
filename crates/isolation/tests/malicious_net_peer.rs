//! Malicious vhost-user peers around virtio-net: a frontend that attacks the network
//! partition's backend (impossible queues, rings outside memory, a broken available ring,
//! receive buffers outside memory), and a backend that stalls the hypervisor's frontend.
//! The backend refuses or reports each and keeps answering; the frontend gives up in bounded
//! time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use splitvisor_devices::virtio::net::{HEADER_SIZE, NetParams};
use splitvisor_devices::virtio::tap::SocketBackend;
use splitvisor_isolation::backend::net::NetDevice;
use splitvisor_isolation::backend::{self, FaultPlan};
use splitvisor_isolation::frontend::{DeviceShape, Handshake, REPLY_TIMEOUT};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const RAM: usize = 1 << 20;

/// Guest memory the "frontend" shares: a memfd mapped here.
struct Memory {
    fd: OwnedFd,
    base: *mut u8,
}

impl Memory {
    fn new() -> Self {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"evil-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), RAM as i64) }, 0);
        // SAFETY: a shared mapping of the whole memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        Self { fd, base: base.cast() }
    }

    fn addr(&self, offset: u64) -> u64 {
        self.base as u64 + offset
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        assert!(offset as usize + bytes.len() <= RAM);
        // SAFETY: inside the mapping (checked above).
        let at = unsafe { self.base.add(offset as usize) };
        // SAFETY: `bytes.len()` bytes from `at` are inside the mapping; the source is a slice.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
    }

    fn read_u16(&self, offset: u64) -> u16 {
        assert!(offset as usize + 2 <= RAM);
        // SAFETY: inside the mapping.
        let at = unsafe { self.base.add(offset as usize) };
        // SAFETY: the backend writes it concurrently: a volatile read of two mapped bytes.
        unsafe { std::ptr::read_volatile(at.cast::<u16>()) }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: RAM as u64,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

// SAFETY: the mapping is only read and written through volatile/plain copies in the tests.
unsafe impl Send for Memory {}

/// A network backend on a socket "wire", served on its own thread; the frontend end.
fn backend() -> (Frontend, UnixDatagram, std::thread::JoinHandle<Result<(), backend::BackendError>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (net, wire) = SocketBackend::pair().unwrap();
    let device = Arc::new(NetDevice::new(NetParams::new([0x52, 0x54, 0, 0, 0, 9]), Arc::new(net)));
    let served = std::thread::spawn(move || backend::serve(theirs, device, Arc::new(FaultPlan::none())));
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let frontend = Frontend::from_stream(ours, 2);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    let mut frontend = frontend;
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_features(features).unwrap();
    let wire = UnixDatagram::from(wire);
    wire.set_nonblocking(true).unwrap();
    (frontend, wire, served)
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// Sets up queue `index` (size 16) on rings in `memory`; returns its call and error eventfds.
fn start_queue(frontend: &mut Frontend, memory: &Memory, index: usize) -> (EventFd, EventFd, EventFd) {
    let at = 0x10_000 * index as u64;
    let config = VringConfigData {
        queue_max_size: 256,
        queue_size: 16,
        flags: 0,
        desc_table_addr: memory.addr(at + DESC),
        used_ring_addr: memory.addr(at + USED),
        avail_ring_addr: memory.addr(at + AVAIL),
        log_addr: None,
    };
    let (kick, call, err) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    frontend.set_vring_num(index, 16).unwrap();
    frontend.set_vring_addr(index, &config).unwrap();
    frontend.set_vring_base(index, 0).unwrap();
    frontend.set_vring_call(index, &call).unwrap();
    frontend.set_vring_err(index, &err).unwrap();
    frontend.set_vring_kick(index, &kick).unwrap();
    frontend.set_vring_enable(index, true).unwrap();
    (kick, call, err)
}

fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut poll = [libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd, bounded wait.
    unsafe { libc::poll(poll.as_mut_ptr(), 1, timeout.as_millis() as i32) > 0 }
}

fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    raw
}

#[test]
fn impossible_queues_and_memory_are_refused_and_only_that_session_ends() {
    let (pipe_r, _pipe_w) = {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two new fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: a fresh fd owned by nobody else.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        (read, unsafe { OwnedFd::from_raw_fd(fds[1]) })
    };
    // A memory table whose fd is not memory, and whose size is absurd.
    let bogus = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 40,
        userspace_addr: 0x1000,
        mmap_offset: 0,
        mmap_handle: pipe_r.as_raw_fd(),
    };
    for case in 0..5 {
        let (mut frontend, _wire, served) = backend();
        let refused = match case {
            0 => frontend.set_vring_num(0, 0),
            1 => frontend.set_vring_num(0, 1000),
            2 => frontend.set_vring_num(1, 24),
            3 => frontend.set_mem_table(&[bogus]).map(drop),
            _ => frontend.get_vring_base(0).map(drop).and_then(|()| frontend.set_vring_enable(7, true)),
        };
        assert!(refused.is_err(), "case {case} was accepted");
        drop(frontend);
        // The backend thread ends (no panic), whatever it made of the session.
        let ended = served.join();
        assert!(ended.is_ok(), "case {case}: the backend panicked");
    }
}

#[test]
fn a_broken_available_ring_is_reported_and_nothing_leaves_the_partition() {
    let memory = Memory::new();
    let (mut frontend, wire, served) = backend();
    frontend.set_mem_table(&[memory.region()]).unwrap();
    let (kick, _call, err) = start_queue(&mut frontend, &memory, 1);
    // An available index far beyond the queue size.
    memory.write(0x10_000 + AVAIL + 2, &1000u16.to_le_bytes());
    kick.write(1).unwrap();
    assert!(wait_readable(&err, Duration::from_secs(10)), "the backend reported the broken queue");
    let mut buf = [0u8; 2048];
    assert!(wire.recv(&mut buf).is_err(), "no frame left the partition");
    // The backend still answers, and lets the frontend stop the queue.
    assert!(frontend.get_vring_base(1).is_ok());
    drop(frontend);
    served.join().unwrap().unwrap();
}

#[test]
fn receive_buffers_outside_guest_memory_go_back_unused() {
    let memory = Memory::new();
    let (mut frontend, wire, served) = backend();
    frontend.set_mem_table(&[memory.region()]).unwrap();
    // Receive queue: one chain far outside memory, one good buffer.
    memory.write(DESC, &descriptor(1 << 40, 2048, 2, 0));
    memory.write(DESC + 16, &descriptor(0x8_0000, 2048, 2, 0));
    memory.write(AVAIL + 4, &[0, 0, 1, 0]);
    memory.write(AVAIL + 2, &2u16.to_le_bytes());
    let (_kick, call, err) = start_queue(&mut frontend, &memory, 0);
    let frame = [0x11u8; HEADER_SIZE + 60];
    wire.send(&frame).unwrap();
    wire.send(&frame).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while memory.read_u16(USED + 2) < 2 && Instant::now() < deadline {
        wait_readable(&call, Duration::from_millis(100));
    }
    assert_eq!(memory.read_u16(USED + 2), 2, "both chains came back");
    assert_eq!((memory.read_u16(USED + 4), memory.read_u16(USED + 8)), (0, 0), "the bad one unused");
    assert!(!wait_readable(&err, Duration::ZERO), "a bad buffer is not a broken queue");
    drop(frontend);
    served.join().unwrap().unwrap();
}

#[test]
fn a_silent_network_backend_fails_the_handshake_in_bounded_time() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let result = Handshake::for_device(ours, &DeviceShape::net());
    assert!(result.is_err());
    assert!(start.elapsed() < REPLY_TIMEOUT * 2, "waited {:?}", start.elapsed());
    drop(theirs);
}
