//! ACPI tables describing the assembled VM to the guest OS, made with rust-vmm's
//! `acpi_tables` crate.
//!
//! The platform is *hardware-reduced* (ACPI 6.x, section 4.1): no PM1 event/control
//! blocks, no SCI, no FACS. What a distribution kernel needs, and what [`AcpiPlatform`]
//! describes, is:
//! * **RSDP** at [`RSDP_ADDRESS`], in the BIOS area an OS scans (0xE0000-0xFFFFF), also
//!   handed over directly (PVH `rsdp_paddr`, `boot_params.acpi_rsdp_addr`);
//! * **XSDT** listing the FADT and the MADT;
//! * **FADT**: `HW_REDUCED_ACPI`, the sleep control and status registers and the reset
//!   register of the power device (as I/O-port GASes), the DSDT, and the IA-PC boot flags
//!   (an i8042 or not, no VGA, no CMOS RTC);
//! * **MADT**: one enabled local APIC per vCPU (APIC ID = vCPU index, as the vCPUs are
//!   created), the IOAPIC, and PC-AT compatibility (the in-kernel 8259s). No interrupt
//!   source overrides: KVM's default routing sends ISA IRQ *n* to IOAPIC pin *n*, which is
//!   what an OS assumes without one;
//! * **DSDT**: every device under `\_SB` with `_HID`, `_UID` and `_CRS` (its I/O or MMIO
//!   range and its interrupt, edge-triggered, active-high, as splitvisor's irqfds deliver
//!   them), and `\_S5` so the OS can power off.
//!
//! All tables live in [`ACPI_AREA_START`]..[`ACPI_AREA_END`], which the e820 map leaves out
//! of RAM, so the OS never reuses it.
//!
//! ```
//! use splitvisor_memory::GuestRam;
//! use splitvisor_vcpu::acpi::{AcpiDevice, AcpiPlatform, AcpiPowerRegisters, AcpiTables};
//!
//! let platform = AcpiPlatform {
//!     vcpus: 2,
//!     devices: vec![
//!         AcpiDevice::serial(1, 0x3f8, 4),
//!         AcpiDevice::virtio_mmio(0, 0xc000_0000, 0x200, 5),
//!     ],
//!     power: Some(AcpiPowerRegisters { sleep_control_port: 0x600, sleep_status_port: 0x601, reset_port: 0x602, reset_value: 1, s5_sleep_type: 5 }),
//!     ..AcpiPlatform::default()
//! };
//! let tables = AcpiTables::build(&platform)?;
//! let ram = GuestRam::new(64 << 20)?;
//! let rsdp = tables.write_to(ram.memory())?; // give it to the kernel: PVH or boot_params
//! assert_eq!(rsdp, splitvisor_vcpu::acpi::RSDP_ADDRESS);
//! assert!(tables.table(*b"DSDT").is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use splitvisor_memory::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// First byte of the area the tables are written to: the start of the BIOS area an OS
/// scans for the RSDP.
pub const ACPI_AREA_START: u64 = 0xe_0000;
/// One past the last byte of the table area (the end of the first MiB).
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// Where the RSDP goes (16-byte aligned, inside the scanned range).
pub const RSDP_ADDRESS: u64 = ACPI_AREA_START;
/// OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"SPLITV";
/// OEM table ID of every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"SPLITVSR";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// Most vCPUs the MADT describes: processor UIDs and APIC IDs are one byte in a local
/// APIC entry (x2APIC entries would be needed beyond).
pub const MAX_VCPUS: u32 = 255;
/// Most devices in the DSDT (their names are `D000` to `DFFF`).
pub const MAX_DEVICES: usize = 0x1000;

/// `_HID` of a virtio-mmio device (Linux's virtio_mmio driver matches it).
pub const HID_VIRTIO_MMIO: &str = "LNRO0005";
/// `_HID` of a 16550-compatible UART.
pub const HID_SERIAL_16550: &str = "PNP0501";

