//! The `monolithic` example and the `splitvisor-ctl` and `splitvisor-driver` tools as a user
//! runs them: exit statuses and one-line errors.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

fn example() -> PathBuf {
    support::example("monolithic")
}

/// Runs the example to its end. Every run gets a deadline (`--timeout`), so a fault
/// shows as a failure, never as a hung test.
fn run(args: &[&str]) -> Output {
    run_example(example(), args)
}

fn run_example(program: PathBuf, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args).env("RUST_BACKTRACE", "1");
    if !args.contains(&"--timeout") {
        command.args(["--timeout", "300"]);
    }
    command.output().expect("run the example")
}

/// Exactly one line on stderr naming the problem, no panic, no backtrace, status 2.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn bad_sizes_and_counts_are_one_line_errors() {
    assert_one_line_error(&["--mem", "lots"], "not a size");
    assert_one_line_error(&["--vcpus", "many"], "invalid value");
    assert_one_line_error(&["--bogus"], "unexpected argument");
    // These are refused before KVM is opened, so they hold on any machine.
    assert_one_line_error(&["--mem", "0"], "too small");
    assert_one_line_error(&["--mem", "99999T"], "too large");
    assert_one_line_error(&["--mem", "17000001"], "4 KiB");
    assert_one_line_error(&["--vcpus", "0"], "at least one vCPU");
    assert_one_line_error(&["--guest", "nope"], "unknown guest 'nope'");
    // A watchdog of 0 ms would take every driver with a request in flight for a hung one.
    assert_one_line_error(&["--watchdog", "0"], "--watchdog");
    assert_one_line_error(&["--watchdog", "600001"], "--watchdog");
}

/// Two disks on one image file, one of them writable, are refused by name, through another
/// path too, before the second finds the image locked by the VM itself and blames "another
/// VM". Two read-only disks on one image share its read lock, as before.
#[test]
fn two_disks_on_one_image_are_refused_naming_both() {
    let image = support::images::Image::new("cli-same-image", 1 << 20);
    let link = image.0.with_extension("link.img");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&image.0, &link).unwrap();
    let (path, linked) = (image.0.to_str().unwrap(), link.to_str().unwrap());
    let read_only = format!("{path},ro=on");
    for second in [path, linked, &read_only] {
        assert_one_line_error(
            &["--guest", "blk-verify", "--disk", path, "--disk", second],
            "disk1 names the same image as disk0",
        );
    }
    std::fs::remove_file(&link).unwrap();
}

