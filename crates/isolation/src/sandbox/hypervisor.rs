//! The hypervisor process's own sandbox: a seccomp filter per kind of thread, and an
//! optional jail.
//!
//! Partitions sandbox themselves ([`super::apply`]); this module does the same for the
//! process that holds /dev/kvm, the VM and guest memory, in the manner of Firecracker:
//! every thread gets the allowlist of its kind ([`ThreadKind`]) once the VM is set up,
//! and nothing else.
//!
//! # How threads get their filter
//!
//! [`enable`] installs the report of a forbidden call (below) and registers a hook with the
//! thread seam ([`splitvisor_bus::threads`]): from then on every thread a splitvisor crate
//! starts installs its kind's filter before it does its work (the first thread of a kind
//! compiles it).
//! seccomp applies to the calling thread only (this module never uses TSYNC, which would
//! give every thread one filter), and a thread inherits its creator's filter, so:
//!
//! * `enable` is called before the VM is built ([`VmBuilder`] does it first thing): the
//!   partition spawner, started while partitions are set up, gets its filter at its start;
//! * the main thread builds the VM unfiltered (it opens /dev/kvm, images, sockets) and
//!   starts the vCPU threads meanwhile, then starts the seam's launcher, the supervisor, the
//!   control socket and console threads (each gets its own filter), and only then installs
//!   its own filter, the smallest of all: wait, tear down, report;
//! * threads started later by filtered threads (a virtio device's worker, which the vCPU
//!   activating the device asks for) are created by the launcher, whose filter is the
//!   union of every kind it may start, so each still gets exactly its own.
//!
//! [`VmBuilder`]: https://docs.rs/splitvisor-layout
//!
//! # A forbidden call
//!
//! A call outside a thread's allowlist (or with other arguments: an ioctl other than
//! KVM_RUN on a vCPU thread, a clone that is not a thread, executable memory, ...) traps
//! (`SECCOMP_RET_TRAP`): a SIGSYS handler writes one line to stderr, with only
//! async-signal-safe calls, and ends the process with status
//! [`FORBIDDEN_SYSCALL_EXIT_STATUS`] (159, which is 128 + SIGSYS as shells report a
//! death by SIGSYS):
//!
//! ```text
//! splitvisor: seccomp: the vcpu thread 'vcpu0' made a forbidden system call: socket (41); exiting with status 159
//! ```
//!
//! # The partition spawner
//!
//! The spawner clones (a child born as PID 1 of a PID namespace of its own) and execs
//! `splitvisor-driver`, and a filter is inherited through clone *and* exec: a partition runs
//! under the spawner's filter as well as its own, from its first instruction (the dynamic
//! loader) to its last. So the spawner's allowlist is the widest here: its own calls, what
//! the cloned child does before exec, what the driver
//! does until its own sandbox is final (namespaces, mounts, ids, capabilities, rlimits,
//! seccomp) and, merged in from the partitions' own allowlists, everything a partition
//! does while it serves. It still allows no socket creation (but a socket pair), no
//! connect, bind or listen, no ptrace, no process_vm_*, no bpf, no module or kexec calls,
//! and a clone only as a thread or as a new partition (a plain child, in a new PID
//! namespace, and a new user namespace when the hypervisor is not root).
//!
//! # The jail
//!
//! [`enter_jail`] (`--jail` in the examples) is for the main thread once everything is
//! open (KVM, guest memory, images, the control socket, partitions started) and before
//! any other thread but the partition spawner runs; threads started afterwards inherit
//! it. It enters new mount, IPC, UTS, network and cgroup namespaces, makes an empty
//! read-only tmpfs the root (as partitions do) with the host's mount tree detached, drops
//! every capability but CAP_KILL (partitions run as another uid and must still be killed)
//! from every set, the bounding set included, and sets `no_new_privs`. It needs root.
//!
//! The partition spawner is the one thread outside the jail, by design: a new partition
//! is an exec of the driver program, whose ELF interpreter and shared libraries the kernel
//! and the loader find by path in the exec'ing process's root. The spawner keeps the
//! host's root and capabilities (the driver needs CAP_SYS_ADMIN, CAP_SETUID and
//! CAP_SETGID to build its own sandbox) and is confined by its filter. Because the spawner
//! still sees the host's files, restarts, spares and upgrades (to another binary path
//! too) work under the jail. External vhost-user backends (`socket=PATH`) are reached at
//! start; reconnecting to one after it restarts needs its path, which the jail hides: such
//! a device then fails as its fault policy says.

mod syscall_names;

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen as Len};
use splitvisor_bus::threads::{self, ThreadKind};

use super::seccomp::{
    self, Rules, THREAD_CLONE_FLAGS, any, arg_in, arg_without, clone3_enosys, compile, partition_rules,
};
use super::{Profile, SandboxError};
use crate::partition::PARTITION_CLONE_FLAGS;

