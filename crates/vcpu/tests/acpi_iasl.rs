//! A third-party check of splitvisor's ACPI tables: ACPICA's own disassembler (`iasl -d`,
//! Debian's acpica-tools) decodes every table without complaint, and what it reads back
//! names every vCPU, device, interrupt and power register the platform described.
//!
//! Needs `iasl`: outside CI a missing one skips with a visible reason; under `CI=true` it
//! fails (`bash .ci/install-deps` installs it).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use splitvisor_vcpu::acpi::{AcpiDevice, AcpiPlatform, AcpiPowerRegisters, AcpiTables};

fn iasl_available() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(out) if out.status.success() => true,
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but iasl is missing: run `bash .ci/install-deps` (acpica-tools)")
        }
        _ => {
            eprintln!("SKIPPED: iasl (Debian acpica-tools) is not installed");
            false
        }
    }
}

/// A scratch directory of this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("splitvisor-acpi-iasl-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Disassembles one table with `iasl -d`; returns the .dsl text after checking that iasl
/// succeeded and reported no error, warning or bad checksum.
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

fn power() -> AcpiPowerRegisters {
    AcpiPowerRegisters {
        sleep_control_port: 0x600,
        sleep_status_port: 0x601,
        reset_port: 0x602,
        reset_value: 1,
        s5_sleep_type: 5,
    }
}

fn platform(vcpus: u32, disks: u32) -> AcpiPlatform {
    let mut devices = vec![AcpiDevice::serial(1, 0x3f8, 4)];
    devices.extend(
        (0..disks)
            .map(|i| AcpiDevice::virtio_mmio(i, 0xc000_0000 + u64::from(i) * 0x1000, 0x200, 5 + i % 19)),
    );
    AcpiPlatform { vcpus, devices, power: Some(power()), ..AcpiPlatform::default() }
}

/// Lines of `dsl` that contain `needle`.
fn count(dsl: &str, needle: &str) -> usize {
    dsl.lines().filter(|line| line.contains(needle)).count()
}

/// The values of every field called `name` in an iasl data table dump, whose lines read
/// `[offset] name : value` (or `name : value` for decoded flag bits).
fn fields<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|line| line.split_once(" : "))
        .filter(|(left, _)| left.rsplit(']').next().unwrap_or(left).trim() == name)
        .map(|(_, value)| value.trim())
        .collect()
}

/// The value of the first field called `name`.
fn field<'a>(dsl: &'a str, name: &str) -> &'a str {
    fields(dsl, name).first().copied().unwrap_or_else(|| panic!("no field {name:?} in:\n{dsl}"))
}

/// Compiles disassembled ASL back with iasl: it must take it without errors or warnings.
fn recompile(dir: &Path, name: &str) {
    let out = Command::new("iasl").arg(format!("{name}.dsl")).current_dir(dir).output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && log.contains("0 Errors, 0 Warnings"), "iasl {name}.dsl:\n{log}");
}

