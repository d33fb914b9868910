//! A driver partition that the host refuses a queue's thread (its task limit reached, as
//! under a pids cgroup) ends at once, and says why: the hypervisor's record of the fault
//! names the queue and the OS error, and the device fails through its restart policy,
//! never through the watchdog finding requests that nothing served.
//!
//! The VM runs in a helper process (this test binary again) whose RLIMIT_NPROC is 1: the
//! hypervisor, root, is exempt from it, but every partition, which runs as an unprivileged
//! uid and inherits the limit, can start no thread.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use splitvisor::guests;
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, VmBuilder};
use support::Capture;
use support::images::Image;

/// Set in the helper process's environment.
const HELPER_ENV: &str = "SPLITVISOR_TEST_PARTITIONS_WITHOUT_THREADS";

#[test]
fn a_partition_refused_a_queue_thread_ends_at_once_and_the_hypervisor_says_why() {
    if !support::kvm() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !support::require(
        "root, whose hypervisor the task limit spares",
        root.then_some(()).ok_or("not root".into()),
    ) {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vm_with_partitions_without_threads",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<&str> =
        stdout.lines().filter_map(|line| line.split_once("EVENT ").map(|(_, e)| e)).collect();
    // The first fault is the partition's end, with its cause.
    let first = events.iter().find(|event| event.contains("driver failed")).copied().unwrap_or_default();
    assert!(
        first.contains("its process ended (exit status: 1: cannot start queue 0: cannot create its thread: ")
            && first.contains(&format!("(os error {})", libc::EAGAIN)),
        "{report}"
    );
    // Every later partition failed the same way, and none was left serving nothing until
    // the watchdog noticed.
    assert!(events.iter().any(|event| event.contains("2 restarts within")), "{report}");
    assert!(!events.iter().any(|event| event.contains("no request completed")), "{report}");
    assert!(stdout.contains("GUEST Some(Fail(\"device needs reset\"))"), "{report}");
}

/// Not a test: the process of `a_partition_refused_a_queue_thread_ends_at_once_and_the_hypervisor_says_why`.
#[test]
#[ignore = "helper process of a_partition_refused_a_queue_thread_ends_at_once_and_the_hypervisor_says_why"]
fn vm_with_partitions_without_threads() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    // Inherited by every partition; root (this process) is exempt.
    let one = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
    // SAFETY: sets a limit from a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &one) }, 0);
    let disk = Image::new("queue-refused", 1 << 20);
    let console = Capture::default();
    let layout = Layout::microkernel().with_fault_policy("disk0", "restart:max=2:backoff=0".parse().unwrap());
    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(layout)
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .disk(DiskConfig::image(&disk.0))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    for event in &report.device_events {
        println!("EVENT {}: {}", event.device, event.what);
    }
    println!("GUEST {:?}", report.guest_result);
    println!("END {:?}", report.end);
    println!("CONSOLE {}", console.text());
}
