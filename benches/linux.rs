//! Linux on splitvisor against QEMU microvm, the same kernel and initramfs, in one run.
//!
//! `cargo bench --bench linux` boots the project's test kernel (`.ci/build-linux-kernel`:
//! target/linux-kernel, or $SPLITVISOR_LINUX_KERNEL) with its initramfs, whose /init
//! writes a pattern through /dev/vda and powers off, under:
//!
//! * splitvisor monolithic and microkernel (every device in a partition), PVH `vmlinux`
//!   with ACPI tables, and monolithic with the `bzImage` (its decompressor runs first);
//! * `qemu-system-x86_64 -M microvm,acpi=off` (the disk on the command line; no ACPI
//!   power-off, so /init reboots through the i8042 and QEMU exits on `-no-reboot`) and
//!   `-M microvm,acpi=on` (the disk in QEMU's DSDT, ACPI power-off), KVM, PVH `vmlinux`.
//!
//! For each: seconds from process start to the kernel's first console line
//! (`Linux version`), to the kernel starting /init (`Run /init as init process`), to
//! /init's first line, and to the process's exit; the host then checks the image. Runs go
//! one after the other, alternating, and the table gives medians. LINUX_BENCH_RUNS sets
//! the number of rounds (default 1: each boot takes about a minute on the build
//! machines, whose KVM emulates guest ring 0); LINUX_BENCH_BZIMAGE=0 skips the bzImage.
//!
//! The splitvisor process is this very binary re-run with `--hypervisor`: it then behaves
//! exactly as `examples/monolithic` (or `microkernel`, with `--microkernel-layout`), its
//! own driver partition program included.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

#[path = "common/scratch.rs"]
mod scratch;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// What the test kernel needs on the build machines' software KVM (guests/linux/README.md).
const TEST_KERNEL_CMDLINE: &str =
    "earlyprintk=serial,ttyS0 panic=-1 noxsave clearcpuid=308,288,151,298,145,59";
/// Blocks /init writes.
const BLOCKS: usize = 16;

/// The console lines that mark the milestones, in order.
const MILESTONES: [&str; 3] = ["Linux version", "Run /init as init process", "splitvisor-init: started"];

/// One boot as seen from outside.
struct Boot {
    /// When each milestone's line came, from process start.
    milestones: [Option<Duration>; 3],
    exit: Duration,
    success: bool,
    console: String,
}

/// Spawns `cmd`, timestamping its console lines, and waits for it to exit.
fn measure(mut cmd: Command) -> Boot {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut milestones = [None; 3];
        let mut console = String::new();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            for (at, marker) in milestones.iter_mut().zip(MILESTONES) {
                if at.is_none() && line.contains(marker) {
                    *at = Some(start.elapsed());
                }
            }
            console.push_str(&line);
            console.push('\n');
        }
        (milestones, console)
    });
    let output = child.wait_with_output().expect("wait");
    let exit = start.elapsed();
    let (milestones, mut console) = reader.join().unwrap();
    console.push_str(&String::from_utf8_lossy(&output.stderr));
    Boot { milestones, exit, success: output.status.success(), console }
}

/// The blocks /init writes (guests/linux/init).
fn pattern_holds(image: &Path, generation: u32) -> bool {
    let bytes = std::fs::read(image).unwrap();
    (0..BLOCKS).all(|i| {
        let mut want = format!("splitvisor-linux-guest gen={generation:010} block={i:010}\n").into_bytes();
        want.resize(4096, b'.');
        bytes.get(i * 4096..(i + 1) * 4096) == Some(&want[..])
    })
}

/// Makes the command that boots the kernel on a disk image, with a pattern generation.
type BootCommand = Box<dyn Fn(&Path, u32) -> Command>;

/// One way of booting the kernel.
struct Setup {
    name: &'static str,
    command: BootCommand,
    boots: Vec<Boot>,
}

fn splitvisor(kernel: PathBuf, initrd: PathBuf, microkernel: bool) -> BootCommand {
    Box::new(move |image, generation| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg("--hypervisor");
        if microkernel {
            cmd.arg("--microkernel-layout");
        }
        cmd.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).arg("--disk").arg(image);
        cmd.args(["--mem", "256M", "--timeout", "1200", "--cmdline"]);
        cmd.arg(format!("{TEST_KERNEL_CMDLINE} splitvisor.gen={generation} splitvisor.blocks={BLOCKS}"));
        cmd
    })
}

