//! The KVM VM and its running vCPU threads.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, kvm_irqchip, kvm_pit_config,
};
use kvm_ioctls::{Kvm, VmFd};
use splitvisor_bus::threads::{self, StartingThread, ThreadKind};
use splitvisor_memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::vcpu::{Buses, Vcpu};
use crate::{VcpuError, VmError};

/// Where KVM may put its three-page TSS region: just below the firmware hole at 4 GiB,
/// clear of guest RAM and of the MMIO window.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM with an in-kernel interrupt controller (PIC, IOAPIC, local APICs) and PIT.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
}

impl KvmVm {
    /// Opens /dev/kvm and creates the VM with its in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let vm = Self::without_pit()?;
        create_pit(&vm.fd)?;
        Ok(vm)
    }

    /// Creates the VM as [`new`](Self::new) does, with `ram` registered as its memory.
    ///
    /// Prefer this to [`new`](Self::new) and [`register_memory`](Self::register_memory):
    /// the memory slots are registered before the interrupt controllers exist, the order
    /// Firecracker and Cloud Hypervisor use too. On a KVM where a slot registered after
    /// KVM_CREATE_IRQCHIP waits for the VM's other users to let go of its memory map (the
    /// kvm_pvm module: 5-9 ms, against 0.2 ms before it), that wait is most of a small
    /// VM's start.
    pub fn with_memory(ram: &GuestRam) -> Result<Self, VmError> {
        Self::with_memory_and_cpuid(ram, None)
    }

    /// [`with_memory`](Self::with_memory), taking the CPUID KVM supports from a read
    /// `ahead` if there is one ([`VmControl::read_supported_cpuid`]; read here if not, or
    /// if that read did not come).
    pub fn with_memory_and_cpuid(ram: &GuestRam, ahead: Option<SupportedCpuid>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        for slot in ram.kvm_slots()? {
            // SAFETY: the caller's `GuestRam` outlives the VM (the VM is built and run
            // holding it); the slot is its mapping.
            unsafe { splitvisor_memory::register_slot(&fd, slot) }?;
        }
        let vm = Self::with_irqchip(kvm, fd, ahead)?;
        create_pit(&vm.fd)?;
        Ok(vm)
    }

    /// The VM with its irqchip, no PIT yet.
    fn without_pit() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Self::with_irqchip(kvm, fd, None)
    }

    /// `fd` given its TSS region and in-kernel irqchip, and the CPUID KVM supports (read
    /// `ahead`, or now if that read did not come).
    fn with_irqchip(kvm: Kvm, fd: VmFd, ahead: Option<SupportedCpuid>) -> Result<Self, VmError> {
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|e| VmError::Setup("set the TSS address", e))?;
        fd.create_irq_chip().map_err(|e| VmError::Setup("create the in-kernel irqchip", e))?;
        let supported_cpuid = match ahead.and_then(SupportedCpuid::answer) {
            Some(read) => read,
            None => kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        }
        .map_err(|e| VmError::Setup("read the supported CPUID", e))?;
        Ok(Self { kvm, fd, supported_cpuid })
    }

    /// A duplicate of the VM fd, owned by the result.
    fn duplicate_fd(&self) -> Result<VmFd, VmError> {
        // SAFETY: duplicating an fd this VmFd owns; the new fd is owned by the result.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(VmError::Setup("duplicate the VM fd", kvm_ioctls::Error::last()));
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM fd, owned by nothing else.
        unsafe { self.kvm.create_vmfd_from_rawfd(fd) }
            .map_err(|e| VmError::Setup("wrap the duplicated VM fd", e))
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Most vCPUs KVM allows in one VM on this host (KVM_CAP_MAX_VCPUS), asked of
    /// /dev/kvm without creating a VM: for refusing a VM before anything of it exists.
    pub fn host_max_vcpus() -> Result<usize, VmError> {
        Ok(Kvm::new().map_err(VmError::KvmUnavailable)?.get_max_vcpus())
    }

    /// The VM fd, for irqfds, ioeventfds and the like.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID KVM supports, the base of every vCPU's CPUID.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers guest RAM as KVM memory slots, in a VM that already has its interrupt
    /// controllers: see [`with_memory`](Self::with_memory) for why that can be slow.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        ram.register(&self.fd).map_err(VmError::Memory)
    }

    /// Delivers writes to `eventfd` as edge interrupts on `gsi`.
    pub fn register_irqfd(&self, eventfd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(eventfd, gsi).map_err(|e| VmError::Irqfd { gsi, source: e })
    }

    /// Turns guest writes of the 32-bit value `datamatch` to `addr` into writes of
    /// `eventfd`, handled in the kernel without a VM exit to this process.
    pub fn register_mmio_ioeventfd(
        &self,
        eventfd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(eventfd, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// Creates vCPUs `0..count` (not yet configured).
    pub fn create_vcpus(&self, count: u32) -> Result<Vec<Vcpu>, VmError> {
        let max = self.max_vcpus();
        if count == 0 {
            return Err(VmError::NoVcpus);
        }
        if count as usize > max {
            return Err(VmError::TooManyVcpus { requested: count, max });
        }
        (0..count)
            .map(|index| {
                let fd = self
                    .fd
                    .create_vcpu(u64::from(index))
                    .map_err(|source| VmError::CreateVcpu { vcpu: index, source })?;
                Vcpu::new(index, fd).map_err(VmError::Vcpu)
            })
            .collect()
    }

    /// A handle that puts the in-kernel interrupt controllers back to their power-on
    /// state from any thread (a vCPU thread, at a restart). It holds its own duplicate of
    /// the VM fd.
    pub fn irqchip_reset(&self) -> Result<IrqchipReset, VmError> {
        Ok(IrqchipReset { vm: Arc::new(self.duplicate_fd()?) })
    }
}

/// The CPUID KVM supports, being read on another thread
/// ([`VmControl::read_supported_cpuid`]).
#[derive(Debug)]
pub struct SupportedCpuid {
    answer: mpsc::Receiver<Result<CpuId, kvm_ioctls::Error>>,
}

/// Longest [`KvmVm::with_memory_and_cpuid`] waits for a CPUID read ahead before it reads
/// it itself.
const CPUID_AHEAD_WAIT: Duration = Duration::from_secs(1);

impl SupportedCpuid {
    /// The read's result; `None` if it did not come in time (the thread that had it
    /// ended, or is late).
    fn answer(self) -> Option<Result<CpuId, kvm_ioctls::Error>> {
        self.answer.recv_timeout(CPUID_AHEAD_WAIT).ok()
    }
}

/// Creates the in-kernel PIT (speaker port ignored).
fn create_pit(fd: &VmFd) -> Result<(), VmError> {
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    fd.create_pit2(pit).map_err(|e| VmError::Setup("create the in-kernel PIT", e))
}

/// Resets KVM's in-kernel IOAPIC and 8259s ([`KvmVm::irqchip_reset`]).
#[derive(Clone, Debug)]
pub struct IrqchipReset {
    vm: Arc<VmFd>,
}

impl IrqchipReset {
    /// Masks every IOAPIC pin and both 8259s and drops whatever they had pending, as a
    /// machine reset does (the IOAPIC keeps its ID and address). A guest sets them up
    /// again as it boots; until then no device interrupt reaches a vCPU.
    pub fn reset(&self) -> Result<(), kvm_ioctls::Error> {
        for chip in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut state = kvm_irqchip { chip_id: chip, ..Default::default() };
            self.vm.get_irqchip(&mut state)?;
            match chip {
                KVM_IRQCHIP_IOAPIC => {
                    // SAFETY: chip_id says the union holds the IOAPIC's state.
                    let ioapic = unsafe { &mut state.chip.ioapic };
                    ioapic.irr = 0;
                    for entry in ioapic.redirtbl.iter_mut() {
                        entry.bits = IOAPIC_ENTRY_RESET;
                    }
                }
                _ => {
                    // SAFETY: chip_id says the union holds a PIC's state.
                    let pic = unsafe { &mut state.chip.pic };
                    pic.irr = 0;
                    pic.isr = 0;
                    pic.imr = 0xff;
                    pic.last_irr = 0;
                }
            }
            self.vm.set_irqchip(&state)?;
        }
        Ok(())
    }
}