/// The exit status of a hypervisor whose thread made a forbidden system call.
pub const FORBIDDEN_SYSCALL_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Errors sandboxing the hypervisor process.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorSandboxError {
    /// A filter could not be built or installed, or a set-up call failed.
    #[error("hypervisor sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    /// The SIGSYS handler could not be installed.
    #[error("hypervisor sandbox: cannot handle SIGSYS: {0}")]
    SignalHandler(#[source] io::Error),
    /// The jail needs root (CAP_SYS_ADMIN in the host's user namespace).
    #[error("--jail needs root: the hypervisor runs as uid {uid}")]
    JailNeedsRoot {
        /// The effective uid.
        uid: u32,
    },
    /// A thread step of the sandbox failed (the launcher, the main thread's filter).
    #[error("hypervisor sandbox: cannot {what}: {source}")]
    Thread {
        /// The step.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Threads other than the partition spawner run: they would stay outside the jail.
    #[error("cannot jail the hypervisor while other threads run outside the jail: {threads}")]
    ThreadsRunning {
        /// Their names.
        threads: String,
    },
}

/// How the hypervisor process sandboxes itself: off unless asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypervisorSandbox {
    seccomp: bool,
    jail: bool,
}

impl HypervisorSandbox {
    /// No sandbox: what a library embedding the VMM gets by default.
    pub fn off() -> Self {
        Self::default()
    }

    /// A seccomp filter per thread kind (see the [module docs](self)).
    pub fn seccomp() -> Self {
        Self { seccomp: true, jail: false }
    }

    /// Also (or only) the jail: namespaces, an empty root, capabilities dropped.
    pub fn with_jail(mut self, jail: bool) -> Self {
        self.jail = jail;
        self
    }

    /// Whether threads get seccomp filters.
    pub fn seccomp_enabled(&self) -> bool {
        self.seccomp
    }

    /// Whether the process enters a jail.
    pub fn jail_enabled(&self) -> bool {
        self.jail
    }
}

/// Every kind's filters, each compiled by the first thread of its kind: a kind no thread
/// has is never compiled, and none is compiled while the VM is set up.
struct Filters {
    /// The process the filters are for.
    own_pid: libc::pid_t,
    by_kind: HashMap<ThreadKind, OnceLock<[BpfProgram; 2]>>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();
static JAILED: AtomicBool = AtomicBool::new(false);

/// Registers the per-kind filters with the thread seam and installs the report of a
/// forbidden call. From then on, every thread started through [`threads::spawn`] installs
/// its kind's filter first; the main thread installs its own with
/// `threads::enter(ThreadKind::Main)`. Process-wide, and once is enough: later calls do
/// nothing. Fails if another thread hook was registered.
pub fn enable() -> Result<(), HypervisorSandboxError> {
    if FILTERS.get().is_some() {
        return Ok(());
    }
    // SAFETY: getpid has no preconditions.
    let own_pid = unsafe { libc::getpid() };
    let by_kind = ThreadKind::ALL.iter().map(|&kind| (kind, OnceLock::new())).collect();
    install_report()?;
    install_panic_report();
    if FILTERS.set(Filters { own_pid, by_kind }).is_err() {
        return Ok(()); // another thread enabled it meanwhile
    }
    if !threads::set_hook(Box::new(install_filters)) {
        return Err(SandboxError::Seccomp("another thread hook is registered already".into()).into());
    }
    log::debug!("hypervisor threads are sandboxed from now on");
    Ok(())
}

/// The filters of `kind`: the shared one that makes clone3 fail with ENOSYS, and the kind's
/// allowlist. Compiled at the first call for the kind.
fn filters(kind: ThreadKind) -> io::Result<&'static [BpfProgram; 2]> {
    let filters =
        FILTERS.get().ok_or_else(|| io::Error::other("the hypervisor's filters are not enabled"))?;
    let cell = filters
        .by_kind
        .get(&kind)
        .ok_or_else(|| io::Error::other(format!("no filter for {kind} threads")))?;
    if let Some(programs) = cell.get() {
        return Ok(programs);
    }
    let compiled = rules(kind, filters.own_pid)
        .and_then(|rules| compile(rules, SeccompAction::Trap, SeccompAction::Allow))
        .and_then(|allowlist| Ok([clone3_enosys()?, allowlist]))
        .map_err(|e| io::Error::other(format!("cannot compile the {kind} filter: {e}")))?;
    // Two threads of a kind starting at once compile it twice: the first one kept wins.
    Ok(cell.get_or_init(|| compiled))
}

/// Reports a panic in one line, without a backtrace: capturing one reads the executable
/// and its debug information (getcwd, open, ...), which no filtered thread may do, and a
/// panicking device worker is a fault the supervisor handles, not a reason to die of the
/// filter.
fn install_panic_report() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let line =
            format!("thread '{}' panicked{location}: {message}\n", thread.name().unwrap_or("<unnamed>"));
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }));
}

/// Whether [`enable`] ran.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Whether the process entered its jail.
pub fn jailed() -> bool {
    JAILED.load(Ordering::Acquire)
}

