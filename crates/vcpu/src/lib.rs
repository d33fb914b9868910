//! KVM VMs and vCPUs for splitvisor.
//!
//! * [`KvmVm`]: the VM, with in-kernel PIC/IOAPIC/local APICs and PIT.
//! * [`boot`]: x86_64 boot state: PVH (32-bit protected mode), direct long mode and the
//!   Linux boot protocol's 64-bit entry.
//! * [`loader`]: loading a kernel (PVH ELF or bzImage) and an initrd, and the boot
//!   structures that describe the machine to it (`hvm_start_info`, `boot_params`).
//! * [`acpi`]: the ACPI tables of the assembled VM (RSDP, XSDT, FADT, MADT, DSDT).
//! * [`Vcpu`] and [`VmControl`]: one thread per vCPU, each running KVM_RUN and dispatching
//!   PIO and MMIO exits to the [`Buses`]; everything else that ends a vCPU is a
//!   [`VcpuError`] naming the vCPU, the exit and RIP.
//!
//! ```no_run
//! use std::sync::Arc;
//! use splitvisor_bus::{Bus, BusKind};
//! use splitvisor_memory::GuestRam;
//! use splitvisor_vcpu::{boot::BootState, Buses, KvmVm, VmControl};
//!
//! let ram = GuestRam::new(64 << 20)?;
//! let vm = KvmVm::with_memory(&ram)?;
//! // ... load a guest, then:
//! let vcpus = vm.create_vcpus(1)?;
//! vcpus[0].configure(vm.supported_cpuid(), Some(&BootState::Pvh { entry: 0x10_0000, start_info: 0x6000 }))?;
//! let buses = Buses { pio: Arc::new(Bus::new(BusKind::Pio)), mmio: Arc::new(Bus::new(BusKind::Mmio)) };
//! let running = VmControl::new().start(vcpus, buses)?;
//! let end = running.wait(None)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod acpi;
pub mod boot;
pub mod loader;
pub mod stats;
mod vcpu;
mod vm;

use std::fmt;

pub use vcpu::{Buses, Vcpu};
pub use vm::{
    ExitCounts, IrqchipReset, KvmVm, RestartError, RunningVm, StopHandle, StoppedVm, SupportedCpuid,
    VcpuSetup, VmControl, VmEnd,
};

/// Errors creating and setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("cannot create a KVM VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A VM-wide set-up ioctl failed.
    #[error("cannot {0}: {1}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    /// Registering guest memory failed.
    #[error(transparent)]
    Memory(#[from] splitvisor_memory::Error),
    /// Zero vCPUs were asked for.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs asked for, but KVM allows at most {max}")]
    TooManyVcpus {
        /// Asked for.
        requested: u32,
        /// KVM's limit.
        max: usize,
    },
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {vcpu}: {source}")]
    CreateVcpu {
        /// The vCPU.
        vcpu: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("cannot register an irqfd for GSI {gsi}: {source}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD failed.
    #[error("cannot register an ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        /// The doorbell address.
        addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// A vCPU could not be read or set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    SpawnVcpuThread {
        /// The vCPU.
        vcpu: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The kind of a KVM_EXIT_SYSTEM_EVENT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEventKind {
    /// The guest asked for power-off (KVM_SYSTEM_EVENT_SHUTDOWN).
    Shutdown,
    /// The guest asked for a reset (KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest crashed (KVM_SYSTEM_EVENT_CRASH).
    Crash,
    /// Another event type.
    Other(u32),
}

impl From<u32> for SystemEventKind {
    fn from(kind: u32) -> Self {
        match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Self::Shutdown,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Self::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Self::Crash,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for SystemEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown => f.write_str("shutdown"),
            Self::Reset => f.write_str("reset"),
            Self::Crash => f.write_str("crash"),
            Self::Other(kind) => write!(f, "type {kind}"),
        }
    }
}

/// What ended a vCPU, and with it the VM.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Configuring the vCPU failed.
    #[error("vCPU {vcpu}: cannot {what}: {source}")]
    Setup {
        /// The vCPU.
        vcpu: u32,
        /// What was being set up.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    #[error("vCPU {vcpu}: guest shutdown (triple fault) at rip {rip:#x}")]
    Shutdown {
        /// The vCPU.
        vcpu: u32,
        /// Where.
        rip: u64,
    },
    /// KVM_EXIT_HLT: only without an in-kernel local APIC.
    #[error("vCPU {vcpu}: halted at rip {rip:#x}")]
    Hlt {
        /// The vCPU.
        vcpu: u32,
        /// Where.
        rip: u64,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    #[error("vCPU {vcpu}: system event ({kind}) at rip {rip:#x}")]
    SystemEvent {
        /// The vCPU.
        vcpu: u32,
        /// The event.
        kind: SystemEventKind,
        /// Where.
        rip: u64,
    },
    /// KVM_EXIT_INTERNAL_ERROR with KVM_INTERNAL_ERROR_EMULATION: KVM could not emulate
    /// an instruction.
    #[error("vCPU {vcpu}: emulation failure (KVM internal error) at rip {rip:#x}")]
    EmulationFailure {
        /// The vCPU.
        vcpu: u32,
        /// Where.
        rip: u64,
    },
    /// KVM_EXIT_INTERNAL_ERROR of another kind.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, at rip {rip:#x}")]
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// KVM's suberror code.
        suberror: u32,
        /// Where.
        rip: u64,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}, at rip {rip:#x}")]
    FailEntry {
        /// The vCPU.
        vcpu: u32,
        /// The hardware's reason code.
        reason: u64,
        /// Where.
        rip: u64,
    },
    /// Any other exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit, as kvm-ioctls names it.
        exit: String,
        /// Where.
        rip: u64,
    },
    /// KVM_RUN kept answering EAGAIN: the kernel could not create a thread the VM needs
    /// (KVM's huge-page recovery worker, counted against a pids cgroup or a task limit).
    #[error(
        "vCPU {vcpu}: KVM_RUN kept failing with EAGAIN for {waited:?}: the kernel cannot start a thread for the VM (is a pids limit reached?)"
    )]
    RunRefused {
        /// The vCPU.
        vcpu: u32,
        /// How long it was retried.
        waited: std::time::Duration,
    },
    /// KVM_RUN itself failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run {
        /// The vCPU.
        vcpu: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread panicked.
    #[error("vCPU {vcpu}: its thread panicked")]
    Panicked {
        /// The vCPU.
        vcpu: u32,
    },
    /// The other vCPUs did not finish their set-up (a restart's reset) in time.
    #[error("vCPU {vcpu}: the other vCPUs were not set up in time")]
    SetupTimeout {
        /// The vCPU.
        vcpu: u32,
    },
}