/// An IOAPIC redirection entry after a reset: masked (vector 0, fixed delivery, edge).
const IOAPIC_ENTRY_RESET: u64 = 1 << 16;

/// Why a VM ended, when no vCPU failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset the machine: a reboot (and the way splitvisor's own guest programs
    /// power off).
    GuestReset,
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest reset the machine after reporting a panic on its console.
    GuestPanic {
        /// The guest's panic line.
        message: String,
    },
    /// The host asked it to stop ([`StopHandle::stop`], Ctrl-C).
    Stopped,
    /// The deadline given to [`RunningVm::wait`] passed.
    TimedOut,
    /// A device's driver failed and its fault policy ends the VM.
    DeviceFault {
        /// The device.
        device: String,
        /// What happened to its driver.
        reason: String,
    },
}

impl std::fmt::Display for VmEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEnd::GuestReset => f.write_str("the guest reset the machine"),
            VmEnd::PowerOff => f.write_str("the guest powered off"),
            VmEnd::GuestPanic { message } => write!(f, "the guest panicked ({message})"),
            VmEnd::Stopped => f.write_str("stopped by the host"),
            VmEnd::TimedOut => f.write_str("timed out"),
            VmEnd::DeviceFault { device, reason } => write!(f, "the driver of {device} failed ({reason})"),
        }
    }
}

