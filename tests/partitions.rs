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
use splitvisor::vcpu::VmEnd;
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
fn a_backend_that_cannot_start_a_queue_thread_hangs_up_at_once() {
    if !support::kvm() {
        return;
    }
    if !support::root("to run the backend under another uid") {
        return;
    }
    let disk = Image::new("no-threads", MIB);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&disk.0, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Three tasks: the process started (which keeps the socket), the sandboxed backend and
    // the process it serves from, in its PID namespace. Its queue's thread would be a fourth.
    let backend = support::HandStartedDriver::start_limited("no-threads", &disk.0, 64_998, 3);
    let console = Capture::default();
    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .disk(DiskConfig::VhostUser { socket: backend.socket.clone() })
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    // The backend ended the session as the queue was set up: the device failed for that,
    // not after its watchdog found requests that were never served.
    assert!(
        matches!(&report.end, VmEnd::DeviceFault { device, reason } if device == "disk0" && reason.contains("hung up")),
        "{:?}: {}",
        report.end,
        console.text()
    );
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

#[test]
fn a_read_only_disk_in_a_partition_is_opened_read_only_and_refuses_writes() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("ro-partition", MIB);
    std::fs::write(&disk.0, vec![0x5a; MIB as usize]).unwrap();
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(Layout::microkernel())
        .driver(driver())
        .disk(DiskConfig::image(&disk.0).read_only())
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap();
    // The process that serves the disk holds the image open for reading only.
    let watched = vm.drivers().iter().find(|d| d.device == "disk0").unwrap().pid.unwrap();
    let serving = std::iter::once(watched).chain(support::descendants(watched));
    let name = disk.0.file_name().unwrap().to_string_lossy().into_owned();
    let mut image_fds = 0;
    for pid in serving {
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            if target.to_string_lossy().ends_with(&name) {
                let fd = entry.file_name().to_string_lossy().into_owned();
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim().to_string();
                let flags = u32::from_str_radix(&flags, 8).unwrap();
                assert_eq!(
                    flags & libc::O_ACCMODE as u32,
                    libc::O_RDONLY as u32,
                    "fd {fd} of {pid}: {flags:o}"
                );
                image_fds += 1;
            }
        }
    }
    assert!(image_fds > 0, "no process of the partition holds the image");
    let report = vm.run().unwrap();
    let console = console.text();
    // blk-verify checks that a write to a read-only disk fails with IOERR.
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(disk.bytes().iter().all(|b| *b == 0x5a), "the image changed");
}

/// Whether any process below `pid` maps or holds guest RAM.
fn holds_guest_ram(pid: u32) -> bool {
    support::descendants(pid).into_iter().chain([pid]).any(|p| {
        let maps = std::fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
        let fds = std::fs::read_dir(format!("/proc/{p}/fd")).into_iter().flatten().flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("splitvisor-guest-ram"))
        });
        maps.contains("splitvisor-guest-ram") || fds
    })
}

#[test]
fn a_hand_started_driver_serves_one_frontend_at_a_time_and_the_next_after_it() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("one-at-a-time", 16 * MIB);
    let backend = support::HandStartedDriver::start("one-at-a-time", &disk.0);
    let socket = backend.socket.clone();
    // A VM that keeps the backend busy (its guest maps its memory into the driver) while a
    // second one tries.
    let first = {
        let socket = socket.clone();
        std::thread::spawn(move || blk_verify(Layout::monolithic(), &[DiskConfig::VhostUser { socket }], 26))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !holds_guest_ram(backend.pid()) {
        assert!(std::time::Instant::now() < deadline, "the first VM never set its disk up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .disk(DiskConfig::VhostUser { socket: socket.clone() })
        .console(ConsoleOutput::Discard)
        .build();
    let error = second.expect_err("a second frontend at once is refused").to_string();
    assert!(error.contains("disk0") && error.contains("is another VMM using it?"), "{error}");
    let (report, console) = first.join().unwrap();
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    // Once the first one left, its memory is gone and the next VM is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while holds_guest_ram(backend.pid()) {
        assert!(std::time::Instant::now() < deadline, "the driver kept the first VM's memory");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (report, console) = blk_verify(Layout::monolithic(), &[DiskConfig::VhostUser { socket }], 27);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(pattern_mismatches(&disk.bytes(), 32768, 27).is_empty());
}
