//! The per-device seam: each device kind is a [`DeviceRecipe`] that builds the device in
//! the hypervisor or has a driver partition serve it, and hands its driver to the
//! lifecycle. The VM builder is a loop over recipes; a new device kind is a new recipe
//! and touches no other device's code.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use splitvisor_bus::{
    Bus, BusDevice, BusRange, EventFdInterrupt, Interrupt, ResourceAllocator, SharedDevice,
};
use splitvisor_devices::acpi::{self as power, AcpiPower};
use splitvisor_devices::fault::{FaultPlan, InjectInThread};
use splitvisor_devices::i8042::{I8042, I8042_PORT, I8042_PORT_COUNT};
use splitvisor_devices::serial::{COM1_IRQ, COM1_PORT, SERIAL_PORT_COUNT, Serial};
use splitvisor_devices::virtio::block::{Block, CacheMode, DiskImage, MAX_QUEUES};
use splitvisor_devices::virtio::{MMIO_REGION_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, VirtioDevice, reg};
use splitvisor_isolation::driver::default_serial;
use splitvisor_isolation::frontend::{DeviceShape, FrontendError, Handshake, VhostUserVirtio};
use splitvisor_isolation::liveness::DeviceQueue;
use splitvisor_isolation::partition::{BlockOptions, DriverProgram, Partition, StartingPartition};
use splitvisor_isolation::proxy::{InputSink, ProxyConnection, ProxyDevice, ProxyLink};
use splitvisor_memory::GuestRam;
use splitvisor_vcpu::acpi::{AcpiDevice, AcpiPlatform, AcpiPowerRegisters, AcpiResource, HID_VIRTIO_MMIO};
use splitvisor_vcpu::{KvmVm, StopHandle};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::Error;
use crate::drivers::{Backend, InHypervisorBlockSlot, ProxySlot, Served, Spare, VhostUserSlot};
use crate::lifecycle::{DriverSlot, EventLog, ManagedDriver};
use crate::placement::{FaultPolicy, Layout, Placement};

/// A virtio-blk disk.
///
/// On the command line: `PATH` or `path=PATH`, then any of `ro=on|off`, `serial=ID`,
/// `queues=N` (request queues, each served by its own thread; by default one per vCPU)
/// and `cache=writeback|none` (none: O_DIRECT), comma-separated, a comma inside a value
/// written twice (`path=a,,b.img` is `a,b.img`);
/// or `socket=PATH` for an external vhost-user-blk backend.
///
/// ```
/// use splitvisor_devices::virtio::block::CacheMode;
/// use splitvisor_layout::DiskConfig;
///
/// let disk: DiskConfig = "path=with,,comma.img,ro=on,serial=data".parse().unwrap();
/// assert_eq!(disk, DiskConfig::image("with,comma.img").read_only().serial("data"));
/// let fast: DiskConfig = "a.img,queues=2,cache=none".parse().unwrap();
/// assert_eq!(fast, DiskConfig::image("a.img").queues(2).cache(CacheMode::None));
/// let external: DiskConfig = "socket=/run/blk.sock".parse().unwrap();
/// assert_eq!(external, DiskConfig::VhostUser { socket: "/run/blk.sock".into() });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskConfig {
    /// A raw image file, served by splitvisor's own virtio-blk, placed by the [`Layout`].
    Image {
        /// The image.
        path: PathBuf,
        /// Refuse the guest's writes.
        read_only: bool,
        /// The ID the guest reads (GET_ID); by default one derived from the image's identity.
        serial: Option<String>,
        /// Request queues (VIRTIO_BLK_F_MQ above 1); by default one per vCPU.
        queues: Option<u16>,
        /// How data reaches the image on the host.
        cache: CacheMode,
    },
    /// An external vhost-user-blk backend listening on `socket` (splitvisor-driver started
    /// by hand, qemu-storage-daemon, ...).
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
    },
}

impl DiskConfig {
    /// A read-write image with the default ID.
    pub fn image(path: impl Into<PathBuf>) -> Self {
        Self::Image {
            path: path.into(),
            read_only: false,
            serial: None,
            queues: None,
            cache: CacheMode::Writeback,
        }
    }

    /// The same disk, read-only.
    pub fn read_only(self) -> Self {
        match self {
            Self::Image { path, serial, queues, cache, .. } => {
                Self::Image { path, read_only: true, serial, queues, cache }
            }
            other => other,
        }
    }