/// Exit counters shared by every vCPU.
#[derive(Debug, Default)]
pub(crate) struct ExitStats {
    pub(crate) pio_exits: AtomicU64,
    pub(crate) mmio_exits: AtomicU64,
}

/// State shared by the vCPU threads, the stop handles and the waiter.
#[derive(Debug, Default)]
pub(crate) struct Control {
    stopping: AtomicBool,
    end: Mutex<Ends>,
    ended: Condvar,
    pub(crate) stats: ExitStats,
}

/// How the VM ended: the first report, and the first one after it (which decides whether
/// a guest reset may still restart the VM).
#[derive(Debug, Default)]
struct Ends {
    /// Whether anything ended this run of the vCPUs (`first` is taken by the waiter).
    reported: bool,
    first: Option<Result<VmEnd, VcpuError>>,
    next: Option<Result<VmEnd, VcpuError>>,
}

impl Control {
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.end.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records how the VM ended; the first report wins, the second is kept aside.
    fn finish(&self, outcome: Result<VmEnd, VcpuError>) {
        let mut ends = self.ends();
        if !ends.reported {
            ends.reported = true;
            ends.first = Some(outcome);
        } else if ends.next.is_none() {
            ends.next = Some(outcome);
        }
        self.stopping.store(true, Ordering::Release);
        self.ended.notify_all();
    }
}

/// Ends a running VM from anywhere: another thread, a device, a signal-handling thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    control: Arc<Control>,
}

impl StopHandle {
    /// The host stops the VM.
    pub fn stop(&self) {
        self.control.finish(Ok(VmEnd::Stopped));
    }

    /// The guest reset the machine (wired to the i8042's reset line and the ACPI reset
    /// register).
    pub fn guest_reset(&self) {
        self.control.finish(Ok(VmEnd::GuestReset));
    }

    /// The guest powered the machine off (wired to the ACPI sleep control register).
    pub fn power_off(&self) {
        self.control.finish(Ok(VmEnd::PowerOff));
    }

    /// The guest reset the machine after it reported a panic (`message`).
    pub fn guest_panic(&self, message: &str) {
        self.control.finish(Ok(VmEnd::GuestPanic { message: message.to_string() }));
    }

    /// A device's driver failed, and its fault policy ends the VM.
    pub fn device_fault(&self, device: &str, reason: &str) {
        self.control
            .finish(Ok(VmEnd::DeviceFault { device: device.to_string(), reason: reason.to_string() }));
    }

    /// Whether the VM has ended (or is ending).
    pub fn has_ended(&self) -> bool {
        self.control.stopping()
    }

    /// Exits counted so far, over every vCPU.
    pub fn exit_counts(&self) -> ExitCounts {
        ExitCounts {
            pio: self.control.stats.pio_exits.load(Ordering::Relaxed),
            mmio: self.control.stats.mmio_exits.load(Ordering::Relaxed),
        }
    }
}

