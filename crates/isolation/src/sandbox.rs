//! The driver partitions' sandbox, applied by a partition to itself once it holds the fds it
//! needs and before it reads a byte of guest data.
//!
//! A partition is started with exactly its fds (the vhost-user socket and the image, or the
//! proxy socket and the irqfd) and must never need to open, create or reach anything else.
//! [`apply`] takes away everything else, in this order:
//!
//! 1. **Every other fd is closed**: nothing the hypervisor happened to hold leaks in.
//! 2. **New namespaces**: mount, network, IPC, UTS, cgroup and PID. No network interface
//!    but a down loopback, no System V IPC of the host's, no view of host processes.
//!    Started as root, the partition creates them while still root: they belong to the
//!    host's user namespace, and a process of the partition's uid gains no power over them.
//!    The PID namespace is usually there already: the spawner ([`crate::partition`])
//!    creates the partition's process as PID 1 of a PID namespace of its own (as root, so
//!    it too belongs to the host's user namespace; an unprivileged spawner creates it with
//!    a user namespace that maps only its own ids, inside which the partition then creates
//!    its own as below).
//! 3. **An empty root**: a read-only, empty tmpfs becomes the root (`pivot_root`) and the
//!    host's whole mount tree is detached from the partition's mount namespace. No path
//!    names a host file, and there is no directory to escape through. A root partition
//!    the spawner started usually enters such a mount namespace, made once for all the
//!    partitions it starts ([`EMPTY_ROOT_FD_ENV`]), instead of making its own.
//! 4. **Unprivileged host ids** (when started as root): supplementary groups dropped, then
//!    the gid and the uid set to [`SandboxConfig::run_as`] (65534 "nobody" by default).
//!    The uid change clears every capability in the host's user namespace; root-owned
//!    files and processes are out of reach from then on. The process is not dumpable from
//!    that moment and never again, so no other process of that uid (another partition, a
//!    daemon running as nobody) may ptrace it, read its memory (guest RAM) or take its
//!    fds, not even while it sets up. Then no way back: setting uid 0 again must fail, or
//!    the sandbox refuses to go on. A hypervisor that is not root keeps its own ids.
//! 5. **A user namespace of its own**: for a root partition, created after the id change,
//!    unprivileged and owning nothing, with no ids mapped: the kernel counts RLIMIT_NPROC
//!    per (user namespace, uid), so the partition's task budget covers its own tasks
//!    although every partition runs as the same host uid. For a partition that is not
//!    root, created first with its ids mapped to themselves: it is what allows the other
//!    namespaces and the new root. If the kernel refuses new namespaces the partition
//!    refuses to start ([`SandboxError::Namespaces`]) unless the sandbox was disabled
//!    explicitly ([`SandboxConfig::enabled`]).
//! 6. **No capabilities in its own user namespace either**: the bounding, ambient,
//!    effective, permitted and inheritable sets are emptied.
//! 7. **Resource limits**: at most 64 fds, no core dumps, no locked memory, a task budget
//!    (RLIMIT_NPROC, [`SandboxConfig::max_tasks`], set once the user namespace exists; the
//!    host-wide count of the uid stays bound by the limit the partition was started with)
//!    and an address-space budget (RLIMIT_AS, [`SandboxConfig::guest_ram`]: room for the
//!    guest RAM a vhost-user partition maps plus its own needs; a small fixed one for the
//!    proxy partitions).
//! 8. **`no_new_privs` and not dumpable**: no privilege through exec (there is no exec
//!    anyway), no ptrace or /proc access from other processes of its uid.
//! 9. **One process, PID 1 of its PID namespace**: a partition the spawner started is PID 1
//!    already and serves as it is; one started otherwise (a vhost-user backend started by
//!    hand) forks, its child is PID 1 of the new PID namespace and serves, while the
//!    process that was started holds nothing, waits, and dies the way its child died (a
//!    "watcher"). PID 1 cannot die of a signal it sends itself, so an abort (an allocation
//!    beyond the address-space budget, a panic in a drop) ends it with exit status
//!    [`ABORTED_EXIT_CODE`], which the spawner ([`crate::partition::Partition`]) or the
//!    watcher turns back into a death by SIGABRT. A seccomp kill (SIGSYS) ends it as it
//!    would any process.
//! 10. **A seccomp allowlist per kind of process** ([`Profile`]; a watcher gets the
//!     smallest): any other system call, or an allowed one with other arguments (a clone
//!     that is not a thread, a prctl other than naming a thread, executable mappings, ...),
//!     kills the process. A watcher installs its filter before its child may install its
//!     own, and the serving process installs its filter before it tells the spawner it is
//!     ready ([`ReadySignal`]): once the spawner has heard that, the sandbox is final in
//!     every process of the partition, before any request is served.
//!
//! A partition never holds /dev/kvm or the VM fd: it is never given them.

