//! virtio-blk end to end: the guest's own driver against splitvisor's device, on KVM.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::Duration;

use splitvisor::guests::{self, GuestResult};
use splitvisor::layout::{ConsoleOutput, DiskConfig, Error, VmBuilder};
use support::Capture;
use support::images::{Image, pattern_mismatches};

const MIB: u64 = 1 << 20;

fn run_blk_verify(
    disks: &[(&Image, bool)],
    cmdline: &str,
) -> (Result<splitvisor::layout::VmReport, Error>, String) {
    let console = Capture::default();
    let mut builder = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .cmdline(cmdline)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)));
    for (image, read_only) in disks {
        let disk = DiskConfig::image(&image.0);
        builder = builder.disk(if *read_only { disk.read_only() } else { disk });
    }
    (builder.build().unwrap().run(), console.text())
}

#[test]
fn blk_verify_writes_a_pattern_the_host_finds_in_the_image() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("verify", 4 * MIB);
    // A generation that differs run to run, so a stale image cannot pass.
    let generation = u64::from(std::process::id()) * 7 + 3;
    let (report, console) =
        run_blk_verify(&[(&image, false)], &format!("blk_verify.generation={generation}"));
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("wrote+read 8192 sectors"), "{console}");
    // The default ID derives from the image's identity: the same in every placement.
    let id = splitvisor::isolation::driver::default_serial(&std::fs::File::open(&image.0).unwrap());
    assert!(console.contains(&format!("id \"{id}\"")), "{console}");
    let bad = pattern_mismatches(&image.bytes(), 8192, generation);
    assert!(bad.is_empty(), "{} sectors wrong, first {:?}", bad.len(), &bad[..bad.len().min(8)]);
}

#[test]
fn a_read_only_disk_refuses_writes_and_stays_unchanged() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("ro", MIB);
    let content: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image.0, &content).unwrap();
    let (report, console) = run_blk_verify(&[(&image, true)], "");
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("read-only: reads work, writes refused"), "{console}");
    assert_eq!(image.bytes(), content, "the read-only image is unchanged");
}

#[test]
fn several_disks_each_get_their_own_device() {
    if !support::kvm() {
        return;
    }
    let a = Image::new("multi-a", MIB);
    let b = Image::new("multi-b", 2 * MIB);
    let (report, console) = run_blk_verify(&[(&a, false), (&b, false)], "blk_verify.generation=5");
    let report = report.unwrap();
    // How the VM ended and what its devices reported, should it end without a result.
    assert_eq!(
        report.guest_result,
        Some(GuestResult::Pass),
        "{console}\nended: {:?}\n{:#?}",
        report.end,
        report.device_events
    );
    assert!(pattern_mismatches(&a.bytes(), 2048, 5).is_empty());
    assert!(pattern_mismatches(&b.bytes(), 4096, 5).is_empty());
}

#[test]
fn a_missing_image_is_a_typed_error() {
    if !support::kvm() {
        return;
    }
    let err = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .disk(DiskConfig::image("/nonexistent/disk.img"))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Disk(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}
