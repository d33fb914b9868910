//! Test hooks (the `test-hooks` feature, which only the workspace's tests enable): make a
//! sandboxed partition try something its sandbox forbids, to show that the sandbox kills
//! it. A release build has none of this.
//!
//! The driver takes `--test-attempt WHAT` ([`Forbidden`]'s text form) and calls
//! [`attempt_and_exit`] at the moment the test is about (a vhost-user partition when the
//! first request arrives, from its worker thread; a proxy partition right after its
//! sandbox is in place). A partition whose sandbox works dies of SIGSYS there (clone3 is
//! answered ENOSYS instead); one that survives exits with [`survived_exit_code`].
//!
//! And a proxy partition late for its sandbox: [`READY_DELAY_ENV`].

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use super::seccomp::THREAD_CLONE_FLAGS;

/// Something a partition must not be able to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forbidden {
    /// `open:PATH`: open a file.
    Open(PathBuf),
    /// `socket`: create a socket.
    Socket,
    /// `exec`: run a program.
    Exec,
    /// `ptrace`: attach to a process.
    Ptrace,
    /// `kill`: signal another process.
    Kill,
    /// `setuid`: change its uid.
    Setuid,
    /// `unshare`: enter a new namespace.
    Unshare,
    /// `fork`: glibc's fork (a clone without CLONE_VM).
    Fork,
    /// `clone-newuser`: a fork-like clone into a new user namespace.
    CloneNewUser,
    /// `clone-thread-newns`: a thread clone with CLONE_NEWNS added (the kernel itself
    /// refuses it with EINVAL, so nothing is created even if the filter let it through).
    CloneThreadNewNs,
    /// `clone3`: must fail with ENOSYS (not kill): glibc then falls back to clone.
    Clone3,
    /// `prctl:N`: a prctl option other than the one the partition uses.
    Prctl(i32),
    /// `mmap-exec`: map executable memory.
    MmapExec,
    /// `allocate:BYTES`: allocate (infallibly, as most code does) more than the
    /// address-space budget: malloc fails and the process aborts (SIGABRT, not SIGSYS:
    /// the allowlist lets abort() report the real cause).
    Allocate(u64),
}

/// How the sandbox answers an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The process dies of this signal.
    Killed(i32),
    /// The call fails with this errno (the hook then exits with [`survived_exit_code`]).
    Failed(i32),
}

impl Forbidden {
    /// Every kind that does not depend on the partition's budget, with `/etc/passwd` to
    /// open and PR_SET_DUMPABLE as the prctl.
    pub fn all() -> Vec<Self> {
        vec![
            Self::Open("/etc/passwd".into()),
            Self::Socket,
            Self::Exec,
            Self::Ptrace,
            Self::Kill,
            Self::Setuid,
            Self::Unshare,
            Self::Fork,
            Self::CloneNewUser,
            Self::CloneThreadNewNs,
            Self::Clone3,
            Self::Prctl(libc::PR_SET_DUMPABLE),
            Self::MmapExec,
        ]
    }

    /// What the sandbox answers.
    pub fn expected(&self) -> Outcome {
        match self {
            Self::Clone3 => Outcome::Failed(libc::ENOSYS),
            Self::Allocate(_) => Outcome::Killed(libc::SIGABRT),
            _ => Outcome::Killed(libc::SIGSYS),
        }
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(path) => write!(f, "open:{}", path.display()),
            Self::Socket => f.write_str("socket"),
            Self::Exec => f.write_str("exec"),
            Self::Ptrace => f.write_str("ptrace"),
            Self::Kill => f.write_str("kill"),
            Self::Setuid => f.write_str("setuid"),
            Self::Unshare => f.write_str("unshare"),
            Self::Fork => f.write_str("fork"),
            Self::CloneNewUser => f.write_str("clone-newuser"),
            Self::CloneThreadNewNs => f.write_str("clone-thread-newns"),
            Self::Clone3 => f.write_str("clone3"),
            Self::Prctl(option) => write!(f, "prctl:{option}"),
            Self::MmapExec => f.write_str("mmap-exec"),
            Self::Allocate(bytes) => write!(f, "allocate:{bytes}"),
        }
    }
}

/// An unknown forbidden operation.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown forbidden operation '{0}' (open:PATH, socket, exec, ptrace, kill, setuid, unshare, fork, clone-newuser, clone-thread-newns, clone3, prctl:N, mmap-exec, allocate:BYTES)"
)]
pub struct UnknownForbidden(pub String);

impl FromStr for Forbidden {
    type Err = UnknownForbidden;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownForbidden(text.to_string());
        if let Some(path) = text.strip_prefix("open:") {
            return Ok(Self::Open(path.into()));
        }
        if let Some(option) = text.strip_prefix("prctl:") {
            return option.parse().map(Self::Prctl).map_err(|_| unknown());
        }
        if let Some(bytes) = text.strip_prefix("allocate:") {
            return bytes.parse().map(Self::Allocate).map_err(|_| unknown());
        }
        Ok(match text {
            "socket" => Self::Socket,
            "exec" => Self::Exec,
            "ptrace" => Self::Ptrace,
            "kill" => Self::Kill,
            "setuid" => Self::Setuid,
            "unshare" => Self::Unshare,
            "fork" => Self::Fork,
            "clone-newuser" => Self::CloneNewUser,
            "clone-thread-newns" => Self::CloneThreadNewNs,
            "clone3" => Self::Clone3,
            "mmap-exec" => Self::MmapExec,
            _ => return Err(unknown()),
        })
    }
}