pub mod hypervisor;
mod seccomp;
#[cfg(feature = "test-hooks")]
pub mod testing;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call of the set-up failed.
    #[error("sandbox: cannot {what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The unprivileged ids could not be taken, or root could be taken back.
    #[error("sandbox: cannot run as uid {uid} gid {gid}: {source}")]
    Ids {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused new namespaces: the partition will not run unsandboxed unless
    /// told so.
    #[error(
        "sandbox: the kernel refused new namespaces (unshare: {source}); refusing to run a \
         driver partition without its sandbox (check user.max_user_namespaces and any policy \
         on unprivileged user namespaces, or disable the sandbox explicitly with --no-sandbox)"
    )]
    Namespaces {
        /// The error of `unshare`.
        #[source]
        source: io::Error,
    },
    /// The seccomp filter could not be built or applied.
    #[error("sandbox: seccomp: {0}")]
    Seccomp(String),
    /// The watcher process went away before its own filter was in place.
    #[error("sandbox: the watcher process exited before its seccomp filter was in place")]
    WatcherGone,
    /// The process that started the partition died while it changed its ids.
    #[error("sandbox: the hypervisor exited while the partition was being sandboxed")]
    ParentGone,
}

fn check(what: &'static str, result: libc::c_int) -> Result<(), SandboxError> {
    if result < 0 {
        return Err(SandboxError::Setup { what, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// A host uid and gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    /// The user ID.
    pub uid: u32,
    /// The group ID.
    pub gid: u32,
}

/// The ids partitions of a root hypervisor run as unless told otherwise.
pub const NOBODY: Ids = Ids { uid: 65534, gid: 65534 };

/// What the partition serves, which decides the system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// A vhost-user-blk backend: a listening socket, the image, threads of its own.
    VhostUserBlk,
    /// A plain bus device behind the proxy protocol (the 8250, the i8042): one thread, one
    /// socket, maybe an irqfd. Maps no guest memory.
    BusProxy,
    /// A vhost-user-net backend: a listening socket or a connection, the TAP fd it was
    /// handed, threads of its own.
    VhostUserNet,
}

impl Profile {
    /// The default task budget (RLIMIT_NPROC): the serving process and a watcher (if it
    /// forked into its PID namespace), plus for vhost-user its connection thread and one
    /// worker per queue, with room for more queues and a reconnecting frontend.
    fn default_max_tasks(self) -> u64 {
        match self {
            Self::VhostUserBlk | Self::VhostUserNet => 16,
            Self::BusProxy => 2,
        }
    }

    /// Locked memory (RLIMIT_MEMLOCK): the kernel charges an io_uring's rings to it (a
    /// block partition runs one per queue); nothing else in a partition locks memory.
    fn locked_memory(self) -> u64 {
        match self {
            Self::VhostUserBlk => IO_URING_LOCKED_MEMORY,
            Self::VhostUserNet | Self::BusProxy => 0,
        }
    }

    /// The default address-space budget (RLIMIT_AS).
    fn default_address_space(self) -> Option<u64> {
        match self {
            // Depends on the guest RAM: the spawner says ([`SandboxConfig::guest_ram`]).
            Self::VhostUserBlk | Self::VhostUserNet => None,
            Self::BusProxy => Some(PROXY_ADDRESS_SPACE),
        }
    }
}

/// RLIMIT_MEMLOCK of a block partition: room for the rings of an io_uring per queue
/// (about 24 KiB each at the engine's depth), with a margin.
pub const IO_URING_LOCKED_MEMORY: u64 = 2 << 20;

/// Address space of a partition that maps no guest RAM: the program and a small heap
/// (about 8 MiB are mapped at start).
pub const PROXY_ADDRESS_SPACE: u64 = 64 << 20;

/// Address space a vhost-user partition needs besides guest RAM: the program, a 2 MiB
/// stack and a 64 MiB malloc arena reservation per thread, and the heap of in-flight
/// requests.
pub const ADDRESS_SPACE_MARGIN: u64 = 256 << 20;

/// How many copies of the guest RAM a vhost-user partition may have mapped at once:
/// vhost-user-backend maps a new SET_MEM_TABLE before it unmaps the old one, and the
/// frontend sends the table again each time the guest driver re-activates the device.
pub const GUEST_RAM_MAPPINGS: u64 = 2;

/// The RLIMIT_AS of a vhost-user partition serving a guest with `guest_ram` bytes of RAM.
pub fn address_space_for_guest_ram(guest_ram: u64) -> u64 {
    guest_ram.saturating_mul(GUEST_RAM_MAPPINGS).saturating_add(ADDRESS_SPACE_MARGIN)
}

/// How a partition sandboxes itself; see the [module docs](self) for each step.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    enabled: bool,
    profile: Profile,
    keep: Vec<RawFd>,
    run_as: Ids,
    address_space: Option<u64>,
    max_tasks: u64,
    ready: Option<RawFd>,
    report: Option<RawFd>,
}

impl SandboxConfig {
    /// The full sandbox for a partition of kind `profile` keeping only the fds `keep`
    /// (besides stdin, stdout and stderr): runs as [`NOBODY`] if started as root, with the
    /// profile's task budget and, for [`Profile::BusProxy`], [`PROXY_ADDRESS_SPACE`].
    pub fn new(profile: Profile, keep: &[RawFd]) -> Self {
        Self {
            enabled: true,
            profile,
            keep: keep.to_vec(),
            run_as: NOBODY,
            address_space: profile.default_address_space(),
            max_tasks: profile.default_max_tasks(),
            ready: None,
            report: None,
        }
    }

    /// `false` runs the partition without any of it (debugging: `--no-sandbox`); only the
    /// other fds are still closed and readiness still signalled. Logged as a warning.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The host ids to take when started as root (default [`NOBODY`]). A process that is
    /// not root keeps its own.
    pub fn run_as(mut self, ids: Ids) -> Self {
        self.run_as = ids;
        self
    }

    /// Sizes RLIMIT_AS for a vhost-user partition of a guest with `bytes` of RAM
    /// ([`address_space_for_guest_ram`]).
    pub fn guest_ram(mut self, bytes: u64) -> Self {
        self.address_space = Some(address_space_for_guest_ram(bytes));
        self
    }

    /// RLIMIT_AS in bytes; `None` leaves the inherited limit.
    pub fn address_space(mut self, bytes: Option<u64>) -> Self {
        self.address_space = bytes;
        self
    }

    /// RLIMIT_NPROC: how many tasks (processes and threads) the partition may have.
    pub fn max_tasks(mut self, tasks: u64) -> Self {
        self.max_tasks = tasks;
        self
    }

    /// The write end of a [`ReadySignal`]: one byte is written to it, and it is closed,
    /// once the sandbox is in place in every process of the partition.
    pub fn ready_fd(mut self, fd: RawFd) -> Self {
        self.ready = Some(fd);
        self
    }

    /// The write end of the pipe where the partition says why it ends, if it ends on an
    /// error ([`crate::partition::PartitionEnd`]): kept open in the process that serves.
    pub fn report_fd(mut self, fd: RawFd) -> Self {
        self.report = Some(fd);
        self
    }

    fn kept_fds(&self) -> Vec<RawFd> {
        self.keep.iter().copied().chain(self.ready).chain(self.report).collect()
    }
}

/// Closes every fd above stderr except `keep`.
fn close_other_fds(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    let mut next = 3u32;
    for fd in keep.iter().map(|fd| *fd as u32).chain([u32::MAX]) {
        if fd > next {
            // SAFETY: close_range only closes descriptors; the ones we use are kept.
            check("close inherited fds", unsafe { libc::close_range(next, fd - 1, 0) })?;
        }
        next = fd.saturating_add(1);
    }
    Ok(())
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The ids of a process that is not root.
fn own_ids() -> Ids {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    Ids { uid, gid }
}

/// Takes `ids` for good (the process is root): groups, gid, uid, and checks there is no
/// way back. The uid change clears every capability.
fn drop_host_ids(ids: Ids) -> Result<(), SandboxError> {
    let fail = |source| SandboxError::Ids { uid: ids.uid, gid: ids.gid, source };
    let os = |result: libc::c_int| if result < 0 { Err(fail(io::Error::last_os_error())) } else { Ok(()) };
    // Groups first, then the gid, then the uid: each step needs the privilege the next
    // one removes.
    // A credential change clears the parent-death signal; a partition started by a
    // hypervisor must still die with it.
    let mut death_signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
    check("read the parent-death signal", unsafe {
        libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut death_signal, 0, 0, 0)
    })?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: an empty group list; the pointer is not read.
    os(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integers.
    os(unsafe { libc::setresgid(ids.gid, ids.gid, ids.gid) })?;
    // SAFETY: plain integers.
    os(unsafe { libc::setresuid(ids.uid, ids.uid, ids.uid) })?;
    // The uid change made the process non-dumpable unless fs.suid_dumpable says
    // otherwise: make sure at once, before anything else runs as this uid.
    // SAFETY: plain integers.
    check("become non-dumpable", unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    if death_signal != 0 {
        // SAFETY: PR_SET_PDEATHSIG takes plain integers.
        check("set the parent-death signal again", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong, 0, 0, 0)
        })?;
        // The parent may have died while the signal was cleared.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return Err(SandboxError::ParentGone);
        }
    }
    if ids.uid != 0 {
        // SAFETY: plain integers; must fail now that the process is not root.
        if unsafe { libc::setresuid(0, 0, 0) } == 0 {
            return Err(fail(io::Error::other("uid 0 could be taken back")));
        }
    }
    Ok(())
}