/// The seam's hook: records the thread for the report, installs its kind's filters.
fn install_filters(kind: ThreadKind) -> io::Result<()> {
    let programs = filters(kind)?;
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let own = current.name().unwrap_or("").as_bytes();
    let len = own.len().min(name.len());
    name[..len].copy_from_slice(&own[..len]);
    REPORTED.with(|thread| thread.set(Some((kind, name))));
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// What every hypervisor thread may do, whatever its kind.
fn base(rules: &mut Rules, own_pid: libc::pid_t) -> Result<(), SandboxError> {
    any(
        rules,
        &[
            // Locks, condition variables, channels, joins; std's channels back off with
            // sched_yield.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            // Eventfds, irqfds, the guest console, logs on stderr, this module's report.
            libc::SYS_write,
            libc::SYS_close,
            // The heap and thread stacks: brk and mmap grow it (executable mappings are
            // refused below), munmap, madvise and mremap give back or move memory.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            // Returning from signal handlers (the vCPU kick, Ctrl-C, stack overflow), and
            // the signal mask and alternate stack a thread sets up and tears down.
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            // An interrupted sleep or poll with a timeout goes on through restart_syscall
            // (an io_uring's completion work and a stop and continue interrupt them).
            libc::SYS_restart_syscall,
            libc::SYS_getpid,
            libc::SYS_gettid,
            // Clocks (when the vDSO falls back to the kernel), sleeps, HashMap seeds.
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_getrandom,
            // The CPU a thread runs on (a proxy publishes it), where the vDSO falls back.
            libc::SYS_getcpu,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Let clone3 reach the first filter's ENOSYS (glibc then uses clone).
            libc::SYS_clone3,
        ],
    );
    // abort() and the vCPU kick (pthread_kill): signals to this process's own threads.
    arg_in(rules, libc::SYS_tgkill, 0, Len::Dword, &[own_pid as u32 as u64])?;
    // Rust's debug builds check an fd is open before closing it; try_clone duplicates.
    arg_in(rules, libc::SYS_fcntl, 1, Len::Dword, &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64])?;
    // Memory, but never executable: no new code once sandboxed.
    let exec = libc::PROT_EXEC as u64;
    arg_without(rules, libc::SYS_mmap, 2, exec)?;
    arg_without(rules, libc::SYS_mprotect, 2, exec)?;
    Ok(())
}

/// Creating threads (std::thread): a clone that shares everything, its name, and what
/// glibc's thread start does.
fn thread_creation(rules: &mut Rules) -> Result<(), SandboxError> {
    arg_in(rules, libc::SYS_clone, 0, Len::Qword, &[THREAD_CLONE_FLAGS])?;
    arg_in(rules, libc::SYS_prctl, 0, Len::Dword, &[libc::PR_SET_NAME as u64])?;
    any(rules, &[libc::SYS_set_robust_list, libc::SYS_rseq, libc::SYS_sched_getaffinity]);
    Ok(())
}