fn os(result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

/// Tries `what` and returns what the call returned (if the process is still alive). Each
/// attempt is harmless if it succeeds: a new process exits at once, a new fd or mapping is
/// released.
pub fn attempt(what: &Forbidden) -> io::Result<()> {
    let forked = |pid: libc::c_long| {
        if pid == 0 {
            // SAFETY: the new process ends at once.
            unsafe { libc::_exit(0) }
        }
    };
    match what {
        Forbidden::Open(path) => std::fs::File::open(path).map(drop),
        Forbidden::Socket => {
            // SAFETY: plain integers.
            let fd =
                os(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }.into())?;
            // SAFETY: closes the fd just created.
            unsafe { libc::close(fd as libc::c_int) };
            Ok(())
        }
        Forbidden::Exec => {
            let argv = [c"true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path, NULL-terminated argv and envp that outlive the call.
            os(unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) }.into()).map(drop)
        }
        Forbidden::Ptrace => {
            // SAFETY: plain integers; attaching to PID 1 (itself, in its PID namespace).
            os(unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) }).map(drop)
        }
        // SAFETY: signal 0 only checks whether PID 1 could be signalled.
        Forbidden::Kill => os(unsafe { libc::kill(1, 0) }.into()).map(drop),
        // SAFETY: plain integers.
        Forbidden::Setuid => os(unsafe { libc::setuid(0) }.into()).map(drop),
        // SAFETY: plain integers.
        Forbidden::Unshare => os(unsafe { libc::unshare(libc::CLONE_NEWNET) }.into()).map(drop),
        Forbidden::Fork => {
            // SAFETY: the child only calls _exit.
            let pid = os(unsafe { libc::fork() }.into())?;
            forked(pid);
            Ok(())
        }
        Forbidden::CloneNewUser => {
            let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
            // SAFETY: a fork-like clone (no CLONE_VM, the child gets a copy of this stack);
            // the child only calls _exit.
            let pid = os(unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) })?;
            forked(pid);
            Ok(())
        }
        Forbidden::CloneThreadNewNs => {
            let flags = THREAD_CLONE_FLAGS | libc::CLONE_NEWNS as u64;
            // SAFETY: CLONE_NEWNS with CLONE_FS is refused by the kernel (EINVAL) before
            // anything is created.
            os(unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) }).map(drop)
        }
        Forbidden::Clone3 => {
            // SAFETY: NULL arguments of size 0: the kernel answers EINVAL, a filter ENOSYS.
            os(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) }).map(drop)
        }
        Forbidden::Prctl(option) => {
            // SAFETY: plain integers.
            os(unsafe { libc::prctl(*option, 0, 0, 0, 0) }.into()).map(drop)
        }
        Forbidden::MmapExec => {
            let prot = libc::PROT_READ | libc::PROT_EXEC;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            // SAFETY: a new anonymous mapping, unmapped below.
            let map = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0) };
            if map == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(map, 4096) };
            Ok(())
        }
        Forbidden::Allocate(bytes) => {
            let bytes = usize::try_from(*bytes).map_err(io::Error::other)?;
            let block = vec![0u8; bytes];
            // Keep the allocation from being optimised away.
            std::hint::black_box(&block);
            Ok(())
        }
    }
}

/// Exit status base of a partition that survived its attempt: `SURVIVED_EXIT_BASE` if
/// the call succeeded, plus the errno if it failed.
pub const SURVIVED_EXIT_BASE: i32 = 100;

/// The exit status of a partition whose attempt returned `result`.
pub fn survived_exit_code(result: &io::Result<()>) -> i32 {
    SURVIVED_EXIT_BASE + result.as_ref().err().and_then(io::Error::raw_os_error).unwrap_or(0)
}

/// Tries `what`; if the process survives, logs it and exits with [`survived_exit_code`].
pub fn attempt_and_exit(what: &Forbidden) -> ! {
    let result = attempt(what);
    log::error!("sandbox test: {what} returned {result:?}");
    std::process::exit(survived_exit_code(&result))
}

/// In the environment of a hypervisor (which passes it on to the partitions it starts), a
/// number of milliseconds every proxy partition waits before it sandboxes itself: a
/// partition still setting up while the guest runs ([`delay_before_sandbox`]).
pub const READY_DELAY_ENV: &str = "SPLITVISOR_TEST_READY_DELAY_MS";

/// Waits as [`READY_DELAY_ENV`] says, if it is set.
pub fn delay_before_sandbox() {
    if let Some(ms) = std::env::var(READY_DELAY_ENV).ok().and_then(|ms| ms.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_operations_round_trip_as_text() {
        for what in Forbidden::all() {
            assert_eq!(what.to_string().parse::<Forbidden>().unwrap(), what);
        }
        assert_eq!("open:/a,b".parse::<Forbidden>().unwrap(), Forbidden::Open("/a,b".into()));
        assert!("prctl:x".parse::<Forbidden>().is_err());
        assert_eq!("allocate:4096".parse::<Forbidden>().unwrap(), Forbidden::Allocate(4096));
        assert!("mount".parse::<Forbidden>().is_err());
    }

    #[test]
    fn survivors_report_the_errno() {
        assert_eq!(survived_exit_code(&Ok(())), 100);
        assert_eq!(survived_exit_code(&Err(io::Error::from_raw_os_error(libc::ENOSYS))), 138);
    }
}
