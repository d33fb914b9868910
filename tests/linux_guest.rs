//! Linux on splitvisor, as a user runs it: `--kernel`, `--initrd`, `--cmdline`, how the
//! guest's power-off, reboot and panic end the VM, `--on-reboot restart`, and bad input.
//!
//! The Linux boots use the project's test kernel and initramfs (`.ci/build-linux-kernel`,
//! in target/linux-kernel or $SPLITVISOR_LINUX_KERNEL): its /init writes a pattern on
//! /dev/vda, reads it back and powers off; the host checks the image. They take about a
//! minute each on the build machines (the guest's ring 0 is emulated), so only two run:
//! one per layout. Reboot, panic and restart are checked with the guest kit's programs
//! given as `--kernel` or `--guest`, which take milliseconds.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use splitvisor::guests;
use support::images::{Image, pattern_mismatches};

/// What the test kernel needs on this machine's software KVM (guests/linux/README.md).
const TEST_KERNEL_CMDLINE: &str =
    "earlyprintk=serial,ttyS0 panic=-1 noxsave clearcpuid=308,288,151,298,145,59";

/// The test kernel's directory, if built (the `require` of CI).
fn linux_kernel() -> Option<PathBuf> {
    let dir = kernel_dir();
    let missing: Vec<&str> =
        ["vmlinux", "bzImage", "initramfs.cpio"].into_iter().filter(|f| !dir.join(f).is_file()).collect();
    let why = match missing.as_slice() {
        [] => Ok(()),
        missing => {
            Err(format!("{} lacks {}: run bash .ci/build-linux-kernel", dir.display(), missing.join(", ")))
        }
    };
    support::require("the test Linux kernel and initramfs", why).then_some(dir)
}

fn kernel_dir() -> PathBuf {
    std::env::var_os("SPLITVISOR_LINUX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/linux-kernel"))
}

/// Runs an example to its end with a generous deadline (a backstop, not a measure).
fn run(example: &str, args: &[&str]) -> Output {
    let mut command = Command::new(support::example(example));
    command.args(args).stdin(Stdio::null()).env("RUST_BACKTRACE", "1");
    if !args.contains(&"--timeout") {
        command.args(["--timeout", "900"]);
    }
    command.output().unwrap()
}

/// A guest kit program written to a file, to give as `--kernel`; removed on drop.
struct KitKernel(PathBuf);

impl KitKernel {
    fn new(name: &str) -> Self {
        Self::with_bytes(name, guests::find(name).unwrap().elf)
    }