/// Every namespace a partition gets besides its user namespace.
const NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWPID;

/// Set (to `1`) by the partition spawner in the environment of a partition it started in
/// the network namespace it made for all of them, empty: the driver then does not make
/// one of its own, if it finds the namespace empty indeed (`in_empty_network_namespace`).
pub const EMPTY_NETNS_ENV: &str = "SPLITVISOR_EMPTY_NETNS";

/// Set by the partition spawner, in the environment of a root partition it started, to
/// the number of an fd it handed over: a mount namespace it made for all of its
/// partitions, whose root is an empty read-only tmpfs with the host's mount tree detached,
/// as `pivot_into_empty_root` leaves a partition's own. The partition enters it
/// (`enter_handed_empty_root`) instead of copying the host's mounts and detaching them
/// again (a tenth of a partition's start on a quiet host, 0.1 ms, and up to 0.5 ms on a
/// busy one; the detach waits for an RCU grace period). Every process in it is a
/// partition: root, as the driver program (trusted) until its sandbox is in place, and
/// without a capability from then on, before its first request.
pub const EMPTY_ROOT_FD_ENV: &str = "SPLITVISOR_EMPTY_ROOT_FD";

/// The fd [`EMPTY_ROOT_FD_ENV`] names, if the spawner handed one: open, and not one of
/// `kept` (a driver started by hand with the variable set keeps its own fds).
fn handed_empty_root(kept: &[RawFd]) -> Option<RawFd> {
    let fd: RawFd =
        std::env::var(EMPTY_ROOT_FD_ENV).ok()?.parse().ok().filter(|fd| *fd > 2 && !kept.contains(fd))?;
    // SAFETY: F_GETFD only reads the flags of a descriptor number (or fails).
    (unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0).then_some(fd)
}

