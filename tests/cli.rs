//! The `monolithic` example as a user runs it: exit statuses and one-line errors.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

fn example() -> PathBuf {
    support::example("monolithic")
}

fn run(args: &[&str]) -> Output {
    Command::new(example()).args(args).env("RUST_BACKTRACE", "1").output().expect("run the example")
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
    let fault = run(&["--guest", "triple-fault"]);
    assert_eq!(fault.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&fault.stderr).contains("triple fault"));
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
        .args(["--guest", "echo"])
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
    let mut child = Command::new(example())
        .args(["--guest", "idle", "--vcpus", "2"])
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
