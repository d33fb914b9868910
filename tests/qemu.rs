//! The same guest ELF under another VMM: QEMU's microvm machine, booting it through PVH.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `qemu-system-x86_64 -M microvm` on a guest program; returns its console.
fn run_under_qemu(guest: &str) -> String {
    run_under_qemu_with(guest, None, &[])
}

fn run_under_qemu_with(guest: &str, append: Option<&str>, disks: &[(&std::path::Path, bool)]) -> String {
    let elf = splitvisor::guests::find(guest).unwrap().elf;
    let path = std::env::temp_dir().join(format!("splitvisor-qemu-{}-{guest}.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    let mut child = splitvisor::guests::qemu_microvm_command(&path, 128, append, disks)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start QEMU");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    format!("{stdout}{stderr}")
}

fn qemu_available() -> bool {
    if !support::kvm() {
        return false;
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    support::require("qemu-system-x86_64", qemu.map(drop).map_err(|e| e.to_string()))
}

#[test]
fn hello_runs_unchanged_under_qemu_microvm() {
    if !qemu_available() {
        return;
    }
    let console = run_under_qemu("hello");
    assert!(console.contains("Hello from the splitvisor guest kit!"), "{console}");
    assert!(console.contains("vcpus=1 "), "{console}");
    assert!(console.contains("SPLITVISOR-RESULT: PASS"), "{console}");
}

#[test]
fn blk_verify_runs_unchanged_against_qemus_virtio_blk() {
    if !qemu_available() {
        return;
    }
    let image = support::images::Image::new("qemu-verify", 2 << 20);
    let console = run_under_qemu_with("blk-verify", Some("blk_verify.generation=11"), &[(&image.0, false)]);
    assert!(console.contains("wrote+read 4096 sectors"), "{console}");
    assert!(console.contains("SPLITVISOR-RESULT: PASS"), "{console}");
    assert!(support::images::pattern_mismatches(&image.bytes(), 4096, 11).is_empty());
}