/// Timeouts on sockets (SO_RCVTIMEO, SO_SNDTIMEO): every wait on a partition is bounded.
fn socket_timeouts(rules: &mut Rules) -> Result<(), SandboxError> {
    let level = seccompiler::SeccompCondition::new(
        1,
        Len::Dword,
        seccompiler::SeccompCmpOp::Eq,
        libc::SOL_SOCKET as u64,
    )
    .map_err(seccomp::error)?;
    let alternatives = [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
        .into_iter()
        .map(|option| {
            let option = seccompiler::SeccompCondition::new(
                2,
                Len::Dword,
                seccompiler::SeccompCmpOp::Eq,
                option as u64,
            )?;
            seccompiler::SeccompRule::new(vec![level.clone(), option])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(seccomp::error)?;
    rules.insert(libc::SYS_setsockopt, alternatives);
    Ok(())
}

/// Talking to partitions over the sockets the hypervisor already holds: the proxy
/// protocol (send and recv) and vhost-user (messages carrying fds).
fn partition_messages(rules: &mut Rules) -> Result<(), SandboxError> {
    // pread: a late proxied partition's state, from its /proc stat file opened at its start
    // (crate::liveness), which takes no path lookup.
    any(
        rules,
        &[
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            libc::SYS_pread64,
        ],
    );
    socket_timeouts(rules)
}

/// Ending and reaping partitions: SIGKILL only, and wait4.
fn partition_reaping(rules: &mut Rules) -> Result<(), SandboxError> {
    arg_in(rules, libc::SYS_kill, 1, Len::Dword, &[libc::SIGKILL as u64])?;
    any(rules, &[libc::SYS_wait4, libc::SYS_waitid]);
    Ok(())
}

/// What the fds a new partition gets are made of: socket pairs (never a socket that can
/// reach anything else), eventfds, and a proxy's shared page (a memfd, sized by a write,
/// then sealed).
fn partition_setup(rules: &mut Rules) -> Result<(), SandboxError> {
    arg_in(rules, libc::SYS_socketpair, 0, Len::Dword, &[libc::AF_UNIX as u64])?;
    any(rules, &[libc::SYS_eventfd2]);
    // Added to what the thread may already do with these calls.
    let mut page = Rules::new();
    let sealable = (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64;
    arg_in(&mut page, libc::SYS_memfd_create, 1, Len::Dword, &[sealable])?;
    arg_in(&mut page, libc::SYS_fcntl, 1, Len::Dword, &[libc::F_ADD_SEALS as u64])?;
    merge(rules, page);
    Ok(())
}

/// The KVM ioctl numbers a vCPU thread uses.
mod kvm {
    const KVMIO: u64 = 0xae;
    const fn io(nr: u64) -> u64 {
        (KVMIO << 8) | nr
    }
    const fn ior(nr: u64, size: u64) -> u64 {
        (2 << 30) | (size << 16) | (KVMIO << 8) | nr
    }
    const fn iow(nr: u64, size: u64) -> u64 {
        (1 << 30) | (size << 16) | (KVMIO << 8) | nr
    }
    const fn iowr(nr: u64, size: u64) -> u64 {
        (3 << 30) | (size << 16) | (KVMIO << 8) | nr
    }
    /// `_IO(KVMIO, 0x80)`.
    pub(super) const RUN: u64 = io(0x80);
    /// `_IOR(KVMIO, 0x81, struct kvm_regs)` (144 bytes).
    pub(super) const GET_REGS: u64 = ior(0x81, 144);
    /// `_IOR(KVMIO, 0x83, struct kvm_sregs)` (312 bytes).
    pub(super) const GET_SREGS: u64 = ior(0x83, 312);
    /// `_IOWR(KVMIO, 0x05, struct kvm_cpuid2)` (8 bytes), on /dev/kvm: what KVM can show
    /// a guest, read by vCPU 0's thread while the VM is set up. A read of the host's KVM,
    /// allowed for the thread's whole life (the rule cannot tell when it is asked).
    pub(super) const GET_SUPPORTED_CPUID: u64 = iowr(0x05, 8);
    /// What a vCPU thread does to put its own vCPU back to its power-on state when the
    /// VM restarts (`--on-reboot restart`), and vCPU 0's reset of the in-kernel interrupt
    /// controllers: `KVM_SET_REGS`, `KVM_SET_SREGS`, `KVM_SET_MSRS`, `KVM_SET_FPU`,
    /// `KVM_SET_LAPIC`, `KVM_SET_MP_STATE`, `KVM_SET_VCPU_EVENTS`, `KVM_GET_IRQCHIP`,
    /// `KVM_SET_IRQCHIP` (`_IOR`, as the kernel declares it).
    pub(super) const RESET: [u64; 9] = [
        iow(0x82, 144),
        iow(0x84, 312),
        iow(0x89, 8),
        iow(0x8d, 416),
        iow(0x8f, 1024),
        iow(0x99, 4),
        iow(0xa0, 64),
        iowr(0x62, 520),
        ior(0x63, 520),
    ];
}

/// The allowlist of `kind`; see each call's reason.
fn rules(kind: ThreadKind, own_pid: libc::pid_t) -> Result<Rules, SandboxError> {
    let mut rules = Rules::new();
    base(&mut rules, own_pid)?;
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN; the registers only to name RIP when a vCPU fails; the resets of a
            // VM restart (its own vCPU and the interrupt controllers); and the CPUID KVM
            // supports, which vCPU 0's thread reads before its vCPU comes (a read-only
            // query, allowed at any time). A vCPU thread never creates KVM state or maps
            // memory.
            let mut ioctls = vec![kvm::RUN, kvm::GET_REGS, kvm::GET_SREGS, kvm::GET_SUPPORTED_CPUID];
            ioctls.extend(kvm::RESET);
            // A virtio-net device in the hypervisor sets its TAP's header size and
            // offloads to what the guest negotiated, when the guest activates it (its
            // DRIVER_OK write, on a vCPU).
            ioctls.extend([
                splitvisor_devices::virtio::tap::TUNSETVNETHDRSZ,
                splitvisor_devices::virtio::tap::TUNSETOFFLOAD,
            ]);
            arg_in(&mut rules, libc::SYS_ioctl, 1, Len::Dword, &ioctls)?;
            // Exits dispatched to devices: eventfds (a device's stop event, read and
            // created when the guest activates a virtio device), proxies and vhost-user
            // frontends of partitions.
            any(&mut rules, &[libc::SYS_read, libc::SYS_eventfd2, libc::SYS_poll, libc::SYS_ppoll]);
            partition_messages(&mut rules)?;
        }
        ThreadKind::DeviceWorker => {
            any(
                &mut rules,
                &[
                    // Kicks and its stop event, from an epoll loop.
                    libc::SYS_read,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // The image: one vector per request, straight into guest memory.
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    // VIRTIO_BLK_T_FLUSH.
                    libc::SYS_fdatasync,
                ],
            );
            // The I/O engine: io_uring where the kernel has it (else a pool of threads of
            // this kind, making the calls above, started through the launcher).
            seccomp::io_uring(&mut rules)?;
        }
        ThreadKind::Supervisor => {
            // Waits on pidfds, sockets and eventfds; reads its wake eventfd.
            any(&mut rules, &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read]);
            // Restarts: new socket pairs and eventfds for the replacement (the spawner
            // starts the process), the vhost-user hand-over, and the old partition killed
            // and reaped.
            partition_setup(&mut rules)?;
            partition_messages(&mut rules)?;
            partition_reaping(&mut rules)?;
            // Reconnecting to an external vhost-user backend by its socket path (unix
            // sockets only; under the jail the path is out of reach).
            arg_in(&mut rules, libc::SYS_socket, 0, Len::Dword, &[libc::AF_UNIX as u64])?;
            any(&mut rules, &[libc::SYS_connect]);
            // The watchdog's look at a stalled disk driver's threads (crate::liveness::Threads):
            // its /proc task directory, opened at its start, read from the start, and each
            // thread's stat opened in it read-only.
            any(&mut rules, &[libc::SYS_getdents64, libc::SYS_lseek]);
            arg_in(
                &mut rules,
                libc::SYS_openat,
                2,
                Len::Dword,
                &[(libc::O_RDONLY | libc::O_CLOEXEC) as u64],
            )?;
        }
        ThreadKind::Control => {
            // Clients on non-blocking sockets, polled side by side (accepted non-blocking,
            // so no ioctl or fcntl); commands are carried out by the supervisor.
            any(
                &mut rules,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_accept4,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_read,
                ],
            );
        }
        ThreadKind::ConsoleInput => {
            // Standard input and its stop event; the input goes to the UART, which may
            // run in a partition (the proxy's socket).
            any(&mut rules, &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read]);
            partition_messages(&mut rules)?;
        }
        ThreadKind::Signals => {
            // Waits on a signalfd (and the eventfd that ends it), reads the signal and
            // stops the VM (the base's writes and kicks).
            any(&mut rules, &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]);
        }
        ThreadKind::Main => {
            // Waiting for the VM's end, then tearing it down: stop events, the partitions
            // killed and reaped, the vhost-user frontends' last words, KVM's statistics
            // (pread of the stats fd), the control socket removed: through an fd of its
            // directory (its path is out of reach in the jail), once its device and inode
            // show it is still the one bound.
            any(
                &mut rules,
                &[libc::SYS_read, libc::SYS_pread64, libc::SYS_poll, libc::SYS_ppoll, libc::SYS_newfstatat],
            );
            arg_in(&mut rules, libc::SYS_unlinkat, 2, Len::Dword, &[0])?;
            partition_messages(&mut rules)?;
            partition_reaping(&mut rules)?;
        }
        ThreadKind::PartitionSpawner => return spawner_rules(rules, own_pid),
        ThreadKind::Launcher => {
            thread_creation(&mut rules)?;
            // The threads it creates install their own filters under this one.
            arg_in(
                &mut rules,
                libc::SYS_prctl,
                0,
                Len::Dword,
                &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
            )?;
            arg_in(&mut rules, libc::SYS_seccomp, 0, Len::Dword, &[libc::SECCOMP_SET_MODE_FILTER as u64])?;
            for launched in ThreadKind::ALL {
                if !matches!(launched, ThreadKind::Launcher | ThreadKind::PartitionSpawner) {
                    merge(&mut rules, self::rules(launched, own_pid)?);
                }
            }
        }
    }
    Ok(rules)
}

