//! Starting the hypervisor's threads through one seam.
//!
//! Every thread a splitvisor crate starts (vCPUs, device workers, the supervisor, the
//! control socket, ...) is started with [`spawn`], which says what *kind* of thread it is.
//! A program that sandboxes its own threads registers one process-wide hook
//! ([`set_hook`]) that runs inside each new thread, before the thread's work, and is told
//! the thread's kind: the hook installs that kind's seccomp filter. The crates that start
//! threads never learn about seccomp.
//!
//! # Why the order matters
//!
//! A seccomp filter applies to the thread that installs it and is *inherited* by every
//! thread that thread creates afterwards: a thread started by a filtered thread runs
//! under its creator's filter and its own, and may only make the calls both allow.
//! So:
//!
//! * a thread started by a thread that has no filter yet (the main thread while it sets
//!   the VM up) is created directly and gets exactly its own kind's filter;
//! * a thread started by a filtered thread (a virtio device's worker, started by the
//!   vCPU thread on which the guest activates the device) is created by the *launcher*
//!   ([`start_launcher`], or [`open_launcher`] and later [`LauncherQueue::start`]), a
//!   thread whose own filter allows what every kind may do, so that the new thread ends
//!   up with exactly its own kind's filter, whoever asked for it;
//! * the main thread installs its own filter last ([`enter`]), once it has started what
//!   it starts directly.
//!
//! [`spawn`] returns only once the hook has run in the new thread: if it fails, the
//! thread never runs its work and `spawn` returns the hook's error. [`start`] returns at
//! once, and its [`StartingThread::started`] waits for the hook later.
//!
//! Without a hook, [`spawn`] is `std::thread::Builder::new().name(name).spawn(f)` that
//! returns once the thread runs under its name (a jail that lists the process's threads
//! by name must not see a new one under the process's name).
//!
//! ```
//! use splitvisor_bus::threads::{self, ThreadKind};
//!
//! let worker = threads::spawn(ThreadKind::DeviceWorker, "example-worker", || 6 * 7).unwrap();
//! assert_eq!(worker.join().unwrap(), 42);
//! ```

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What a thread does, which decides what it may do once sandboxed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The thread that builds the VM, then waits for it to end and tears it down.
    Main,
    /// A vCPU: KVM_RUN and the exits it dispatches (device registers, proxies).
    Vcpu,
    /// A device's I/O worker in the hypervisor (virtio queues: eventfds, the image).
    DeviceWorker,
    /// Watches driver partitions and restarts them.
    Supervisor,
    /// Serves the control socket.
    Control,
    /// Feeds standard input to the guest console.
    ConsoleInput,
    /// Starts driver partitions (fork and exec of the driver program).
    PartitionSpawner,
    /// Watches for the host's stop signals (Ctrl-C, SIGTERM, SIGHUP) and stops the VM.
    Signals,
    /// Creates the threads that filtered threads ask for (see the [module docs](self)).
    Launcher,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::DeviceWorker,
        ThreadKind::Supervisor,
        ThreadKind::Control,
        ThreadKind::ConsoleInput,
        ThreadKind::PartitionSpawner,
        ThreadKind::Signals,
        ThreadKind::Launcher,
    ];

    /// A short name, for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device worker",
            ThreadKind::Supervisor => "supervisor",
            ThreadKind::Control => "control socket",
            ThreadKind::ConsoleInput => "console input",
            ThreadKind::PartitionSpawner => "partition spawner",
            ThreadKind::Signals => "signals",
            ThreadKind::Launcher => "launcher",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The process-wide hook: runs in each new thread (and in a thread that [`enter`]s), told
/// its kind, before anything else. An error stops the thread before its work.
pub type ThreadHook = dyn Fn(ThreadKind) -> io::Result<()> + Send + Sync;

/// Longest a thread start may take (the hook and, through the launcher, the hand-over).
const START_TIMEOUT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send>;

static HOOK: OnceLock<Box<ThreadHook>> = OnceLock::new();
static LAUNCHER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
/// Why the launcher could not start, once it could not.
static LAUNCHER_FAILURE: OnceLock<String> = OnceLock::new();