fn check_platform(vcpus: u32, disks: u32) {
    let scratch = Scratch::new(&format!("{vcpus}-{disks}"));
    let platform = platform(vcpus, disks);
    let tables = AcpiTables::build(&platform).unwrap();
    let table = |sig: &[u8; 4]| &tables.table(*sig).unwrap().bytes;

    // (iasl 20200925 decodes no stand-alone RSDP; the unit tests check its checksums and
    // pointer, and the XSDT it points to is decoded here.)
    let xsdt = disassemble(&scratch.0, "xsdt", table(b"XSDT"));
    let fadt_addr = tables.table(*b"FACP").unwrap().address;
    let madt_addr = tables.table(*b"APIC").unwrap().address;
    let entries: Vec<u64> = xsdt
        .lines()
        .filter(|l| l.contains("ACPI Table Address"))
        .map(|l| u64::from_str_radix(l.split_once(" : ").unwrap().1.trim(), 16).unwrap())
        .collect();
    assert_eq!(entries, [fadt_addr, madt_addr]);

    let fadt = disassemble(&scratch.0, "facp", table(b"FACP"));
    assert_eq!(field(&fadt, "Hardware Reduced (V5)"), "1");
    assert_eq!(field(&fadt, "Reset Register Supported (V2)"), "1");
    let dsdt_addr = tables.table(*b"DSDT").unwrap().address;
    // The 32-bit DSDT pointer is left zero; the 64-bit one (X_DSDT) is used.
    let dsdt_pointers: Vec<u64> =
        fields(&fadt, "DSDT Address").iter().map(|v| u64::from_str_radix(v, 16).unwrap()).collect();
    assert_eq!(dsdt_pointers, [0, dsdt_addr]);
    for (register, port) in
        [("Reset Register", 0x602u64), ("Sleep Control Register", 0x600), ("Sleep Status Register", 0x601)]
    {
        // The GAS follows its title: space ID, width, offset, access size, address.
        let title = format!("{register} : [Generic Address Structure]");
        let block: Vec<&str> = fadt.lines().skip_while(|l| !l.contains(&title)).take(6).collect();
        let block = block.join("\n");
        assert_eq!(field(&block, "Space ID"), "01 [SystemIO]", "{register}");
        assert_eq!(field(&block, "Bit Width"), "08", "{register}");
        assert_eq!(u64::from_str_radix(field(&block, "Address"), 16).unwrap(), port, "{register}");
    }
    assert_eq!(field(&fadt, "Value to cause reset"), "01");
    assert_eq!(field(&fadt, "8042 Present on ports 60/64 (V2)"), "1");
    assert_eq!(field(&fadt, "VGA Not Present (V4)"), "1");
    assert_eq!(field(&fadt, "CMOS RTC Not Present (V5)"), "1");

    let madt = disassemble(&scratch.0, "apic", table(b"APIC"));
    assert_eq!(field(&madt, "Local Apic Address"), "FEE00000");
    assert_eq!(field(&madt, "PC-AT Compatibility"), "1");
    assert_eq!(count(&madt, "[Processor Local APIC]"), vcpus as usize);
    let expected: Vec<String> = (0..vcpus).map(|id| format!("{id:02X}")).collect();
    assert_eq!(fields(&madt, "Local Apic ID"), expected);
    assert_eq!(fields(&madt, "Processor ID"), expected);
    assert_eq!(fields(&madt, "Processor Enabled"), vec!["1"; vcpus as usize]);
    assert_eq!(count(&madt, "[I/O APIC]"), 1);
    assert_eq!(field(&madt, "Address"), "FEC00000");
    assert_eq!(field(&madt, "Interrupt"), "00000000", "the IOAPIC's GSI base");

    let dsdt = disassemble(&scratch.0, "dsdt", table(b"DSDT"));
    recompile(&scratch.0, "dsdt");
    assert_eq!(count(&dsdt, "Scope (\\_SB)"), 1);
    assert_eq!(count(&dsdt, "Name (_HID, EisaId (\"PNP0501\")"), 1);
    assert_eq!(count(&dsdt, "IO (Decode16,"), 1);
    assert!(dsdt.contains("0x03F8,             // Range Minimum"), "{dsdt}");
    assert_eq!(count(&dsdt, "Name (_HID, \"LNRO0005\")"), disks as usize);
    assert_eq!(count(&dsdt, "Memory32Fixed (ReadWrite,"), disks as usize);
    assert_eq!(
        count(&dsdt, "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"),
        disks as usize + 1
    );
    for disk in 0..disks {
        let base = format!("0x{:08X},         // Address Base", 0xc000_0000 + disk * 0x1000);
        assert_eq!(count(&dsdt, &base), 1, "disk {disk}'s MMIO range in:\n{dsdt}");
    }
    let mut irqs: Vec<String> =
        std::iter::once(4).chain((0..disks).map(|i| 5 + i % 19)).map(|i| format!("0x{i:08X},")).collect();
    irqs.sort();
    let mut found: Vec<String> = dsdt
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("0x") && l.ends_with(',') && l.len() == 11)
        .map(String::from)
        .collect();
    found.sort();
    assert_eq!(found, irqs, "one interrupt per device");
    assert_eq!(count(&dsdt, "Name (_S5, Package (0x04)"), 1);
    let s5: Vec<&str> =
        dsdt.lines().skip_while(|l| !l.contains("Name (_S5")).skip(2).take(4).map(str::trim).collect();
    assert_eq!(s5, ["0x05,", "0x05,", "Zero,", "Zero"], "SLP_TYPa and SLP_TYPb of S5");
}

#[test]
fn iasl_decodes_one_vcpu_and_one_disk() {
    if iasl_available() {
        check_platform(1, 1);
    }
}

#[test]
fn iasl_decodes_several_vcpus_and_disks() {
    if iasl_available() {
        check_platform(2, 3);
        check_platform(8, 24);
    }
}

#[test]
fn iasl_decodes_a_platform_without_power_registers_or_disks() {
    if !iasl_available() {
        return;
    }
    let scratch = Scratch::new("bare");
    let platform = AcpiPlatform { power: None, i8042: false, ..AcpiPlatform::default() };
    let tables = AcpiTables::build(&platform).unwrap();
    let fadt = disassemble(&scratch.0, "facp", &tables.table(*b"FACP").unwrap().bytes);
    assert_eq!(field(&fadt, "Reset Register Supported (V2)"), "0");
    assert_eq!(field(&fadt, "8042 Present on ports 60/64 (V2)"), "0");
    let dsdt = disassemble(&scratch.0, "dsdt", &tables.table(*b"DSDT").unwrap().bytes);
    assert!(!dsdt.contains("_S5"));
    assert!(!dsdt.contains("Device ("));
}