/// Exits counted over every vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub pio: u64,
    /// MMIO exits.
    pub mmio: u64,
}

/// A VM whose vCPUs are running, one thread each.
#[derive(Debug)]
pub struct RunningVm {
    control: Arc<Control>,
    /// How far the vCPU threads have come.
    arrived: Arc<Arrivals>,
    /// Each vCPU's thread; it ends with its vCPU, or with none if it never got one.
    threads: Vec<(u32, JoinHandle<Option<Vcpu>>)>,
}

/// How far the vCPU threads have come, for [`RunningVm::wait_until_running`].
#[derive(Debug, Default)]
struct Arrivals {
    state: Mutex<Arrived>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Arrived {
    /// Threads that have come to their run loop (or given up before it).
    threads: u32,
    /// Whether the boot vCPU (index 0) has served the exit of its first KVM_RUN, or never
    /// will enter one.
    boot_served_exit: bool,
}

impl Arrivals {
    fn update(&self, change: impl FnOnce(&mut Arrived)) {
        change(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }
}

/// Work a vCPU thread does on its own vCPU before it runs it (at a restart: its reset).
/// Every vCPU's set-up is done before any of them runs.
pub type VcpuSetup = Arc<dyn Fn(&Vcpu) -> Result<(), VcpuError> + Send + Sync>;

/// Longest the vCPU threads wait for each other's set-up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the vCPU threads wait until each has done its set-up.
#[derive(Debug, Default)]
struct SetupGate {
    done: Mutex<u32>,
    changed: Condvar,
}

impl SetupGate {
    /// Counts this thread's set-up as done and waits (bounded) for the other `count - 1`;
    /// false if the VM stopped meanwhile.
    fn arrive_and_wait(&self, count: u32, control: &Control) -> Result<bool, ()> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done += 1;
        self.changed.notify_all();
        while *done < count {
            if control.stopping() {
                return Ok(false);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            // Woken by the others, or at least every 10 ms to look at the stop flag.
            let wait = left.min(Duration::from_millis(10));
            done = self.changed.wait_timeout(done, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(!control.stopping())
    }
}

/// A VM whose vCPU threads have all stopped: how it ended, and its vCPUs, to run them
/// again after a guest reset ([`StoppedVm::restart`]).
#[derive(Debug)]
pub struct StoppedVm {
    control: Arc<Control>,
    vcpus: Vec<Vcpu>,
    end: Result<VmEnd, VcpuError>,
}

impl StoppedVm {
    /// Why the VM ended (the first report).
    pub fn end(&self) -> &Result<VmEnd, VcpuError> {
        &self.end
    }

    /// How many vCPUs came back.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Whether the VM ended with a plain guest reset and nothing else has ended it since
    /// (a host stop, a device fault, a vCPU failure): then it may be restarted.
    pub fn restartable(&self) -> bool {
        matches!(self.end, Ok(VmEnd::GuestReset)) && self.control.ends().next.is_none()
    }

    /// Gives up on restarting: how the VM ended, the report that came after a guest reset
    /// winning (a host stop while restarting is a stop).
    pub fn into_end(self) -> Result<VmEnd, VcpuError> {
        let next = self.control.ends().next.take();
        match (self.end, next) {
            (Ok(VmEnd::GuestReset), Some(next)) => next,
            (end, _) => end,
        }
    }

    /// Runs the vCPUs again, each thread first running `setup` on its vCPU (its reset).
    /// Refused, with the VM's end, unless [`restartable`](Self::restartable).
    pub fn restart(self, buses: Buses, setup: VcpuSetup) -> Result<RunningVm, RestartError> {
        {
            let mut ends = self.control.ends();
            if !matches!(self.end, Ok(VmEnd::GuestReset)) || ends.next.is_some() {
                drop(ends);
                return Err(RestartError::Ended(self.into_end()));
            }
            ends.reported = false;
            self.control.stopping.store(false, Ordering::Release);
        }
        VmControl { control: self.control, ready: Vec::new() }
            .start_with(self.vcpus, buses, Some(setup))
            .map_err(RestartError::Vm)
    }
}

/// Why a stopped VM was not restarted.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// Something else ended the VM: this end.
    #[error("the VM ended: {0:?}")]
    Ended(Result<VmEnd, VcpuError>),
    /// The vCPU threads could not be started again.
    #[error(transparent)]
    Vm(VmError),
}

/// A vCPU thread's work before it runs its vCPU: its `setup`, if any, then waiting for
/// the other `count - 1` threads' set-up. Whether to run (false: the VM stopped meanwhile).
fn prepare(
    vcpu: &Vcpu,
    setup: Option<VcpuSetup>,
    gate: &SetupGate,
    count: u32,
    control: &Control,
) -> Result<bool, VcpuError> {
    let Some(setup) = setup else {
        return Ok(true);
    };
    setup(vcpu)?;
    gate.arrive_and_wait(count, control).map_err(|()| VcpuError::SetupTimeout { vcpu: vcpu.index() })
}

/// A no-op handler: the signal only has to interrupt KVM_RUN.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// A stop handle and exit counters, created before the devices that need them; and the
/// vCPU threads, if they were started ahead of their vCPUs.
#[derive(Debug, Default)]
pub struct VmControl {
    control: Arc<Control>,
    /// Threads started by [`VmControl::prepare_threads`], by vCPU index.
    ready: Vec<ReadyThread>,
}

/// A vCPU thread started ahead of its vCPU: it waits for its work (run the vCPU, return it).
#[derive(Debug)]
struct ReadyThread {
    thread: StartingThread<Option<Vcpu>>,
    work: mpsc::Sender<ThreadJob>,
}

type VcpuWork = Box<dyn FnOnce() -> Vcpu + Send>;

/// What a prepared vCPU thread is handed.
enum ThreadJob {
    /// Work done while it waits for its vCPU.
    Meanwhile(Box<dyn FnOnce() + Send>),
    /// Its vCPU, to run: the thread's last job.
    Run(VcpuWork),
}

impl VmControl {
    /// New, not yet running.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle that ends the VM.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { control: self.control.clone() }
    }

