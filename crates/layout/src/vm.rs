//! The VM builder and the assembled VM.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use splitvisor_bus::threads::{self, ThreadKind};
use splitvisor_bus::{Bus, BusKind, BusRange, DeviceStats, Interrupt, ResourceAllocator, SharedDevice};
use splitvisor_guests::GuestResult;
use splitvisor_isolation::partition::READY_TIMEOUT;
use splitvisor_isolation::proxy::InputSink;
use splitvisor_isolation::sandbox::hypervisor::HypervisorSandbox;
use splitvisor_isolation::supervisor::{Supervised, Supervisor};
use splitvisor_memory::{GuestRam, layout};
use splitvisor_vcpu::acpi::{AcpiPlatform, AcpiTables};
use splitvisor_vcpu::boot::BootState;
use splitvisor_vcpu::stats::VcpuStats;
use splitvisor_vcpu::{
    Buses, IrqchipReset, KvmVm, RestartError, StopHandle, Vcpu, VcpuSetup, VmControl, VmEnd, VmError,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::Error;
use crate::api::{ApiListener, ApiServer};
use crate::boot::{BootImage, BootPlan, Loaded, OnReboot};
use crate::console::{ConsoleState, ConsoleTap};
use crate::device::{
    Assembly, ConsoleRecipe, DeviceRecipe, DeviceReset, DiskConfig, DiskRecipe, Early, ExtraDevice,
    I8042Recipe, PowerRecipe,
};
use crate::host_signals::{self, BlockedHere, SignalWatcher};
use crate::hypervisor_sandbox;
use crate::lifecycle::{DeviceEvent, DriverControl, DriverStatus, EventLog, ManagedDriver};
use crate::net::{NetConfig, NetRecipe};
use crate::placement::{DevicePlacement, DriverProgram, FaultPolicy, Layout, Placement};

/// First and last interrupt line handed to devices that have no fixed ISA line.
const FIRST_DEVICE_IRQ: u32 = 5;
const LAST_DEVICE_IRQ: u32 = 23;

/// How often the supervisor looks at its drivers when nothing happens (the watchdog's
/// resolution is a fraction of its timeout, at most this).
const SUPERVISOR_TICK: Duration = Duration::from_millis(50);

/// Longest [`Vm::run`] holds the rest of its start for the vCPU threads to run: past it,
/// they are late for a reason the rest does not cause.
const VCPUS_RUNNING_WAIT: Duration = Duration::from_millis(20);

/// Longest [`Vm::run`] then holds it for the boot vCPU to serve its first exit: a marker
/// guest's (a COM1 byte, through a partition in the microkernel layout) is served 0.1-1 ms
/// after its start; a guest that runs longer before its first exit has its services started
/// a little later, which nothing it does early waits for.
const BOOT_VCPU_HEAD_START: Duration = Duration::from_millis(5);

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

/// The console the VMM names on every guest's command line.
const CONSOLE_CMDLINE: &str = "console=ttyS0";

/// Describes a VM; [`VmBuilder::build`] makes it.
pub struct VmBuilder {
    elf: Vec<u8>,
    kernel: Option<BootImage>,
    initrd: Option<BootImage>,
    acpi: Option<bool>,
    on_reboot: OnReboot,
    memory: u64,
    vcpus: u32,
    cmdline: String,
    console: ConsoleOutput,
    console_input: bool,
    stop_on_signals: bool,
    timeout: Option<Duration>,
    extra: Vec<ExtraDevice>,
    disks: Vec<DiskConfig>,
    nics: Vec<NetConfig>,
    layout: Layout,
    driver: Option<DriverProgram>,
    /// How to find the driver program when none was given, if one is needed.
    find_driver: Option<Box<dyn FnOnce() -> Option<DriverProgram>>>,
    faults: Vec<(String, String)>,
    api_socket: Option<PathBuf>,
    sandbox: HypervisorSandbox,
    #[cfg(feature = "test-hooks")]
    partition_attempt: Option<splitvisor_isolation::sandbox::testing::Forbidden>,
}

impl VmBuilder {
    /// A VM that boots the PVH ELF `elf` (one of the guest kit's programs): 128 MiB, one
    /// vCPU, console to stdout, no ACPI tables (the kit finds its disks on the command
    /// line). See [`kernel`](Self::kernel) for a Linux guest.
    pub fn new(elf: &[u8]) -> Self {
        Self {
            elf: elf.to_vec(),
            kernel: None,
            initrd: None,
            acpi: None,
            on_reboot: OnReboot::End,
            memory: 128 << 20,
            vcpus: 1,
            cmdline: String::new(),
            console: ConsoleOutput::Stdout,
            console_input: false,
            stop_on_signals: false,
            timeout: None,
            extra: Vec::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            layout: Layout::monolithic(),
            driver: None,
            find_driver: None,
            faults: Vec::new(),
            api_socket: None,
            sandbox: HypervisorSandbox::off(),
            #[cfg(feature = "test-hooks")]
            partition_attempt: None,
        }
    }

    /// A VM that boots `kernel` instead of the ELF given to [`new`](Self::new): a PVH ELF
    /// (a Linux `vmlinux`, any kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note) or a bzImage
    /// (the Linux x86 boot protocol 2.12+, started at its 64-bit entry), recognised by its
    /// headers. Such a VM gets ACPI tables unless [`acpi`](Self::acpi) says otherwise.
    ///
    /// ```no_run
    /// use splitvisor_layout::{DiskConfig, VmBuilder};
    ///
    /// let vm = VmBuilder::new(&[])
    ///     .kernel(std::path::Path::new("vmlinux"))
    ///     .initrd(std::path::Path::new("initramfs.cpio"))
    ///     .cmdline("panic=-1")
    ///     .disk(DiskConfig::image("disk.img"))
    ///     .memory(256 << 20)
    ///     .build()?;
    /// let report = vm.run()?; // VmEnd::PowerOff once the guest runs `poweroff`
    /// # Ok::<(), splitvisor_layout::Error>(())
    /// ```
    pub fn kernel(mut self, kernel: impl Into<BootImage>) -> Self {
        self.kernel = Some(kernel.into());
        self
    }

    /// An initrd (initramfs) for the kernel: put at the top of low RAM below what the
    /// kernel can reach, and named in `boot_params` or as the PVH start info's module.
    pub fn initrd(mut self, initrd: impl Into<BootImage>) -> Self {
        self.initrd = Some(initrd.into());
        self
    }

    /// Whether the VM gets ACPI tables (RSDP, XSDT, FADT, MADT and a DSDT listing every
    /// device) and the ACPI power device. With them, virtio-mmio devices are announced in
    /// the DSDT only; without them, on the command line (`virtio_mmio.device=`). Default:
    /// on for a [`kernel`](Self::kernel), off for the guest kit's programs.
    pub fn acpi(mut self, enabled: bool) -> Self {
        self.acpi = Some(enabled);
        self
    }

    /// What happens when the guest resets the machine (default: [`OnReboot::End`]).
    pub fn on_reboot(mut self, action: OnReboot) -> Self {
        self.on_reboot = action;
        self
    }

    /// Whether the VM gets ACPI tables, as [`acpi`](Self::acpi) and the guest decide.
    fn acpi_enabled(&self) -> bool {
        self.acpi.unwrap_or(self.kernel.is_some())
    }

    /// Where each device runs, and what happens when its driver fails (default:
    /// [`Layout::monolithic`]).
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The program driver partitions run (default: [`DriverProgram::find`]).
    pub fn driver(mut self, driver: DriverProgram) -> Self {
        self.driver = Some(driver);
        self
    }

    /// How to find the program driver partitions run, when [`driver`](Self::driver) gave
    /// none: asked only if a device is placed in a partition (a VM whose drivers all run
    /// in the hypervisor starts without looking). Default: [`DriverProgram::find`].
    pub fn find_driver_with(mut self, find: impl FnOnce() -> Option<DriverProgram> + 'static) -> Self {
        self.find_driver = Some(Box::new(find));
        self
    }

    /// Injects a fault into `device`'s driver, for demonstrations and tests:
    /// `crash-after=N` or `hang-after=N` requests. A partition's first driver gets it; the
    /// drivers that replace it do not.
    pub fn inject_fault(mut self, device: &str, fault: &str) -> Self {
        self.faults.push((device.to_string(), fault.to_string()));
        self
    }

    /// Serves the control socket at `path` while the VM runs (see [`crate::api`]).
    pub fn api_socket(mut self, path: &Path) -> Self {
        self.api_socket = Some(path.to_path_buf());
        self
    }

    /// Sandboxes this hypervisor process's own threads (a seccomp filter per kind of
    /// thread) and optionally jails it: see [`splitvisor_isolation::sandbox::hypervisor`].
    /// Off by default: the filters are process-wide and the thread that calls
    /// [`Vm::run`] is filtered for good, which only a program that runs VMs and nothing
    /// else (the examples turn it on) can accept. Everything the VM needs must go
    /// through this builder (files, sockets); the jail also needs root and no other
    /// thread of the process running when `build` ends.
    pub fn hypervisor_sandbox(mut self, sandbox: HypervisorSandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Test hook: every disk partition tries `what` when its first request arrives, which
    /// the sandbox answers by killing it. Only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn partition_test_attempt(mut self, what: splitvisor_isolation::sandbox::testing::Forbidden) -> Self {
        self.partition_attempt = Some(what);
        self
    }

    /// Adds a virtio-blk disk (virtio-mmio; announced in the DSDT, or on the command line
    /// without ACPI).
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// Adds a virtio-net NIC (virtio-mmio; announced on the command line): `net0`, `net1`, ...
    pub fn net(mut self, nic: NetConfig) -> Self {
        self.nics.push(nic);
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

    /// More guest command line, appended to what splitvisor puts there: `console=ttyS0`,
    /// without ACPI a `virtio_mmio.device=SIZE@ADDR:IRQ` per virtio device, and
    /// `splitvisor.vcpus=N`.
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

    /// Stops the VM (as [`Vm::stop_handle`] does) when this process gets SIGINT, SIGTERM
    /// or SIGHUP. [`build`](Self::build) blocks them on its thread, and so in every thread
    /// the VM starts; a signal sent before the vCPUs run waits for them (see
    /// [`host_signals`](crate::host_signals)).
    pub fn stop_on_host_signals(mut self, enabled: bool) -> Self {
        self.stop_on_signals = enabled;
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

    /// The devices of this VM, in the order they are placed.
    fn recipes(
        &self,
        output: Box<dyn Write + Send>,
        reset: Arc<dyn Interrupt>,
        power_off: Arc<dyn Interrupt>,
    ) -> Vec<Box<dyn DeviceRecipe>> {
        let mut recipes: Vec<Box<dyn DeviceRecipe>> = vec![
            Box::new(ConsoleRecipe { output, started: None }),
            Box::new(I8042Recipe { reset: reset.clone(), started: None }),
        ];
        if self.acpi_enabled() {
            recipes.push(Box::new(PowerRecipe { power_off, reset, started: None }));
        }
        for (index, config) in self.disks.iter().enumerate() {
            recipes.push(Box::new(DiskRecipe { index, config: config.clone(), started: None }));
        }
        for (index, config) in self.nics.iter().enumerate() {
            recipes.push(Box::new(NetRecipe { index, config: config.clone() }));
        }
        recipes
    }

    /// Refuses two disks on one image file (by device and inode, so another path to it,
    /// a link, counts too) unless both are read-only: the second would find the image
    /// locked by the VM itself, and be refused as if another VM held it. A path that
    /// cannot be looked at is left to the disk's own open, which says why.
    fn check_disks_name_distinct_images(&self) -> Result<(), Error> {
        let mut seen: Vec<((u64, u64), bool, usize)> = Vec::new();
        for (index, config) in self.disks.iter().enumerate() {
            let DiskConfig::Image { path, read_only, .. } = config else { continue };
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let file = (meta.dev(), meta.ino());
            let clash = seen
                .iter()
                .find(|(other, other_read_only, _)| *other == file && !(*read_only && *other_read_only));
            if let Some((_, _, first)) = clash {
                return Err(Error::SameImageTwice {
                    first: format!("disk{first}"),
                    second: format!("disk{index}"),
                    path: path.clone(),
                });
            }
            seen.push((file, *read_only, index));
        }
        Ok(())
    }

    /// The names of this VM's devices.
    pub fn device_names(&self) -> Vec<String> {
        let mut names = vec!["com1".to_string(), "i8042".to_string()];
        if self.acpi_enabled() {
            names.push("power".to_string());
        }
        names.extend((0..self.disks.len()).map(|index| format!("disk{index}")));
        names.extend((0..self.nics.len()).map(|index| format!("net{index}")));
        names
    }

    /// Creates the VM: memory, KVM, the guest loaded, every device placed and every vCPU
    /// configured. Nothing runs until [`Vm::run`]. Every driver partition runs by then;
    /// those of the plain bus devices may still be setting up their sandboxes (see
    /// [`Vm::wait_for_partitions`]).
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
    pub fn build(mut self) -> Result<Vm, Error> {
        // Refused before KVM is even opened, like a bad memory size.
        if self.vcpus == 0 {
            return Err(VmError::NoVcpus.into());
        }
        let known = self.device_names();
        let mut unknown: Vec<&str> = self.layout.unknown_devices(&known);
        unknown.extend(self.faults.iter().map(|(d, _)| d.as_str()).filter(|d| !known.iter().any(|k| k == d)));
        if let Some(name) = unknown.first() {
            return Err(Error::UnknownDevice { name: name.to_string(), known: known.join(", ") });
        }
        self.check_disks_name_distinct_images()?;
        let guest = self.kernel.is_none().then_some(&self.elf[..]);
        crate::boot::check_vcpus(self.vcpus, guest, self.acpi_enabled())?;
        // Before this thread starts any: they inherit the mask. Kept blocked here until the
        // VM has run.
        let blocked_signals = match self.stop_on_signals {
            true => Some(host_signals::block_on_this_thread().map_err(Error::HostSignals)?),
            false => None,
        };
        hypervisor_sandbox::before_build(&self.sandbox)?;
        #[cfg(feature = "test-hooks")]
        if let Some((range, device)) = hypervisor_sandbox::forbidden_call::device() {
            self = self.mmio_device(range, "test-forbidden-call", device);
        }
        let mut control = VmControl::new();
        // The bootstrap processor's thread starts first (its filter's install alone takes
        // a few hundred microseconds on some hosts) and waits for its vCPU while the VM is
        // set up. The others start at run, one after another: handed their vCPUs all at
        // once, the guest kit's APs spin while the BSP sets up and starve it on few cores
        // (56 vCPUs: first output 43 -> 382 ms). A jailed hypervisor starts every one in
        // its jail, which wants no other thread when it enters.
        if !self.sandbox.jail_enabled() {
            control.prepare_threads(1)?;
        }
        // Then the partition spawner, which installs its filter while the VM is set up:
        // the first partition starts as soon as it has, and the partitions' network
        // namespace, which this thread makes meanwhile, is there; asking for one does not
        // wait for either. A failure here is reported by the first partition's wait, and
        // the next start tries again.
        let partitions_namespace = if self.layout.has_partitions() {
            splitvisor_isolation::partition::start_spawner()
                .map_err(|e| log::debug!("the partition spawner did not start yet: {e}"))
                .ok()
        } else {
            None
        };
        let cpuid = control.read_supported_cpuid();
        let ram = GuestRam::new(self.memory)?;
        // The images are read and checked (format, size, room in RAM) before the VM is
        // created or any partition started.
        let mut plan = BootPlan {
            kernel: match &self.kernel {
                Some(kernel) => kernel.read("kernel", ram.size())?,
                None => self.elf.clone(),
            },
            initrd: self.initrd.as_ref().map(|initrd| initrd.read("initrd", ram.size())).transpose()?,
            cmdline: String::new(),
            acpi: None,
        };
        let loaded = plan.load_images(&ram)?;

        let console = Arc::new(ConsoleState::default());
        let output: Box<dyn Write + Send> = match &self.console {
            ConsoleOutput::Stdout => Box::new(io::stdout()),
            ConsoleOutput::File(path) => Box::new(
                File::create(path).map_err(|source| Error::ConsoleFile { path: path.clone(), source })?,
            ),
            ConsoleOutput::Writer(_) => Box::new(io::sink()),
            ConsoleOutput::Discard => Box::new(io::sink()),
        };
        let mut this = self;
        let output = match std::mem::replace(&mut this.console, ConsoleOutput::Discard) {
            ConsoleOutput::Writer(writer) => writer,
            _ => output,
        };
        let console_tap = Box::new(ConsoleTap::new(output, console.clone()));
        let reset_line: Arc<dyn Interrupt> =
            Arc::new(ResetLine { stop: control.stop_handle(), console: console.clone() });
        let power_off_line: Arc<dyn Interrupt> = Arc::new(PowerOffLine(control.stop_handle()));
        let mut recipes = this.recipes(console_tap, reset_line, power_off_line);
        let needs_driver = recipes.iter().any(|r| this.layout.placement(&r.name()) == Placement::Partition);
        let find_driver = this.find_driver.take();
        let driver = this.driver.clone().or_else(|| {
            needs_driver.then(|| find_driver.map_or_else(DriverProgram::find, |find| find())).flatten()
        });
        // Every partition is started first, all at once: each sets up its sandbox while
        // the others do and while the VM is set up. Placing a device waits for its own to
        // run the driver program; for a virtio device, to be sandboxed and to answer.
        {
            let early = Early {
                driver: driver.as_ref(),
                guest_ram: ram.size(),
                vcpus: this.vcpus,
                faults: &this.faults,
                #[cfg(feature = "test-hooks")]
                attempt: this.partition_attempt.clone(),
            };
            for recipe in &mut recipes {
                recipe.start(this.layout.placement(&recipe.name()), &early)?;
            }
        }
        // The partitions just asked for are cloned into it.
        if let Some(maker) = partitions_namespace {
            maker.make();
        }
        let kvm = KvmVm::with_memory_and_cpuid(&ram, cpuid)?;
        let vcpus = kvm.create_vcpus(this.vcpus)?;
        // Now, while the partitions set themselves up; the boot state comes once the
        // devices are placed (placing one waits for its partition to run).
        for vcpu in &vcpus {
            vcpu.set_cpuid(kvm.supported_cpuid())?;
        }

        let pio = Bus::new(BusKind::Pio);
        let mmio = Bus::new(BusKind::Mmio);
        let mut allocator = ResourceAllocator::new(
            layout::MMIO32_START,
            layout::MMIO32_SIZE,
            FIRST_DEVICE_IRQ,
            LAST_DEVICE_IRQ,
        )?;
        for extra in std::mem::take(&mut this.extra) {
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
        let log = EventLog::new();
        let acpi = this.acpi_enabled();
        let mut announced = String::new();
        let mut platform = AcpiPlatform { vcpus: this.vcpus, i8042: false, ..AcpiPlatform::default() };
        let mut resets: Vec<DeviceReset> = Vec::new();
        let mut placements = Vec::new();
        let mut drivers = Vec::new();
        let mut console_input: Option<Arc<Mutex<dyn InputSink>>> = None;
        {
            let mut assembly = Assembly {
                kvm: &kvm,
                ram: &ram,
                pio: &pio,
                mmio: &mmio,
                allocator: &mut allocator,
                layout: &this.layout,
                driver,
                cmdline: &mut announced,
                acpi: &mut platform,
                resets: &mut resets,
                stop: control.stop_handle(),
                log: log.clone(),
                faults: &this.faults,
                vcpus: this.vcpus,
                #[cfg(feature = "test-hooks")]
                attempt: this.partition_attempt.clone(),
            };
            for recipe in recipes {
                let (name, kind) = (recipe.name(), recipe.kind());
                let placement = this.layout.placement(&name);
                let placed = recipe.place(placement, &mut assembly)?;
                let placement = if placed.note.is_some() { Placement::Partition } else { placement };
                // A device whose driver runs on the vCPU threads fails with the VM: another
                // policy given for it is refused, not ignored.
                let policy = match &placed.driver {
                    Some(_) => this.layout.fault_policy(&name),
                    None if this.layout.fault_policy(&name) == FaultPolicy::HaltVm => FaultPolicy::HaltVm,
                    None => return Err(Error::PolicyInHypervisor(name)),
                };
                let partition = placed.note.or_else(|| placed.driver.as_ref().map(|d| d.status().driver));
                placements.push(DevicePlacement {
                    device: name,
                    kind: kind.to_string(),
                    placement,
                    policy,
                    partition,
                });
                if let Some(input) = placed.input {
                    console_input = Some(input);
                }
                drivers.extend(placed.driver);
            }
        }

        // What the VMM puts first, then what the user gave (which may end with `-- ARGS`
        // for init).
        let announced = if acpi { "" } else { announced.as_str() };
        plan.cmdline =
            format!("{CONSOLE_CMDLINE}{announced} splitvisor.vcpus={} {}", this.vcpus, this.cmdline)
                .trim()
                .to_string();
        if acpi {
            plan.acpi = Some(AcpiTables::build(&platform)?);
        }
        let bsp = plan.write_boot_info(&ram, &loaded)?;
        let states = boot_states(&loaded, bsp, this.vcpus)?;
        for (vcpu, state) in vcpus.iter().zip(&states) {
            vcpu.reset(state.as_ref())?;
        }
        let reboot = Reboot { plan, loaded, irqchip: kvm.irqchip_reset()?, resets, action: this.on_reboot };

        let tsc_khz = vcpus[0].tsc_khz().ok();
        let vcpu_stats = vcpus.iter().filter_map(Vcpu::stats).collect();
        // The control socket is bound now: a jailed hypervisor cannot reach its path later.
        let api = this.api_socket.as_deref().map(ApiListener::bind).transpose()?;
        hypervisor_sandbox::after_build(&this.sandbox, needs_driver)?;
        Ok(Vm {
            kvm,
            ram,
            vcpus,
            buses: Buses { pio: Arc::new(pio), mmio: Arc::new(mmio) },
            control,
            console,
            console_device: console_input,
            console_input: this.console_input,
            stop_on_signals: this.stop_on_signals,
            blocked_signals: blocked_signals.into_iter().collect(),
            timeout: this.timeout,
            created: Instant::now(),
            tsc_khz,
            vcpu_stats,
            placements,
            api,
            sandbox: this.sandbox,
            log,
            drivers,
            reboot,
            restarts: 0,
        })
    }
}

/// How each vCPU starts: the bootstrap processor as the kernel's format says;
/// application processors in long mode at the guest's AP entry if it has one (the guest
/// kit), or waiting for the guest's INIT/SIPI (Linux).
fn boot_states(loaded: &Loaded, bsp: BootState, vcpus: u32) -> Result<Vec<Option<BootState>>, Error> {
    let ap_entry = loaded.kernel.ap_entry();
    if ap_entry.is_some() && u64::from(vcpus) - 1 > layout::MAX_AP_STACKS {
        return Err(Error::TooManyApStacks { requested: vcpus, max: layout::MAX_AP_STACKS + 1 });
    }
    Ok((0..u64::from(vcpus))
        .map(|index| match index {
            0 => Some(bsp),
            _ => ap_entry.map(|entry| BootState::LongMode {
                entry,
                stack_top: layout::AP_STACKS_TOP - (index - 1) * layout::AP_STACK_SIZE,
                arg: index,
            }),
        })
        .collect())
}

/// What a restart of the VM needs: the boot plan, what the last boot loaded, the
/// interrupt controllers' reset and the devices' resets.
struct Reboot {
    plan: BootPlan,
    loaded: Loaded,
    irqchip: IrqchipReset,
    resets: Vec<DeviceReset>,
    action: OnReboot,
}

impl Reboot {
    /// Puts the platform back to its power-on state while every vCPU is stopped: the
    /// devices reset (no DMA into memory the new boot owns), the kernel, initrd and boot
    /// structures loaded again. Returns what each vCPU thread does before it runs again:
    /// vCPU 0 resets the interrupt controllers, each vCPU resets itself to its boot
    /// state. (The 8250 and the i8042 keep their registers: they hold no memory address
    /// and a booting guest programs them.)
    fn prepare(&mut self, ram: &GuestRam, vcpus: u32) -> Result<VcpuSetup, Error> {
        for reset in &self.resets {
            reset();
        }
        let (loaded, bsp) = self.plan.reload(ram, &self.loaded)?;
        let states = boot_states(&loaded, bsp, vcpus)?;
        self.loaded = loaded;
        let irqchip = self.irqchip.clone();
        Ok(Arc::new(move |vcpu: &Vcpu| {
            if vcpu.index() == 0 {
                irqchip.reset().map_err(|source| splitvisor_vcpu::VcpuError::Setup {
                    vcpu: 0,
                    what: "reset the interrupt controllers",
                    source,
                })?;
            }
            let state = states.get(vcpu.index() as usize).copied().flatten();
            vcpu.reset(state.as_ref())
        }))
    }
}

/// The CPU reset line of the i8042 and of the ACPI reset register: the guest reboots, or
/// ends its run after a panic (the console has shown the kernel's panic line).
struct ResetLine {
    stop: StopHandle,
    console: Arc<ConsoleState>,
}

impl Interrupt for ResetLine {
    fn trigger(&self) -> io::Result<()> {
        match self.console.panic() {
            Some(message) => {
                log::debug!("guest reset after a panic: {message}");
                self.stop.guest_panic(&message);
            }
            None => {
                log::debug!("guest reset");
                self.stop.guest_reset();
            }
        }
        Ok(())
    }
}

/// The ACPI power device's S5: the guest powers off.
struct PowerOffLine(StopHandle);

impl Interrupt for PowerOffLine {
    fn trigger(&self) -> io::Result<()> {
        log::debug!("guest power-off (ACPI S5)");
        self.0.power_off();
        Ok(())
    }
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs go before the VM fd, the VM before its memory, the
    // buses (whose devices close their drivers' connections) before the drivers (whose
    // partitions are then killed and reaped).
    vcpus: Vec<Vcpu>,
    // Holds a duplicate of the VM fd (the interrupt controllers' reset): before the VM.
    reboot: Reboot,
    kvm: KvmVm,
    ram: GuestRam,
    buses: Buses,
    control: VmControl,
    console: Arc<ConsoleState>,
    console_device: Option<Arc<Mutex<dyn InputSink>>>,
    console_input: bool,
    stop_on_signals: bool,
    /// The stop signals blocked on the threads that built and run the VM, until it ends.
    blocked_signals: Vec<BlockedHere>,
    timeout: Option<Duration>,
    created: Instant,
    tsc_khz: Option<u32>,
    vcpu_stats: Vec<VcpuStats>,
    placements: Vec<DevicePlacement>,
    api: Option<ApiListener>,
    sandbox: HypervisorSandbox,
    log: Arc<EventLog>,
    drivers: Vec<Arc<ManagedDriver>>,
    restarts: u32,
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
    /// What happened to device drivers while the VM ran (faults, restarts, upgrades), in
    /// order: the first 32 and the last 224, with an event of device `"*"` between them
    /// saying how many were left out (a VM whose drivers restart in a loop keeps a bounded
    /// list; the `log` crate has them all).
    pub device_events: Vec<DeviceEvent>,
    /// Each supervised driver at the end: restarts, health.
    pub drivers: Vec<DriverStatus>,
    /// How often the guest rebooted and the VM booted it again ([`OnReboot::Restart`]).
    pub restarts: u32,
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

    /// Waits until the sandbox of every driver partition the VM was built with is in place
    /// (at most [`READY_TIMEOUT`] each); a partition that failed is the error, as it would
    /// have been `build`'s. `build` returns before the partitions of the plain bus devices
    /// (the serial port, the i8042, the ACPI power registers) are sandboxed: their drivers
    /// read no request before, so the guest may run already, and the first access to each
    /// waits for its answer as any other does. [`run`](Self::run) calls this once the
    /// guest runs, so the guest boots while they set up. Call it to look at the partitions
    /// before `run`.
    pub fn wait_for_partitions(&self) -> Result<(), Error> {
        for driver in &self.drivers {
            driver.wait_started(READY_TIMEOUT).map_err(Error::partition(driver.name()))?;
        }
        Ok(())
    }

    /// Where each device runs (partition PIDs included). Before [`run`](Self::run) or
    /// [`wait_for_partitions`](Self::wait_for_partitions), a bus device's partition listed
    /// here may still be setting up its sandbox, or fail to.
    pub fn placements(&self) -> &[DevicePlacement] {
        &self.placements
    }

    /// Each supervised driver now: what serves it, its process, restarts, health.
    pub fn drivers(&self) -> Vec<DriverStatus> {
        self.drivers.iter().map(|driver| driver.status()).collect()
    }

    /// Lists, restarts, upgrades and fails drivers from another thread while the VM runs
    /// (what the control socket does).
    pub fn driver_control(&self) -> DriverControl {
        DriverControl::new(self.drivers.clone(), self.placements.iter().map(|p| p.device.clone()).collect())
    }

    /// Guest RAM, for inspection.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The ACPI tables the guest is given, if the VM has them (see [`VmBuilder::acpi`]).
    pub fn acpi_tables(&self) -> Option<&AcpiTables> {
        self.reboot.plan.acpi.as_ref()
    }

    /// The guest's command line, whole.
    pub fn cmdline(&self) -> &str {
        &self.reboot.plan.cmdline
    }

    /// When the VM was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// The threads that serve a running VM: the drivers' supervisor, and if asked for, the
    /// control socket, the console's input and the watch for the host's stop signals. If
    /// one cannot start, those started already are stopped.
    fn start_services(&mut self, stop: &StopHandle) -> Result<Services, Error> {
        let supervisor = Supervisor::start(
            self.drivers.iter().map(|d| d.clone() as Arc<dyn Supervised>).collect(),
            SUPERVISOR_TICK,
        )
        .map_err(Error::Supervisor)?;
        for driver in &self.drivers {
            driver.attach(supervisor.handle());
        }
        let mut services = Services { _supervisor: supervisor, api: None, input: None, signals: None };
        if let Some(listener) = self.api.take() {
            services.api = Some(listener.serve(self.driver_control(), self.placements.clone())?);
        }
        if let (Some(device), true) = (&self.console_device, self.console_input) {
            services.input = Some(ConsoleInput::start(device.clone())?);
        }
        if self.stop_on_signals {
            services.signals = Some(SignalWatcher::start(stop.clone()).map_err(Error::HostSignals)?);
        }
        Ok(services)
    }

    /// Runs the VM until the guest resets it, the host stops it, the timeout passes, a
    /// driver's fault policy ends it, or a vCPU fails (the error).
    pub fn run(mut self) -> Result<VmReport, Error> {
        if self.stop_on_signals {
            // Run from another thread than the one that built it: threads started here
            // inherit this one's mask.
            self.blocked_signals.push(host_signals::block_on_this_thread().map_err(Error::HostSignals)?);
        }
        // A vCPU may ask for a thread as soon as it runs: the launcher's queue is open
        // before, its thread started after.
        let launcher = hypervisor_sandbox::open_launcher(&self.sandbox)?;
        let vcpus = std::mem::take(&mut self.vcpus);
        let stop_handle = self.control.stop_handle();
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        // The vCPUs first: nothing else started here is needed before the guest's first
        // instruction. And nothing else is started until the partitions are sandboxed
        // (below), their threads run and the boot vCPU has served its first exit (bounded;
        // a vCPU that asks for a thread meanwhile waits for the launcher): each start
        // installs a seccomp filter, which holds a CPU for hundreds of microseconds, and on
        // a small host a vCPU thread, the task KVM starts at the first KVM_RUN, or the
        // partition that serves the exit, woken meanwhile, waits for a CPU behind them.
        let mut running = std::mem::take(&mut self.control).start(vcpus, self.buses.clone())?;
        // The guest runs while the bus devices' partitions finish their sandboxes (its first
        // access to each waits for it); one that failed ends the VM before the services start.
        if let Err(e) = self.wait_for_partitions() {
            stop_handle.stop();
            // A vCPU waiting for the launcher to start a thread is answered at once.
            drop(launcher);
            let _ = running.wait(None);
            return Err(e);
        }
        if !running.wait_until_running(VCPUS_RUNNING_WAIT) {
            log::debug!(
                "the vCPU threads did not all run within {VCPUS_RUNNING_WAIT:?}: starting the services anyway"
            );
        }
        running.wait_until_boot_vcpu_served_first_exit(BOOT_VCPU_HEAD_START);
        let services = hypervisor_sandbox::start_launcher(launcher)
            .map_err(Error::from)
            .and_then(|()| self.start_services(&stop_handle))
            .and_then(|services| {
                // Everything this thread starts itself runs: from here on it only waits,
                // tears down and reports.
                hypervisor_sandbox::main_thread(&self.sandbox)?;
                Ok(services)
            });
        let services = match services {
            Ok(services) => services,
            Err(e) => {
                stop_handle.stop();
                let _ = running.wait(None);
                return Err(e);
            }
        };
        let mut restart_error = None;
        let end = loop {
            let stopped = running.wait_until(deadline);
            if self.reboot.action != OnReboot::Restart || !stopped.restartable() {
                break stopped.into_end();
            }
            log::info!("the guest rebooted: restarting the VM (restart {})", self.restarts + 1);
            let setup = match self.reboot.prepare(&self.ram, stopped.vcpu_count()) {
                Ok(setup) => setup,
                Err(e) => {
                    restart_error = Some(e);
                    break stopped.into_end();
                }
            };
            running = match stopped.restart(self.buses.clone(), setup) {
                Ok(running) => running,
                Err(RestartError::Ended(end)) => break end,
                Err(RestartError::Vm(e)) => {
                    restart_error = Some(e.into());
                    break Ok(VmEnd::Stopped);
                }
            };
            self.restarts += 1;
        };
        let ended = Instant::now();
        drop(services);
        // Every thread of the VM is gone: this thread's mask is as it was before.
        self.blocked_signals.clear();
        if let Some(e) = restart_error {
            return Err(e);
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
            device_events: self.log.all(),
            drivers: self.drivers(),
            restarts: self.restarts,
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

/// What runs beside the vCPUs while the VM runs; dropped, each is stopped.
struct Services {
    api: Option<ApiServer>,
    /// Stopped when dropped, after the control socket (fields drop in order).
    _supervisor: Supervisor,
    input: Option<ConsoleInput>,
    signals: Option<SignalWatcher>,
}

impl Drop for Services {
    fn drop(&mut self) {
        if let Some(input) = self.input.take() {
            input.stop();
        }
        if let Some(signals) = self.signals.take() {
            signals.stop();
        }
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
        let thread = threads::spawn(ThreadKind::ConsoleInput, "console-input", move || {
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
        })
        .map_err(|source| Error::Thread { name: "console-input", source })?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}