    /// The same disk, with the ID `serial`.
    pub fn serial(self, serial: &str) -> Self {
        match self {
            Self::Image { path, read_only, queues, cache, .. } => {
                Self::Image { path, read_only, serial: Some(serial.into()), queues, cache }
            }
            other => other,
        }
    }

    /// The same disk, with `queues` request queues (1 to [`MAX_QUEUES`]).
    pub fn queues(self, queues: u16) -> Self {
        match self {
            Self::Image { path, read_only, serial, cache, .. } => {
                Self::Image { path, read_only, serial, queues: Some(queues.clamp(1, MAX_QUEUES)), cache }
            }
            other => other,
        }
    }

    /// The same disk, with the host cache mode `cache`.
    pub fn cache(self, cache: CacheMode) -> Self {
        match self {
            Self::Image { path, read_only, serial, queues, .. } => {
                Self::Image { path, read_only, serial, queues, cache }
            }
            other => other,
        }
    }
}

/// Splits `a=b,c=d` at single commas; `,,` is a comma inside a value.
fn split_options(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                part.push(',');
            }
            ',' => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    parts
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{key}={other}: use on or off")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (mut path, mut socket, mut read_only, mut serial) = (None, None, false, None);
        let (mut queues, mut cache) = (None, None);
        for (index, part) in split_options(text).into_iter().enumerate() {
            match part.split_once('=') {
                None if index == 0 && !part.is_empty() => path = Some(PathBuf::from(part)),
                Some(("path", value)) => path = Some(PathBuf::from(value)),
                Some(("socket", value)) => socket = Some(PathBuf::from(value)),
                Some(("ro", value)) => read_only = on_off("ro", value)?,
                Some(("serial", value)) => {
                    if value.is_empty() || value.len() > 20 || !value.is_ascii() {
                        return Err(format!("serial '{value}': 1 to 20 ASCII characters"));
                    }
                    serial = Some(value.to_string());
                }
                Some(("queues", value)) => match value.parse::<u16>() {
                    Ok(n) if (1..=MAX_QUEUES).contains(&n) => queues = Some(n),
                    _ => return Err(format!("queues={value}: a number from 1 to {MAX_QUEUES}")),
                },
                Some(("cache", value)) => cache = Some(value.parse::<CacheMode>()?),
                _ => {
                    return Err(format!(
                        "'{part}' is not a disk option (use PATH or path=PATH, ro=on|off, serial=ID, queues=N, cache=writeback|none, or socket=PATH; write a comma in a path as ,,)"
                    ));
                }
            }
        }
        match (path, socket) {
            (Some(path), None) if !path.as_os_str().is_empty() => {
                Ok(Self::Image { path, read_only, serial, queues, cache: cache.unwrap_or_default() })
            }
            (None, Some(socket)) if !socket.as_os_str().is_empty() => {
                if read_only || serial.is_some() || queues.is_some() || cache.is_some() {
                    return Err(
                        "ro=, serial=, queues= and cache= belong to the external backend (set them where it runs)"
                            .into(),
                    );
                }
                Ok(Self::VhostUser { socket })
            }
            (Some(_), Some(_)) => Err("give path= or socket=, not both".into()),
            _ => Err("no disk path given".into()),
        }
    }
}

/// What the VM being assembled offers a device.
pub(crate) struct Assembly<'a> {
    pub kvm: &'a KvmVm,
    pub ram: &'a GuestRam,
    pub pio: &'a Bus,
    pub mmio: &'a Bus,
    pub allocator: &'a mut ResourceAllocator,
    pub layout: &'a Layout,
    pub driver: Option<DriverProgram>,
    /// What the guest's command line gets appended (virtio-mmio announcements), used
    /// only by a VM without ACPI tables.
    pub cmdline: &'a mut String,
    /// The platform the ACPI tables describe: each device adds itself
    /// ([`Assembly::describe`]); used only by a VM with ACPI tables.
    pub acpi: &'a mut AcpiPlatform,
    /// What a restart of the VM does to the devices, besides what the guest does itself.
    pub resets: &'a mut Vec<DeviceReset>,
    pub stop: StopHandle,
    pub log: Arc<EventLog>,
    /// Faults to inject, by device.
    pub faults: &'a [(String, String)],
    /// The VM's vCPUs (a disk has one request queue per vCPU by default).
    pub vcpus: u32,
    /// Test hook: every disk partition tries this when its first request arrives.
    #[cfg(feature = "test-hooks")]
    pub attempt: Option<splitvisor_isolation::sandbox::testing::Forbidden>,
}

