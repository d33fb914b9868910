//! The thread seam with a hook registered (a process of its own: the hook is process-wide).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io;
use std::sync::Mutex;

use splitvisor_bus::threads::{self, ThreadKind};

/// Every (kind, thread name) the hook ran for, in order.
static SEEN: Mutex<Vec<(ThreadKind, String)>> = Mutex::new(Vec::new());

fn hook(kind: ThreadKind) -> io::Result<()> {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    SEEN.lock().unwrap().push((kind, name));
    if kind == ThreadKind::Signals {
        return Err(io::Error::other("no signals thread here"));
    }
    Ok(())
}

fn seen(name: &str) -> Vec<ThreadKind> {
    SEEN.lock().unwrap().iter().filter(|(_, n)| n == name).map(|(k, _)| *k).collect()
}

#[test]
fn the_hook_runs_in_each_thread_before_its_work_and_sandboxed_threads_go_through_the_launcher() {
    assert!(threads::set_hook(Box::new(hook)));
    assert!(!threads::set_hook(Box::new(|_| Ok(()))), "one hook per process");

    // Started directly: the hook ran in the new thread, before its work, with its kind.
    let worker =
        threads::spawn(ThreadKind::Vcpu, "vcpu-test", || (threads::current(), SEEN.lock().unwrap().len()))
            .unwrap();
    let (kind, seen_before_work) = worker.join().unwrap();
    assert_eq!(kind, Some(ThreadKind::Vcpu));
    assert_eq!(seen("vcpu-test"), vec![ThreadKind::Vcpu]);
    assert!(seen_before_work >= 1);

    // A failing hook: the work never runs and spawn says why.
    let error = threads::spawn(ThreadKind::Signals, "signals-test", || panic!("must not run")).unwrap_err();
    assert!(error.to_string().contains("no signals thread"), "{error}");

    // Started without waiting: the same, once asked whether it started.
    let starting = threads::start(ThreadKind::Vcpu, "vcpu-start", threads::current).unwrap();
    assert_eq!(starting.started().unwrap().join().unwrap(), Some(ThreadKind::Vcpu));
    assert_eq!(seen("vcpu-start"), vec![ThreadKind::Vcpu]);
    let starting = threads::start(ThreadKind::Signals, "signals-start", || panic!("must not run")).unwrap();
    let error = starting.started().unwrap_err();
    assert!(error.to_string().contains("no signals thread"), "{error}");

    // A sandboxed thread cannot start threads itself before the launcher runs ...
    let nested = threads::spawn(ThreadKind::Vcpu, "vcpu-nested", || {
        threads::spawn(ThreadKind::DeviceWorker, "worker-early", || ()).map(drop).map_err(|e| e.to_string())
    })
    .unwrap();
    let refused = nested.join().unwrap().unwrap_err();
    assert!(refused.contains("before the launcher"), "{refused}");

    // ... and with it, the launcher creates the thread: its creator is the launcher. What
    // is asked once its queue is open, before its thread starts, waits for it.
    let queue = threads::open_launcher().unwrap().expect("the first opening");
    assert!(threads::open_launcher().unwrap().is_none(), "the queue opens once");
    let nested = threads::spawn(ThreadKind::Vcpu, "vcpu-later", || {
        threads::spawn(ThreadKind::DeviceWorker, "worker-later", threads::current).unwrap().join().unwrap()
    })
    .unwrap();
    queue.start().unwrap();
    assert_eq!(nested.join().unwrap(), Some(ThreadKind::DeviceWorker));
    assert_eq!(seen("worker-later"), vec![ThreadKind::DeviceWorker]);
    assert_eq!(seen("thread-launcher"), vec![ThreadKind::Launcher]);

    // The calling thread enters once; again as the same kind is a no-op, as another an error.
    threads::enter(ThreadKind::Main).unwrap();
    threads::enter(ThreadKind::Main).unwrap();
    assert!(threads::enter(ThreadKind::Control).is_err());
    assert_eq!(threads::current(), Some(ThreadKind::Main));
    let main_entries = SEEN.lock().unwrap().iter().filter(|(k, _)| *k == ThreadKind::Main).count();
    assert_eq!(main_entries, 1);
    // Started by an entered thread: through the launcher.
    let from_main = threads::spawn(ThreadKind::Supervisor, "from-main", threads::current).unwrap();
    assert_eq!(from_main.join().unwrap(), Some(ThreadKind::Supervisor));
}
