//! The partition sandbox, applied by the partition to itself before it touches guest data.
//!
//! In order: every fd but the ones it was handed is closed; new user, mount, network and
//! IPC namespaces (where the kernel allows); the root becomes an empty directory; resource
//! limits; `no_new_privs`; a seccomp allowlist that kills the process on any other system
//! call (no open/openat of files, no socket creation, no exec, no ptrace). Before the
//! filter, a fork into a new PID namespace: the device is served by PID 1 there, while the
//! process the hypervisor started (and watches) holds nothing and only waits for it. A partition never
//! holds /dev/kvm or the VM fd: it is never given them.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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
    /// The seccomp filter could not be built or applied.
    #[error("sandbox: seccomp: {0}")]
    Seccomp(String),
}

fn check(what: &'static str, result: libc::c_int) -> Result<(), SandboxError> {
    if result < 0 {
        return Err(SandboxError::Setup { what, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Closes every fd above stderr except `keep`.
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), SandboxError> {
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

/// New user, mount, network and IPC namespaces, mapping our uid and gid to root inside.
/// Returns which were entered; a kernel that refuses user namespaces is not an error.
pub fn enter_namespaces() -> Result<bool, SandboxError> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    // SAFETY: getgid has no preconditions.
    let gid = unsafe { libc::getgid() };
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(flags) } < 0 {
        log::warn!("sandbox: no new namespaces: {}", io::Error::last_os_error());
        return Ok(false);
    }
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|source| SandboxError::Setup { what: "map ids", source })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    Ok(true)
}

/// Makes an empty directory the root: nothing of the host's file system stays reachable.
/// The directory is removed before it becomes the root (it stays the working directory), so
/// nothing is left behind in /tmp and nothing can ever be created in it.
pub fn chroot_into_empty_dir() -> Result<(), SandboxError> {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("splitvisor-root-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir)
        .map_err(|source| SandboxError::Setup { what: "create the empty root", source })?;
    let entered = std::env::set_current_dir(&dir);
    let removed = std::fs::remove_dir(&dir);
    entered.map_err(|source| SandboxError::Setup { what: "enter the empty root", source })?;
    removed.map_err(|source| SandboxError::Setup { what: "remove the empty root's name", source })?;
    // SAFETY: chroot takes a NUL-terminated path; "." is the (now nameless) directory.
    check("chroot", unsafe { libc::chroot(c".".as_ptr()) })?;
    // SAFETY: as above.
    check("chdir to the new root", unsafe { libc::chdir(c"/".as_ptr()) })?;
    Ok(())
}

/// Resource limits: few fds, no core dumps, no locked memory.
pub fn limit_resources() -> Result<(), SandboxError> {
    for (resource, limit) in [(libc::RLIMIT_NOFILE, 64), (libc::RLIMIT_CORE, 0), (libc::RLIMIT_MEMLOCK, 0)] {
        let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        // SAFETY: setrlimit reads one rlimit struct.
        check("set resource limits", unsafe { libc::setrlimit(resource, &rlimit) })?;
    }
    Ok(())
}

/// The system calls a vhost-user-blk backend makes once set up.
const ALLOWED_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tgkill,
    // The watcher outside the PID namespace waits for the partition.
    libc::SYS_wait4,
    // A hand-started backend waits on its connection and its listener together.
    libc::SYS_poll,
    libc::SYS_ppoll,
    // The inflight region a vhost-user backend allocates (anonymous shared memory).
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

/// The seccomp program: the allowlist, everything else kills the process.
pub fn seccomp_program() -> Result<BpfProgram, SandboxError> {
    let rules = ALLOWED_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect::<BTreeMap<_, _>>();
    let filter =
        SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
}

/// Moves the work into a new PID namespace: forks a child that is PID 1 there and returns
/// in it; the parent (the process the hypervisor started and supervises) closes what it
/// holds, waits, and exits as its child did. Needs a single-threaded process.
fn enter_pid_namespace(keep: &[RawFd]) -> Result<(), SandboxError> {
    // SAFETY: unshare only changes the namespace of this process's future children.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        log::warn!("sandbox: no new PID namespace: {}", io::Error::last_os_error());
        return Ok(());
    }
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
        // The child serves; it must not outlive the process the hypervisor watches.
        // SAFETY: PR_SET_PDEATHSIG takes plain integers.
        check("set the parent-death signal", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
        })?;
        return Ok(());
    }
    // The parent keeps nothing of the device's, and is filtered like its child.
    for fd in keep {
        // SAFETY: closing fds this process owns and will not use again.
        unsafe { libc::close(*fd) };
    }
    apply_seccomp()?;
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing into `status`.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        if waited == child || (waited < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
        {
            break;
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // Die the same way, so the supervisor sees the real cause (SIGSYS for seccomp).
        // SAFETY: restores the default action of a signal number the kernel reported.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        // SAFETY: raising a signal at ourselves has no memory effects.
        unsafe { libc::raise(signal) };
    }
    std::process::exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 });
}

/// Applies every step, for a process that keeps only the fds `keep`. Call it while the
/// process has one thread: it forks into a new PID namespace, and seccomp applies to the
/// calling thread and the ones it creates. Returns in the process that serves.
pub fn apply(keep: &[RawFd]) -> Result<(), SandboxError> {
    close_other_fds(keep)?;
    let namespaces = enter_namespaces()?;
    if namespaces {
        chroot_into_empty_dir()?;
    }
    limit_resources()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    check("set no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    if namespaces {
        enter_pid_namespace(keep)?;
    }
    apply_seccomp()?;
    log::debug!("sandbox applied (namespaces: {namespaces})");
    Ok(())
}

fn apply_seccomp() -> Result<(), SandboxError> {
    let program = seccomp_program()?;
    seccompiler::apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))
}