/// What a device may start before the VM exists ([`DeviceRecipe::start`]).
pub(crate) struct Early<'a> {
    pub driver: Option<&'a DriverProgram>,
    /// Bytes of guest RAM (a vhost-user partition's address-space limit depends on it).
    pub guest_ram: u64,
    /// The VM's vCPUs (a disk has one request queue per vCPU by default).
    pub vcpus: u32,
    /// Faults to inject, by device.
    pub faults: &'a [(String, String)],
    /// Test hook: every disk partition tries this when its first request arrives.
    #[cfg(feature = "test-hooks")]
    pub attempt: Option<splitvisor_isolation::sandbox::testing::Forbidden>,
}

impl Early<'_> {
    /// The partition program, or why there is none.
    pub(crate) fn driver(&self, device: &str) -> Result<DriverProgram, Error> {
        self.driver.cloned().ok_or_else(|| Error::NoDriverProgram(device.to_string()))
    }

    pub(crate) fn fault(&self, device: &str) -> Option<String> {
        self.faults.iter().find(|(name, _)| name == device).map(|(_, fault)| fault.clone())
    }
}

impl Assembly<'_> {
    /// The partition program, or why there is none.
    pub(crate) fn driver(&self, device: &str) -> Result<DriverProgram, Error> {
        self.driver.clone().ok_or_else(|| Error::NoDriverProgram(device.to_string()))
    }

    /// What a device that did not start early sees of the VM ([`DeviceRecipe::start`]).
    pub(crate) fn early(&self) -> Early<'_> {
        Early {
            driver: self.driver.as_ref(),
            guest_ram: self.ram.size(),
            vcpus: self.vcpus,
            faults: self.faults,
            #[cfg(feature = "test-hooks")]
            attempt: self.attempt.clone(),
        }
    }

    /// Puts `driver` under supervision with `device`'s fault policy.
    pub(crate) fn manage(
        &self,
        device: &str,
        kind: &'static str,
        placement: Placement,
        slot: Box<dyn DriverSlot>,
    ) -> Arc<ManagedDriver> {
        ManagedDriver::new(
            device,
            kind,
            placement,
            self.layout.fault_policy(device),
            self.layout.watchdog(),
            self.stop.clone(),
            self.log.clone(),
            slot,
        )
    }

    pub(crate) fn fault(&self, device: &str) -> Option<String> {
        self.faults.iter().find(|(name, _)| name == device).map(|(_, fault)| fault.clone())
    }

    /// An MMIO range, an interrupt line and its irqfd for a virtio-mmio device.
    pub(crate) fn virtio_slot(&mut self) -> Result<VirtioSlot, Error> {
        let base = self.allocator.allocate_mmio(MMIO_REGION_SIZE, 0x1000)?;
        let irq = self.allocator.allocate_irq()?;
        let line = Arc::new(EventFdInterrupt::new().map_err(Error::EventFd)?);
        self.kvm.register_irqfd(line.irqfd(), irq)?;
        Ok(VirtioSlot { base, irq, line })
    }

    /// Adds a device to the ACPI tables' DSDT: its hardware ID, registers and interrupt.
    /// Its `_UID` tells it from the devices of the same ID described before it.
    fn describe(&mut self, hid: &str, resource: AcpiResource, irq: Option<u32>) {
        let uid = self.acpi.devices.iter().filter(|d| d.hid == hid).count() as u32;
        self.acpi.devices.push(AcpiDevice { hid: hid.to_string(), uid, resource, irq });
    }

    /// Puts a virtio-mmio transport on the bus with its doorbells as ioeventfds, and
    /// announces it: on the command line and in the DSDT (the VM uses one or the other).
    /// A restart of the VM resets it, as the guest's write of 0 to its status does.
    pub(crate) fn add_virtio<D: VirtioDevice + 'static>(
        &mut self,
        slot: &VirtioSlot,
        transport: Arc<Mutex<MmioTransport<D>>>,
        name: &str,
    ) -> Result<(), Error> {
        {
            let transport = transport.lock().unwrap_or_else(|e| e.into_inner());
            for (queue, eventfd) in transport.queue_notify_eventfds() {
                self.kvm.register_mmio_ioeventfd(eventfd, slot.base + QUEUE_NOTIFY_OFFSET, queue)?;
            }
        }
        self.mmio.insert(BusRange::new(slot.base, MMIO_REGION_SIZE)?, name, transport.clone())?;
        self.cmdline
            .push_str(&format!(" virtio_mmio.device={}@{:#x}:{}", MMIO_REGION_SIZE, slot.base, slot.irq));
        self.describe(
            HID_VIRTIO_MMIO,
            AcpiResource::Mmio { base: slot.base, len: MMIO_REGION_SIZE },
            Some(slot.irq),
        );
        // Stops the device's DMA into memory the next boot will own.
        self.resets.push(Box::new(move || {
            transport.lock().unwrap_or_else(|e| e.into_inner()).write(reg::STATUS, &0u32.to_le_bytes())
        }));
        log::debug!("{name} at {:#x}, irq {}", slot.base, slot.irq);
        Ok(())
    }
}