/// Moves the process into the mount namespace `fd` (see [`EMPTY_ROOT_FD_ENV`]), which sets
/// its root and working directory to that namespace's root. False, and nothing changed,
/// if the kernel refuses (not a mount namespace's fd, or not allowed): the partition then
/// makes its own empty root. `fd` is closed either way (it is none of the fds the
/// partition keeps). An error if the root it entered is not read-only or holds a
/// directory.
fn enter_handed_empty_root(fd: RawFd) -> Result<bool, SandboxError> {
    // SAFETY: setns takes an fd number and a plain flag (and fails for anything but a
    // mount namespace's fd); the process is single-threaded here, as a change of mount
    // namespace requires.
    let entered = unsafe { libc::setns(fd, libc::CLONE_NEWNS) } == 0;
    let refused = io::Error::last_os_error();
    // SAFETY: the fd was handed to this process for this one use, and no other owns it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    if !entered {
        log::debug!("cannot enter the partitions' empty root: {refused}");
        return Ok(false);
    }
    // A wrong fd would leave the process in some other mount namespace: checked, not
    // trusted (with calls the spawner's filter, still in force, allows). The root must be
    // read-only, so that nothing is added to it, and hold no directory.
    // SAFETY: a NUL-terminated path and a plain flag.
    let writable = unsafe { libc::access(c"/".as_ptr(), libc::W_OK) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::EROFS);
    let links = std::fs::metadata("/").map(|root| std::os::unix::fs::MetadataExt::nlink(&root));
    if writable || !matches!(links, Ok(2)) {
        return Err(SandboxError::Setup {
            what: "enter the partitions' empty root",
            source: io::Error::other("the root handed over is writable or holds a directory"),
        });
    }
    Ok(true)
}

/// Whether the spawner says this process was born in the partitions' empty network
/// namespace and the namespace has no interface but the loopback: as good as a new one
/// for a partition, which can neither create sockets nor raise an interface.
fn in_empty_network_namespace() -> bool {
    std::env::var_os(EMPTY_NETNS_ENV).is_some_and(|value| value == "1")
        && std::fs::read_to_string("/proc/self/net/dev").is_ok_and(|table| only_loopback(&table))
}

