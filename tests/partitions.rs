//! The microkernel layout: disks served by sandboxed driver partitions over vhost-user.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::Duration;

use splitvisor::guests::{self, GuestResult};
use splitvisor::isolation::sandbox::testing::Forbidden;
use splitvisor::layout::{
    ConsoleOutput, DiskConfig, DriverProgram, FaultPolicy, Layout, Placement, VmBuilder, VmReport,
};
use support::Capture;
use support::images::{Image, pattern_mismatches};

const MIB: u64 = 1 << 20;

fn driver() -> DriverProgram {
    DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver")))
}

fn blk_verify(layout: Layout, disks: &[DiskConfig], generation: u64) -> (VmReport, String) {
    let console = Capture::default();
    let mut builder = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(layout)
        .driver(driver())
        .cmdline(&format!("blk_verify.generation={generation}"))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)));
    for disk in disks {
        builder = builder.disk(disk.clone());
    }
    let report = builder.build().unwrap().run().unwrap();
    (report, console.text())
}

fn image(disk: &Image) -> DiskConfig {
    DiskConfig::image(&disk.0)
}

#[test]
fn blk_verify_in_the_microkernel_layout() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("mk", 4 * MIB);
    let (report, console) = blk_verify(Layout::microkernel(), &[image(&disk)], 21);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    let placed = report.placements.iter().find(|p| p.device == "disk0").unwrap();
    assert_eq!(placed.placement, Placement::Partition);
    assert!(pattern_mismatches(&disk.bytes(), 8192, 21).is_empty());
    assert!(report.device_events.is_empty(), "{:?}", report.device_events);
}

#[test]
fn blk_verify_in_a_hybrid_layout() {
    if !support::kvm() {
        return;
    }
    let (a, b) = (Image::new("hy-a", 2 * MIB), Image::new("hy-b", 2 * MIB));
    let layout = Layout::microkernel().with("disk1", Placement::InHypervisor);
    let (report, console) = blk_verify(layout, &[image(&a), image(&b)], 22);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    let placement = |name: &str| report.placements.iter().find(|p| p.device == name).unwrap().placement;
    assert_eq!((placement("disk0"), placement("disk1")), (Placement::Partition, Placement::InHypervisor));
    assert!(pattern_mismatches(&a.bytes(), 4096, 22).is_empty());
    assert!(pattern_mismatches(&b.bytes(), 4096, 22).is_empty());
}

#[test]
fn an_external_vhost_user_backend_serves_a_disk() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("external", 2 * MIB);
    let backend = support::HandStartedDriver::start("external", &disk.0);
    let (report, console) =
        blk_verify(Layout::monolithic(), &[DiskConfig::VhostUser { socket: backend.socket.clone() }], 23);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(pattern_mismatches(&disk.bytes(), 4096, 23).is_empty());
}

#[test]
fn a_partition_that_opens_a_file_is_killed_and_the_vm_goes_on() {
    if !support::kvm() {
        return;
    }
    let (good, evil) = (Image::new("escape-good", MIB), Image::new("escape-evil", MIB));
    let console = Capture::default();
    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(
            Layout::microkernel()
                .with("disk0", Placement::InHypervisor)
                .with_fault_policy("disk1", FaultPolicy::FailDevice),
        )
        .driver(driver())
        .partition_test_attempt(Forbidden::Open("/etc/passwd".into()))
        .cmdline("blk_verify.generation=24")
        .disk(image(&good))
        .disk(image(&evil))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    let console = console.text();
    // The partition died of its seccomp filter (SIGSYS)...
    let events = &report.device_events;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].device, "disk1");
    assert!(events[0].what.contains("SIGSYS") && events[0].what.contains("the device fails"), "{events:?}");
    // ...the guest saw its disk ask for a reset, and everything else went on.
    assert!(console.contains("vd1") && console.contains("needs reset"), "{console}");
    assert_eq!(report.guest_result, Some(GuestResult::Fail("device needs reset".into())), "{console}");
    assert!(pattern_mismatches(&good.bytes(), 2048, 24).is_empty(), "the other disk was served");
}

#[test]
fn a_broken_queue_asks_for_a_reset_in_either_placement() {
    if !support::kvm() {
        return;
    }
    for layout in [Layout::monolithic(), Layout::microkernel()] {
        let disk = Image::new("broken-queue", MIB);
        let console = Capture::default();
        let report = VmBuilder::new(guests::find("blk-break").unwrap().elf)
            .layout(layout.clone())
            .driver(driver())
            .disk(image(&disk))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(60)))
            .build()
            .unwrap()
            .run()
            .unwrap();
        let console = console.text();
        assert_eq!(report.guest_result, Some(GuestResult::Pass), "{layout:?}: {console}");
        assert!(console.contains("device needs reset"), "{console}");
        if layout == Layout::microkernel() {
            // Not the driver's fault: the partition reports the broken queue and lives on.
            let events = &report.device_events;
            assert_eq!(events.len(), 1, "{events:?}");
            assert!(events[0].what.contains("the guest broke a queue"), "{events:?}");
            assert_eq!(report.drivers.iter().find(|d| d.device == "disk0").unwrap().restarts, 0);
        }
    }
}
