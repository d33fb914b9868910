//! The VM builder and the assembled VM.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use splitvisor_bus::{
    Bus, BusKind, BusRange, DeviceStats, EventFdInterrupt, Interrupt, ResourceAllocator, SharedDevice,
};
use splitvisor_devices::i8042::{I8042, I8042_PORT, I8042_PORT_COUNT};
use splitvisor_devices::serial::{COM1_IRQ, COM1_PORT, SERIAL_PORT_COUNT, Serial};
use splitvisor_devices::virtio::block::{Block, DiskImage};
use splitvisor_devices::virtio::{MMIO_REGION_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, VirtioDevice};
use splitvisor_guests::GuestResult;
use splitvisor_isolation::frontend::VhostUserBlk;
use splitvisor_isolation::partition::{BlockPartitionSpec, Partition, Supervisor};
use splitvisor_isolation::proxy::{InputSink, ProxyDevice};
use splitvisor_memory::{GuestRam, layout};
use splitvisor_vcpu::boot::{self, BootState};
use splitvisor_vcpu::loader::{self, LoadedGuest};
use splitvisor_vcpu::stats::VcpuStats;
use splitvisor_vcpu::{Buses, KvmVm, StopHandle, Vcpu, VmControl, VmEnd, VmError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::Error;
use crate::console::{ConsoleState, ConsoleTap};
use crate::placement::{DevicePlacement, DriverProgram, Layout, Placement};

/// First and last interrupt line handed to devices that have no fixed ISA line.
const FIRST_DEVICE_IRQ: u32 = 5;
const LAST_DEVICE_IRQ: u32 = 23;

/// Where the guest console goes.
pub enum ConsoleOutput {
    /// This process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer.
    Writer(Box<dyn Write + Send>),
    /// Nowhere (the result line is still watched).
    Discard,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("Stdout"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Writer(_) => f.write_str("Writer(..)"),
            Self::Discard => f.write_str("Discard"),
        }
    }
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskConfig {
    /// A raw image file, served by splitvisor's own virtio-blk, placed by the [`Layout`].
    Image {
        /// The image.
        path: PathBuf,
        /// Refuse the guest's writes.
        read_only: bool,
    },
    /// An external vhost-user-blk backend listening on `socket` (splitvisor-driver started
    /// by hand, qemu-storage-daemon, ...).
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
    },
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH`, `PATH,ro` or `vhost-user:SOCKET`.
    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(socket) = text.strip_prefix("vhost-user:") {
            if socket.is_empty() {
                return Err("empty vhost-user socket path".to_string());
            }
            return Ok(Self::VhostUser { socket: PathBuf::from(socket) });
        }
        let (path, read_only) = match text.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, option)) => {
                return Err(format!("unknown disk option '{option}' (use PATH or PATH,ro)"));
            }
            None => (text, false),
        };
        if path.is_empty() {
            return Err("empty disk path".to_string());
        }
        Ok(Self::Image { path: PathBuf::from(path), read_only })
    }
}

struct ExtraDevice {
    kind: BusKind,
    range: BusRange,
    name: String,
    device: SharedDevice,
}

/// Describes a VM; [`VmBuilder::build`] makes it.
pub struct VmBuilder {
    elf: Vec<u8>,
    memory: u64,
    vcpus: u32,
    cmdline: String,
    console: ConsoleOutput,
    console_input: bool,
    timeout: Option<Duration>,
    extra: Vec<ExtraDevice>,
    disks: Vec<DiskConfig>,
    layout: Layout,
    driver: Option<DriverProgram>,
    #[cfg(feature = "test-hooks")]
    partition_attempt: Option<splitvisor_isolation::sandbox::testing::Forbidden>,
}

impl VmBuilder {
    /// A VM that boots the PVH ELF `elf`: 128 MiB, one vCPU, console to stdout.
    pub fn new(elf: &[u8]) -> Self {
        Self {
            elf: elf.to_vec(),
            memory: 128 << 20,
            vcpus: 1,
            cmdline: "console=ttyS0".to_string(),
            console: ConsoleOutput::Stdout,
            console_input: false,
            timeout: None,
            extra: Vec::new(),
            disks: Vec::new(),
            layout: Layout::monolithic(),
            driver: None,
            #[cfg(feature = "test-hooks")]
            partition_attempt: None,
        }
    }

    /// Where each device runs (default: [`Layout::monolithic`]).
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The program driver partitions run (default: [`DriverProgram::find`]).
    pub fn driver(mut self, driver: DriverProgram) -> Self {
        self.driver = Some(driver);
        self
    }

    /// Test hook: every disk partition tries `what` when its first request arrives,
    /// which the sandbox answers by killing it.
    #[cfg(feature = "test-hooks")]
    pub fn partition_test_attempt(mut self, what: splitvisor_isolation::sandbox::testing::Forbidden) -> Self {
        self.partition_attempt = Some(what);
        self
    }

    /// Adds a virtio-blk disk (virtio-mmio; announced on the command line).
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// Bytes of guest RAM.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    /// The guest command line (splitvisor appends `splitvisor.vcpus=N`).
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    /// Where the guest console goes.
    pub fn console(mut self, output: ConsoleOutput) -> Self {
        self.console = output;
        self
    }

    /// Feeds this process's standard input to the guest console.
    pub fn console_input(mut self, enabled: bool) -> Self {
        self.console_input = enabled;
        self
    }

    /// Ends the VM with [`VmEnd::TimedOut`] if it runs longer than `timeout`.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Places an extra device on the PIO bus.
    pub fn pio_device(mut self, range: BusRange, name: &str, device: SharedDevice) -> Self {
        self.extra.push(ExtraDevice { kind: BusKind::Pio, range, name: name.into(), device });
        self
    }

    /// Places an extra device in the 32-bit MMIO window.
    pub fn mmio_device(mut self, range: BusRange, name: &str, device: SharedDevice) -> Self {
        self.extra.push(ExtraDevice { kind: BusKind::Mmio, range, name: name.into(), device });
        self
    }

    /// Creates the VM: memory, KVM, the guest loaded and every vCPU configured. Nothing
    /// runs until [`Vm::run`].
    pub fn build(self) -> Result<Vm, Error> {
        // Refused before KVM is even opened, like a bad memory size.
        if self.vcpus == 0 {
            return Err(VmError::NoVcpus.into());
        }
        let ram = GuestRam::new(self.memory)?;
        let kvm = KvmVm::new()?;
        kvm.register_memory(&ram)?;
        let mem = ram.memory();
        let low_ram_end = ram.regions()[0].size;

        let guest = loader::load_pvh_elf(mem, &self.elf, low_ram_end)?;
        boot::write_long_mode_tables(mem)?;
        let vcpus = kvm.create_vcpus(self.vcpus)?;

        let control = VmControl::new();
        let console = Arc::new(ConsoleState::default());
        let output: Box<dyn Write + Send> = match self.console {
            ConsoleOutput::Stdout => Box::new(io::stdout()),
            ConsoleOutput::File(path) => {
                Box::new(File::create(&path).map_err(|source| Error::ConsoleFile { path, source })?)
            }
            ConsoleOutput::Writer(writer) => writer,
            ConsoleOutput::Discard => Box::new(io::sink()),
        };
        let com1_irq = Arc::new(EventFdInterrupt::new().map_err(Error::EventFd)?);
        kvm.register_irqfd(com1_irq.irqfd(), COM1_IRQ)?;
        let reset_line: Arc<dyn Interrupt> = Arc::new(ResetLine(control.stop_handle()));
        let console_tap = ConsoleTap::new(output, console.clone());
        let partition_exits = Arc::new(Mutex::new(Vec::new()));
        let mut supervisors = Vec::new();
        let mut placements = Vec::new();
        let needs_driver = ["com1", "i8042"].iter().any(|d| self.layout.placement(d) == Placement::Partition)
            || self.disks.iter().enumerate().any(|(index, disk)| {
                matches!(disk, DiskConfig::Image { .. })
                    && self.layout.placement(&format!("disk{index}")) == Placement::Partition
            });
        let driver = self.driver.clone().or_else(|| needs_driver.then(DriverProgram::find).flatten());

        let pio = Bus::new(BusKind::Pio);
        let legacy = LegacyContext { driver: driver.as_ref(), partition_exits: &partition_exits };
        let (com1, com1_input, com1_partition) = match self.layout.placement("com1") {
            Placement::InHypervisor => {
                let serial = Arc::new(Mutex::new(Serial::new(com1_irq, console_tap)));
                (serial.clone() as SharedDevice, serial as Arc<Mutex<dyn InputSink>>, None)
            }
            Placement::Partition => {
                let (proxy, supervisor) =
                    legacy.spawn("com1", "serial", Some(com1_irq.irqfd()), Box::new(console_tap), None)?;
                let proxy = Arc::new(Mutex::new(proxy));
                (proxy.clone() as SharedDevice, proxy as Arc<Mutex<dyn InputSink>>, Some(supervisor))
            }
        };
        let (i8042, i8042_partition) = match self.layout.placement("i8042") {
            Placement::InHypervisor => (Arc::new(Mutex::new(I8042::new(reset_line))) as SharedDevice, None),
            Placement::Partition => {
                let (proxy, supervisor) =
                    legacy.spawn("i8042", "i8042", None, Box::new(io::sink()), Some(reset_line))?;
                (Arc::new(Mutex::new(proxy)) as SharedDevice, Some(supervisor))
            }
        };
        for (device, kind, supervisor) in
            [("com1", "8250", com1_partition), ("i8042", "i8042", i8042_partition)]
        {
            let (placement, partition) = match &supervisor {
                Some(s) => (Placement::Partition, Some(format!("pid {}", s.pid()))),
                None => (Placement::InHypervisor, None),
            };
            placements.push(DevicePlacement {
                device: device.into(),
                kind: kind.into(),
                placement,
                partition,
            });
            supervisors.extend(supervisor);
        }
        pio.insert(BusRange::new(COM1_PORT, SERIAL_PORT_COUNT)?, "com1 (8250)", com1)?;
        pio.insert(BusRange::new(I8042_PORT, I8042_PORT_COUNT)?, "i8042", i8042)?;
        let mmio = Bus::new(BusKind::Mmio);
        let mut allocator = ResourceAllocator::new(
            layout::MMIO32_START,
            layout::MMIO32_SIZE,
            FIRST_DEVICE_IRQ,
            LAST_DEVICE_IRQ,
        )?;
        for extra in self.extra {
            match extra.kind {
                BusKind::Pio => pio.insert(extra.range, &extra.name, extra.device)?,
                BusKind::Mmio => {
                    let window = layout::MMIO32_START..layout::MMIO32_START + layout::MMIO32_SIZE;
                    if !window.contains(&extra.range.base()) || !window.contains(&extra.range.last()) {
                        return Err(Error::OutsideMmioWindow(extra.range));
                    }
                    allocator.reserve_mmio(extra.range.base(), extra.range.len())?;
                    mmio.insert(extra.range, &extra.name, extra.device)?;
                }
            }
        }
        let mut cmdline = self.cmdline.clone();
        let mut context = DeviceContext {
            kvm: &kvm,
            ram: &ram,
            mmio: &mmio,
            allocator: &mut allocator,
            layout: &self.layout,
            driver: driver.clone(),
            guest_ram: self.memory,
            #[cfg(feature = "test-hooks")]
            attempt: self.partition_attempt.clone(),
            partition_exits: partition_exits.clone(),
        };
        for (index, disk) in self.disks.iter().enumerate() {
            let placed = context.add_disk(index, disk)?;
            cmdline.push_str(&format!(
                " virtio_mmio.device={}@{:#x}:{}",
                MMIO_REGION_SIZE, placed.base, placed.irq
            ));
            placements.push(placed.placement);
            supervisors.extend(placed.supervisor);
        }

        let cmdline = format!("{cmdline} splitvisor.vcpus={}", self.vcpus).trim().to_string();
        let start_info = loader::write_pvh_start_info(mem, &cmdline, &ram.e820())?;
        configure_vcpus(&kvm, &vcpus, &guest, start_info)?;

        let tsc_khz = vcpus[0].tsc_khz().ok();
        let vcpu_stats = vcpus.iter().filter_map(Vcpu::stats).collect();
        Ok(Vm {
            kvm,
            ram,
            vcpus,
            buses: Buses { pio: Arc::new(pio), mmio: Arc::new(mmio) },
            control,
            console,
            console_device: com1_input,
            console_input: self.console_input,
            timeout: self.timeout,
            created: Instant::now(),
            tsc_khz,
            vcpu_stats,
            placements,
            supervisors,
            partition_exits,
        })
    }
}

/// The bootstrap processor starts at the PVH entry; application processors start in long
/// mode at the guest's AP entry if it has one, or wait for the guest's INIT/SIPI.
fn configure_vcpus(kvm: &KvmVm, vcpus: &[Vcpu], guest: &LoadedGuest, start_info: u64) -> Result<(), Error> {
    let aps = vcpus.len() as u64 - 1;
    if guest.ap_entry.is_some() && aps > layout::MAX_AP_STACKS {
        return Err(Error::TooManyApStacks { requested: vcpus.len() as u32, max: layout::MAX_AP_STACKS + 1 });
    }
    for vcpu in vcpus {
        let index = u64::from(vcpu.index());
        let state = if index == 0 {
            Some(BootState::Pvh { entry: guest.pvh_entry, start_info })
        } else {
            guest.ap_entry.map(|entry| BootState::LongMode {
                entry,
                stack_top: layout::AP_STACKS_TOP - (index - 1) * layout::AP_STACK_SIZE,
                arg: index,
            })
        };
        vcpu.configure(kvm.supported_cpuid(), state.as_ref())?;
    }
    Ok(())
}

/// Where a virtio-mmio device landed.
struct PlacedDevice {
    base: u64,
    irq: u32,
    placement: DevicePlacement,
    supervisor: Option<Supervisor>,
}

/// What placing a plain bus device in a partition needs.
struct LegacyContext<'a> {
    driver: Option<&'a DriverProgram>,
    partition_exits: &'a Arc<Mutex<Vec<(String, String)>>>,
}

impl LegacyContext<'_> {
    /// Starts `kind` in a supervised partition behind a proxy.
    fn spawn(
        &self,
        device: &str,
        kind: &str,
        irqfd: Option<&vmm_sys_util::eventfd::EventFd>,
        output: Box<dyn Write + Send>,
        reset: Option<Arc<dyn Interrupt>>,
    ) -> Result<(ProxyDevice, Supervisor), Error> {
        let driver = self.driver.ok_or_else(|| Error::NoDriverProgram(device.to_string()))?;
        let (partition, stream) = Partition::spawn_proxy(&driver.path, &driver.prefix, kind, irqfd)?;
        let dropped = self.partition_exits.clone();
        let name = device.to_string();
        let on_dead = Box::new(move |why: String| {
            dropped.lock().unwrap_or_else(|e| e.into_inner()).push((name, format!("dropped: {why}")));
        });
        let proxy = ProxyDevice::new(device, stream, output, reset, Some(on_dead)).map_err(Error::EventFd)?;
        let exits = self.partition_exits.clone();
        let name = device.to_string();
        let on_exit = Box::new(move |status: String| {
            exits.lock().unwrap_or_else(|e| e.into_inner()).push((name, status));
        });
        let supervisor = partition.supervise(device.to_string(), on_exit)?;
        Ok((proxy, supervisor))
    }
}

/// What placing devices needs from the VM being built.
struct DeviceContext<'a> {
    kvm: &'a KvmVm,
    ram: &'a GuestRam,
    mmio: &'a Bus,
    allocator: &'a mut ResourceAllocator,
    layout: &'a Layout,
    driver: Option<DriverProgram>,
    guest_ram: u64,
    #[cfg(feature = "test-hooks")]
    attempt: Option<splitvisor_isolation::sandbox::testing::Forbidden>,
    partition_exits: Arc<Mutex<Vec<(String, String)>>>,
}

impl DeviceContext<'_> {
    /// Places disk `index`: in the hypervisor, in a driver partition, or on an external
    /// vhost-user backend, as the layout and the disk say.
    fn add_disk(&mut self, index: usize, disk: &DiskConfig) -> Result<PlacedDevice, Error> {
        let device = format!("disk{index}");
        let base = self.allocator.allocate_mmio(MMIO_REGION_SIZE, 0x1000)?;
        let irq = self.allocator.allocate_irq()?;
        let line = Arc::new(EventFdInterrupt::new().map_err(Error::EventFd)?);
        self.kvm.register_irqfd(line.irqfd(), irq)?;
        let mem = self.ram.memory().clone();
        let placement = |placement, partition| DevicePlacement {
            device: device.clone(),
            kind: "virtio-blk".to_string(),
            placement,
            partition,
        };
        let (placed, supervisor) = match disk {
            DiskConfig::Image { path, read_only }
                if self.layout.placement(&device) == Placement::InHypervisor =>
            {
                let image = DiskImage::open(path, *read_only)?;
                let block = Block::new(image, &format!("splitvisor-vd{index}"));
                let transport = MmioTransport::new(block, mem, line).map_err(Error::EventFd)?;
                let ro = if *read_only { ", ro" } else { "" };
                self.place(transport, base, &format!("virtio-blk{index} ({}{ro})", path.display()))?;
                (placement(Placement::InHypervisor, None), None)
            }
            DiskConfig::Image { path, read_only } => {
                let driver = self.driver.clone().ok_or_else(|| Error::NoDriverProgram(device.clone()))?;
                let spec = BlockPartitionSpec {
                    driver: driver.path,
                    driver_prefix: driver.prefix,
                    disk: path.clone(),
                    read_only: *read_only,
                    guest_ram: self.guest_ram,
                    #[cfg(feature = "test-hooks")]
                    attempt: self.attempt.clone(),
                };
                let (partition, stream) = Partition::spawn_block(&spec)?;
                let pid = partition.pid();
                let frontend = VhostUserBlk::from_stream(stream)
                    .map_err(|source| Error::VhostUser { device: device.clone(), source })?;
                let transport = MmioTransport::new(frontend, mem, line).map_err(Error::EventFd)?;
                // A dead partition: the device asks the guest for a reset; the VM goes on.
                let interrupt = transport.interrupt();
                let exits = self.partition_exits.clone();
                let name = device.clone();
                let on_exit = Box::new(move |status: String| {
                    exits.lock().unwrap_or_else(|e| e.into_inner()).push((name, status));
                    if let Err(e) = interrupt.request_reset() {
                        log::warn!("cannot tell the guest its disk needs a reset: {e}");
                    }
                });
                let supervisor = partition.supervise(device.clone(), on_exit)?;
                let ro = if *read_only { ", ro" } else { "" };
                self.place(
                    transport,
                    base,
                    &format!("virtio-blk{index} ({}{ro}, partition {pid})", path.display()),
                )?;
                (placement(Placement::Partition, Some(format!("pid {pid}"))), Some(supervisor))
            }
            DiskConfig::VhostUser { socket } => {
                let frontend = VhostUserBlk::connect(socket)
                    .map_err(|source| Error::VhostUser { device: device.clone(), source })?;
                let transport = MmioTransport::new(frontend, mem, line).map_err(Error::EventFd)?;
                self.place(transport, base, &format!("virtio-blk{index} (vhost-user {})", socket.display()))?;
                (
                    placement(
                        Placement::Partition,
                        Some(format!("external vhost-user {}", socket.display())),
                    ),
                    None,
                )
            }
        };
        Ok(PlacedDevice { base, irq, placement: placed, supervisor })
    }

    /// Puts a virtio-mmio transport on the bus with its doorbells as ioeventfds.
    fn place<D: VirtioDevice + 'static>(
        &mut self,
        transport: MmioTransport<D>,
        base: u64,
        name: &str,
    ) -> Result<(), Error> {
        for (queue, eventfd) in transport.queue_notify_eventfds() {
            self.kvm.register_mmio_ioeventfd(eventfd, base + QUEUE_NOTIFY_OFFSET, queue)?;
        }
        self.mmio.insert(BusRange::new(base, MMIO_REGION_SIZE)?, name, Arc::new(Mutex::new(transport)))?;
        log::debug!("{name} at {base:#x}");
        Ok(())
    }
}

/// The i8042's CPU reset line: the guest asks to end the VM.
struct ResetLine(StopHandle);

impl Interrupt for ResetLine {
    fn trigger(&self) -> io::Result<()> {
        log::debug!("guest reset through the i8042");
        self.0.guest_reset();
        Ok(())
    }
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs go before the VM fd, the VM before its memory.
    vcpus: Vec<Vcpu>,
    kvm: KvmVm,
    ram: GuestRam,
    buses: Buses,
    control: VmControl,
    console: Arc<ConsoleState>,
    console_device: Arc<Mutex<dyn InputSink>>,
    console_input: bool,
    timeout: Option<Duration>,
    created: Instant,
    tsc_khz: Option<u32>,
    vcpu_stats: Vec<VcpuStats>,
    placements: Vec<DevicePlacement>,
    /// Held for their `Drop`, after the buses: devices stop their partitions' queues, then
    /// every driver partition is killed and reaped.
    supervisors: Vec<Supervisor>,
    /// Driver partitions that died while the VM ran: (device, exit status).
    partition_exits: Arc<Mutex<Vec<(String, String)>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.ram.size())
            .field("buses", &self.buses)
            .finish_non_exhaustive()
    }
}

/// Access counts of one bus.
#[derive(Clone, Debug)]
pub struct BusReport {
    /// Which bus.
    pub kind: BusKind,
    /// Per device.
    pub devices: Vec<DeviceStats>,
    /// Accesses no device took.
    pub unassigned: u64,
}

/// How a VM ran, when no vCPU failed.
#[derive(Clone, Debug)]
pub struct VmReport {
    /// Why it ended.
    pub end: VmEnd,
    /// The result line the guest printed, if any.
    pub guest_result: Option<GuestResult>,
    /// When the VM was created (KVM VM, memory, vCPUs, devices all set up).
    pub created: Instant,
    /// When the guest wrote its first console byte.
    pub first_output: Option<Instant>,
    /// When the last vCPU thread was joined.
    pub ended: Instant,
    /// Device accesses per bus.
    pub buses: Vec<BusReport>,
    /// Port I/O exits.
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// The vCPUs' TSC frequency, to convert guest TSC readings.
    pub tsc_khz: Option<u32>,
    /// KVM's own exit counts over every vCPU (exits the kernel handled included), by
    /// statistic name: `exits`, `io_exits`, `mmio_exits`, `halt_exits`, `irq_exits`, ...
    /// Empty if the kernel has no binary statistics.
    pub kvm_exits: Vec<(String, u64)>,
    /// Where each device ran.
    pub placements: Vec<DevicePlacement>,
    /// Driver partitions that died while the VM ran: (device, exit status). The VM went on;
    /// their devices asked the guest for a reset.
    pub partition_exits: Vec<(String, String)>,
}

/// The KVM statistics a report sums over the vCPUs.
const KVM_EXIT_STATS: &[&str] =
    &["exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "signal_exits", "insn_emulation"];

impl Vm {
    /// A handle that stops the VM from another thread (Ctrl-C handlers, tests).
    pub fn stop_handle(&self) -> StopHandle {
        self.control.stop_handle()
    }

    /// The KVM VM, for devices that need irqfds or ioeventfds.
    pub fn kvm(&self) -> &KvmVm {
        &self.kvm
    }

    /// Where each device runs (partition PIDs included).
    pub fn placements(&self) -> &[DevicePlacement] {
        &self.placements
    }

    /// Guest RAM, for inspection.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// When the VM was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Runs the VM until the guest resets it, the host stops it, the timeout passes or a
    /// vCPU fails (the error).
    pub fn run(mut self) -> Result<VmReport, Error> {
        let vcpus = std::mem::take(&mut self.vcpus);
        let stop_handle = self.control.stop_handle();
        let running = std::mem::take(&mut self.control).start(vcpus, self.buses.clone())?;
        let input = match self.console_input {
            true => Some(ConsoleInput::start(self.console_device.clone())?),
            false => None,
        };
        let end = running.wait(self.timeout);
        let ended = Instant::now();
        for supervisor in &self.supervisors {
            supervisor.disarm();
        }
        if let Some(input) = input {
            input.stop();
        }
        let end = end?;
        let exits = stop_handle.exit_counts();
        Ok(VmReport {
            end,
            guest_result: self.console.result(),
            created: self.created,
            first_output: self.console.first_output(),
            ended,
            buses: [&self.buses.pio, &self.buses.mmio]
                .into_iter()
                .map(|bus| BusReport {
                    kind: bus.kind(),
                    devices: bus.stats(),
                    unassigned: bus.unassigned_accesses(),
                })
                .collect(),
            pio_exits: exits.pio,
            mmio_exits: exits.mmio,
            tsc_khz: self.tsc_khz,
            placements: self.placements.clone(),
            partition_exits: self.partition_exits.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            kvm_exits: KVM_EXIT_STATS
                .iter()
                .filter(|name| {
                    !self.vcpu_stats.is_empty() && self.vcpu_stats.iter().all(|s| s.get(name).is_some())
                })
                .map(|name| (name.to_string(), self.vcpu_stats.iter().filter_map(|s| s.get(name)).sum()))
                .collect(),
        })
    }
}

/// Feeds standard input to the UART. It polls stdin together with an eventfd, so that
/// stopping it is immediate even while no input comes.
struct ConsoleInput {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

impl ConsoleInput {
    fn start(serial: Arc<Mutex<dyn InputSink>>) -> Result<Self, Error> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let stdin = io::stdin().as_raw_fd();
            let mut buf = [0u8; 256];
            loop {
                let mut fds = [
                    libc::pollfd { fd: stdin, events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: stopped.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: two valid pollfds; no timeout.
                let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if ready < 0 || fds[1].revents != 0 {
                    return;
                }
                // SAFETY: reading into a buffer of `buf.len()` bytes.
                let n = unsafe { libc::read(stdin, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    return; // end of input or an error: the guest just gets no more
                }
                let mut pending = &buf[..n as usize];
                while !pending.is_empty() {
                    let taken = serial.lock().unwrap_or_else(|e| e.into_inner()).input(pending);
                    match taken {
                        n if n > 0 => pending = &pending[n..],
                        // The guest has not drained its FIFO yet; stop waiting if asked to.
                        _ if stopped.read().is_ok() => return,
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}