    /// Starts the threads of vCPUs `0..count` now, before the vCPUs exist: a thread's start
    /// (with a sandbox, installing its seccomp filter: a few hundred microseconds on some
    /// hosts) then overlaps the rest of the VM's set-up instead of delaying its first
    /// instruction. [`start`](Self::start) hands each thread its vCPU; a thread that never
    /// gets one ends when this is dropped.
    pub fn prepare_threads(&mut self, count: u32) -> Result<(), VmError> {
        for index in self.ready.len() as u32..count {
            let (work, incoming) = mpsc::channel::<ThreadJob>();
            let thread = threads::start(ThreadKind::Vcpu, format!("vcpu{index}"), move || {
                loop {
                    match incoming.recv().ok()? {
                        ThreadJob::Meanwhile(job) => job(),
                        ThreadJob::Run(work) => return Some(work()),
                    }
                }
            })
            .map_err(|source| VmError::SpawnVcpuThread { vcpu: index, source })?;
            self.ready.push(ReadyThread { thread, work });
        }
        Ok(())
    }

    /// Has vCPU 0's prepared thread ([`prepare_threads`](Self::prepare_threads)) read the
    /// CPUID KVM supports while it waits for its vCPU; pass the result to
    /// [`KvmVm::with_memory_and_cpuid`]. The read takes a few hundred microseconds where
    /// the host is itself a VM (every CPUID instruction KVM runs to answer exits to the
    /// host's hypervisor); ahead, it overlaps the VM's creation. `None` without a
    /// prepared thread, or if /dev/kvm does not open (the VM's creation then says why).
    pub fn read_supported_cpuid(&self) -> Option<SupportedCpuid> {
        let thread = self.ready.first()?;
        let kvm = Kvm::new().ok()?;
        let (reply, answer) = mpsc::sync_channel(1);
        let read = move || {
            let _ = reply.send(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES));
        };
        thread.work.send(ThreadJob::Meanwhile(Box::new(read))).ok()?;
        Some(SupportedCpuid { answer })
    }