/// Puts a device back in its power-on state when the VM restarts.
pub(crate) type DeviceReset = Box<dyn Fn() + Send + Sync>;

/// Where a virtio-mmio device sits.
pub(crate) struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    pub line: Arc<EventFdInterrupt>,
}

/// A device once placed.
pub(crate) struct Placed {
    /// Where it runs, if not as its placement says (an external backend).
    pub note: Option<String>,
    /// Its supervised driver, if it has one that can fail on its own.
    pub driver: Option<Arc<ManagedDriver>>,
    /// Where host console input goes, for the console.
    pub input: Option<Arc<Mutex<dyn InputSink>>>,
}

/// One device of a VM, before it is placed.
pub(crate) trait DeviceRecipe {
    /// Its name: `com1`, `i8042`, `disk0`, ...
    fn name(&self) -> String;
    /// What it is: `8250`, `i8042`, `virtio-blk`.
    fn kind(&self) -> &'static str;
    /// Starts, before the VM exists, the part of the device that takes long to start and
    /// needs no VM: a driver partition's process, which then sets up its sandbox while the
    /// hypervisor sets up the VM and starts the other partitions ([`place`](Self::place)
    /// waits for it). By default nothing; a recipe whose `place` finds nothing started
    /// starts it then.
    fn start(&mut self, _placement: Placement, _vm: &Early<'_>) -> Result<(), Error> {
        Ok(())
    }
    /// Builds it where `placement` says.
    fn place(self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error>;
}

/// COM1, the guest console.
pub(crate) struct ConsoleRecipe {
    pub output: Box<dyn Write + Send>,
    /// What [`DeviceRecipe::start`] made, if it ran.
    pub started: Option<ConsoleStart>,
}

/// COM1's interrupt line, and its partition if it has one.
pub(crate) enum ConsoleStart {
    InHypervisor(Arc<EventFdInterrupt>),
    Partition(Arc<EventFdInterrupt>, StartedProxy),
}

impl ConsoleStart {
    fn new(placement: Placement, vm: &Early<'_>) -> Result<Self, Error> {
        let line = Arc::new(EventFdInterrupt::new().map_err(Error::EventFd)?);
        Ok(match placement {
            Placement::InHypervisor => Self::InHypervisor(line),
            Placement::Partition => {
                let driver = vm.driver("com1")?;
                let started = Partition::start_proxy(&driver, "serial", Some(line.irqfd()))
                    .map_err(Error::partition("com1"))?;
                Self::Partition(line, started)
            }
        })
    }

    fn line(&self) -> &Arc<EventFdInterrupt> {
        match self {
            Self::InHypervisor(line) | Self::Partition(line, _) => line,
        }
    }
}

/// A proxied device's partition, started ahead of the VM, and the hypervisor's end of its
/// connection.
pub(crate) type StartedProxy = (StartingPartition, ProxyConnection);

impl DeviceRecipe for ConsoleRecipe {
    fn name(&self) -> String {
        "com1".into()
    }

    fn kind(&self) -> &'static str {
        "8250"
    }

    fn start(&mut self, placement: Placement, vm: &Early<'_>) -> Result<(), Error> {
        self.started = Some(ConsoleStart::new(placement, vm)?);
        Ok(())
    }