fn qemu(kernel: PathBuf, initrd: PathBuf, acpi: bool) -> BootCommand {
    Box::new(move |image, generation| {
        let mut cmd = Command::new("timeout");
        cmd.args(["1200", "qemu-system-x86_64", "-M"]);
        cmd.arg(if acpi { "microvm,acpi=on" } else { "microvm,acpi=off" });
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M", "-smp", "1"]);
        cmd.args(["-nographic", "-no-user-config", "-no-reboot"]);
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
        let mut append = format!(
            "console=ttyS0 {TEST_KERNEL_CMDLINE} splitvisor.gen={generation} splitvisor.blocks={BLOCKS}"
        );
        if !acpi {
            // No ACPI power-off: /init reboots, through the i8042, which QEMU ends on.
            append.push_str(" splitvisor.end=reboot reboot=k");
            cmd.args(["-device", "i8042"]);
        }
        cmd.arg("-append").arg(append);
        cmd.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none", image.display()));
        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
        cmd
    })
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<String> = std::env::args().collect();
    // This bench binary doubles as the driver partition program.
    if let Some(status) = splitvisor::cli::driver_subcommand("linux-bench") {
        return status;
    }
    if args.iter().any(|a| a == "--hypervisor") {
        let layout = if args.iter().any(|a| a == "--microkernel-layout") {
            splitvisor::layout::Layout::microkernel()
        } else {
            splitvisor::layout::Layout::monolithic()
        };
        let args = args
            .iter()
            .filter(|a| !matches!(a.as_str(), "--hypervisor" | "--bench" | "--microkernel-layout"));
        return splitvisor::cli::main_from("linux-bench", layout, args, start);
    }
    let dir = std::env::var_os("SPLITVISOR_LINUX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/linux-kernel"));
    let (vmlinux, bzimage, initrd) = (dir.join("vmlinux"), dir.join("bzImage"), dir.join("initramfs.cpio"));
    if ![&vmlinux, &bzimage, &initrd].iter().all(|p| p.is_file()) {
        eprintln!("linux bench: no test kernel in {}: run bash .ci/build-linux-kernel", dir.display());
        return ExitCode::FAILURE;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("linux bench: /dev/kvm is not available; nothing to measure");
        return ExitCode::FAILURE;
    }
    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    let runs: usize = std::env::var("LINUX_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let with_bzimage = std::env::var("LINUX_BENCH_BZIMAGE").map_or(true, |v| v != "0");

    let mut setups = vec![
        Setup {
            name: "splitvisor monolithic, vmlinux (PVH), ACPI",
            command: splitvisor(vmlinux.clone(), initrd.clone(), false),
            boots: Vec::new(),
        },
        Setup {
            name: "splitvisor microkernel (every device in a partition), vmlinux, ACPI",
            command: splitvisor(vmlinux.clone(), initrd.clone(), true),
            boots: Vec::new(),
        },
    ];
    if have_qemu {
        setups.push(Setup {
            name: "QEMU -M microvm,acpi=off, vmlinux (PVH)",
            command: qemu(vmlinux.clone(), initrd.clone(), false),
            boots: Vec::new(),
        });
        setups.push(Setup {
            name: "QEMU -M microvm,acpi=on, vmlinux (PVH)",
            command: qemu(vmlinux.clone(), initrd.clone(), true),
            boots: Vec::new(),
        });
    } else {
        eprintln!("linux bench: qemu-system-x86_64 not found: no QEMU rows");
    }
    if with_bzimage {
        setups.push(Setup {
            name: "splitvisor monolithic, bzImage, ACPI",
            command: splitvisor(bzimage, initrd, false),
            boots: Vec::new(),
        });
    }

    let scratch = scratch::ScratchDir::new("linux-bench");
    let image = scratch.path().join("disk.img");
    let mut generation = 1000 + std::process::id() % 1000;
    for round in 0..runs {
        for setup in &mut setups {
            generation += 1;
            let file = std::fs::File::create(&image).unwrap();
            file.set_len(8 << 20).unwrap();
            drop(file);
            eprintln!("linux bench: round {}/{runs}: {}", round + 1, setup.name);
            let mut boot = measure((setup.command)(&image, generation));
            boot.success = boot.success && pattern_holds(&image, generation);
            if !boot.success {
                eprintln!("linux bench: {} failed:\n{}", setup.name, boot.console);
            }
            setup.boots.push(boot);
        }
    }
    drop(scratch);

    println!("\n## Linux: process start to the kernel's first line, /init and exit (median of {runs}, s)\n");
    println!(
        "| hypervisor | first kernel line | kernel runs /init | /init's first line | exit (power-off) | image checked |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let mut all_ok = true;
    let mut exits = Vec::new();
    for setup in &setups {
        let ok: Vec<&Boot> = setup.boots.iter().filter(|b| b.success).collect();
        all_ok &= ok.len() == setup.boots.len();
        let column = |i: usize| {
            median(ok.iter().filter_map(|b| b.milestones[i]).map(|d| d.as_secs_f64()).collect())
                .map_or("n/a".to_string(), |s| format!("{s:.2}"))
        };
        let exit = median(ok.iter().map(|b| b.exit.as_secs_f64()).collect());
        exits.push(exit);
        println!(
            "| {} | {} | {} | {} | {} | {}/{} |",
            setup.name,
            column(0),
            column(1),
            column(2),
            exit.map_or("n/a".to_string(), |s| format!("{s:.2}")),
            ok.len(),
            setup.boots.len()
        );
    }
    if let (Some(Some(ours)), Some(Some(qemu))) = (exits.first(), exits.get(3).filter(|_| have_qemu)) {
        println!("\nexit, splitvisor monolithic / QEMU microvm,acpi=on: {:.3}", ours / qemu);
    }
    if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