/// Adds `more` to `rules`: a call allowed by either is allowed, with the arguments either
/// allows (any arguments if either allows any).
fn merge(rules: &mut Rules, more: Rules) {
    for (nr, alternatives) in more {
        match rules.get_mut(&nr) {
            None => {
                rules.insert(nr, alternatives);
            }
            Some(existing) if existing.is_empty() => {}
            Some(_) if alternatives.is_empty() => {
                rules.insert(nr, Vec::new());
            }
            Some(existing) => existing.extend(alternatives),
        }
    }
}

/// The spawner, the child it clones and the driver that child becomes (see the [module
/// docs](self)).
fn spawner_rules(mut rules: Rules, own_pid: libc::pid_t) -> Result<Rules, SandboxError> {
    // The spawner itself: the readiness pipe and the one the child reports a failed exec
    // on, the clone (below), the wait for readiness, the child killed and reaped on
    // failure, /dev/null for the child's stdin and stdout.
    any(
        &mut rules,
        &[
            libc::SYS_pipe2,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_openat,
        ],
    );
    partition_setup(&mut rules)?;
    partition_reaping(&mut rules)?;
    thread_creation(&mut rules)?;
    // The cloned child before exec: the parent-death signal, its fds moved into place, its
    // ids mapped (a new user namespace), signal dispositions and mask reset, exec.
    any(
        &mut rules,
        &[libc::SYS_getppid, libc::SYS_dup2, libc::SYS_dup3, libc::SYS_rt_sigaction, libc::SYS_execve],
    );
    // The driver until its own sandbox is final: the dynamic loader (opens, maps and
    // protects its libraries, executable mappings included), std's start-up, the
    // sandbox's own steps (fds closed, namespaces, the empty root, ids, capabilities,
    // rlimits, seccomp), and its log.
    any(
        &mut rules,
        &[
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_access,
            libc::SYS_arch_prctl,
            libc::SYS_set_tid_address,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_readlink,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_prlimit64,
            libc::SYS_getrlimit,
            libc::SYS_setrlimit,
            libc::SYS_close_range,
            libc::SYS_chdir,
            libc::SYS_pivot_root,
            libc::SYS_umount2,
            libc::SYS_setgroups,
            libc::SYS_setresgid,
            libc::SYS_setresuid,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_capget,
            libc::SYS_capset,
            libc::SYS_seccomp,
            libc::SYS_fcntl,
        ],
    );
    // prctl: the parent-death signal, dumpability, no_new_privs, the capability bounding
    // and ambient sets, thread names.
    let options = [
        libc::PR_SET_NAME,
        libc::PR_SET_PDEATHSIG,
        libc::PR_GET_PDEATHSIG,
        libc::PR_SET_DUMPABLE,
        libc::PR_GET_DUMPABLE,
        libc::PR_SET_NO_NEW_PRIVS,
        libc::PR_CAPBSET_READ,
        libc::PR_CAPBSET_DROP,
        libc::PR_CAP_AMBIENT,
    ];
    arg_in(&mut rules, libc::SYS_prctl, 0, Len::Dword, &options.map(|option| option as u64))?;
    // Namespaces: exactly the driver's sets (as root; unprivileged, with a user namespace),
    // without the PID namespace when it was born in one, without the network one when it
    // was born in the partitions' (which the spawner makes for itself first), and as root
    // without the mount one when it entered the partitions' empty root.
    let net = libc::CLONE_NEWNET as u64;
    let (pid, user) = (libc::CLONE_NEWPID as u64, libc::CLONE_NEWUSER as u64);
    let others = (libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP) as u64;
    let mut sets = vec![user, net];
    for namespaces in [others | net, others] {
        sets.extend([namespaces, namespaces | pid, namespaces | user, namespaces | pid | user]);
    }
    let rooted = others & !(libc::CLONE_NEWNS as u64);
    sets.extend([rooted | net, rooted, rooted | net | pid, rooted | pid]);
    // And the spawner's own thread that makes that root (see `crate::partition`).
    sets.push(libc::CLONE_NEWNS as u64);
    arg_in(&mut rules, libc::SYS_unshare, 0, Len::Dword, &sets)?;
    // The spawner enters the partitions' network namespace, made by the thread that
    // started it (see `crate::partition::start_spawner`); a root driver, their empty root
    // (see `crate::sandbox::EMPTY_ROOT_FD_ENV`).
    let entered = [libc::CLONE_NEWNET as u64, libc::CLONE_NEWNS as u64];
    arg_in(&mut rules, libc::SYS_setns, 1, Len::Dword, &entered)?;
    // Mounts: making the tree private, and the empty read-only tmpfs.
    let private = libc::MS_REC | libc::MS_PRIVATE;
    let empty = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    arg_in(&mut rules, libc::SYS_mount, 3, Len::Qword, &[private, empty])?;
    // isatty (env_logger), and a net driver's check that the fd it was handed is a TAP.
    arg_in(
        &mut rules,
        libc::SYS_ioctl,
        1,
        Len::Dword,
        &[libc::TCGETS, splitvisor_devices::virtio::tap::TUNGETIFF],
    )?;
    // A clone is a thread or a new partition: a plain child, born as PID 1 of a PID
    // namespace of its own (and, unprivileged, in a user namespace of its own), or in the
    // spawner's namespaces if the kernel refuses those (the driver then refuses to run).
    let partition = PARTITION_CLONE_FLAGS;
    let pid_namespace = libc::CLONE_NEWPID as u64;
    let user_namespace = libc::CLONE_NEWUSER as u64;
    arg_in(
        &mut rules,
        libc::SYS_clone,
        0,
        Len::Qword,
        &[
            THREAD_CLONE_FLAGS,
            partition,
            partition | pid_namespace,
            partition | pid_namespace | user_namespace,
        ],
    )?;
    // Whatever a partition does while it serves: its own allowlists, merged. Arguments
    // that name one process (its pid) are checked by the partition's own filters; here
    // they are allowed for any.
    for profile in [Profile::VhostUserBlk, Profile::BusProxy, Profile::VhostUserNet] {
        merge(&mut rules, partition_rules(profile, own_pid)?);
    }
    any(&mut rules, &[libc::SYS_tgkill, libc::SYS_wait4, libc::SYS_kill, libc::SYS_write, libc::SYS_close]);
    // The merged partition lists refuse executable mappings; the loader needs them.
    any(&mut rules, &[libc::SYS_mmap, libc::SYS_mprotect, libc::SYS_fcntl]);
    Ok(rules)
}

