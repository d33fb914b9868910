//! The ACPI tables of assembled VMs, as `VmBuilder` makes them from the devices it
//! placed, checked by a third party: ACPICA's disassembler (`iasl -d`, Debian's
//! acpica-tools) decodes every table without complaint, and what it reads back names every
//! vCPU, the IOAPIC, COM1, every virtio-mmio disk at the address and interrupt the VM gave
//! it, and the power device's registers. The same VM without ACPI announces its disks on
//! the command line: both channels must agree.
//!
//! Needs /dev/kvm (a VM is built, not run) and iasl: outside CI a missing one skips with a
//! visible reason; under `CI=true` it fails.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use splitvisor::guests;
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, VmBuilder};
use support::images::Image;

fn iasl() -> bool {
    support::require(
        "iasl (Debian acpica-tools; bash .ci/install-deps)",
        match Command::new("iasl").arg("-v").output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!("iasl -v exited with {}", out.status)),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// A scratch directory of this test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("splitvisor-acpi-vm-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `iasl -d` of one table: no error, warning or bad checksum; its .dsl text.
fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let input = dir.join(format!("{name}.dat"));
    std::fs::write(&input, bytes).unwrap();
    let out = Command::new("iasl").arg("-d").arg(&input).current_dir(dir).output().unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    for bad in ["Error", "Warning", "Invalid", "Unknown"] {
        assert!(!log.contains(bad), "iasl -d {name} reported '{bad}':\n{log}");
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
    for bad in ["Incorrect checksum", "should be", "Invalid", "**** "] {
        assert!(!dsl.contains(bad), "{name}: iasl's decoding says '{bad}':\n{dsl}");
    }
    dsl
}

/// Compiles the disassembled DSDT back: no errors, no warnings.
fn recompile(dir: &Path, name: &str) {
    let out = Command::new("iasl").arg(format!("{name}.dsl")).current_dir(dir).output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && log.contains("0 Errors, 0 Warnings"), "iasl {name}.dsl:\n{log}");
}

/// Values of the fields called `name` in an iasl data-table dump (`[offset] name : value`).
fn fields<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|line| line.split_once(" : "))
        .filter(|(left, _)| left.rsplit(']').next().unwrap_or(left).trim() == name)
        .map(|(_, value)| value.trim())
        .collect()
}

fn count(dsl: &str, needle: &str) -> usize {
    dsl.lines().filter(|line| line.contains(needle)).count()
}

/// A VM of the guest kit's `hello` with `vcpus` and one disk per image, built (not run).
fn builder(layout: Layout, vcpus: u32, disks: &[Image]) -> VmBuilder {
    let mut builder = VmBuilder::new(guests::find("hello").unwrap().elf)
        .layout(layout)
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .vcpus(vcpus)
        .console(ConsoleOutput::Discard);
    for disk in disks {
        builder = builder.disk(DiskConfig::image(&disk.0));
    }
    builder
}

/// `(base, irq)` of every `virtio_mmio.device=512@BASE:IRQ` on a command line.
fn announced(cmdline: &str) -> Vec<(u64, u32)> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("virtio_mmio.device="))
        .map(|device| {
            let (_, at) = device.split_once('@').unwrap();
            let (base, irq) = at.split_once(':').unwrap();
            (u64::from_str_radix(base.trim_start_matches("0x"), 16).unwrap(), irq.parse().unwrap())
        })
        .collect()
}