thread_local! {
    /// The kind the hook ran for on this thread, if it ran.
    static ENTERED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Registers the process-wide hook. Returns `false` (and keeps the first) if one was
/// registered already: there is one per process.
pub fn set_hook(hook: Box<ThreadHook>) -> bool {
    HOOK.set(hook).is_ok()
}

/// Whether a hook is registered.
pub fn hook_is_set() -> bool {
    HOOK.get().is_some()
}

/// The kind the hook ran for on the calling thread, if it ran.
pub fn current() -> Option<ThreadKind> {
    ENTERED.with(Cell::get)
}

/// Runs the hook on the calling thread as a thread of kind `kind` (the main thread
/// sandboxing itself). Without a hook, nothing happens. Entering again as the same kind
/// does nothing; as another kind it is an error (the thread keeps what it has).
pub fn enter(kind: ThreadKind) -> io::Result<()> {
    let Some(hook) = HOOK.get() else { return Ok(()) };
    match current() {
        Some(entered) if entered == kind => Ok(()),
        Some(entered) => Err(io::Error::other(format!(
            "this thread is already sandboxed as a {entered} thread, not a {kind} thread"
        ))),
        None => {
            hook(kind)?;
            ENTERED.with(|cell| cell.set(Some(kind)));
            Ok(())
        }
    }
}

/// Starts the launcher thread, which creates the threads that threads already sandboxed
/// ask for (see the [module docs](self)): [`open_launcher`], then [`LauncherQueue::start`].
pub fn start_launcher() -> io::Result<()> {
    open_launcher()?.map_or(Ok(()), LauncherQueue::start)
}

/// Opens the launcher's queue without starting its thread yet: from here on a sandboxed
/// thread's [`spawn`] is queued for the launcher instead of refused. Call it from a thread
/// that has not entered (its filter would be the launcher's too), after [`set_hook`].
/// `None` if the queue is open already (once is enough).
///
/// This lets a caller put the thread's start, and its filter's install, after work that
/// must not wait for a CPU behind them (a VM's vCPUs, which may ask for threads as soon
/// as they run). What is asked meanwhile waits in the queue; if the [`LauncherQueue`] is
/// dropped unstarted, every [`spawn`] that waits on it fails.
pub fn open_launcher() -> io::Result<Option<LauncherQueue>> {
    if HOOK.get().is_none() {
        return Err(io::Error::other("no thread hook is registered: there is nothing to launch for"));
    }
    if let Some(kind) = current() {
        return Err(io::Error::other(format!(
            "the launcher must be started by a thread that is not sandboxed (this one is a {kind} thread)"
        )));
    }
    let (jobs, incoming) = mpsc::channel::<Job>();
    if LAUNCHER.set(jobs).is_err() {
        return Ok(None);
    }
    Ok(Some(LauncherQueue { incoming: Some(incoming) }))
}

/// The launcher's open queue, whose thread is not started yet ([`open_launcher`]).
#[derive(Debug)]
pub struct LauncherQueue {
    /// Taken by [`LauncherQueue::start`].
    incoming: Option<mpsc::Receiver<Job>>,
}

impl LauncherQueue {
    /// Starts the launcher thread, which serves the queue. This does not wait for the hook
    /// to run in the launcher: the caller goes on at once. If the hook fails there, the
    /// launcher logs why and ends, and every [`spawn`] that needs it fails with that reason.
    pub fn start(mut self) -> io::Result<()> {
        let (Some(hook), Some(incoming)) = (HOOK.get(), self.incoming.take()) else {
            return Err(io::Error::other("no thread hook is registered: there is nothing to launch for"));
        };
        let started = std::thread::Builder::new().name("thread-launcher".into()).spawn(move || {
            if let Err(e) = hook(ThreadKind::Launcher) {
                log::error!("the thread launcher cannot start: {e}");
                let _ = LAUNCHER_FAILURE.set(e.to_string());
                return; // drops the queue: whoever waits on a job hears that it is gone
            }
            ENTERED.with(|cell| cell.set(Some(ThreadKind::Launcher)));
            for job in incoming {
                job();
            }
        });
        if let Err(e) = started {
            let _ = LAUNCHER_FAILURE.set(e.to_string());
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for LauncherQueue {
    fn drop(&mut self) {
        if self.incoming.is_some() {
            let _ = LAUNCHER_FAILURE.set("its queue was dropped before its thread started".to_string());
        }
    }
}

/// Why the launcher is gone: the error of a [`spawn`] that needed it.
fn launcher_gone() -> io::Error {
    let why = LAUNCHER_FAILURE.get().map_or("", String::as_str);
    io::Error::other(format!("the thread launcher is gone: {why}"))
}

/// Starts a thread of kind `kind` named `name` running `f`. With a hook registered, the
/// hook runs in the new thread first, and this returns once it has (its error if it
/// failed); a thread already sandboxed has the launcher create the thread.
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    let Some(hook) = HOOK.get() else {
        return start_unwaited(None, kind, name, f)?.started();
    };
    if current().is_none() {
        return start_unwaited(Some(hook.as_ref()), kind, name, f)?.started();
    }
    let Some(launcher) = LAUNCHER.get() else {
        return Err(io::Error::other(format!(
            "a sandboxed thread cannot start the {kind} thread '{name}' before the launcher runs"
        )));
    };
    let (reply, result) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ =
            reply.send(start_unwaited(Some(hook.as_ref()), kind, name, f).and_then(StartingThread::started));
    });
    launcher.send(job).map_err(|_| launcher_gone())?;
    result.recv_timeout(START_TIMEOUT * 2).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => {
            io::Error::new(io::ErrorKind::TimedOut, "the thread launcher did not answer")
        }
        mpsc::RecvTimeoutError::Disconnected => launcher_gone(),
    })?
}

