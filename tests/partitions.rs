//! The microkernel layout: disks served by sandboxed driver partitions over vhost-user.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::Duration;

use splitvisor::guests::{self, GuestResult};
use splitvisor::isolation::sandbox::testing::Forbidden;
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, Placement, VmBuilder, VmReport};
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
    DiskConfig::Image { path: disk.0.clone(), read_only: false }
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
    assert!(report.partition_exits.is_empty(), "{:?}", report.partition_exits);
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

fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)).unwrap().trim().to_string()
}

#[test]
fn partitions_are_sandboxed_as_seen_from_outside() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("sandbox", MIB);
    let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
        .layout(Layout::microkernel())
        .driver(driver())
        .disk(image(&disk))
        .console(ConsoleOutput::Discard)
        .timeout(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    let placed = vm.placements().iter().find(|p| p.device == "disk0").unwrap();
    let watched = placed.partition.as_deref().unwrap().strip_prefix("pid ").unwrap().to_string();
    // The process the hypervisor started only waits; its child, PID 1 of a new PID
    // namespace, serves the disk.
    let children = std::fs::read_to_string(format!("/proc/{watched}/task/{watched}/children")).unwrap();
    let pid = children.split_whitespace().next().expect("the serving child").to_string();
    assert_eq!(status_field(&pid, "NSpid:").split_whitespace().last(), Some("1"), "PID 1 in its namespace");

    for process in [&watched, &pid] {
        assert_eq!(status_field(process, "Seccomp:"), "2", "seccomp filter mode");
        assert_eq!(status_field(process, "NoNewPrivs:"), "1");
        for ns in ["user", "mnt", "net", "ipc"] {
            let theirs = std::fs::read_link(format!("/proc/{process}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{ns} namespace is the partition's own");
        }
    }
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_ne!(theirs, std::fs::read_link("/proc/self/ns/pid").unwrap(), "pid namespace");
    // Only what it was handed: stdin and stdout on /dev/null, stderr (inherited, for its
    // log), then the disk, its sockets, eventfds, epoll and guest memory.
    let disk_name = disk.0.file_name().unwrap().to_string_lossy().into_owned();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(entry.path()).unwrap().to_string_lossy().into_owned();
        assert!(!target.contains("kvm"), "partition {pid} holds {target}");
        let allowed = match fd {
            0 | 1 => target == "/dev/null",
            2 => true,
            _ => {
                target.starts_with("socket:")
                    || target.starts_with("anon_inode:")
                    || target.starts_with("/memfd:splitvisor-guest-ram")
                    || target.ends_with(&disk_name)
            }
        };
        assert!(allowed, "partition {pid} holds {target} on fd {fd}");
    }
    let report = vm.run().unwrap();
    assert!(report.partition_exits.is_empty());
}

#[test]
fn a_partition_that_opens_a_file_is_killed_and_the_vm_goes_on() {
    if !support::kvm() {
        return;
    }
    let (good, evil) = (Image::new("escape-good", MIB), Image::new("escape-evil", MIB));
    let console = Capture::default();
    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(Layout::microkernel().with("disk0", Placement::InHypervisor))
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
    assert_eq!(report.partition_exits.len(), 1, "{:?}", report.partition_exits);
    assert_eq!(report.partition_exits[0].0, "disk1");
    assert!(report.partition_exits[0].1.contains("SIGSYS"), "{:?}", report.partition_exits);
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
            assert_eq!(report.partition_exits.len(), 1, "{:?}", report.partition_exits);
            assert!(report.partition_exits[0].1.contains("exit status: 3"), "{:?}", report.partition_exits);
        }
    }
}