    /// Starts one thread per vCPU (or hands it to the thread prepared for it), each
    /// dispatching its exits to `buses`.
    pub fn start(self, vcpus: Vec<Vcpu>, buses: Buses) -> Result<RunningVm, VmError> {
        self.start_with(vcpus, buses, None)
    }

    /// As [`start`](Self::start), each thread first running `setup` on its vCPU; no vCPU
    /// runs before every set-up is done. A failed set-up ends the VM with its error.
    pub fn start_with(
        self,
        vcpus: Vec<Vcpu>,
        buses: Buses,
        setup: Option<VcpuSetup>,
    ) -> Result<RunningVm, VmError> {
        static REGISTER: Once = Once::new();
        let mut registered = Ok(());
        REGISTER.call_once(|| registered = register_signal_handler(kick_signal(), kick_handler));
        registered.map_err(VmError::SignalHandler)?;

        let count = vcpus.len() as u32;
        let gate = Arc::new(SetupGate::default());
        let mut ready: Vec<Option<ReadyThread>> = self.ready.into_iter().map(Some).collect();
        let mut running =
            RunningVm { control: self.control, arrived: Arc::new(Arrivals::default()), threads: Vec::new() };
        for mut vcpu in vcpus {
            let index = vcpu.index();
            let control = running.control.clone();
            let buses = buses.clone();
            let setup = setup.clone();
            let gate = gate.clone();
            let arrived = running.arrived.clone();
            let work: VcpuWork = Box::new(move || {
                // Counted however it goes: whoever waits for the vCPUs to run is not kept
                // waiting by one that never will.
                let ready = prepare(&vcpu, setup, &gate, count, &control);
                arrived.update(|a| a.threads += 1);
                let boot_served_exit = || {
                    if index == 0 {
                        arrived.update(|a| a.boot_served_exit = true);
                    }
                };
                match ready {
                    Ok(true) => {
                        if let Err(e) = vcpu.run(&buses, &control, boot_served_exit) {
                            control.finish(Err(e));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => control.finish(Err(e)),
                }
                boot_served_exit();
                vcpu
            });
            let thread = match ready.get_mut(index as usize).and_then(Option::take) {
                Some(ReadyThread { thread, work: handoff }) => thread.started().and_then(|thread| {
                    handoff
                        .send(ThreadJob::Run(work))
                        .map_err(|_| io::Error::other("the vCPU thread ended before its vCPU came"))?;
                    Ok(thread)
                }),
                None => threads::spawn(ThreadKind::Vcpu, format!("vcpu{index}"), move || Some(work())),
            }
            .map_err(|source| VmError::SpawnVcpuThread { vcpu: index, source });
            match thread {
                Ok(thread) => running.threads.push((index, thread)),
                Err(e) => {
                    running.control.finish(Ok(VmEnd::Stopped));
                    running.join_all();
                    return Err(e);
                }
            }
        }
        Ok(running)
    }
}

impl RunningVm {
    /// A handle that ends the VM.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { control: self.control.clone() }
    }

    /// Waits, at most `timeout`, until every vCPU thread has come to its run loop (or has
    /// given up before it); false if `timeout` passed first.
    ///
    /// A caller with more threads to start waits for this first: on a host with few CPUs,
    /// threads started while the vCPU threads are still waking take the CPUs from them
    /// (installing a seccomp filter holds a CPU for hundreds of microseconds), and the
    /// guest's first instruction waits behind that work.
    pub fn wait_until_running(&self, timeout: Duration) -> bool {
        let expected = self.threads.len() as u32;
        self.wait_for(timeout, |arrived| arrived.threads >= expected)
    }

    /// Waits, at most `timeout`, until the boot vCPU (index 0) has served the exit of its
    /// first KVM_RUN (a console byte written, a driver partition's answer come back), or
    /// its thread will never enter one; false if `timeout` passed first (a guest may well
    /// run that long without an exit).
    ///
    /// For the same reason as [`wait_until_running`](Self::wait_until_running): a thread
    /// at its run loop has yet to enter the guest, and KVM's first KVM_RUN of a VM
    /// starts a task of the VM's (its huge-page recovery worker) and waits for it, which,
    /// too, has to find a CPU.
    pub fn wait_until_boot_vcpu_served_first_exit(&self, timeout: Duration) -> bool {
        let boot = self.threads.iter().any(|(index, _)| *index == 0);
        self.wait_for(timeout, |arrived| !boot || arrived.boot_served_exit)
    }

    fn wait_for(&self, timeout: Duration, done: impl Fn(&Arrived) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut arrived = self.arrived.state.lock().unwrap_or_else(|e| e.into_inner());
        while !done(&arrived) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            arrived = self.arrived.changed.wait_timeout(arrived, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Waits until the VM ends (or `timeout` passes), stops every vCPU and joins its
    /// thread. A vCPU failure is the error; the first thing that ended the VM wins.
    pub fn wait(self, timeout: Option<Duration>) -> Result<VmEnd, VcpuError> {
        self.wait_until(timeout.map(|t| Instant::now() + t)).end
    }

    /// Waits until the VM ends (or `deadline` passes), stops every vCPU and joins its
    /// thread; the vCPUs come back with how the VM ended.
    pub fn wait_until(mut self, deadline: Option<Instant>) -> StoppedVm {
        {
            let mut ends = self.control.ends();
            while !ends.reported {
                match deadline {
                    None => ends = self.control.ended.wait(ends).unwrap_or_else(|e| e.into_inner()),
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            ends.reported = true;
                            ends.first = Some(Ok(VmEnd::TimedOut));
                            break;
                        }
                        ends =
                            self.control.ended.wait_timeout(ends, left).unwrap_or_else(|e| e.into_inner()).0;
                    }
                }
            }
        }
        self.control.stopping.store(true, Ordering::Release);
        let vcpus = self.join_all();
        let end = self.control.ends().first.take().unwrap_or(Ok(VmEnd::Stopped));
        StoppedVm { control: self.control.clone(), vcpus, end }
    }

    /// Kicks every vCPU thread out of KVM_RUN until it has seen the stop flag, then joins
    /// it. A kick can land just before a thread enters KVM_RUN, so it is repeated.
    ///
    /// Every round kicks every thread still running before any is waited for: a vCPU not
    /// yet kicked keeps its guest running and takes a CPU from those asked to stop, so
    /// stopping them one after another made each wait behind all the others (56 spinning
    /// vCPUs on 2 CPUs: seconds).
    fn join_all(&mut self) -> Vec<Vcpu> {
        self.control.stopping.store(true, Ordering::Release);
        loop {
            let mut running = false;
            for (index, thread) in self.threads.iter().filter(|(_, thread)| !thread.is_finished()) {
                running = true;
                if let Err(e) = thread.kill(kick_signal()) {
                    log::warn!("cannot kick vCPU {index}: {e}");
                }
            }
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut vcpus = Vec::new();
        for (index, thread) in self.threads.drain(..) {
            match thread.join() {
                Ok(vcpu) => vcpus.extend(vcpu),
                Err(_) => self.control.finish(Err(VcpuError::Panicked { vcpu: index })),
            }
        }
        vcpus
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.join_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stopped VM without vCPUs, as `wait_until` leaves it.
    fn stopped(control: &Arc<Control>) -> StoppedVm {
        let end = control.ends().first.take().expect("an end");
        StoppedVm { control: control.clone(), vcpus: Vec::new(), end }
    }

    #[test]
    fn a_cpuid_read_ahead_that_never_comes_is_given_up_at_once() {
        let (reply, answer) = mpsc::sync_channel(1);
        // The thread that had the read ended without it: no wait for the bound.
        drop(reply);
        let started = Instant::now();
        assert!(SupportedCpuid { answer }.answer().is_none());
        assert!(started.elapsed() < CPUID_AHEAD_WAIT);
    }

    #[test]
    fn a_prepared_vcpu_thread_does_what_it_is_handed_while_it_waits_for_its_vcpu() {
        let mut control = VmControl::new();
        control.prepare_threads(1).unwrap();
        let (done, on_thread) = mpsc::channel();
        let job = move || done.send(std::thread::current().name().map(str::to_string)).unwrap();
        control.ready[0].work.send(ThreadJob::Meanwhile(Box::new(job))).unwrap();
        let name = on_thread.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("vcpu0"));
    }

    #[test]
    fn stopping_kicks_every_vcpu_thread_before_waiting_for_any() {
        register_signal_handler(kick_signal(), kick_handler).unwrap();
        // The second thread ends only once kicked, the first only once the second has
        // been (or after a generous bound): waited for one after another, the first
        // would wait in vain for a kick that comes only after it.
        let second_kicked = Arc::new((Mutex::new(false), Condvar::new()));
        let first_saw_it = Arc::new(AtomicBool::new(false));
        let first = {
            let (kicked, saw) = (second_kicked.clone(), first_saw_it.clone());
            std::thread::spawn(move || {
                let (flag, changed) = &*kicked;
                let flag = flag.lock().unwrap();
                let flag = changed.wait_timeout_while(flag, Duration::from_secs(30), |k| !*k).unwrap().0;
                saw.store(*flag, Ordering::Release);
                None
            })
        };
        let second = std::thread::spawn(move || {
            // SAFETY: pause only waits for a signal (the kick) to be handled.
            unsafe { libc::pause() };
            let (flag, changed) = &*second_kicked;
            *flag.lock().unwrap() = true;
            changed.notify_all();
            None
        });
        let mut running = RunningVm {
            control: Arc::new(Control::default()),
            arrived: Arc::new(Arrivals::default()),
            threads: vec![(0, first), (1, second)],
        };
        running.join_all();
        assert!(first_saw_it.load(Ordering::Acquire), "vCPU 0 was waited for before vCPU 1 was kicked");
    }

    #[test]
    fn a_guest_reset_alone_may_restart() {
        let control = Arc::new(Control::default());
        StopHandle { control: control.clone() }.guest_reset();
        let vm = stopped(&control);
        assert!(vm.restartable());
        assert!(matches!(vm.into_end(), Ok(VmEnd::GuestReset)));
    }

    #[test]
    fn a_host_stop_after_a_guest_reset_is_not_lost() {
        // Ctrl-C while the guest's reset is being handled: the VM ends stopped.
        let control = Arc::new(Control::default());
        let handle = StopHandle { control: control.clone() };
        handle.guest_reset();
        let vm = stopped(&control);
        handle.stop();
        assert!(!vm.restartable());
        assert!(matches!(vm.into_end(), Ok(VmEnd::Stopped)));
        // The same when the stop comes before the waiter took the reset.
        let control = Arc::new(Control::default());
        let handle = StopHandle { control: control.clone() };
        handle.guest_reset();
        handle.device_fault("disk0", "its partition died");
        let vm = stopped(&control);
        assert!(!vm.restartable());
        assert!(matches!(vm.into_end(), Ok(VmEnd::DeviceFault { .. })));
    }

    #[test]
    fn other_ends_never_restart_and_the_first_report_wins() {
        for end in [
            |h: &StopHandle| h.power_off(),
            |h: &StopHandle| h.guest_panic("Kernel panic - not syncing: test"),
            |h: &StopHandle| h.stop(),
        ] {
            let control = Arc::new(Control::default());
            let handle = StopHandle { control: control.clone() };
            end(&handle);
            handle.guest_reset();
            let vm = stopped(&control);
            assert!(!vm.restartable());
            assert!(!matches!(vm.into_end(), Ok(VmEnd::GuestReset)));
        }
    }

    #[test]
    fn a_restart_refused_says_how_the_vm_ended() {
        let control = Arc::new(Control::default());
        let handle = StopHandle { control: control.clone() };
        handle.power_off();
        let vm = stopped(&control);
        let buses = Buses {
            pio: Arc::new(splitvisor_bus::Bus::new(splitvisor_bus::BusKind::Pio)),
            mmio: Arc::new(splitvisor_bus::Bus::new(splitvisor_bus::BusKind::Mmio)),
        };
        match vm.restart(buses, Arc::new(|_: &Vcpu| Ok(()))) {
            Err(RestartError::Ended(Ok(VmEnd::PowerOff))) => {}
            other => panic!("{other:?}"),
        }
    }
}