    fn place(mut self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error> {
        let started = match self.started.take() {
            Some(started) => started,
            None => ConsoleStart::new(placement, &vm.early())?,
        };
        let line = started.line().clone();
        vm.kvm.register_irqfd(line.irqfd(), COM1_IRQ)?;
        let range = BusRange::new(COM1_PORT, SERIAL_PORT_COUNT)?;
        vm.describe(
            splitvisor_vcpu::acpi::HID_SERIAL_16550,
            AcpiResource::Pio { base: COM1_PORT as u16, len: SERIAL_PORT_COUNT as u16 },
            Some(COM1_IRQ),
        );
        match started {
            ConsoleStart::InHypervisor(_) => {
                let serial = Arc::new(Mutex::new(Serial::new(line, self.output)));
                vm.pio.insert(range, "com1 (8250)", serial.clone())?;
                Ok(Placed { note: None, driver: None, input: Some(serial) })
            }
            ConsoleStart::Partition(_, started) => {
                let irqfd = line.irqfd().try_clone().map_err(Error::EventFd)?;
                let (proxy, driver) = proxied(
                    vm,
                    &self.name(),
                    self.kind(),
                    "serial",
                    Some(irqfd),
                    self.output,
                    None,
                    started,
                )?;
                vm.pio.insert(range, "com1 (8250, partition)", proxy.clone())?;
                Ok(Placed { note: None, driver: Some(driver), input: Some(proxy) })
            }
        }
    }
}

/// The i8042, for its CPU reset line.
pub(crate) struct I8042Recipe {
    pub reset: Arc<dyn Interrupt>,
    /// Its partition, if [`DeviceRecipe::start`] started one.
    pub started: Option<StartedProxy>,
}

impl DeviceRecipe for I8042Recipe {
    fn name(&self) -> String {
        "i8042".into()
    }

    fn kind(&self) -> &'static str {
        "i8042"
    }

    fn start(&mut self, placement: Placement, vm: &Early<'_>) -> Result<(), Error> {
        if placement == Placement::Partition {
            let driver = vm.driver(&self.name())?;
            self.started =
                Some(Partition::start_proxy(&driver, "i8042", None).map_err(Error::partition(&self.name()))?);
        }
        Ok(())
    }

    fn place(mut self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error> {
        let range = BusRange::new(I8042_PORT, I8042_PORT_COUNT)?;
        // The FADT says there is one: its reset line is the guest's fallback reboot path.
        vm.acpi.i8042 = true;
        match placement {
            Placement::InHypervisor => {
                vm.pio.insert(range, "i8042", Arc::new(Mutex::new(I8042::new(self.reset))))?;
                Ok(Placed { note: None, driver: None, input: None })
            }
            Placement::Partition => {
                let started = match self.started.take() {
                    Some(started) => started,
                    None => Partition::start_proxy(&vm.driver(&self.name())?, "i8042", None)
                        .map_err(Error::partition(&self.name()))?,
                };
                let (proxy, driver) = proxied(
                    vm,
                    &self.name(),
                    self.kind(),
                    "i8042",
                    None,
                    Box::new(io::sink()),
                    Some(self.reset),
                    started,
                )?;
                vm.pio.insert(range, "i8042 (partition)", proxy)?;
                Ok(Placed { note: None, driver: Some(driver), input: None })
            }
        }
    }
}

/// Puts `kind`, whose partition was `started`, behind a proxy and under supervision.
#[allow(clippy::too_many_arguments)]
fn proxied(
    vm: &Assembly<'_>,
    device: &str,
    device_kind: &'static str,
    kind: &'static str,
    irqfd: Option<EventFd>,
    output: Box<dyn Write + Send>,
    reset: Option<Arc<dyn Interrupt>>,
    started: StartedProxy,
) -> Result<(Arc<Mutex<ProxyDevice>>, Arc<ManagedDriver>), Error> {
    proxied_with(vm, device, device_kind, kind, irqfd, output, reset, started, |proxy| proxy)
}

/// [`proxied`], with `adapt` finishing the proxy (more request lines).
#[allow(clippy::too_many_arguments)]
fn proxied_with(
    vm: &Assembly<'_>,
    device: &str,
    device_kind: &'static str,
    kind: &'static str,
    irqfd: Option<EventFd>,
    output: Box<dyn Write + Send>,
    reset: Option<Arc<dyn Interrupt>>,
    started: StartedProxy,
    adapt: impl FnOnce(ProxyDevice) -> ProxyDevice,
) -> Result<(Arc<Mutex<ProxyDevice>>, Arc<ManagedDriver>), Error> {
    let driver = vm.driver(device)?;
    let (starting, mut stream) = started;
    // Its sandbox is waited for once the guest runs (`Vm::wait_for_partitions`): the
    // driver reads no request before it is in place, and the vCPU that makes the first
    // access waits for the answer as for any other.
    let mut partition = starting.wait_spawned().map_err(Error::partition(device))?;
    stream.watch(partition.take_liveness());
    let stop = vm.stop.clone();
    let link = ProxyLink::halted_when(move || stop.has_ended()).map_err(Error::EventFd)?.starting();
    let proxy = adapt(ProxyDevice::new(device, stream, output, reset, None)).with_link(link.clone());
    let proxy = Arc::new(Mutex::new(proxy));
    let slot = ProxySlot::new(link, proxy.clone(), driver, kind, irqfd, partition, vm.layout.standby());
    let managed = vm.manage(device, device_kind, Placement::Partition, Box::new(slot));
    Ok((proxy, managed))
}

/// The ACPI power registers (sleep control, sleep status, reset) of a hardware-reduced
/// platform: how an ACPI guest powers off and reboots. Only in a VM with ACPI tables.
pub(crate) struct PowerRecipe {
    /// Raised by the guest's S5.
    pub power_off: Arc<dyn Interrupt>,
    /// Raised by the guest's write of the reset value.
    pub reset: Arc<dyn Interrupt>,
    /// Its partition, if [`DeviceRecipe::start`] started one.
    pub started: Option<StartedProxy>,
}

impl DeviceRecipe for PowerRecipe {
    fn name(&self) -> String {
        "power".into()
    }