fn check(layout: fn() -> Layout, vcpus: u32, disk_count: usize) {
    let name = format!("{vcpus}-{disk_count}");
    let disks: Vec<Image> =
        (0..disk_count).map(|i| Image::new(&format!("acpi-{name}-{i}"), 1 << 20)).collect();
    // The same machine without ACPI tables says where its disks are on the command line.
    let plain = builder(layout(), vcpus, &disks).build().unwrap();
    let placed = announced(plain.cmdline());
    assert_eq!(placed.len(), disk_count, "{}", plain.cmdline());
    assert!(plain.acpi_tables().is_none());
    drop(plain);

    // Images of their own: the first VM's image locks may outlive it for a moment, while a
    // partition spawned by a test running beside this one holds a forked copy of their fds
    // (until its exec closes them).
    let disks: Vec<Image> =
        (0..disk_count).map(|i| Image::new(&format!("acpi-{name}-{i}-tables"), 1 << 20)).collect();
    let vm = builder(layout(), vcpus, &disks).acpi(true).build().unwrap();
    assert!(announced(vm.cmdline()).is_empty(), "with ACPI the DSDT alone names the disks: {}", vm.cmdline());
    assert!(vm.placements().iter().any(|p| p.device == "power"), "the power device is a device of the VM");
    let tables = vm.acpi_tables().unwrap();
    let table = |signature: &[u8; 4]| &tables.table(*signature).unwrap().bytes;
    let scratch = Scratch::new(&name);

    let xsdt = disassemble(&scratch.0, "xsdt", table(b"XSDT"));
    assert_eq!(count(&xsdt, "ACPI Table Address"), 2, "FADT and MADT:\n{xsdt}");

    let fadt = disassemble(&scratch.0, "facp", table(b"FACP"));
    assert_eq!(fields(&fadt, "Hardware Reduced (V5)"), ["1"]);
    assert_eq!(fields(&fadt, "Reset Register Supported (V2)"), ["1"]);
    assert_eq!(fields(&fadt, "8042 Present on ports 60/64 (V2)"), ["1"], "the VM has an i8042");
    let addresses: Vec<u64> =
        fields(&fadt, "Address").iter().filter_map(|v| u64::from_str_radix(v, 16).ok()).collect();
    for port in [0x600, 0x601, 0x602] {
        assert!(addresses.contains(&port), "power register {port:#x} in the FADT:\n{fadt}");
    }

    let madt = disassemble(&scratch.0, "apic", table(b"APIC"));
    let ids: Vec<String> = (0..vcpus).map(|id| format!("{id:02X}")).collect();
    assert_eq!(fields(&madt, "Local Apic ID"), ids, "one local APIC per vCPU:\n{madt}");
    assert_eq!(fields(&madt, "Processor Enabled"), vec!["1"; vcpus as usize]);
    assert_eq!(count(&madt, "[I/O APIC]"), 1);

    let dsdt = disassemble(&scratch.0, "dsdt", table(b"DSDT"));
    recompile(&scratch.0, "dsdt");
    assert_eq!(count(&dsdt, "Name (_HID, EisaId (\"PNP0501\")"), 1, "COM1:\n{dsdt}");
    assert!(dsdt.contains("0x03F8,             // Range Minimum"), "{dsdt}");
    assert_eq!(count(&dsdt, "Name (_HID, \"LNRO0005\")"), disk_count, "{dsdt}");
    assert_eq!(count(&dsdt, "Name (_S5, Package (0x04)"), 1);
    // Each disk where the VM put it, with the interrupt it was given; COM1 on IRQ 4.
    let mut irqs: Vec<String> = std::iter::once(4)
        .chain(placed.iter().map(|&(_, irq)| irq))
        .map(|irq| format!("0x{irq:08X},"))
        .collect();
    irqs.sort();
    let mut found: Vec<String> = dsdt
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("0x") && l.ends_with(',') && l.len() == 11)
        .map(String::from)
        .collect();
    found.sort();
    assert_eq!(found, irqs, "one interrupt per device:\n{dsdt}");
    for (base, _) in placed {
        let line = format!("0x{base:08X},         // Address Base");
        assert_eq!(count(&dsdt, &line), 1, "the disk at {base:#x}:\n{dsdt}");
    }
}

#[test]
fn tables_of_a_vm_with_one_vcpu_and_one_disk_decode_with_iasl() {
    if !support::kvm() || !iasl() {
        return;
    }
    check(Layout::monolithic, 1, 1);
}

#[test]
fn tables_of_vms_with_several_vcpus_and_disks_decode_with_iasl() {
    if !support::kvm() || !iasl() {
        return;
    }
    check(Layout::monolithic, 2, 3);
    check(Layout::monolithic, 8, 12);
}

#[test]
fn a_vm_whose_devices_run_in_partitions_is_described_alike() {
    if !support::kvm() || !iasl() {
        return;
    }
    check(Layout::microkernel, 2, 2);
}