// ---- The report of a forbidden call ----

thread_local! {
    /// The calling thread's kind and name (NUL-padded), for the SIGSYS report. Constant
    /// initialisation and no destructor: reading it from a signal handler is a plain
    /// thread-local load.
    static REPORTED: Cell<Option<(ThreadKind, [u8; 16])>> = const { Cell::new(None) };
}

/// `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A line built without allocating (the report runs in a signal handler).
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, text: &[u8]) -> &mut Self {
        for &byte in text {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = byte;
                self.len += 1;
            }
        }
        self
    }

    fn number(&mut self, value: i64) -> &mut Self {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let tail = digits;
        self.push(&tail[at..])
    }
}

/// The report's text for thread `thread` and system call `nr`.
fn report_line(thread: Option<(ThreadKind, [u8; 16])>, nr: i64) -> Line {
    let mut line = Line { bytes: [0; 256], len: 0 };
    line.push(b"splitvisor: seccomp: ");
    match thread {
        Some((kind, name)) => {
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            line.push(b"the ").push(kind.name().as_bytes()).push(b" thread '").push(&name[..len]).push(b"'");
        }
        None => {
            line.push(b"a thread started outside splitvisor's thread seam");
        }
    }
    line.push(b" made a forbidden system call: ");
    let name = usize::try_from(nr).ok().and_then(|nr| syscall_names::NAMES.get(nr)).copied().unwrap_or("");
    if name.is_empty() {
        line.push(b"unknown");
    } else {
        line.push(name.as_bytes());
    }
    line.push(b" (").number(nr).push(b"); exiting with status ").number(FORBIDDEN_SYSCALL_EXIT_STATUS.into());
    line.push(b"\n");
    line
}

