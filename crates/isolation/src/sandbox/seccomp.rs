//! The seccomp allowlists: one per kind of partition process, each call with its reason.
//!
//! Every list is the set of system calls that kind of process was seen to make once
//! sandboxed (`strace -ff` of the driver serving `blk-bench` and `blk-verify`, and of the
//! proxies serving a guest), and nothing else. Anything not listed, or listed with other
//! arguments, kills the whole process (SIGSYS). A new system call in device or backend code
//! must be added here with its reason (the tests in `tests/sandbox.rs` catch a missing one).
//!
//! x86_64 and glibc: the thread-creating clone flags are glibc's.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use splitvisor_devices::virtio::block_io::MAX_IN_FLIGHT;

use super::{Profile, SandboxError};

/// The flags glibc's `pthread_create` passes to clone: a thread sharing everything, and
/// nothing else (no namespace, no fork, no vfork, no ptrace).
pub(crate) const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

pub(super) fn error(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Seccomp(e.to_string())
}

/// Allowed with any arguments.
pub(super) fn any(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for nr in syscalls {
        rules.insert(*nr, Vec::new());
    }
}

/// Allowed only when argument `index` is one of `values`.
pub(super) fn arg_in(
    rules: &mut Rules,
    nr: libc::c_long,
    index: u8,
    len: Len,
    values: &[u64],
) -> Result<(), SandboxError> {
    let alternatives = values
        .iter()
        .map(|value| SeccompRule::new(vec![SeccompCondition::new(index, len.clone(), Op::Eq, *value)?]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    rules.insert(nr, alternatives);
    Ok(())
}

/// Allowed only when argument `index` has none of the bits of `mask`.
pub(super) fn arg_without(
    rules: &mut Rules,
    nr: libc::c_long,
    index: u8,
    mask: u64,
) -> Result<(), SandboxError> {
    let condition = SeccompCondition::new(index, Len::Dword, Op::MaskedEq(mask), 0).map_err(error)?;
    rules.insert(nr, vec![SeccompRule::new(vec![condition]).map_err(error)?]);
    Ok(())
}

pub(super) fn compile(
    rules: Rules,
    on_mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    SeccompFilter::new(rules, on_mismatch, on_match, TargetArch::x86_64)
        .map_err(error)?
        .try_into()
        .map_err(|e: seccompiler::BackendError| error(e))
}

/// What every partition process needs once sandboxed, whatever it serves.
fn common(rules: &mut Rules, own_pid: libc::pid_t) -> Result<(), SandboxError> {
    any(
        rules,
        &[
            // Output to its socket or eventfd (the irqfd), its readiness byte, its log on
            // stderr.
            libc::SYS_write,
            // Dropping fds.
            libc::SYS_close,
            // The heap: glibc's malloc grows the main arena with brk, large blocks and
            // other arenas with mmap (rules below), frees with munmap and madvise, and
            // Vec reallocates large blocks with mremap.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            // Returning from a signal handler (Rust's stack-overflow handler).
            libc::SYS_rt_sigreturn,
            // A sleep or a poll with a timeout that something interrupted goes on through
            // restart_syscall: an io_uring's completion work interrupts the other threads
            // of its process that way, and so do a stop and a continue.
            libc::SYS_restart_syscall,
            // Rust tears down the thread's alternate signal stack at exit.
            libc::SYS_sigaltstack,
            // abort() (an allocation failure under RLIMIT_AS, a panic in a drop) blocks
            // signals and raises SIGABRT at itself: it dies of SIGABRT, not of SIGSYS.
            libc::SYS_rt_sigprocmask,
            libc::SYS_getpid,
            libc::SYS_gettid,
            // The end of the process and of a thread.
            libc::SYS_exit_group,
            libc::SYS_exit,
        ],
    );
    // abort()'s tgkill, only at itself.
    arg_in(rules, libc::SYS_tgkill, 0, Len::Dword, &[own_pid as u32 as u64])?;
    // Memory, but never executable: no new code once sandboxed.
    let exec = libc::PROT_EXEC as u64;
    arg_without(rules, libc::SYS_mmap, 2, exec)?;
    arg_without(rules, libc::SYS_mprotect, 2, exec)?;
    Ok(())
}

/// io_uring for a disk's I/O engine, as narrowly as the engine uses it: a ring of
/// [`MAX_IN_FLIGHT`] entries, entered to submit and to wait (no SQPOLL wake-up, no
/// extended arguments), registered with the image as its one file (unregistered when dropped), a restriction
/// set and then enabled. The restriction set (READV, WRITEV and FSYNC on the registered file only,
/// registered by the engine before the ring runs) bounds what the ring itself can do:
/// seccomp does not see the operations a ring carries out.
pub(super) fn io_uring(rules: &mut Rules) -> Result<(), SandboxError> {
    arg_in(rules, libc::SYS_io_uring_setup, 0, Len::Dword, &[MAX_IN_FLIGHT as u64])?;
    // IORING_ENTER_GETEVENTS or nothing.
    arg_in(rules, libc::SYS_io_uring_enter, 3, Len::Dword, &[0, 1])?;
    // IORING_REGISTER_FILES, IORING_UNREGISTER_FILES (when the engine is dropped),
    // IORING_REGISTER_RESTRICTIONS, IORING_REGISTER_ENABLE_RINGS.
    arg_in(rules, libc::SYS_io_uring_register, 1, Len::Dword, &[2, 3, 11, 12])
}

/// The partition's filters, to install in this order: the first answers clone3 with ENOSYS
/// (glibc then creates threads with clone, whose flags a filter can check; clone3's are
/// behind a pointer), the second is the allowlist of `profile`, which kills on anything
/// else. The kernel applies the stricter answer of the two.
pub(super) fn partition_filters(
    profile: Profile,
    own_pid: libc::pid_t,
) -> Result<[BpfProgram; 2], SandboxError> {
    let allowlist =
        compile(partition_rules(profile, own_pid)?, SeccompAction::KillProcess, SeccompAction::Allow)?;
    Ok([clone3_enosys()?, allowlist])
}

/// A filter that answers clone3 with ENOSYS and allows everything else: glibc then
/// creates threads with clone, whose flags a filter can check.
pub(super) fn clone3_enosys() -> Result<BpfProgram, SandboxError> {
    let mut clone3 = Rules::new();
    any(&mut clone3, &[libc::SYS_clone3]);
    compile(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// The allowlist of a partition process of kind `profile` (see [`partition_filters`]).
pub(super) fn partition_rules(profile: Profile, own_pid: libc::pid_t) -> Result<Rules, SandboxError> {
    let mut rules = Rules::new();
    common(&mut rules, own_pid)?;
    // Let clone3 through to the first filter's ENOSYS.
    any(&mut rules, &[libc::SYS_clone3]);
    match profile {
        Profile::BusProxy => {
            any(
                &mut rules,
                &[
                    // The proxy connection: the doorbells (eventfds, read; written with
                    // the common write) awaited with poll together with the socket, whose
                    // hang-up ends the partition (recvfrom tells it from stray bytes).
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // The bounded spin on the page reads the clock and the CPU it runs
                    // on (the vDSO's, unless the host makes them fall back to the calls).
                    libc::SYS_clock_gettime,
                    libc::SYS_getcpu,
                ],
            );
            // Moving itself off the vCPU's CPU (its own thread only).
            arg_in(&mut rules, libc::SYS_sched_setaffinity, 0, Len::Dword, &[0])?;
            // Rust's debug builds check an fd is open before closing it.
            arg_in(&mut rules, libc::SYS_fcntl, 1, Len::Dword, &[libc::F_GETFD as u64])?;
        }
        Profile::VhostUserBlk => {
            any(
                &mut rules,
                &[
                    // Eventfds (kick, call, the worker's exit event).
                    libc::SYS_read,
                    // The image: one vector per request, straight into guest memory.
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    // VIRTIO_BLK_T_FLUSH.
                    libc::SYS_fdatasync,
                    // vhost-user: the frontend's connection (messages carry fds; an early
                    // SET_VRING_ENABLE is peeked at and answered with recv and send) ...
                    libc::SYS_accept4,
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                    // ... served from an epoll loop per worker, with an exit eventfd each.
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_wait,
                    libc::SYS_eventfd2,
                    // Threads: locks, glibc's per-thread set-up (robust futex list, rseq,
                    // the affinity pthread_getattr_np reads for the stack guard), and
                    // SIGCANCEL's handler, installed at the first pthread_create.
                    libc::SYS_futex,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    libc::SYS_sched_getaffinity,
                    libc::SYS_rt_sigaction,
                    // std's HashMap seeds.
                    libc::SYS_getrandom,
                    // A hand-started backend waits on its connection and its listener
                    // together (to refuse a second frontend).
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // The inflight region a backend allocates for its frontend
                    // (GET_INFLIGHT_FD): anonymous shared memory, no file.
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    // An injected hang (--inject-fault hang-after=N) sleeps for ever.
                    libc::SYS_clock_nanosleep,
                    // The workers' bounded looks at the rings before they sleep read the
                    // clock: the vDSO here, the system call where the kernel's clock
                    // source has no vDSO path.
                    libc::SYS_clock_gettime,
                ],
            );
            // The I/O engine: io_uring (where the kernel has it; else the same threads
            // and calls as above).
            io_uring(&mut rules)?;
            // Threads and nothing else: no fork, no new namespace.
            arg_in(&mut rules, libc::SYS_clone, 0, Len::Qword, &[THREAD_CLONE_FLAGS])?;
            // Naming a thread (std::thread::Builder::name).
            arg_in(&mut rules, libc::SYS_prctl, 0, Len::Dword, &[libc::PR_SET_NAME as u64])?;
            // Checking an fd (Rust's debug builds) and duplicating one (try_clone).
            arg_in(
                &mut rules,
                libc::SYS_fcntl,
                1,
                Len::Dword,
                &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64],
            )?;
        }
        Profile::VhostUserNet => {
            any(
                &mut rules,
                &[
                    // Frames from the TAP (writes are in the common list), and eventfds
                    // (kick, call, the worker's exit event).
                    libc::SYS_read,
                    // vhost-user: the frontend's connection (messages carry fds; an early
                    // SET_VRING_ENABLE is peeked at and answered with recv and send) ...
                    libc::SYS_accept4,
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                    // ... served from an epoll loop per queue (the receive queue's also
                    // watches the TAP), with an exit eventfd each.
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_wait,
                    libc::SYS_eventfd2,
                    // Threads, as for virtio-blk.
                    libc::SYS_futex,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    libc::SYS_sched_getaffinity,
                    libc::SYS_rt_sigaction,
                    libc::SYS_getrandom,
                    // A hand-started backend refuses a second frontend.
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // The inflight region (GET_INFLIGHT_FD).
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    // An injected hang sleeps for ever.
                    libc::SYS_clock_nanosleep,
                ],
            );
            arg_in(&mut rules, libc::SYS_clone, 0, Len::Qword, &[THREAD_CLONE_FLAGS])?;
            arg_in(&mut rules, libc::SYS_prctl, 0, Len::Dword, &[libc::PR_SET_NAME as u64])?;
            arg_in(
                &mut rules,
                libc::SYS_fcntl,
                1,
                Len::Dword,
                &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64],
            )?;
            // The TAP's offloads and header size follow the features the guest's driver
            // negotiates; no other ioctl (no TUNSETIFF: the partition cannot attach to
            // another interface).
            arg_in(
                &mut rules,
                libc::SYS_ioctl,
                1,
                Len::Dword,
                &[
                    splitvisor_devices::virtio::tap::TUNSETOFFLOAD,
                    splitvisor_devices::virtio::tap::TUNSETVNETHDRSZ,
                ],
            )?;
        }
    }
    Ok(rules)
}

/// The watcher's filter: it writes the gate byte its child waits for on `gate` and closes
/// it, waits for `child`, and dies the way its child died (restoring the default action,
/// raising the signal at itself) or exits.
pub(super) fn watcher_filter(
    child: libc::pid_t,
    own_pid: libc::pid_t,
    gate: RawFd,
) -> Result<BpfProgram, SandboxError> {
    compile(watcher_rules(child, own_pid, gate)?, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// The watcher's allowlist (see [`watcher_filter`]).
pub(super) fn watcher_rules(
    child: libc::pid_t,
    own_pid: libc::pid_t,
    gate: RawFd,
) -> Result<Rules, SandboxError> {
    let mut rules = Rules::new();
    arg_in(&mut rules, libc::SYS_wait4, 0, Len::Dword, &[child as u32 as u64])?;
    arg_in(&mut rules, libc::SYS_write, 0, Len::Dword, &[gate as u32 as u64])?;
    arg_in(&mut rules, libc::SYS_close, 0, Len::Dword, &[gate as u32 as u64])?;
    arg_in(&mut rules, libc::SYS_tgkill, 0, Len::Dword, &[own_pid as u32 as u64])?;
    any(
        &mut rules,
        &[
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit_group,
        ],
    );
    Ok(rules)
}

/// Installs `program` on the calling thread (and the threads it creates from then on).
pub(super) fn install(program: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(program).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for profile in [Profile::VhostUserBlk, Profile::BusProxy, Profile::VhostUserNet] {
            let [clone3, allowlist] = partition_filters(profile, 1).unwrap();
            assert!(!clone3.is_empty() && !allowlist.is_empty());
        }
        assert!(!watcher_filter(2, 1, 5).unwrap().is_empty());
    }

    #[test]
    fn thread_flags_are_glibcs() {
        assert_eq!(THREAD_CLONE_FLAGS, 0x3d0f00);
    }
}