    fn kind(&self) -> &'static str {
        "acpi-power"
    }

    fn start(&mut self, placement: Placement, vm: &Early<'_>) -> Result<(), Error> {
        if placement == Placement::Partition {
            let driver = vm.driver(&self.name())?;
            self.started = Some(
                Partition::start_proxy(&driver, "acpi-power", None)
                    .map_err(Error::partition(&self.name()))?,
            );
        }
        Ok(())
    }

    fn place(mut self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error> {
        let range = BusRange::new(power::ACPI_POWER_PORT, power::ACPI_POWER_PORT_COUNT)?;
        let port = |offset: u64| (power::ACPI_POWER_PORT + offset) as u16;
        vm.acpi.power = Some(AcpiPowerRegisters {
            sleep_control_port: port(power::SLEEP_CONTROL_OFFSET),
            sleep_status_port: port(power::SLEEP_STATUS_OFFSET),
            reset_port: port(power::RESET_OFFSET),
            reset_value: power::RESET_VALUE,
            s5_sleep_type: power::S5_SLEEP_TYPE,
        });
        match placement {
            Placement::InHypervisor => {
                let device = AcpiPower::new(self.power_off, self.reset);
                vm.pio.insert(range, "power (acpi)", Arc::new(Mutex::new(device)))?;
                Ok(Placed { note: None, driver: None, input: None })
            }
            Placement::Partition => {
                let (name, kind) = (self.name(), self.kind());
                let started = match self.started.take() {
                    Some(started) => started,
                    None => Partition::start_proxy(&vm.driver(&name)?, "acpi-power", None)
                        .map_err(Error::partition(&name))?,
                };
                let power_off = self.power_off;
                let (proxy, driver) = proxied_with(
                    vm,
                    &name,
                    kind,
                    "acpi-power",
                    None,
                    Box::new(io::sink()),
                    Some(self.reset),
                    started,
                    |proxy| proxy.with_power_off(power_off),
                )?;
                vm.pio.insert(range, "power (acpi, partition)", proxy)?;
                Ok(Placed { note: None, driver: Some(driver), input: None })
            }
        }
    }
}

/// A virtio-blk disk.
pub(crate) struct DiskRecipe {
    pub index: usize,
    pub config: DiskConfig,
    /// Its partition, if [`DeviceRecipe::start`] started one.
    pub started: Option<StartedDisk>,
}

/// A disk's image, opened (and locked) ahead of the VM, and the partition started to serve
/// it with the hypervisor's end of its vhost-user connection.
pub(crate) struct StartedDisk {
    image: std::fs::File,
    options: BlockOptions,
    partition: StartingPartition,
    stream: UnixStream,
}

impl StartedDisk {
    /// Opens the image of `config` (an image served by a partition) and starts the partition.
    fn new(device: &str, config: &DiskConfig, vm: &Early<'_>) -> Result<Option<Self>, Error> {
        let DiskConfig::Image { path, read_only, serial, queues, cache } = config else {
            return Ok(None);
        };
        // With O_DIRECT for cache=none: a flag of the open file, so the partition's fd has it.
        let image = DiskImage::open_with(path, *read_only, *cache)?;
        let driver = vm.driver(device)?;
        let options = BlockOptions {
            read_only: *read_only,
            serial: serial.clone().unwrap_or_else(|| default_serial(image.file())),
            fault: None,
            guest_ram: vm.guest_ram,
            queues: disk_queues(*queues, vm.vcpus),
            #[cfg(feature = "test-hooks")]
            attempt: vm.attempt.clone(),
        };
        let image = image.file().try_clone().map_err(|source| Error::DuplicateFd {
            device: device.to_string(),
            what: "image",
            source,
        })?;
        let first = BlockOptions { fault: vm.fault(device), ..options.clone() };
        let (partition, stream) =
            Partition::start_block(&driver, &image, &first).map_err(Error::partition(device))?;
        Ok(Some(Self { image, options, partition, stream }))
    }
}

/// A disk's request queues: as configured, else one per vCPU.
fn disk_queues(configured: Option<u16>, vcpus: u32) -> u16 {
    let vcpus = u16::try_from(vcpus).unwrap_or(MAX_QUEUES);
    configured.unwrap_or(vcpus).clamp(1, MAX_QUEUES)
}

impl DeviceRecipe for DiskRecipe {
    fn name(&self) -> String {
        format!("disk{}", self.index)
    }

    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn start(&mut self, placement: Placement, vm: &Early<'_>) -> Result<(), Error> {
        if placement == Placement::Partition {
            self.started = StartedDisk::new(&self.name(), &self.config, vm)?;
        }
        Ok(())
    }