/// The SIGSYS handler: one line on stderr, then the process ends. Only async-signal-safe
/// calls (write, _exit), both allowed by every filter.
extern "C" fn report_forbidden_call(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel hands a SIGSYS handler a siginfo whose `_sigsys` member is
        // laid out as `SigsysInfo`; the pointer is valid for the handler's duration.
        i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall })
    };
    let line = report_line(REPORTED.with(Cell::get), nr);
    // SAFETY: writes bytes of a live buffer to stderr; async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len) };
    // SAFETY: ends the process at once; async-signal-safe.
    unsafe { libc::_exit(FORBIDDEN_SYSCALL_EXIT_STATUS) }
}

/// Installs the SIGSYS handler (process-wide).
fn install_report() -> Result<(), HypervisorSandboxError> {
    // SAFETY: sigaction is plain data; zeroed is a valid initial value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = report_forbidden_call as extern "C" fn(_, _, _) as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } < 0 {
        return Err(HypervisorSandboxError::SignalHandler(io::Error::last_os_error()));
    }
    Ok(())
}

// ---- The jail ----

/// The only capability a jailed hypervisor keeps: killing partitions, which run as
/// another uid.
const CAP_KILL: u32 = 5;

/// Every namespace the jail enters (the PID namespace is not one: the hypervisor must see
/// its partitions' pids).
const JAIL_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET | libc::CLONE_NEWCGROUP;

/// Threads that may run outside the jail: the partition spawner, and the thread that ends
/// exchanges with a silent peer (it only shuts sockets down; its filter allows no more).
const OUTSIDE_THREADS: &[&str] = &["partition-spawner", "deadlines"];

/// A thread name as the kernel keeps it (`comm`: the first 15 bytes).
fn comm(name: &str) -> &str {
    name.get(..15).unwrap_or(name)
}

/// The names of the threads running now besides the calling one (none may escape the
/// jail but the spawner).
fn other_threads() -> Result<Vec<String>, SandboxError> {
    // SAFETY: gettid has no preconditions.
    let own = unsafe { libc::gettid() }.to_string();
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|source| SandboxError::Setup { what: "list this process's threads", source })?;
    Ok(tasks
        .flatten()
        .filter(|task| task.file_name().to_str() != Some(own.as_str()))
        // A thread that ended while being listed is not running.
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|comm| comm.trim().to_string())
        .collect())
}

/// Enters the jail (see the [module docs](self)) on the calling thread, which must be the
/// only one running but the partition spawner. Threads started afterwards are in it too.
pub fn enter_jail() -> Result<(), HypervisorSandboxError> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(HypervisorSandboxError::JailNeedsRoot { uid });
    }
    let outside: Vec<String> = other_threads()?
        .into_iter()
        .filter(|name| !OUTSIDE_THREADS.iter().any(|o| comm(o) == name))
        .collect();
    if !outside.is_empty() {
        return Err(HypervisorSandboxError::ThreadsRunning { threads: outside.join(", ") });
    }
    // SAFETY: unshare changes only this thread's namespaces (and unshares its fs struct).
    if unsafe { libc::unshare(JAIL_NAMESPACES) } < 0 {
        return Err(SandboxError::Namespaces { source: io::Error::last_os_error() }.into());
    }
    super::pivot_into_empty_root()?;
    keep_only_capability(CAP_KILL)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    super::check("set no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    JAILED.store(true, Ordering::Release);
    log::debug!("the hypervisor entered its jail");
    Ok(())
}