/// MADT flags: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision for ACPI 6.x.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2 and later: 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// FADT IA-PC boot architecture flags.
mod iapc_boot_arch {
    /// The motherboard has an 8042 keyboard controller.
    pub const I8042: u16 = 1 << 1;
    /// No VGA: the OS must not probe for one.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// No CMOS RTC.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}
/// Tables start 16-byte aligned.
const TABLE_ALIGN: u64 = 16;

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A VM without vCPUs.
    #[error("the ACPI tables need at least one vCPU")]
    NoVcpus,
    /// More vCPUs than local APIC entries can name.
    #[error("{0} vCPUs do not fit the MADT's local APIC entries (at most {MAX_VCPUS})")]
    TooManyVcpus(u32),
    /// More devices than the DSDT names.
    #[error("{0} devices do not fit the DSDT (at most {MAX_DEVICES})")]
    TooManyDevices(usize),
    /// A `_HID` that is neither an EISA ID (`PNP0501`) nor an ACPI ID (`LNRO0005`).
    #[error("device {uid}: invalid ACPI hardware ID {hid:?} (want AAA#### or NNNN####)")]
    InvalidHid {
        /// The ID.
        hid: String,
        /// The device's `_UID`.
        uid: u32,
    },
    /// A resource the DSDT cannot describe.
    #[error("device {hid} {uid}: {what}")]
    InvalidResource {
        /// The device's `_HID`.
        hid: String,
        /// The device's `_UID`.
        uid: u32,
        /// What is wrong.
        what: String,
    },
    /// An interrupt beyond the IOAPIC's pins.
    #[error("device {hid} {uid}: interrupt {irq} is beyond the IOAPIC's {pins} pins")]
    IrqOutOfRange {
        /// The device's `_HID`.
        hid: String,
        /// The device's `_UID`.
        uid: u32,
        /// The GSI.
        irq: u32,
        /// Pins of the IOAPIC.
        pins: u32,
    },
    /// The tables outgrow their area.
    #[error("the ACPI tables need {size} bytes; the area at {ACPI_AREA_START:#x} holds {room}")]
    TooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write the {table} table at {addr:#x}: {source}")]
    Write {
        /// Its signature.
        table: String,
        /// Where.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The IOAPIC, as KVM's in-kernel irqchip presents it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicInfo {
    /// Its ID (KVM's IOAPIC resets to 0).
    pub id: u8,
    /// Its registers' guest-physical address.
    pub address: u32,
    /// The first GSI it serves.
    pub gsi_base: u32,
    /// Its input pins (24 for KVM's).
    pub pins: u32,
}

impl Default for IoApicInfo {
    fn default() -> Self {
        Self { id: 0, address: layout::IOAPIC_START as u32, gsi_base: 0, pins: 24 }
    }
}

/// The address range a device decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiResource {
    /// I/O ports `base..base + len` (at most 255 of them).
    Pio {
        /// First port.
        base: u16,
        /// Ports.
        len: u16,
    },
    /// Memory-mapped registers `base..base + len`, below 4 GiB.
    Mmio {
        /// Guest-physical start.
        base: u64,
        /// Bytes.
        len: u64,
    },
}

/// A device the OS finds in the DSDT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiDevice {
    /// `_HID`: an EISA ID such as `PNP0501` or an ACPI ID such as `LNRO0005`.
    pub hid: String,
    /// `_UID`: tells apart devices with the same `_HID`.
    pub uid: u32,
    /// Its registers.
    pub resource: AcpiResource,
    /// Its interrupt line (a GSI), if it has one.
    pub irq: Option<u32>,
}

impl AcpiDevice {
    /// A 16550-compatible UART (`PNP0501`) with 8 ports at `port` on ISA `irq`.
    pub fn serial(uid: u32, port: u16, irq: u32) -> Self {
        Self {
            hid: HID_SERIAL_16550.to_string(),
            uid,
            resource: AcpiResource::Pio { base: port, len: 8 },
            irq: Some(irq),
        }
    }

    /// A virtio-mmio transport (`LNRO0005`) at `base` with `len` bytes of registers.
    pub fn virtio_mmio(uid: u32, base: u64, len: u64, irq: u32) -> Self {
        Self {
            hid: HID_VIRTIO_MMIO.to_string(),
            uid,
            resource: AcpiResource::Mmio { base, len },
            irq: Some(irq),
        }
    }
}