/// Whether `/proc/net/dev`'s `table` (two heading lines, then `NAME: counters` per
/// interface) lists the loopback and nothing else.
fn only_loopback(table: &str) -> bool {
    table.lines().skip(2).map(|line| line.split(':').next().unwrap_or("").trim()).eq(["lo"])
}

/// Whether this process is PID 1 of its PID namespace: the spawner created the namespace
/// with it ([`crate::partition`]).
fn is_init() -> bool {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() == 1 }
}

/// Whether the read end of the pipe whose write end is `fd` is closed everywhere (the
/// process that started this one, which holds it, is gone).
fn nobody_listens(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ready == 1 && pollfd.revents & libc::POLLERR != 0
}

fn unshare(flags: libc::c_int) -> Result<(), SandboxError> {
    // SAFETY: unshare only changes this process's namespaces (the PID one: its children's).
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(SandboxError::Namespaces { source: io::Error::last_os_error() });
    }
    Ok(())
}

/// For a process that is not root: a user namespace of its own, its ids mapped to
/// themselves, which owns the other new `namespaces`.
fn enter_namespaces_unprivileged(ids: Ids, namespaces: libc::c_int) -> Result<(), SandboxError> {
    unshare(libc::CLONE_NEWUSER | namespaces)?;
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|source| SandboxError::Setup { what: "map ids", source })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{0} {0} 1", ids.uid))?;
    write("/proc/self/gid_map", format!("{0} {0} 1", ids.gid))?;
    Ok(())
}

/// Where the empty root is mounted before it becomes the root: any directory that exists
/// will do (the mount is private to the partition's mount namespace); /proc always does.
const EMPTY_ROOT_MOUNT_POINT: &CStr = c"/proc";

/// Makes an empty read-only tmpfs the root and detaches the host's whole mount tree, in the
/// calling thread's mount namespace, which must be its own (a new one).
pub(crate) fn pivot_into_empty_root() -> Result<(), SandboxError> {
    // Nothing done below may propagate back to the host's mount namespace.
    // SAFETY: NULL source, type and data are allowed for a propagation change.
    check("make mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: NUL-terminated strings that outlive the call.
    check("mount the empty root", unsafe {
        libc::mount(
            c"splitvisor-empty".as_ptr(),
            EMPTY_ROOT_MOUNT_POINT.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
        )
    })?;
    // SAFETY: a NUL-terminated path.
    check("enter the empty root", unsafe { libc::chdir(EMPTY_ROOT_MOUNT_POINT.as_ptr()) })?;
    // pivot_root(".", "."): the old root ends up stacked on "." and is detached at once.
    // SAFETY: two NUL-terminated paths.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check("pivot_root", if pivoted < 0 { -1 } else { 0 })?;
    // SAFETY: a NUL-terminated path.
    check("detach the host's mounts", unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })?;
    // SAFETY: a NUL-terminated path.
    check("chdir to the new root", unsafe { libc::chdir(c"/".as_ptr()) })?;
    Ok(())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties every capability set, the bounding and ambient sets included.
fn drop_capabilities() -> Result<(), SandboxError> {
    // PR_CAPBSET_DROP answers EINVAL past the last capability this kernel knows (and
    // dropping one already dropped succeeds): one call per capability, no reading first.
    for cap in 0.. {
        // SAFETY: plain integers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let error = io::Error::last_os_error();
            if cap > 0 && error.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(SandboxError::Setup { what: "drop the capability bounding set", source: error });
        }
    }
    // SAFETY: plain integers.
    check("clear ambient capabilities", unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    })?;
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, which outlive the call.
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check("clear capabilities", if set < 0 { -1 } else { 0 })
}

/// Lowers `resource` to `limit` (never raises a lower hard limit).
fn lower_limit(resource: libc::__rlimit_resource_t, limit: u64) -> Result<(), SandboxError> {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct.
    check("read resource limits", unsafe { libc::getrlimit(resource, &mut current) })?;
    let limit = limit.min(current.rlim_max);
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit reads one rlimit struct.
    check("set resource limits", unsafe { libc::setrlimit(resource, &rlimit) })
}

fn limit_resources(config: &SandboxConfig) -> Result<(), SandboxError> {
    lower_limit(libc::RLIMIT_NOFILE, 64)?;
    lower_limit(libc::RLIMIT_CORE, 0)?;
    lower_limit(libc::RLIMIT_MEMLOCK, config.profile.locked_memory())?;
    lower_limit(libc::RLIMIT_NPROC, config.max_tasks)?;
    if let Some(bytes) = config.address_space {
        lower_limit(libc::RLIMIT_AS, bytes)?;
    }
    Ok(())
}