/// Drops every capability of the calling thread but `keep`, from every set.
fn keep_only_capability(keep: u32) -> Result<(), SandboxError> {
    let mut cap = 0;
    // SAFETY: plain integers; PR_CAPBSET_READ answers EINVAL past the last capability.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        if cap != keep as libc::c_int {
            // SAFETY: plain integers.
            super::check("drop the capability bounding set", unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0)
            })?;
        }
        cap += 1;
    }
    // SAFETY: plain integers.
    super::check("clear ambient capabilities", unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    })?;
    let mut header = super::CapHeader { version: super::LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [super::CapData::default(); 2];
    data[(keep / 32) as usize] =
        super::CapData { effective: 1 << (keep % 32), permitted: 1 << (keep % 32), inheritable: 0 };
    // SAFETY: capset reads a v3 header and two data structs, which outlive the call.
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    super::check("drop capabilities", if set < 0 { -1 } else { 0 })
}

/// Closes every fd above stderr: for a program's `main`, first thing, so that nothing it
/// inherited (a terminal's, a parent's, a build tool's descriptors) stays open in the
/// hypervisor. Never for a library: it would close its embedder's fds.
pub fn close_inherited_fds() -> io::Result<()> {
    super::close_other_fds(&[]).map_err(|e| match e {
        SandboxError::Setup { source, .. } => source,
        other => io::Error::other(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &Line) -> String {
        String::from_utf8_lossy(&line.bytes[..line.len]).into_owned()
    }

    #[test]
    fn every_kind_has_a_filter_that_compiles() {
        for kind in ThreadKind::ALL {
            let program =
                compile(rules(kind, 1).unwrap(), SeccompAction::Trap, SeccompAction::Allow).unwrap();
            assert!(!program.is_empty(), "{kind}");
        }
    }

    #[test]
    fn a_vcpu_may_run_but_not_open_sockets_or_set_up_kvm() {
        let vcpu = rules(ThreadKind::Vcpu, 1).unwrap();
        assert!(vcpu.contains_key(&libc::SYS_ioctl));
        for forbidden in
            [libc::SYS_socket, libc::SYS_openat, libc::SYS_execve, libc::SYS_clone, libc::SYS_ptrace]
        {
            assert!(!vcpu.contains_key(&forbidden), "{forbidden}");
        }
        assert_eq!(kvm::RUN, 0xae80);
        assert_eq!(kvm::GET_REGS, 0x8090_ae81);
        assert_eq!(kvm::GET_SREGS, 0x8138_ae83);
    }

    #[test]
    fn the_launcher_allows_what_every_kind_it_starts_does() {
        let launcher = rules(ThreadKind::Launcher, 1).unwrap();
        for kind in ThreadKind::ALL {
            if matches!(kind, ThreadKind::Launcher | ThreadKind::PartitionSpawner) {
                continue;
            }
            for nr in rules(kind, 1).unwrap().keys() {
                assert!(launcher.contains_key(nr), "{kind} needs {nr}");
            }
        }
        assert!(!launcher.contains_key(&libc::SYS_execve));
    }

    #[test]
    fn the_spawner_allows_what_partitions_do_and_no_socket() {
        let spawner = rules(ThreadKind::PartitionSpawner, 1).unwrap();
        for profile in [Profile::VhostUserBlk, Profile::BusProxy] {
            for nr in partition_rules(profile, 1).unwrap().keys() {
                assert!(spawner.contains_key(nr), "{profile:?} needs {nr}");
            }
        }
        for forbidden in
            [libc::SYS_socket, libc::SYS_connect, libc::SYS_bind, libc::SYS_ptrace, libc::SYS_bpf]
        {
            assert!(!spawner.contains_key(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn merging_keeps_the_widest_arguments() {
        let mut rules = Rules::new();
        arg_in(&mut rules, libc::SYS_fcntl, 1, Len::Dword, &[1]).unwrap();
        let mut more = Rules::new();
        arg_in(&mut more, libc::SYS_fcntl, 1, Len::Dword, &[2]).unwrap();
        any(&mut more, &[libc::SYS_read]);
        merge(&mut rules, more);
        assert_eq!(rules[&libc::SYS_fcntl].len(), 2);
        assert!(rules[&libc::SYS_read].is_empty());
        let mut anything = Rules::new();
        any(&mut anything, &[libc::SYS_fcntl]);
        merge(&mut rules, anything);
        assert!(rules[&libc::SYS_fcntl].is_empty());
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let line = text(&report_line(Some((ThreadKind::Vcpu, name)), libc::SYS_socket));
        assert_eq!(
            line,
            "splitvisor: seccomp: the vcpu thread 'vcpu0' made a forbidden system call: socket (41); \
             exiting with status 159\n"
        );
        let line = text(&report_line(None, 9999));
        assert!(line.contains("a thread started outside") && line.contains("unknown (9999)"), "{line}");
        assert_eq!(syscall_names::NAMES[libc::SYS_execve as usize], "execve");
    }
}
