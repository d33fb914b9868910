//! A driver partition that the host refuses a queue's thread (its task limit reached, as
//! under a pids cgroup) ends at once, and says why: the hypervisor's record of the fault
//! names the queue and the OS error, and the device fails through its restart policy,
//! never through the watchdog finding requests that nothing served.
//!
//! The VM runs in a helper process (this test binary again) whose RLIMIT_NPROC is 1: the
//! hypervisor, root, is exempt from it, but every partition, which runs as an unprivileged
//! uid and inherits the limit, can start no thread.
//!
//! A driver started by hand (for QEMU, say) that meets the same refusal ends too, with
//! status 1 and the cause on its stderr, and removes its socket.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use splitvisor::guests;
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, VmBuilder};
use splitvisor::vcpu::VmEnd;
use support::Capture;
use support::images::Image;

/// Set in the helper process's environment.
const HELPER_ENV: &str = "SPLITVISOR_TEST_PARTITIONS_WITHOUT_THREADS";

#[test]
fn a_partition_refused_a_queue_thread_ends_at_once_and_the_hypervisor_says_why() {
    if !support::kvm() {
        return;
    }
    if !support::root("whose hypervisor the task limit spares") {
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

/// The uid the hand-started driver runs as (no other test uses it: RLIMIT_NPROC counts
/// every process of a uid).
const DRIVER_UID: u32 = 64_996;

#[test]
fn a_driver_started_by_hand_refused_a_queue_thread_ends_with_the_cause_and_removes_its_socket() {
    use std::io::{BufRead, Read};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !support::kvm() {
        return;
    }
    if !support::root("to run the driver under a uid of its own") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("splitvisor-{}-hand-no-threads", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = dir.join("driver.sock");
    // Three tasks: the process started (which keeps the socket), the sandboxed backend and
    // the process it serves from. A queue's thread would be a fourth.
    let tasks = libc::rlimit { rlim_cur: 3, rlim_max: 3 };
    let limit_tasks = move || {
        // SAFETY: sets a limit from a struct the closure owns.
        match unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &tasks) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_splitvisor-driver"));
    command
        .args(["blk", "--socket"])
        .arg(&socket)
        .arg("--disk")
        .arg(&disk)
        .uid(DRIVER_UID)
        .gid(DRIVER_UID)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the child only calls setrlimit, which is
    // async-signal-safe.
    unsafe { command.pre_exec(limit_tasks) };
    let mut driver = support::KillOnDrop(command.spawn().unwrap());
    let mut line = String::new();
    let stdout = driver.0.stdout.take().unwrap();
    // The driver prints its line or ends (closing stdout): this read ends either way.
    std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("serving"), "splitvisor-driver did not get ready: {line}");

    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .disk(DiskConfig::VhostUser { socket: socket.clone() })
        .console(ConsoleOutput::Discard)
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert!(
        matches!(&report.end, VmEnd::DeviceFault { device, .. } if device == "disk0"),
        "{:?}",
        report.end
    );

    // The driver ends by itself, at once: no frontend it could serve would do better.
    let ended = wait_exit(&driver.0, Duration::from_secs(30));
    let mut stderr = String::new();
    driver.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(ended, "the driver still serves after a queue was refused its thread: {stderr}");
    let status = driver.0.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(1), "{status:?}: {stderr}");
    assert!(
        stderr.contains("splitvisor-driver: error: cannot start queue 0: cannot create its thread: ")
            && stderr.contains(&format!("(os error {})", libc::EAGAIN)),
        "{stderr}"
    );
    assert!(!socket.exists(), "the driver left its socket behind: {stderr}");
}

/// Waits at most `timeout` for `child` to end (without reaping it); whether it did.
fn wait_exit(child: &std::process::Child, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(pidfd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) };
    let mut pollfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, bounded wait.
    unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) == 1 }
}
