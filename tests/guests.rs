//! The guest kit's programs that measure the VMM and stress the disk path, on KVM: `marker`,
//! `blk-stress` (its image checked on the host) and `blk-bench` with its loop in ring 3.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::Duration;

use splitvisor::guests::{self, GuestResult, blk_stress_check, stress};
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Error, Layout, VmBuilder, VmReport};
use support::Capture;
use support::images::Image;

const MIB: u64 = 1 << 20;
/// Generous: each of these takes seconds at most on the emulating KVM.
const TIMEOUT: Duration = Duration::from_secs(120);

fn run(
    guest: &str,
    cmdline: &str,
    disk: Option<&Image>,
    layout: Layout,
) -> (Result<VmReport, Error>, String) {
    let console = Capture::default();
    let mut builder = VmBuilder::new(guests::find(guest).unwrap().elf)
        .cmdline(cmdline)
        .layout(layout)
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(TIMEOUT));
    if let Some(image) = disk {
        builder = builder.disk(DiskConfig::image(&image.0));
    }
    (builder.build().unwrap().run(), console.text())
}

/// A generation that differs run to run, so a stale image cannot pass.
fn fresh_generation() -> u64 {
    u64::from(std::process::id()) * 1000 + 17
}

#[test]
fn marker_writes_its_byte_first_then_passes() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("marker", "console=ttyS0", None, Layout::monolithic());
    let report = report.unwrap();
    assert!(console.starts_with("M\n"), "the marker byte is the first console output: {console:?}");
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(report.first_output.is_some_and(|first| first >= report.created));
}

#[test]
fn blk_stress_two_passes_leave_the_last_generation_in_every_block() {
    if !support::kvm() {
        return;
    }
    let blocks = 2 * MIB / stress::BLOCK_SIZE as u64;
    let image = Image::new("stress-2-passes", 2 * MIB);
    let first = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={first} blk_stress.passes=2");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains(", ring 3\n"), "the loop ran in ring 3: {console}");
    assert!(
        console
            .contains(&format!("pass 2/2 generation {}: {blocks}/{blocks} writes acknowledged", first + 1)),
        "{console}"
    );
    let bytes = image.bytes();
    assert_eq!(blk_stress_check(&bytes, first + 1, blocks), Ok(()));
    // The second pass rewrote every block: none still holds the first generation.
    let stale = blk_stress_check(&bytes, first, blocks).unwrap_err();
    assert!(stale.last().unwrap().contains(&format!("{blocks} bad blocks of {blocks}")), "{stale:?}");
}

#[test]
fn blk_stress_writes_only_the_blocks_it_is_given() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-some", 4 * MIB);
    let generation = fresh_generation();
    let cmdline =
        format!("console=ttyS0 blk_stress.generation={generation} blk_stress.blocks=300 blk_stress.depth=3");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("300 blocks of 4 KiB (disk 1024), 1 passes"), "{console}");
    let bytes = image.bytes();
    assert_eq!(blk_stress_check(&bytes, generation, 300), Ok(()));
    assert!(bytes[300 * 4096..].iter().all(|b| *b == 0), "nothing written past block 299");
}

/// The ring-3 loop against a disk served by a driver partition over vhost-user.
#[test]
fn blk_stress_in_ring_3_against_a_driver_partition() {
    if !support::kvm() {
        return;
    }
    let blocks = MIB / stress::BLOCK_SIZE as u64;
    let image = Image::new("stress-partition", MIB);
    let generation = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={generation} blk_stress.passes=2");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::microkernel());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert_eq!(blk_stress_check(&image.bytes(), generation + 1, blocks), Ok(()));
}

/// Without polling, ring 3 waits for the device's interrupts through ring 0: every wait is
/// `ud2` to the service, `sti; hlt`, the virtio interrupt handler (which must be reached
/// whatever its vector), back to ring 3. The FLUSH at least (an fdatasync on the host)
/// outlasts the few checks before a wait.
#[test]
fn blk_stress_in_ring_3_waits_for_interrupts_when_it_does_not_poll() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-irq", MIB);
    let generation = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={generation} blk_stress.poll_us=0");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    let interrupts: u64 = console
        .split_once(", interrupts ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count: {console}"));
    assert!(interrupts > 0, "the guest never took the device's interrupt: {console}");
    assert_eq!(blk_stress_check(&image.bytes(), generation, MIB / 4096), Ok(()));
}

#[test]
fn blk_stress_refuses_bad_settings_with_a_reason() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-bad", MIB);
    for (cmdline, why) in [
        ("blk_stress.depth=17", "blk_stress.depth must be 1 to 16"),
        ("blk_stress.ring=1", "blk_stress.ring must be 0 or 3"),
        ("blk_stress.passes=x", "bad command line"),
    ] {
        let (report, console) = run("blk-stress", cmdline, Some(&image), Layout::monolithic());
        assert_eq!(report.unwrap().guest_result, Some(GuestResult::Fail(why.into())), "{console}");
    }
    assert!(image.bytes().iter().all(|b| *b == 0), "nothing written");
}

#[test]
fn blk_bench_runs_its_loop_in_ring_3_by_default() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("bench-ring3", 16 * MIB);
    let (report, console) = run(
        "blk-bench",
        "console=ttyS0 blk_bench.mib=4 blk_bench.ops=200",
        Some(&image),
        Layout::monolithic(),
    );
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("clock kvm-clock, ring 3\n"), "{console}");
    for workload in ["seq-read-1M-qd1", "rand-write-4K-qd16"] {
        assert!(console.contains(&format!("blk-bench: {workload} ops=")), "{workload}: {console}");
    }
}

#[test]
fn blk_bench_ring_0_stays_selectable() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("bench-ring0", 4 * MIB);
    let cmdline = "console=ttyS0 blk_bench.ring=0 blk_bench.mib=1 blk_bench.ops=10";
    let (report, console) = run("blk-bench", cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("clock kvm-clock, ring 0\n"), "{console}");
}

/// A failure found in ring 3 comes back to ring 0 and is reported like any other.
#[test]
fn a_failure_in_ring_3_is_reported() {
    if !support::kvm() {
        return;
    }
    // Smaller than one 1 MiB request: the first workload fails, in ring 3.
    let image = Image::new("bench-tiny", MIB / 2);
    let (report, console) = run("blk-bench", "console=ttyS0", Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Fail("disk too small".into())), "{console}");
    assert!(console.contains(", ring 3\n"), "{console}");
}