/// The hardware-reduced power registers (one byte each, I/O ports), as the VM's power
/// device serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiPowerRegisters {
    /// FADT `SLEEP_CONTROL_REG`.
    pub sleep_control_port: u16,
    /// FADT `SLEEP_STATUS_REG`.
    pub sleep_status_port: u16,
    /// FADT `RESET_REG`.
    pub reset_port: u16,
    /// FADT `RESET_VALUE`.
    pub reset_value: u8,
    /// `SLP_TYP` of S5 (soft off), put in `\_S5`.
    pub s5_sleep_type: u8,
}

/// A plain description of the VM, from which [`AcpiTables::build`] makes the tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// vCPUs, with APIC IDs `0..vcpus`.
    pub vcpus: u32,
    /// The IOAPIC.
    pub ioapic: IoApicInfo,
    /// Guest-physical address of the local APICs.
    pub local_apic_address: u32,
    /// Devices in the DSDT.
    pub devices: Vec<AcpiDevice>,
    /// The power registers; without them the OS has no ACPI power-off or reset.
    pub power: Option<AcpiPowerRegisters>,
    /// The VM has an i8042 (its reset line is the fallback reboot path).
    pub i8042: bool,
}

impl Default for AcpiPlatform {
    /// One vCPU, KVM's IOAPIC and local APICs, an i8042, no devices, no power registers.
    fn default() -> Self {
        Self {
            vcpus: 1,
            ioapic: IoApicInfo::default(),
            local_apic_address: layout::LAPIC_START as u32,
            devices: Vec::new(),
            power: None,
            i8042: true,
        }
    }
}

/// One table and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// `RSD ` for the RSDP (whose signature is `RSD PTR `), else the table's signature.
    pub signature: [u8; 4],
    /// Guest-physical address.
    pub address: u64,
    /// The table, checksummed.
    pub bytes: Vec<u8>,
}

/// The tables of one VM, laid out in [`ACPI_AREA_START`]..[`ACPI_AREA_END`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// Builds the RSDP, XSDT, FADT, MADT and DSDT for `platform`.
    pub fn build(platform: &AcpiPlatform) -> Result<Self, AcpiError> {
        if platform.vcpus == 0 {
            return Err(AcpiError::NoVcpus);
        }
        if platform.vcpus > MAX_VCPUS {
            return Err(AcpiError::TooManyVcpus(platform.vcpus));
        }
        if platform.devices.len() > MAX_DEVICES {
            return Err(AcpiError::TooManyDevices(platform.devices.len()));
        }
        let dsdt = dsdt(platform)?;
        let madt = madt(platform);

        // The RSDP first, at its fixed place; then each table after the ones it points to.
        let mut next = align(RSDP_ADDRESS + Rsdp::len() as u64);
        let mut place = |len: usize| {
            let at = next;
            next = align(at + len as u64);
            at
        };
        let dsdt_addr = place(dsdt.len());
        let madt_addr = place(madt.len());
        let fadt = fadt(platform, dsdt_addr);
        let fadt_addr = place(fadt.len());
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let xsdt = bytes_of(&xsdt);
        let xsdt_addr = place(xsdt.len());
        let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

        let tables = vec![
            AcpiTable { signature: *b"RSD ", address: RSDP_ADDRESS, bytes: rsdp },
            AcpiTable { signature: *b"DSDT", address: dsdt_addr, bytes: dsdt },
            AcpiTable { signature: *b"APIC", address: madt_addr, bytes: madt },
            AcpiTable { signature: *b"FACP", address: fadt_addr, bytes: fadt },
            AcpiTable { signature: *b"XSDT", address: xsdt_addr, bytes: xsdt },
        ];
        let end = tables.iter().map(|t| t.address + t.bytes.len() as u64).max().unwrap_or(ACPI_AREA_START);
        if end > ACPI_AREA_END {
            return Err(AcpiError::TooLarge {
                size: end - ACPI_AREA_START,
                room: ACPI_AREA_END - ACPI_AREA_START,
            });
        }
        Ok(Self { tables })
    }

    /// Every table, the RSDP first.
    pub fn tables(&self) -> &[AcpiTable] {
        &self.tables
    }

    /// The table with `signature` (`RSD ` for the RSDP).
    pub fn table(&self, signature: [u8; 4]) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.signature == signature)
    }

    /// Where the RSDP is.
    pub fn rsdp_address(&self) -> u64 {
        RSDP_ADDRESS
    }

    /// Writes every table into guest memory; returns the RSDP's address.
    pub fn write_to<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u64, AcpiError> {
        for table in &self.tables {
            mem.write_slice(&table.bytes, GuestAddress(table.address)).map_err(|source| {
                AcpiError::Write {
                    table: String::from_utf8_lossy(&table.signature).into_owned(),
                    addr: table.address,
                    source,
                }
            })?;
        }
        log::debug!(
            "ACPI tables at {ACPI_AREA_START:#x}..{:#x}",
            self.tables.iter().map(|t| t.address + t.bytes.len() as u64).max().unwrap_or(ACPI_AREA_START)
        );
        Ok(RSDP_ADDRESS)
    }
}