    fn with_bytes(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("splitvisor-{}-{name}.elf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for KitKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The blocks /init writes (guests/linux/init): block I is
/// "splitvisor-linux-guest gen=GGGGGGGGGG block=IIIIIIIIII\n" then 4041 dots.
fn linux_pattern_mismatches(image: &[u8], generation: u32, blocks: usize) -> Vec<usize> {
    (0..blocks)
        .filter(|&i| {
            let mut want =
                format!("splitvisor-linux-guest gen={generation:010} block={i:010}\n").into_bytes();
            want.resize(4096, b'.');
            image.get(i * 4096..(i + 1) * 4096) != Some(&want[..])
        })
        .collect()
}

fn boot_linux_and_power_off(example: &str, generation: u32) {
    let Some(kernel) = linux_kernel() else {
        return;
    };
    if !support::kvm() {
        return;
    }
    let disk = Image::new(&format!("linux-{example}"), 8 << 20);
    let cmdline = format!("{TEST_KERNEL_CMDLINE} splitvisor.gen={generation} splitvisor.blocks=16");
    let out = run(
        example,
        &[
            "--kernel",
            kernel.join("vmlinux").to_str().unwrap(),
            "--initrd",
            kernel.join("initramfs.cpio").to_str().unwrap(),
            "--disk",
            disk.0.to_str().unwrap(),
            "--mem",
            "256M",
            "--cmdline",
            &cmdline,
            "--layout",
        ],
    );
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{example}: {stderr}\n{console}");
    assert!(stderr.contains(&format!("{example}: the guest powered off")), "{stderr}");
    // The kernel found its disk in the DSDT (no virtio_mmio.device= on its command line).
    assert!(!console.contains("virtio_mmio.device="), "{console}");
    assert!(console.contains("virtio_blk virtio0: [vda]"), "{console}");
    assert!(console.contains("splitvisor-init: started"), "{console}");
    assert!(console.contains("LINUX-GUEST-RESULT: PASS"), "{console}");
    assert!(console.contains("reboot: Power down"), "an ACPI power-off: {console}");
    assert_eq!(linux_pattern_mismatches(&disk.bytes(), generation, 16), Vec::<usize>::new());
    // Every device where the layout says, the power device included.
    for device in ["com1", "i8042", "power", "disk0"] {
        let row =
            stderr.lines().find(|l| l.starts_with(device)).unwrap_or_else(|| panic!("{device}: {stderr}"));
        let expected = if example == "microkernel" { "driver partition" } else { "in hypervisor" };
        assert!(row.contains(expected), "{row}");
    }
}

#[test]
fn linux_boots_writes_dev_vda_and_powers_off_monolithic() {
    boot_linux_and_power_off("monolithic", 4_000_000_001);
}

#[test]
fn linux_boots_writes_dev_vda_and_powers_off_microkernel() {
    boot_linux_and_power_off("microkernel", 4_000_000_002);
}

/// Exactly one line on stderr, status 2, no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "wanted '{needle}' in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_kernel_that_is_neither_a_pvh_elf_nor_a_bzimage_is_refused() {
    let script = KitKernel::with_bytes("not-a-kernel", b"#!/bin/sh\necho I am no kernel\n");
    let out = run("monolithic", &["--kernel", script.path()]);
    assert_one_line_error(&out, "neither a PVH ELF nor a bzImage");
    let missing = run("monolithic", &["--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&missing, "kernel /nonexistent/vmlinux: No such file");
    let no_kernel = run("monolithic", &["--initrd", script.path()]);
    assert_one_line_error(&no_kernel, "required arguments were not provided: --kernel <PATH>");
}

#[test]
fn a_truncated_kernel_is_refused() {
    let elf = guests::find("hello").unwrap().elf;
    let cut = KitKernel::with_bytes("truncated", &elf[..elf.len() / 2]);
    let out = run("monolithic", &["--kernel", cut.path()]);
    assert_one_line_error(&out, "the ELF kernel is truncated");
    // A real bzImage cut short, when the test kernel is built.
    let bzimage = kernel_dir().join("bzImage");
    if let Ok(image) = std::fs::read(&bzimage) {
        let cut = KitKernel::with_bytes("truncated-bz", &image[..image.len() - 4096]);
        let out = run("monolithic", &["--kernel", cut.path()]);
        assert_one_line_error(&out, "the bzImage kernel is truncated");
    }
}

#[test]
fn an_initrd_that_does_not_fit_is_refused() {
    let kernel = KitKernel::new("hello");
    // Larger than the whole guest RAM: refused before it is read.
    let huge = Image::new("initrd-huge", 32 << 20);
    let out =
        run("monolithic", &["--kernel", kernel.path(), "--initrd", huge.0.to_str().unwrap(), "--mem", "16M"]);
    assert_one_line_error(&out, "do not fit in 16777216 bytes of guest RAM");
    // Smaller than RAM, larger than what is left above the kernel.
    let large = Image::new("initrd-large", 15 << 20);
    let out = run(
        "monolithic",
        &["--kernel", kernel.path(), "--initrd", large.0.to_str().unwrap(), "--mem", "16M"],
    );
    assert_one_line_error(&out, "does not fit in guest RAM");
    let empty = Image::new("initrd-empty", 0);
    let out = run("monolithic", &["--kernel", kernel.path(), "--initrd", empty.0.to_str().unwrap()]);
    assert_one_line_error(&out, "the initrd is empty");
}

#[test]
fn a_command_line_longer_than_the_kernel_takes_is_refused() {
    let kernel = KitKernel::new("hello");
    // PVH: the command line area (64 KiB with its NUL) is the limit.
    let long = "x".repeat(70_000);
    let out = run("monolithic", &["--kernel", kernel.path(), "--cmdline", &long]);
    assert_one_line_error(&out, "this kernel takes at most 65535");
    // A bzImage says its own limit (cmdline_size: 2047 for Linux on x86).
    let bzimage = kernel_dir().join("bzImage");
    if bzimage.is_file() {
        let out = run("monolithic", &["--kernel", bzimage.to_str().unwrap(), "--cmdline", &long[..3000]]);
        assert_one_line_error(&out, "this kernel takes at most 2047");
    }
}

#[test]
fn a_kernel_guest_that_reboots_ends_the_vm_with_status_0() {
    if !support::kvm() {
        return;
    }
    // The kit's hello ends by resetting the machine: as a --kernel guest, that is a reboot.
    let kernel = KitKernel::new("hello");
    let out = run("monolithic", &["--kernel", kernel.path(), "--vcpus", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("monolithic: the guest rebooted"), "{stderr}");
    // As a kernel, it got ACPI tables and no virtio_mmio.device= on its command line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vcpus=2"), "{stdout}");
}

/// Runs the kit's `echo` as a --kernel guest that echoes `line` to its console, then
/// resets the machine.
fn echo_kernel(example: &str, line: &str, extra: &[&str]) -> Output {
    let kernel = KitKernel::new("echo");
    let mut child = Command::new(support::example(example))
        .args(["--kernel", kernel.path(), "--timeout", "300"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{line}\n").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_reset_after_a_kernel_panic_line_ends_the_vm_with_a_failure() {
    if !support::kvm() {
        return;
    }
    let panic = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100";
    for example in ["monolithic", "microkernel"] {
        // Even with --on-reboot restart: a guest that panics is not booted again.
        let out = echo_kernel(example, panic, &["--on-reboot", "restart"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{example}: {stderr}");
        assert!(stderr.contains(&format!("{example}: the guest panicked: {panic}")), "{example}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.matches("echo: type a line").count(), 1, "booted once: {stdout}");
    }
    // The same reset without the panic line is a reboot.
    let out = echo_kernel("monolithic", "all is well", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the guest rebooted"), "{stderr}");
}

/// Runs an example with `--on-reboot restart`, reads its console until `needle` has
/// appeared `times` times (or the run ends), then stops it as Ctrl-C does.
fn restarted(example: &str, args: &[&str], needle: &str, times: usize) -> (String, String, Option<i32>) {
    let mut child = Command::new(support::example(example))
        .args(args)
        .args(["--on-reboot", "restart", "--timeout", "300"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches(needle).count() < times {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: signals our own child (or an exited one not yet reaped: then nothing).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let _ = stdout.read_to_end(&mut seen);
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&seen).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn on_reboot_restart_boots_the_guest_again_with_every_vcpu() {
    if !support::kvm() {
        return;
    }
    // hello passes only if every vCPU checks in afresh (its count lives in guest memory,
    // loaded again at each boot): the application processor is reset and started again.
    let (console, stderr, status) =
        restarted("monolithic", &["--guest", "hello", "--vcpus", "2"], "SPLITVISOR-RESULT: PASS", 3);
    assert!(console.matches("Hello from the splitvisor guest kit!").count() >= 3, "{console}{stderr}");
    assert!(console.matches("vcpus=2 ").count() >= 3, "{console}");
    assert!(!console.contains("FAIL"), "{console}");
    assert_eq!(status, Some(0), "the guest reported success: {stderr}");
}

#[test]
fn on_reboot_restart_resets_disks_in_partitions() {
    if !support::kvm() {
        return;
    }
    // Each boot's blk-verify sets the disk up from scratch and checks every sector it
    // writes; the partition behind it was reset at each restart.
    let disk = Image::new("restart-mk", 4 << 20);
    let args = [
        "--guest",
        "blk-verify",
        "--disk",
        disk.0.to_str().unwrap(),
        "--cmdline",
        "blk_verify.generation=77",
    ];
    let (console, stderr, _) = restarted("microkernel", &args, "SPLITVISOR-RESULT: PASS", 2);
    assert!(console.matches("SPLITVISOR-RESULT: PASS").count() >= 2, "{console}{stderr}");
    assert!(!console.contains("FAIL"), "{console}");
    assert!(pattern_mismatches(&disk.bytes(), 8192, 77).is_empty());
}