/// [`spawn`], without waiting for the hook: the thread installs its filter while the
/// caller goes on, and [`StartingThread::started`] waits for it (a VM's vCPU threads are
/// started while the VM is set up). From a thread already sandboxed, the launcher creates
/// the thread, and this waits for it as [`spawn`] does.
pub fn start<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<StartingThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    match HOOK.get() {
        None => start_unwaited(None, kind, name, f),
        Some(hook) if current().is_none() => start_unwaited(Some(hook.as_ref()), kind, name, f),
        Some(_) => Ok(StartingThread { thread: spawn(kind, name, f)?, hooked: None }),
    }
}

/// The hook failed in the new thread: it ends without running its work. (Unwound with
/// `resume_unwind`, which does not print a panic message: the caller reports the error.)
struct HookFailed;

/// Creates the thread from the calling thread; the hook, if any, runs in it before `f`,
/// and the result says when it has (without a hook: when the thread runs, named).
fn start_unwaited<F, T>(
    hook: Option<&'static ThreadHook>,
    kind: ThreadKind,
    name: String,
    f: F,
) -> io::Result<StartingThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (started, hooked) = mpsc::sync_channel::<io::Result<()>>(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // std named the thread before it runs this.
        let Some(hook) = hook else {
            let _ = started.send(Ok(()));
            return f();
        };
        let entered = hook(kind);
        let ok = entered.is_ok();
        if ok {
            ENTERED.with(|cell| cell.set(Some(kind)));
        }
        let _ = started.send(entered);
        if !ok {
            std::panic::resume_unwind(Box::new(HookFailed));
        }
        f()
    })?;
    Ok(StartingThread { thread, hooked: Some((kind, hooked)) })
}

/// A thread [`start`]ed, whose hook may still be running in it.
#[derive(Debug)]
pub struct StartingThread<T> {
    thread: JoinHandle<T>,
    /// The thread's kind and where its hook reports; `None`: nothing to wait for.
    hooked: Option<(ThreadKind, mpsc::Receiver<io::Result<()>>)>,
}

impl<T> StartingThread<T> {
    /// Whether the thread has ended (its hook failed, or its work is done).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits until the hook has run in the thread: its handle, or the hook's error (the
    /// thread then never runs its work).
    pub fn started(self) -> io::Result<JoinHandle<T>> {
        let Self { thread, hooked } = self;
        let Some((kind, hooked)) = hooked else {
            return Ok(thread);
        };
        match hooked.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the {kind} thread did not finish its start within {START_TIMEOUT:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_hook_spawn_is_a_named_thread() {
        let name = spawn(ThreadKind::Supervisor, "plain", || std::thread::current().name().map(String::from))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(name.as_deref(), Some("plain"));
        assert_eq!(current(), None);
    }

    #[test]
    fn without_a_hook_spawn_returns_once_the_thread_bears_its_name() {
        let named = |name: &str| {
            std::fs::read_dir("/proc/self/task").unwrap().flatten().any(|task| {
                std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
            })
        };
        // The kernel learns the name from the new thread itself: a list of the process's
        // threads taken right after an early return could show it under the process's name.
        for round in 0..50 {
            let name = format!("named-{round}");
            let (release, wait) = mpsc::channel::<()>();
            let thread = spawn(ThreadKind::DeviceWorker, name.as_str(), move || {
                let _ = wait.recv();
            })
            .unwrap();
            assert!(named(&name), "round {round}: the thread is not yet named");
            drop(release);
            thread.join().unwrap();
        }
    }

    #[test]
    fn kinds_have_distinct_names() {
        let mut names: Vec<&str> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len());
    }
}
