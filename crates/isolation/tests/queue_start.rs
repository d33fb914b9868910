//! A vhost-user backend whose queue thread the host refuses (a pids cgroup or RLIMIT_NPROC
//! at its limit) ends the session at once with that cause, after answering the message
//! that started the queue with a failure: it never leaves a queue the frontend believes
//! running unserved (the frontend's watchdog would only find that out much later).
//!
//! The backend runs in a helper process (this test binary again) whose RLIMIT_NPROC allows
//! no new thread; as root, the helper runs under a uid of its own, since root is exempt
//! from the limit.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use splitvisor_devices::virtio::net::NetParams;
use splitvisor_devices::virtio::tap::SocketBackend;
use splitvisor_isolation::backend::net::NetDevice;
use splitvisor_isolation::backend::{self, BackendError, FaultPlan};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Set in the helper process's environment.
const HELPER_ENV: &str = "SPLITVISOR_TEST_QUEUE_WITHOUT_THREADS";

/// The uid the helper runs as when the test runs as root (no other test uses it).
const HELPER_UID: u32 = 64_997;

/// Guest RAM the "frontend" offers: a memfd the backend maps.
const RAM: u64 = 1 << 20;

/// Where the frontend says the RAM is in its address space (it need not map it itself).
const RAM_ADDRESS: u64 = 0x7f00_0000_0000;

#[test]
fn a_queue_whose_thread_the_host_refuses_ends_the_session_with_the_cause() {
    use std::os::unix::process::CommandExt;
    let mut helper = Command::new(std::env::current_exe().unwrap());
    helper
        .args(["--exact", "queue_without_threads_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, "1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        helper.uid(HELPER_UID).gid(HELPER_UID);
    }
    let out = helper.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // (The harness may have printed the test's name on the same line.)
    let said = |what: &str| {
        stdout.lines().find_map(|line| line.split_once(what).map(|(_, value)| value.to_string()))
    };
    assert_eq!(said("QUEUE ANSWER ").as_deref(), Some("refused"), "{report}");
    let ended = said("SESSION ").unwrap_or_default();
    assert!(ended.starts_with("ended: cannot start queue 0: cannot create its thread: "), "{report}");
    assert!(ended.contains(&format!("(os error {})", libc::EAGAIN)), "{report}");
}

/// Not a test: the process of `a_queue_whose_thread_the_host_refuses_ends_the_session_with_the_cause`.
#[test]
#[ignore = "helper process of a_queue_whose_thread_the_host_refuses_ends_the_session_with_the_cause"]
fn queue_without_threads_process() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (net, _wire) = SocketBackend::pair().unwrap();
    let device = Arc::new(NetDevice::new(NetParams::new([0x52, 0x54, 0, 0, 0, 7]), Arc::new(net)));
    let served = std::thread::spawn(move || backend::serve(theirs, device, Arc::new(FaultPlan::none())));
    ours.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let watch = ours.try_clone().unwrap();
    let mut frontend = Frontend::from_stream(ours, 2);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    frontend.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_features(features).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name.
    let ram = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(ram >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    let ram = unsafe { OwnedFd::from_raw_fd(ram) };
    // SAFETY: sizes our own memfd.
    assert_eq!(unsafe { libc::ftruncate(ram.as_raw_fd(), RAM as libc::off_t) }, 0);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: RAM_ADDRESS,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    };
    frontend.set_mem_table(&[region]).unwrap();
    let config = VringConfigData {
        queue_max_size: 256,
        queue_size: 16,
        flags: 0,
        desc_table_addr: RAM_ADDRESS + 0x1000,
        used_ring_addr: RAM_ADDRESS + 0x3000,
        avail_ring_addr: RAM_ADDRESS + 0x2000,
        log_addr: None,
    };
    let (kick, call, err) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    frontend.set_vring_num(0, 16).unwrap();
    frontend.set_vring_addr(0, &config).unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_err(0, &err).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    // No new thread from here on: the queue's would be the first.
    let none = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
    // SAFETY: sets a limit from a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &none) }, 0);
    let answer = frontend.set_vring_enable(0, true);
    println!("QUEUE ANSWER {}", if answer.is_err() { "refused" } else { "accepted" });
    // The backend hangs up (bounded wait: a backend that keeps the session is the bug).
    let mut hangup = libc::pollfd { fd: watch.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, bounded wait.
    let hung_up = unsafe { libc::poll(&mut hangup, 1, 30_000) } == 1;
    if !hung_up {
        println!("SESSION still served 30 s after the queue was refused its thread");
        return;
    }
    match served.join().unwrap() {
        Err(error @ BackendError::QueueStart { .. }) => println!("SESSION ended: {error}"),
        other => println!("SESSION ended otherwise: {other:?}"),
    }
}