/// The exit status by which PID 1 of the partition's PID namespace reports that it
/// aborted: the kernel ignores the signals an init process sends itself without a handler,
/// so abort()'s SIGABRT would be lost (and glibc would go on to other ways of dying). The
/// spawner (for a partition that is PID 1 from its start) or the watcher (for one that
/// forked into its PID namespace) turns it back into a death by SIGABRT. No other code of
/// a partition exits with it.
pub const ABORTED_EXIT_CODE: libc::c_int = 128 + libc::SIGABRT;

extern "C" fn exit_as_aborted(_signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and ends the process.
    unsafe { libc::_exit(ABORTED_EXIT_CODE) }
}

/// Makes abort() end PID 1 with [`ABORTED_EXIT_CODE`].
fn report_aborts() -> Result<(), SandboxError> {
    // SAFETY: sigaction is plain data; zeroed is a valid initial value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = exit_as_aborted as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs a handler that only calls _exit, which is async-signal-safe.
    check("handle SIGABRT", unsafe { libc::sigaction(libc::SIGABRT, &action, std::ptr::null_mut()) })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    check("create a pipe", unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: the fd was just created and is owned by nobody else.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// Forks into the new PID namespace. Returns in the child, PID 1 there, once its parent
/// (the process the hypervisor started and supervises) has its own filter in place; the
/// parent closes what it holds, waits, and exits as its child did. Needs a
/// single-threaded process.
fn serve_from_new_pid_namespace(config: &SandboxConfig) -> Result<(), SandboxError> {
    let (gate_read, gate_write) = pipe()?;
    // SAFETY: the process is single-threaded here (the sandbox runs before any thread is
    // started), so the child may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(SandboxError::Setup {
            what: "fork into the PID namespace",
            source: io::Error::last_os_error(),
        });
    }
    if child == 0 {
        drop(gate_write);
        // The child serves; it must not outlive the process the hypervisor watches.
        // SAFETY: PR_SET_PDEATHSIG takes plain integers.
        check("set the parent-death signal", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
        })?;
        report_aborts()?;
        // Serve nothing before the watcher is filtered too.
        let mut byte = 0u8;
        // SAFETY: reads at most one byte into `byte`.
        let read = unsafe { libc::read(gate_read.as_raw_fd(), (&raw mut byte).cast(), 1) };
        if read != 1 {
            return Err(SandboxError::WatcherGone);
        }
        return Ok(());
    }
    watch(config, child, gate_read, gate_write)
}