/// Builds the tables for `platform` and writes them into guest memory; returns the RSDP's
/// address (for PVH `rsdp_paddr` or `boot_params.acpi_rsdp_addr`).
pub fn write_acpi_tables<M: GuestMemoryBackend>(mem: &M, platform: &AcpiPlatform) -> Result<u64, AcpiError> {
    AcpiTables::build(platform)?.write_to(mem)
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// One byte-wide register in I/O space.
fn io_register(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

fn fadt(platform: &AcpiPlatform, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let mut boot_arch = iapc_boot_arch::VGA_NOT_PRESENT | iapc_boot_arch::CMOS_RTC_NOT_PRESENT;
    if platform.i8042 {
        boot_arch |= iapc_boot_arch::I8042;
    }
    fadt.iapc_boot_arch = boot_arch.into();
    if let Some(power) = platform.power {
        fadt = fadt.flag(Flags::ResetRegSup);
        fadt.reset_reg = io_register(power.reset_port);
        fadt.reset_value = power.reset_value;
        fadt.sleep_control_reg = io_register(power.sleep_control_port);
        fadt.sleep_status_reg = io_register(power.sleep_status_port);
    }
    bytes_of(&fadt.finalize())
}

fn madt(platform: &AcpiPlatform) -> Vec<u8> {
    // Header, local APIC address, flags; then the entries.
    let mut madt = Sdt::new(*b"APIC", 44, MADT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, platform.local_apic_address);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for vcpu in 0..platform.vcpus {
        // Checked against MAX_VCPUS by the caller.
        let id = vcpu as u8;
        madt.append_slice(&bytes_of(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled)));
    }
    let ioapic = platform.ioapic;
    madt.append_slice(&bytes_of(&IoApic::new(ioapic.id, ioapic.address, ioapic.gsi_base)));
    madt.as_slice().to_vec()
}

/// Whether `hid` is an EISA ID: three upper-case letters, four hex digits.
fn is_eisa_id(hid: &str) -> bool {
    let b = hid.as_bytes();
    b.len() == 7 && b[..3].iter().all(u8::is_ascii_uppercase) && b[3..].iter().all(is_upper_hex)
}

/// Whether `hid` is an ACPI ID: four upper-case letters or digits, four hex digits.
fn is_acpi_id(hid: &str) -> bool {
    let b = hid.as_bytes();
    b.len() == 8
        && b[..4].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && b[4..].iter().all(is_upper_hex)
}

fn is_upper_hex(c: &u8) -> bool {
    c.is_ascii_digit() || (b'A'..=b'F').contains(c)
}

/// The `_CRS` entries of one device, checked.
struct DeviceResources {
    io: Option<aml::IO>,
    memory: Option<aml::Memory32Fixed>,
    interrupt: Option<aml::Interrupt>,
}

fn device_resources(platform: &AcpiPlatform, device: &AcpiDevice) -> Result<DeviceResources, AcpiError> {
    let invalid =
        |what: String| AcpiError::InvalidResource { hid: device.hid.clone(), uid: device.uid, what };
    let (io, memory) = match device.resource {
        AcpiResource::Pio { base, len } => {
            let Ok(len) = u8::try_from(len) else {
                return Err(invalid(format!("{len} I/O ports; an I/O descriptor takes at most 255")));
            };
            if len == 0 || base.checked_add(u16::from(len) - 1).is_none() {
                return Err(invalid(format!("I/O range {base:#x}+{len} is empty or wraps")));
            }
            (Some(aml::IO::new(base, base, 1, len)), None)
        }
        AcpiResource::Mmio { base, len } => {
            let fits = len > 0 && base.checked_add(len).is_some_and(|end| end <= 1 << 32);
            if !fits {
                return Err(invalid(format!("MMIO range {base:#x}+{len:#x} is empty or not below 4 GiB")));
            }
            (None, Some(aml::Memory32Fixed::new(true, base as u32, len as u32)))
        }
    };
    let interrupt = match device.irq {
        None => None,
        Some(irq) => {
            let pins = platform.ioapic.pins;
            if irq < platform.ioapic.gsi_base || irq - platform.ioapic.gsi_base >= pins {
                return Err(AcpiError::IrqOutOfRange { hid: device.hid.clone(), uid: device.uid, irq, pins });
            }
            // Consumer, edge-triggered, active-high, exclusive: what an irqfd delivers.
            Some(aml::Interrupt::new(true, true, false, false, irq))
        }
    };
    Ok(DeviceResources { io, memory, interrupt })
}

fn dsdt(platform: &AcpiPlatform) -> Result<Vec<u8>, AcpiError> {
    let mut devices = Vec::with_capacity(platform.devices.len());
    for (index, device) in platform.devices.iter().enumerate() {
        devices.push(device_aml(platform, index, device)?);
    }
    let device_refs: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let system_bus = aml::Scope::new("\\_SB_".into(), device_refs);

    let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&bytes_of(&system_bus));
    if let Some(power) = platform.power {
        // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved. A hardware-reduced platform uses
        // SLP_TYPa only.
        let s5 = power.s5_sleep_type;
        let elements: Vec<&dyn Aml> = vec![&s5, &s5, &aml::ZERO, &aml::ZERO];
        let package = aml::Package::new(elements);
        dsdt.append_slice(&bytes_of(&aml::Name::new("_S5_".into(), &package)));
    }
    Ok(dsdt.as_slice().to_vec())
}