/// A policy only a partition can carry out, for a plain device emulated in the hypervisor
/// (on the vCPU threads), is refused rather than dropped; a disk's is refused as before.
#[test]
fn a_fault_policy_a_device_in_the_hypervisor_cannot_follow_is_refused() {
    if !support::kvm() {
        return;
    }
    for (policy, device) in [("com1=fail", "com1"), ("i8042=restart", "i8042"), ("com1=restart", "com1")] {
        assert_one_line_error(
            &["--fault-policy", policy],
            &format!("{device} runs in the hypervisor, where a fault in its emulation ends the VM"),
        );
    }
    let out = run(&["--fault-policy", "com1=halt"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn too_many_vcpus_names_the_limit() {
    if !support::kvm() {
        return;
    }
    assert_one_line_error(&["--vcpus", "100000"], "KVM allows at most");
}

#[test]
fn without_kvm_permission_the_error_names_dev_kvm() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !support::require(
        "root and setpriv, to run as an unprivileged user",
        if root && setpriv { Ok(()) } else { Err(format!("root: {root}, setpriv: {setpriv}")) },
    ) {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(example())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/dev/kvm"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn no_arguments_runs_hello_and_exits_zero() {
    if !support::kvm() {
        return;
    }
    let out = run(&["--boot-timeline", "--stats"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("Hello from the splitvisor guest kit!"), "{stdout}");
    assert!(stderr.contains("first output"), "{stderr}");
    assert!(stderr.contains("com1 (8250)"), "{stderr}");
}

#[test]
fn exit_status_reports_how_the_guest_ended() {
    if !support::kvm() {
        return;
    }
    // A vCPU that fails: one line naming the vCPU, the exit and where.
    let fault = run(&["--guest", "triple-fault"]);
    let stderr = String::from_utf8_lossy(&fault.stderr);
    assert_eq!(fault.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("vCPU 0") && stderr.contains("triple fault") && stderr.contains("rip 0x"),
        "{stderr}"
    );
    // A guest that reports a failure: its reason, readable.
    let failed = run(&["--guest", "blk-verify"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("monolithic: guest 'blk-verify' reported a failure: no virtio-blk disk"),
        "{stderr}"
    );
    assert!(!stderr.contains("Fail("), "{stderr}");
    let idle = run(&["--guest", "idle", "--timeout", "0.3"]);
    assert_eq!(idle.status.code(), Some(3), "{}", String::from_utf8_lossy(&idle.stderr));
}

#[test]
fn serial_out_writes_the_console_to_a_file() {
    if !support::kvm() {
        return;
    }
    let path = std::env::temp_dir().join(format!("splitvisor-serial-{}.txt", std::process::id()));
    let out = run(&["--serial-out", path.to_str().unwrap()]);
    let console = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert!(console.contains("SPLITVISOR-RESULT: PASS"), "{console}");
}

#[test]
fn host_input_reaches_the_guest_console() {
    if !support::kvm() {
        return;
    }
    let mut child = Command::new(example())
        .args(["--guest", "echo", "--timeout", "120"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"ping from the host\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("echo: ping from the host"), "{stdout}");
}

#[test]
fn ctrl_c_stops_the_vm_and_every_vcpu_thread() {
    if !support::kvm() {
        return;
    }
    // The timeout is a backstop: without Ctrl-C, the run would end "timed out".
    let mut child = Command::new(example())
        .args(["--guest", "idle", "--vcpus", "2", "--timeout", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the guest to reach its halt, then press Ctrl-C.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("halting") {
        use std::io::Read;
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the guest ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        // SAFETY: signals our own child, which is still running.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("monolithic: VM stopped by the host"), "{stderr}");
}

/// Whether process `pid` blocks `signal` on its main thread (/proc/PID/status, SigBlk).
fn blocks(pid: u32, signal: libc::c_int) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigBlk:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

#[test]
fn sigterm_and_sighup_stop_the_vm_even_while_it_is_built() {
    if !support::kvm() {
        return;
    }
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        let child = Command::new(example())
            .args(["--guest", "idle", "--timeout", "120"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // As soon as the hypervisor has blocked the stop signals (its first step), whatever
        // it is doing then: usually still building the VM.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !blocks(child.id(), signal) {
            assert!(std::time::Instant::now() < deadline, "signal {signal} is never blocked");
            std::thread::yield_now();
        }
        // SAFETY: signals our own child, which is still running (not yet waited for).
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "signal {signal}: {stderr}");
        assert!(stderr.contains("monolithic: VM stopped by the host"), "signal {signal}: {stderr}");
    }
}

#[test]
fn unknown_device_names_are_errors_that_list_the_known_ones() {
    for args in [
        &["--place", "foo=partition"][..],
        &["--place", "disk5=hypervisor", "--disk", "/nonexistent.img"],
        &["--fault-policy", "disk0=fail"],
        &["--inject-fault", "nic0:crash-after=3"],
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("unknown device") && stderr.contains("com1, i8042"), "{args:?}: {stderr}");
    }
}

#[test]
fn no_data_path_exit_reaches_the_vmm() {
    if !support::kvm() {
        return;
    }
    let disk = support::images::Image::new("cli-exits", 4 << 20);
    for example in ["monolithic", "microkernel"] {
        // blk-verify makes about 130 requests of 64 KiB on 4 MiB, each rung on QueueNotify.
        let out = run_example(
            support::example(example),
            &["--guest", "blk-verify", "--disk", disk.0.to_str().unwrap(), "--stats"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{example}: {stderr}");
        let disk_row = stderr.lines().find(|l| l.contains("disk0")).unwrap_or_else(|| panic!("{stderr}"));
        let writes: u64 = disk_row.split_whitespace().last().unwrap().parse().unwrap();
        // Only the set-up (status, features, queue registers) reached the VMM: every
        // doorbell went to KVM's ioeventfd, every completion through the irqfd.
        assert!(writes < 40, "{example}: {writes} register writes reached the VMM: {stderr}");
    }
}

#[test]
fn the_microkernel_example_places_every_device_and_takes_overrides() {
    if !support::kvm() {
        return;
    }
    let disk = support::images::Image::new("cli-mk", 2 << 20);
    let out = run_example(
        support::example("microkernel"),
        &[
            "--guest",
            "blk-verify",
            "--disk",
            disk.0.to_str().unwrap(),
            "--layout",
            "--place",
            "i8042=hypervisor",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let row =
        |device: &str| stderr.lines().find(|l| l.starts_with(device)).unwrap_or_else(|| panic!("{stderr}"));
    assert!(row("com1").contains("driver partition") && row("com1").contains("pid "), "{stderr}");
    assert!(row("disk0").contains("driver partition") && row("disk0").contains("restart"), "{stderr}");
    assert!(row("i8042").contains("in hypervisor") && row("i8042").contains("halt"), "{stderr}");
}

#[test]
fn the_microkernel_example_is_its_own_driver_when_no_splitvisor_driver_is_around() {
    if !support::kvm() {
        return;
    }
    // A copy of the example alone in a directory: no splitvisor-driver beside it or above.
    let dir = std::env::temp_dir().join(format!("splitvisor-alone-{}", std::process::id()));
    let alone = dir.join("bin").join("microkernel");
    std::fs::create_dir_all(alone.parent().unwrap()).unwrap();
    std::fs::copy(support::example("microkernel"), &alone).unwrap();
    let mut command = Command::new(&alone);
    command.args(["--layout", "--timeout", "120"]).env_remove("SPLITVISOR_DRIVER");
    let out = command.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("Hello from the splitvisor guest kit!"), "{stdout}");
    assert!(
        stderr.lines().filter(|l| l.contains("driver partition") && l.contains("pid ")).count() >= 2,
        "{stderr}"
    );
}

#[test]
fn the_tools_say_what_they_are_and_what_is_missing() {
    let tool = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().expect("run the tool");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (program, about, usage) in [
        (env!("CARGO_BIN_EXE_splitvisor-ctl"), "control socket", "--api-socket <PATH> <COMMAND>"),
        (env!("CARGO_BIN_EXE_splitvisor-driver"), "device driver", "<COMMAND>"),
    ] {
        let (status, help, _) = tool(program, &["--help"]);
        assert_eq!(status, Some(0), "{program} --help");
        assert!(help.lines().next().is_some_and(|line| line.contains(about)), "{program} --help: {help}");
        // Nothing given: one line with the usage, not the whole help or the crate's blurb.
        let (status, _, stderr) = tool(program, &[]);
        assert_eq!(status, Some(2), "{program}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{program}: {stderr}");
        assert!(stderr.contains("nothing to do") && stderr.contains(usage), "{program}: {stderr}");
    }
    // Missing arguments are named on the one line.
    let (status, _, stderr) = tool(env!("CARGO_BIN_EXE_splitvisor-driver"), &["blk"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--socket") && stderr.contains("--disk"), "{stderr}");
}

#[test]
fn a_driver_partition_that_cannot_start_is_one_line_naming_the_device_the_program_and_why() {
    if !support::kvm() {
        return;
    }
    let image = support::images::Image::new("cli-bad-driver", 1 << 20);
    let not_executable = std::env::temp_dir().join(format!("splitvisor-{}-not-a-driver", std::process::id()));
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let not_executable = not_executable.to_str().unwrap().to_string();
    for (driver, why) in [
        (
            "/nonexistent",
            "disk0: cannot start the blk driver partition: /nonexistent: No such file".to_string(),
        ),
        (
            &not_executable,
            format!("disk0: cannot start the blk driver partition: {not_executable}: not executable"),
        ),
        ("/bin/false", "disk0: the blk driver partition (/bin/false, pid ".to_string()),
    ] {
        let out = Command::new(example())
            .args(["--timeout", "300", "--place", "disk0=partition", "--disk"])
            .arg(&image.0)
            .env("SPLITVISOR_DRIVER", driver)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{driver}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{driver}: {stderr}");
        assert!(stderr.contains(&why), "{driver}: {stderr}");
    }
    let _ = std::fs::remove_file(&not_executable);
    let _ = std::fs::remove_file(&image.0);
    // A bus device's partition is waited for while the guest runs: the marker guest's
    // first instruction is an access to COM1, which waits for a partition that never gets
    // its sandbox. The VM ends with that partition's error alone.
    for _ in 0..3 {
        let out = Command::new(support::example("microkernel"))
            .args(["--timeout", "300", "--guest", "marker"])
            .env("SPLITVISOR_DRIVER", "/bin/false")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("com1: the serial driver partition (/bin/false, pid "), "{stderr}");
        assert!(stderr.contains("ended before its sandbox was in place"), "{stderr}");
    }
}

#[test]
fn a_partition_spawner_thread_the_host_refuses_is_one_line_with_the_os_error() {
    if !support::kvm() || !support::root("to put the hypervisor in a pids cgroup") {
        return;
    }
    // Two tasks: the hypervisor's main thread and vCPU 0's, started first. The partition
    // spawner's thread would be a third.
    let Some(stderr) = task_limit_error("spawner", 2, &["--guest", "marker"]) else { return };
    assert!(stderr.contains("start the partition spawner thread: "), "{stderr}");
}

#[test]
fn every_thread_the_host_refuses_while_a_jailed_vm_with_a_disk_starts_is_one_line_with_the_os_error() {
    if !support::kvm() || !support::root("to put the hypervisor in a pids cgroup and jail it") {
        return;
    }
    let image = support::images::Image::new("cli-task-limits", 1 << 20);
    let image_path = image.0.to_str().unwrap();
    // Each limit refuses another of the start's threads and processes (vCPU 0's, the
    // partition spawner's, the partitions, the deadline watcher's, the launcher's, ...).
    for max in 1..=8 {
        let args = ["--jail", "--guest", "blk-verify", "--disk", image_path];
        if task_limit_error(&format!("limit{max}"), max, &args).is_none() {
            return;
        }
    }
    let _ = std::fs::remove_file(&image.0);
}

/// Runs the microkernel example with `args` in a pids cgroup of `max` tasks, and checks
/// that it ends with status 2 and one line naming the OS error (EAGAIN); that line, or
/// `None` where the host has no pids cgroup for the test.
fn task_limit_error(name: &str, max: u32, args: &[&str]) -> Option<String> {
    let cgroup = support::pids_cgroup::PidsCgroup::new(name, max)?;
    let mut command = Command::new(support::example("microkernel"));
    command.args(["--timeout", "300"]).args(args);
    cgroup.put_in(&mut command);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{max} tasks: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{max} tasks: {stderr}");
    assert!(stderr.contains(&format!("(os error {})", libc::EAGAIN)), "{max} tasks: {stderr}");
    Some(stderr)
}

/// `splitvisor-driver blk --socket SOCKET --disk DISK`, started by hand; returns once it
/// said it serves (bounded), with its stderr still to read.
fn serving_driver(socket: &std::path::Path, disk: &std::path::Path) -> support::KillOnDrop {
    let mut child = Command::new(env!("CARGO_BIN_EXE_splitvisor-driver"))
        .args(["blk", "--socket"])
        .arg(socket)
        .arg("--disk")
        .arg(disk)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = support::first_line(child.stdout.take().unwrap());
    let child = support::KillOnDrop(child);
    assert!(line.contains("serving"), "splitvisor-driver did not get ready: {line}");
    child
}

/// Sends `signal` to `driver` and waits (bounded) for it to end; how it ended and its stderr.
fn stop(driver: &mut support::KillOnDrop, signal: libc::c_int) -> (std::process::ExitStatus, String) {
    use support::WaitBounded;
    // SAFETY: a signal to our own child, not reaped yet.
    unsafe { libc::kill(driver.0.id() as libc::pid_t, signal) };
    let (_, stderr) = driver.0.wait_with_output_bounded();
    (driver.0.wait().unwrap(), stderr)
}

#[test]
fn a_driver_stopped_by_a_signal_removes_its_socket() {
    use std::os::unix::process::ExitStatusExt;
    let disk = support::images::Image::new("cli-stopped-driver", 1 << 20);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let socket =
            std::env::temp_dir().join(format!("splitvisor-{}-stopped-{signal}.sock", std::process::id()));
        let mut driver = serving_driver(&socket, &disk.0);
        assert!(socket.exists());
        let (status, stderr) = stop(&mut driver, signal);
        // It ends as the signal ends a program, with its socket gone.
        assert_eq!(status.signal(), Some(signal), "{status:?}: {stderr}");
        assert!(!socket.exists(), "signal {signal} left {} behind: {stderr}", socket.display());
    }
    let _ = std::fs::remove_file(&disk.0);
}

#[test]
fn a_stopped_driver_leaves_a_socket_that_replaced_its_own() {
    use std::os::unix::fs::MetadataExt;
    let disk = support::images::Image::new("cli-replaced-socket", 1 << 20);
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-replaced.sock", std::process::id()));
    let mut driver = serving_driver(&socket, &disk.0);
    // Another program takes the path meanwhile.
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let theirs = std::fs::symlink_metadata(&socket).unwrap().ino();
    let (_, stderr) = stop(&mut driver, libc::SIGTERM);
    let now = std::fs::symlink_metadata(&socket).map(|meta| meta.ino());
    assert_eq!(now.ok(), Some(theirs), "the driver removed a socket it did not bind: {stderr}");
    assert!(stderr.contains("no longer the socket this driver bound"), "{stderr}");
    drop(other);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&disk.0);
}

#[test]
fn root_of_a_user_namespace_on_the_hosts_network_runs_the_microkernel_layout() {
    if !support::kvm() || !support::root("to map root into a user namespace") {
        return;
    }
    let unshare = Command::new("unshare").arg("--version").output().map(drop).map_err(|e| e.to_string());
    if !support::require("unshare (util-linux)", unshare) {
        return;
    }
    // Root in a user namespace of its own, on the host's network namespace, as in a
    // rootless container on the host's network: the main thread may make the partitions'
    // network namespace but not come back from it, and must not try. The shell waits for
    // its id maps (root maps root, written from here), then becomes the example.
    let mut child = Command::new("unshare")
        .args(["--user", "sh", "-c", "read go && exec \"$0\" --guest hello --timeout 300"])
        .arg(support::example("microkernel"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let own = std::fs::read_link("/proc/self/ns/user").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns == own) {
        assert!(std::time::Instant::now() < deadline, "unshare did not enter a user namespace");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), "0 0 65536").unwrap();
    }
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("SPLITVISOR-RESULT: PASS"), "{stderr}");
}
