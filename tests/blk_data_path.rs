//! The virtio-blk data path end to end, on KVM: cache=none (O_DIRECT) and a device with a
//! queue per vCPU, in both placements, with the guest's own driver checking every sector
//! and the host checking the image.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::Duration;

use splitvisor::devices::virtio::block::CacheMode;
use splitvisor::guests::{self, GuestResult};
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, VmBuilder};
use support::Capture;
use support::images::{Image, pattern_mismatches};

const MIB: u64 = 1 << 20;

/// blk-verify on `disk` (an image of `mib` MiB) with `vcpus` vCPUs under `layout`; checks
/// the guest passed and the image holds the pattern.
fn verify(layout: Layout, image: &Image, disk: DiskConfig, vcpus: u32, mib: u64, generation: u64) {
    let console = Capture::default();
    let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(layout)
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .vcpus(vcpus)
        .cmdline(&format!("blk_verify.generation={generation}"))
        .disk(disk)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(300)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    let console = console.text();
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    let sectors = (mib * MIB / 512) as usize;
    let bad = pattern_mismatches(&image.bytes(), sectors, generation);
    assert!(bad.is_empty(), "{} sectors wrong, first {:?}", bad.len(), &bad[..bad.len().min(8)]);
}

#[test]
fn cache_none_serves_the_guest_in_both_placements() {
    if !support::kvm() {
        return;
    }
    for (index, layout) in [Layout::monolithic(), Layout::microkernel()].into_iter().enumerate() {
        let image = Image::new(&format!("direct-{index}"), 4 * MIB);
        let disk = DiskConfig::image(&image.0).cache(CacheMode::None);
        verify(layout, &image, disk, 1, 4, 91 + index as u64);
    }
}

#[test]
fn two_vcpus_get_a_two_queue_disk_in_both_placements() {
    if !support::kvm() {
        return;
    }
    for (index, layout) in [Layout::monolithic(), Layout::microkernel()].into_iter().enumerate() {
        let image = Image::new(&format!("mq-{index}"), 4 * MIB);
        // The default: one queue per vCPU (the guest kit's driver uses the first).
        verify(layout, &image, DiskConfig::image(&image.0), 2, 4, 93 + index as u64);
    }
}

#[test]
fn both_io_engines_serve_under_the_partition_sandbox() {
    if !support::kvm() {
        return;
    }
    // A hand-started driver sandboxes itself as a spawned one does: io_uring and the thread
    // pool (the fallback) must each get through its seccomp allowlist, with two queues.
    for (index, engine) in ["io-uring", "threads"].into_iter().enumerate() {
        let image = Image::new(&format!("engine-{engine}"), 4 * MIB);
        let driver = support::HandStartedDriver::start_with(
            &format!("engine-{engine}"),
            &image.0,
            &["--io-engine", engine, "--queues", "2"],
        );
        let disk = DiskConfig::VhostUser { socket: driver.socket.clone() };
        verify(Layout::microkernel(), &image, disk, 1, 4, 95 + index as u64);
        drop(driver);
    }
}