/// A device's AML, already serialised (the `aml` builders borrow their children).
struct DeviceAml(Vec<u8>);

impl Aml for DeviceAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn device_aml(platform: &AcpiPlatform, index: usize, device: &AcpiDevice) -> Result<DeviceAml, AcpiError> {
    let eisa;
    let acpi_id;
    let hid: &dyn Aml = if is_eisa_id(&device.hid) {
        eisa = aml::EISAName::new(&device.hid);
        &eisa
    } else if is_acpi_id(&device.hid) {
        acpi_id = device.hid.clone();
        &acpi_id
    } else {
        return Err(AcpiError::InvalidHid { hid: device.hid.clone(), uid: device.uid });
    };
    let resources = device_resources(platform, device)?;
    let mut crs: Vec<&dyn Aml> = Vec::new();
    if let Some(io) = &resources.io {
        crs.push(io);
    }
    if let Some(memory) = &resources.memory {
        crs.push(memory);
    }
    if let Some(interrupt) = &resources.interrupt {
        crs.push(interrupt);
    }
    let crs = aml::ResourceTemplate::new(crs);
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &device.uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let name = format!("D{index:03X}");
    let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    Ok(DeviceAml(bytes_of(&device)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_memory::GuestRam;

    fn checksum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
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
        for disk in 0..disks {
            let irq = 5 + disk % 19;
            devices.push(AcpiDevice::virtio_mmio(disk, 0xc000_0000 + u64::from(disk) * 0x1000, 0x200, irq));
        }
        AcpiPlatform { vcpus, devices, power: Some(power()), ..AcpiPlatform::default() }
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_and_has_its_length() {
        let tables = AcpiTables::build(&platform(2, 3)).unwrap();
        let rsdp = &tables.table(*b"RSD ").unwrap().bytes;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(checksum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(checksum(rsdp), 0, "extended checksum");
        for table in tables.tables().iter().skip(1) {
            assert_eq!(table.bytes[..4], table.signature);
            assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
            assert_eq!(checksum(&table.bytes), 0, "{:?}", table.signature);
        }
    }

    #[test]
    fn pointers_lead_from_the_rsdp_to_every_table() {
        let tables = AcpiTables::build(&platform(1, 1)).unwrap();
        let at = |addr: u64| tables.tables().iter().find(|t| t.address == addr).map(|t| t.signature);
        let rsdp = &tables.table(*b"RSD ").unwrap().bytes;
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
        let xsdt_addr = u64_at(rsdp, 24);
        assert_eq!(at(xsdt_addr), Some(*b"XSDT"));
        let xsdt = &tables.table(*b"XSDT").unwrap().bytes;
        let entries: Vec<_> = (36..xsdt.len()).step_by(8).map(|o| at(u64_at(xsdt, o))).collect();
        assert_eq!(entries, [Some(*b"FACP"), Some(*b"APIC")]);
        let fadt = &tables.table(*b"FACP").unwrap().bytes;
        assert_eq!(at(u64_at(fadt, 140)), Some(*b"DSDT"), "X_DSDT");
    }

    #[test]
    fn tables_stay_in_their_area_without_overlapping() {
        let tables = AcpiTables::build(&platform(8, 64)).unwrap();
        let mut ranges: Vec<_> =
            tables.tables().iter().map(|t| (t.address, t.address + t.bytes.len() as u64)).collect();
        ranges.sort();
        assert_eq!(ranges[0].0, RSDP_ADDRESS);
        assert_eq!(RSDP_ADDRESS % 16, 0);
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        assert!(ranges.last().unwrap().1 <= ACPI_AREA_END);
    }

    #[test]
    fn fadt_describes_a_hardware_reduced_platform_with_power_registers() {
        let tables = AcpiTables::build(&platform(1, 0)).unwrap();
        let fadt = &tables.table(*b"FACP").unwrap().bytes;
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // GAS: space, width, offset, access size, address.
        let gas = |at: usize| (fadt[at], fadt[at + 1], fadt[at + 3], u64_at(fadt, at + 4));
        assert_eq!(gas(116), (1, 8, 1, 0x602), "RESET_REG: one byte in I/O space");
        assert_eq!(fadt[128], 1, "RESET_VALUE");
        assert_eq!(gas(244), (1, 8, 1, 0x600), "SLEEP_CONTROL_REG");
        assert_eq!(gas(256), (1, 8, 1, 0x601), "SLEEP_STATUS_REG");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch, 0b10_0110, "8042, no VGA, no CMOS RTC");
    }

    #[test]
    fn without_power_registers_there_is_no_reset_or_s5() {
        let platform = AcpiPlatform { power: None, i8042: false, ..platform(1, 0) };
        let tables = AcpiTables::build(&platform).unwrap();
        let fadt = &tables.table(*b"FACP").unwrap().bytes;
        assert_eq!(u32_at(fadt, 112) & (1 << 10), 0);
        assert_eq!(u64_at(fadt, 248), 0);
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]) & 2, 0, "no 8042");
        let dsdt = &tables.table(*b"DSDT").unwrap().bytes;
        assert!(!dsdt.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u32, 2, 5] {
            let tables = AcpiTables::build(&platform(vcpus, 0)).unwrap();
            let madt = &tables.table(*b"APIC").unwrap().bytes;
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
            let mut at = 44;
            let mut apic_ids = Vec::new();
            let mut ioapics = Vec::new();
            while at < madt.len() {
                let (kind, len) = (madt[at], usize::from(madt[at + 1]));
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, at + 4) & 1, 1, "enabled");
                        apic_ids.push(u32::from(madt[at + 3]));
                    }
                    1 => ioapics.push((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);
        }
    }

    #[test]
    fn dsdt_names_every_device() {
        let tables = AcpiTables::build(&platform(1, 3)).unwrap();
        let dsdt = &tables.table(*b"DSDT").unwrap().bytes;
        let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| w == &needle).count();
        assert_eq!(count(b"LNRO0005\0"), 3);
        assert_eq!(count(b"_S5_"), 1);
        // PNP0501 as an EISA ID: 0x0105d041, stored little-endian after a DWordPrefix.
        assert_eq!(count(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        for disk in 0..3u32 {
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
            let mut descriptor = vec![0x86, 9, 0, 1];
            descriptor.extend_from_slice(&(0xc000_0000 + disk * 0x1000).to_le_bytes());
            descriptor.extend_from_slice(&0x200u32.to_le_bytes());
            assert_eq!(count(&descriptor), 1, "disk {disk}'s MMIO range");
            // Extended interrupt: tag 0x89, length 6, consumer|edge, one interrupt.
            let mut interrupt = vec![0x89, 6, 0, 0b0011, 1];
            interrupt.extend_from_slice(&(5 + disk).to_le_bytes());
            assert_eq!(count(&interrupt), 1, "disk {disk}'s interrupt");
        }
    }

    #[test]
    fn bad_descriptions_are_refused() {
        let build = |f: &dyn Fn(&mut AcpiPlatform)| {
            let mut p = platform(1, 1);
            f(&mut p);
            AcpiTables::build(&p)
        };
        assert!(matches!(build(&|p| p.vcpus = 0), Err(AcpiError::NoVcpus)));
        assert!(matches!(build(&|p| p.vcpus = 256), Err(AcpiError::TooManyVcpus(256))));
        assert!(build(&|p| p.vcpus = 255).is_ok());
        for hid in ["", "PNP050", "pnp0501", "PNP050G", "LNRO000G", "LNRO00055", "1NP0501"] {
            let result = build(&|p| p.devices[0].hid = hid.to_string());
            assert!(matches!(result, Err(AcpiError::InvalidHid { .. })), "{hid:?}");
        }
        let result = build(&|p| p.devices[1].irq = Some(24));
        assert!(matches!(result, Err(AcpiError::IrqOutOfRange { irq: 24, .. })));
        for resource in [
            AcpiResource::Mmio { base: 0xffff_f000, len: 0x2000 },
            AcpiResource::Mmio { base: 0xc000_0000, len: 0 },
            AcpiResource::Mmio { base: u64::MAX, len: 2 },
            AcpiResource::Pio { base: 0x3f8, len: 0 },
            AcpiResource::Pio { base: 0x3f8, len: 256 },
            AcpiResource::Pio { base: 0xffff, len: 2 },
        ] {
            let result = build(&|p| p.devices[1].resource = resource);
            assert!(matches!(result, Err(AcpiError::InvalidResource { .. })), "{resource:?}");
        }
        let many = build(&|p| {
            p.devices = (0..MAX_DEVICES as u32 + 1)
                .map(|i| AcpiDevice::virtio_mmio(i, 0xc000_0000, 0x200, 5))
                .collect()
        });
        assert!(matches!(many, Err(AcpiError::TooManyDevices(_))));
    }

    #[test]
    fn too_many_devices_for_the_area_is_an_error_not_an_overflow() {
        let mut p = platform(MAX_VCPUS, 0);
        p.devices = (0..MAX_DEVICES as u32)
            .map(|i| AcpiDevice::virtio_mmio(i, 0xc000_0000 + u64::from(i) * 0x200, 0x200, 5))
            .collect();
        assert!(matches!(AcpiTables::build(&p), Err(AcpiError::TooLarge { .. })));
    }

    #[test]
    fn written_tables_are_found_by_a_bios_area_scan() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mem = ram.memory();
        let rsdp = write_acpi_tables(mem, &platform(2, 2)).unwrap();
        // What an OS does without a pointer: look for "RSD PTR " on 16-byte boundaries.
        let found = (0xe_0000u64..0x10_0000)
            .step_by(16)
            .find(|&addr| mem.read_obj::<[u8; 8]>(GuestAddress(addr)).unwrap() == *b"RSD PTR ");
        assert_eq!(found, Some(rsdp));
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        assert_eq!(mem.read_obj::<[u8; 4]>(GuestAddress(xsdt)).unwrap(), *b"XSDT");
    }
}