    fn place(mut self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error> {
        let device = self.name();
        let slot = vm.virtio_slot()?;
        let mem = vm.ram.memory().clone();
        let started = match self.started.take() {
            Some(started) => Some(started),
            None if placement == Placement::Partition => {
                StartedDisk::new(&device, &self.config, &vm.early())?
            }
            None => None,
        };
        match self.config {
            DiskConfig::Image { path, read_only, serial, queues, cache } => {
                let ro = if read_only { ", ro" } else { "" };
                match started {
                    None => {
                        // Opened (and locked) here in either placement: a partition is
                        // handed the fd (see `StartedDisk`).
                        let image = DiskImage::open_with(&path, read_only, cache)?;
                        let queues = disk_queues(queues, vm.vcpus);
                        let serial = serial.unwrap_or_else(|| default_serial(image.file()));
                        if let FaultPolicy::Restart { .. } = vm.layout.fault_policy(&device) {
                            return Err(Error::RestartInHypervisor(device));
                        }
                        let panicked = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                        let storage = DeviceQueue::of(image.file());
                        let mut block = Block::new(image, &serial)
                            .with_queues(queues)
                            .with_panic_signal(panicked.try_clone().map_err(Error::EventFd)?);
                        if let Some(fault) = vm.fault(&device) {
                            let plan = Arc::new(FaultPlan::parse(&fault).map_err(Error::Fault)?);
                            block =
                                block.with_journal(Box::new(move || Box::new(InjectInThread(plan.clone()))));
                        }
                        let transport = MmioTransport::new(block, mem.clone(), slot.line.clone())
                            .map_err(Error::EventFd)?;
                        let transport = Arc::new(Mutex::new(transport));
                        let name = format!("{device} ({}{ro})", path.display());
                        vm.add_virtio(&slot, transport.clone(), &name)?;
                        let slot = InHypervisorBlockSlot::new(transport, mem, panicked, storage);
                        let driver =
                            vm.manage(&device, "virtio-blk", Placement::InHypervisor, Box::new(slot));
                        Ok(Placed { note: None, driver: Some(driver), input: None })
                    }
                    Some(StartedDisk { image, options, partition, stream }) => {
                        let driver = vm.driver(&device)?;
                        let partition = partition.wait().map_err(Error::partition(&device))?;
                        let handshake = handshake(&device, stream)?;
                        let name = format!("{device} ({}{ro}, partition)", path.display());
                        let backend = Backend::Spawned {
                            driver,
                            served: Served::Block { image, options },
                            active: Some(partition),
                            spare: Spare::new(vm.layout.standby()),
                        };
                        let frontend = frontend(&device, handshake, DeviceShape::block())?;
                        virtio_vhost_user(vm, &slot, &device, "virtio-blk", &name, frontend, backend, mem)
                    }
                }
            }
            DiskConfig::VhostUser { socket } => {
                let handshake = Handshake::connect(&socket)
                    .map_err(|source| Error::VhostUser { device: device.clone(), source })?;
                let name = format!("{device} (vhost-user {})", socket.display());
                let note = Some(format!("external vhost-user {}", socket.display()));
                let frontend = frontend(&device, handshake, DeviceShape::block())?;
                let placed = virtio_vhost_user(
                    vm,
                    &slot,
                    &device,
                    "virtio-blk",
                    &name,
                    frontend,
                    Backend::External { socket },
                    mem,
                )?;
                Ok(Placed { note, ..placed })
            }
        }
    }
}

fn handshake(device: &str, stream: std::os::unix::net::UnixStream) -> Result<Handshake, Error> {
    Handshake::new(stream).map_err(|source| Error::VhostUser { device: device.to_string(), source })
}

/// The frontend of a `shape` device served by the backend of `handshake`.
pub(crate) fn frontend(
    device: &str,
    handshake: Handshake,
    shape: DeviceShape,
) -> Result<VhostUserVirtio, Error> {
    VhostUserVirtio::with_shape(handshake, shape)
        .map_err(|source| Error::VhostUser { device: device.to_string(), source })
}

/// A virtio device (of `kind`) served over vhost-user by `frontend`'s backend, supervised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn virtio_vhost_user(
    vm: &mut Assembly<'_>,
    slot: &VirtioSlot,
    device: &str,
    kind: &'static str,
    name: &str,
    frontend: VhostUserVirtio,
    backend: Backend,
    mem: splitvisor_devices::virtio::GuestMemoryMmap,
) -> Result<Placed, Error> {
    let hangup: OwnedFd = frontend
        .hangup_fd()
        .ok_or_else(|| Error::VhostUser { device: device.to_string(), source: FrontendError::NotConnected })?
        .try_clone_to_owned()
        .map_err(|source| Error::DuplicateFd {
            device: device.to_string(),
            what: "vhost-user connection",
            source,
        })?;
    let request_failed = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    let frontend = frontend.with_fault_signal(request_failed.try_clone().map_err(Error::EventFd)?);
    let transport =
        Arc::new(Mutex::new(MmioTransport::new(frontend, mem, slot.line.clone()).map_err(Error::EventFd)?));
    vm.add_virtio(slot, transport.clone(), name)?;
    let slot = VhostUserSlot::new(transport, hangup, request_failed, backend).map_err(Error::EventFd)?;
    let driver = vm.manage(device, kind, Placement::Partition, Box::new(slot));
    Ok(Placed { note: None, driver: Some(driver), input: None })
}

/// A device given as a ready-made bus device ([`VmBuilder::pio_device`](crate::VmBuilder::pio_device)).
pub(crate) struct ExtraDevice {
    pub kind: splitvisor_bus::BusKind,
    pub range: BusRange,
    pub name: String,
    pub device: SharedDevice,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_in_one_syntax() {
        assert_eq!("a.img".parse(), Ok(DiskConfig::image("a.img")));
        assert_eq!("a.img,ro=on".parse(), Ok(DiskConfig::image("a.img").read_only()));
        assert_eq!("path=b,,c.img,ro=off,serial=x1".parse(), Ok(DiskConfig::image("b,c.img").serial("x1")));
        assert_eq!("with,,comma.img".parse(), Ok(DiskConfig::image("with,comma.img")));
        assert_eq!("socket=/run/s".parse(), Ok(DiskConfig::VhostUser { socket: "/run/s".into() }));
        assert_eq!(
            "a.img,queues=4,cache=none".parse(),
            Ok(DiskConfig::image("a.img").queues(4).cache(CacheMode::None))
        );
        assert_eq!("a.img,cache=writeback".parse(), Ok(DiskConfig::image("a.img")));
        for bad in [
            "a.img,queues=0",
            "a.img,queues=17",
            "a.img,queues=two",
            "a.img,cache=unsafe",
            "socket=/s,queues=2",
            "socket=/s,cache=none",
            "",
            ",ro=on",
            "a.img,rx",
            "a.img,ro",
            "a.img,ro=maybe",
            "a.img,serial=",
            "a.img,serial=123456789012345678901",
            "a.img,socket=/s",
            "socket=/s,ro=on",
            "a.img,colour=blue",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }
}