/// The watcher: holds nothing, installs the smallest filter, lets its child go on, waits
/// for it and dies the same way.
fn watch(config: &SandboxConfig, child: libc::pid_t, gate_read: OwnedFd, gate_write: OwnedFd) -> ! {
    drop(gate_read);
    for fd in config.kept_fds() {
        // SAFETY: closing fds this process owns and never uses again (it never returns).
        unsafe { libc::close(fd) };
    }
    // SAFETY: getpid has no preconditions.
    let own = unsafe { libc::getpid() };
    if let Err(e) = seccomp::watcher_filter(child, own, gate_write.as_raw_fd())
        .and_then(|program| seccomp::install(&program))
    {
        log::error!("{e}");
        // SAFETY: plain integers; the child is ours.
        unsafe { libc::kill(child, libc::SIGKILL) };
        // SAFETY: ends the process without running anything else.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: writes one byte from a live buffer. The child reads it once this filter is in place.
    unsafe { libc::write(gate_write.as_raw_fd(), b"W".as_ptr().cast(), 1) };
    // From here on the watcher holds nothing but stdin, stdout and stderr. (A plain close:
    // dropping an OwnedFd may make other calls first, which this filter would not allow.)
    // SAFETY: the fd is ours and never used again.
    unsafe { libc::close(gate_write.into_raw_fd()) };
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing into `status`.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        if waited == child || (waited < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
        {
            break;
        }
    }
    let signal = if libc::WIFSIGNALED(status) {
        Some(libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == ABORTED_EXIT_CODE {
        Some(libc::SIGABRT)
    } else {
        None
    };
    if let Some(signal) = signal {
        // Die the same way, so the supervisor sees the real cause (SIGSYS for seccomp).
        // SAFETY: restores the default action of a signal number the kernel reported.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        // SAFETY: raising a signal at ourselves has no memory effects.
        unsafe { libc::raise(signal) };
        // SAFETY: ends the process (only reached for a signal whose default is to ignore).
        unsafe { libc::_exit(128 + signal) };
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
    // SAFETY: ends the process; nothing of it needs running destructors.
    unsafe { libc::_exit(code) }
}

/// Applies every step described in the [module docs](self). Call it while the process has
/// one thread: it may fork into a new PID namespace, and seccomp applies to the calling
/// thread and the ones it creates. Returns in the process that serves, with the sandbox in
/// place in it (and in its watcher, if it forked), and readiness signalled.
pub fn apply(config: &SandboxConfig) -> Result<(), SandboxError> {
    // Kept until it is entered, or closed with the rest where it is not used.
    let empty_root = handed_empty_root(&config.kept_fds()).filter(|_| config.enabled && running_as_root());
    close_other_fds(&config.kept_fds().into_iter().chain(empty_root).collect::<Vec<_>>())?;
    // Started as PID 1 of a PID namespace of its own (as the spawner starts partitions),
    // the process serves as that init, sandboxed or not; otherwise it forks into a new one.
    let init = is_init();
    if init {
        report_aborts()?;
    }
    if config.enabled {
        let mut namespaces = if init { NAMESPACES & !libc::CLONE_NEWPID } else { NAMESPACES };
        if in_empty_network_namespace() {
            namespaces &= !libc::CLONE_NEWNET;
        }
        let ids = if running_as_root() {
            // Namespaces and the empty root while still root (they belong to the host's
            // user namespace, so a process of the partition's uid gains no power over
            // them), then the ids for good: the process is non-dumpable from that moment
            // and never dumpable again.
            let entered = match empty_root {
                Some(fd) => enter_handed_empty_root(fd)?,
                None => false,
            };
            if entered {
                namespaces &= !libc::CLONE_NEWNS;
            }
            unshare(namespaces)?;
            if !entered {
                pivot_into_empty_root()?;
            }
            drop_host_ids(config.run_as)?;
            // The uid change cleared the parent-death signal for a moment; getppid cannot
            // tell an init whether the hypervisor died meanwhile, its readiness pipe can.
            if config.ready.is_some_and(nobody_listens) {
                return Err(SandboxError::ParentGone);
            }
            // A user namespace of its own, created unprivileged and owning nothing, with
            // no ids mapped (nothing needs them): RLIMIT_NPROC counts the tasks of one
            // (user namespace, uid), so the partition's budget covers its own tasks.
            unshare(libc::CLONE_NEWUSER)?;
            config.run_as
        } else {
            // No id to change; a user namespace to be allowed the others at all.
            let ids = own_ids();
            enter_namespaces_unprivileged(ids, namespaces)?;
            pivot_into_empty_root()?;
            ids
        };
        drop_capabilities()?;
        limit_resources(config)?;
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
        check("set no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        // SAFETY: PR_SET_DUMPABLE takes plain integers.
        check("become non-dumpable", unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
        if !init {
            serve_from_new_pid_namespace(config)?;
        }
        // SAFETY: getpid has no preconditions (1 here, in the new PID namespace).
        let own = unsafe { libc::getpid() };
        for program in seccomp::partition_filters(config.profile, own)? {
            seccomp::install(&program)?;
        }
        log::debug!("sandbox applied ({:?}, uid {} gid {})", config.profile, ids.uid, ids.gid);
    } else {
        log::warn!("sandbox disabled: this partition runs with the hypervisor's privileges");
    }
    if let Some(fd) = config.ready {
        // SAFETY: the fd was handed to this process for this one use; taking ownership
        // closes it once the byte is written.
        let ready = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: writes one byte from a live buffer.
        if unsafe { libc::write(ready.as_raw_fd(), [READY].as_ptr().cast(), 1) } != 1 {
            return Err(SandboxError::Setup { what: "signal readiness", source: io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// The byte a partition writes once sandboxed.
const READY: u8 = b'R';

/// The spawner's side of a partition's readiness: a pipe whose write end the partition
/// gets (see [`SandboxConfig::ready_fd`]). Once [`ReadySignal::wait`] returns `Ok`, the
/// sandbox is final in every process of the partition: whatever the hypervisor or a test
/// observes of it from then on stays true.
#[derive(Debug)]
pub struct ReadySignal {
    read: OwnedFd,
    write: OwnedFd,
}

impl ReadySignal {
    /// A new signal; both ends are close-on-exec in this process.
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe().map_err(|e| match e {
            SandboxError::Setup { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })?;
        Ok(Self { read, write })
    }

    /// The end to hand to the partition (as one of its fds).
    pub fn partition_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// This process's end, which a child closes before it checks whether anybody still
    /// listens (see [`crate::partition`]).
    pub(crate) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// This process's end, to watch: it turns readable when the partition's byte comes.
    /// (While this signal is not waited for, this process holds the partition's end too,
    /// so a partition that ends without its byte does not make it readable.)
    pub fn watch_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Waits at most `timeout` for the partition to say it is sandboxed: its byte, then
    /// the end of the pipe (it closed its end, so not even that fd changes afterwards).
    /// Call it once the partition was started (this process's copy of the partition's end
    /// is closed first). Fails with `UnexpectedEof` if the partition exited (or closed the
    /// fd) before its byte, `TimedOut` if the time ran out.
    pub fn wait(self, timeout: Duration) -> io::Result<()> {
        drop(self.write);
        let deadline = std::time::Instant::now() + timeout;
        let mut signalled = false;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pollfd = libc::pollfd { fd: self.read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd, bounded wait.
            let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if ready == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the partition was not sandboxed within {timeout:?}"),
                ));
            }
            let mut byte = 0u8;
            // SAFETY: reads at most one byte into `byte`.
            let read = unsafe { libc::read(self.read.as_raw_fd(), (&raw mut byte).cast(), 1) };
            match read {
                1 if byte == READY && !signalled => signalled = true,
                1 => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("readiness byte {byte:#x}"),
                    ));
                }
                0 if signalled => return Ok(()),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the partition exited before its sandbox was in place",
                    ));
                }
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_namespace_counts_as_empty_only_with_the_loopback_alone() {
        let heading = "Inter-|   Receive\n face |bytes    packets\n";
        let row = |name: &str| format!("{name:>6}: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n");
        assert!(only_loopback(&format!("{heading}{}", row("lo"))));
        assert!(!only_loopback(&format!("{heading}{}{}", row("lo"), row("eth0"))));
        assert!(!only_loopback(&format!("{heading}{}", row("eth0"))));
        assert!(!only_loopback(heading));
        assert!(!only_loopback(""));
    }

    #[test]
    fn address_space_leaves_room_for_two_guest_ram_mappings() {
        assert_eq!(address_space_for_guest_ram(128 << 20), (256 << 20) + ADDRESS_SPACE_MARGIN);
        assert_eq!(address_space_for_guest_ram(u64::MAX), u64::MAX);
        let config = SandboxConfig::new(Profile::VhostUserBlk, &[3]).guest_ram(1 << 30);
        assert_eq!(config.address_space, Some((2 << 30) + ADDRESS_SPACE_MARGIN));
    }

    #[test]
    fn proxies_get_a_small_fixed_budget_and_blk_none_until_told() {
        let proxy = SandboxConfig::new(Profile::BusProxy, &[3]);
        assert_eq!((proxy.address_space, proxy.max_tasks), (Some(PROXY_ADDRESS_SPACE), 2));
        let blk = SandboxConfig::new(Profile::VhostUserBlk, &[3, 4]);
        assert_eq!(blk.address_space, None);
        assert_eq!(blk.run_as, NOBODY);
        assert_eq!(blk.ready_fd(7).report_fd(8).kept_fds(), vec![3, 4, 7, 8]);
    }

    #[test]
    fn readiness_is_a_byte_and_an_exit_before_it_is_an_error() {
        let signal = ReadySignal::new().unwrap();
        // SAFETY: writes one byte from a live buffer to our own pipe.
        assert_eq!(unsafe { libc::write(signal.partition_fd(), [READY].as_ptr().cast(), 1) }, 1);
        signal.wait(Duration::from_secs(60)).unwrap();

        // The byte, but the partition still holds its end: not final yet.
        let signal = ReadySignal::new().unwrap();
        // SAFETY: dup of a valid fd; the copy is owned below.
        let copy = unsafe { libc::dup(signal.partition_fd()) };
        assert!(copy >= 0);
        // SAFETY: the fd was just created and is owned by nobody else.
        let held = unsafe { OwnedFd::from_raw_fd(copy) };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::write(held.as_raw_fd(), [READY].as_ptr().cast(), 1) }, 1);
        let error = signal.wait(Duration::from_millis(10)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(held);

        // The partition's end closed without a byte: it died before its sandbox was up.
        let signal = ReadySignal::new().unwrap();
        let error = signal.wait(Duration::from_secs(60)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn readiness_wait_is_bounded() {
        let signal = ReadySignal::new().unwrap();
        // A copy of the partition's end stays open and silent.
        // SAFETY: dup of a valid fd; the copy is owned below.
        let copy = unsafe { libc::dup(signal.partition_fd()) };
        assert!(copy >= 0);
        // SAFETY: the fd was just created and is owned by nobody else.
        let silent = unsafe { OwnedFd::from_raw_fd(copy) };
        let error = signal.wait(Duration::from_millis(10)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(silent);
    }
}
