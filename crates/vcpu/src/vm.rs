//! The KVM VM and its running vCPU threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use splitvisor_bus::threads::{self, ThreadKind};
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
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|e| VmError::Setup("set the TSS address", e))?;
        fd.create_irq_chip().map_err(|e| VmError::Setup("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| VmError::Setup("create the in-kernel PIT", e))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Setup("read the supported CPUID", e))?;
        Ok(Self { kvm, fd, supported_cpuid })
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The VM fd, for irqfds, ioeventfds and the like.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID KVM supports, the base of every vCPU's CPUID.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers guest RAM as KVM memory slots.
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
                self.fd
                    .create_vcpu(u64::from(index))
                    .map(|fd| Vcpu::new(index, fd))
                    .map_err(|source| VmError::CreateVcpu { vcpu: index, source })
            })
            .collect()
    }
}

/// Why a VM ended, when no vCPU failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset the machine (its way of powering off).
    GuestReset,
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
    end: Mutex<Option<Result<VmEnd, VcpuError>>>,
    ended: Condvar,
    pub(crate) stats: ExitStats,
}

impl Control {
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Records how the VM ended; the first report wins.
    fn finish(&self, outcome: Result<VmEnd, VcpuError>) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            *end = Some(outcome);
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

    /// The guest reset the machine (wired to the i8042's reset line).
    pub fn guest_reset(&self) {
        self.control.finish(Ok(VmEnd::GuestReset));
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
    threads: Vec<(u32, JoinHandle<()>)>,
}

/// A no-op handler: the signal only has to interrupt KVM_RUN.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// A stop handle and exit counters, created before the devices that need them.
#[derive(Debug, Default)]
pub struct VmControl {
    control: Arc<Control>,
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

    /// Starts one thread per vCPU, each dispatching its exits to `buses`.
    pub fn start(self, vcpus: Vec<Vcpu>, buses: Buses) -> Result<RunningVm, VmError> {
        static REGISTER: Once = Once::new();
        let mut registered = Ok(());
        REGISTER.call_once(|| registered = register_signal_handler(kick_signal(), kick_handler));
        registered.map_err(VmError::SignalHandler)?;

        let mut running = RunningVm { control: self.control, threads: Vec::new() };
        for mut vcpu in vcpus {
            let index = vcpu.index();
            let control = running.control.clone();
            let buses = buses.clone();
            let thread = threads::spawn(ThreadKind::Vcpu, format!("vcpu{index}"), move || {
                if let Err(e) = vcpu.run(&buses, &control) {
                    control.finish(Err(e));
                }
            })
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

    /// Waits until the VM ends (or `timeout` passes), stops every vCPU and joins its
    /// thread. A vCPU failure is the error; the first thing that ended the VM wins.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<VmEnd, VcpuError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut end = self.control.end.lock().unwrap_or_else(|e| e.into_inner());
            while end.is_none() {
                match deadline {
                    None => end = self.control.ended.wait(end).unwrap_or_else(|e| e.into_inner()),
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            *end = Some(Ok(VmEnd::TimedOut));
                            break;
                        }
                        end = self.control.ended.wait_timeout(end, left).unwrap_or_else(|e| e.into_inner()).0;
                    }
                }
            }
        }
        self.control.stopping.store(true, Ordering::Release);
        self.join_all();
        let end = self.control.end.lock().unwrap_or_else(|e| e.into_inner()).take();
        end.unwrap_or(Ok(VmEnd::Stopped))
    }

    /// Kicks every vCPU thread out of KVM_RUN until it has seen the stop flag, then joins
    /// it. A kick can land just before a thread enters KVM_RUN, so it is repeated.
    fn join_all(&mut self) {
        self.control.stopping.store(true, Ordering::Release);
        for (index, thread) in self.threads.drain(..) {
            while !thread.is_finished() {
                if let Err(e) = thread.kill(kick_signal()) {
                    log::warn!("cannot kick vCPU {index}: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.join().is_err() {
                self.control.finish(Err(VcpuError::Panicked { vcpu: index }));
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.join_all();
    }
}
