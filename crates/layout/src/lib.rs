//! Assembles a splitvisor VM.
//!
//! [`VmBuilder`] takes a description of the machine (guest program, memory, vCPUs, console,
//! extra devices) and resolves it into a running KVM VM: guest RAM, the in-kernel interrupt
//! controllers, the PVH boot state, the PIO and MMIO buses with the COM1 8250 and the
//! i8042, and one thread per vCPU. [`Vm::run`] runs it to the end and says how it ended.
//!
//! A [`Layout`] says where each device runs: in the hypervisor process
//! ([`Placement::InHypervisor`]) or in a sandboxed driver partition of its own
//! ([`Placement::Partition`]): [`Layout::monolithic`], [`Layout::microkernel`], or either
//! with per-device overrides (hybrid). The devices themselves never know. Disks
//! ([`DiskConfig`], `disk0`, ...) and NICs ([`NetConfig`], `net0`, ...: virtio-net on a TAP
//! the hypervisor opens, or an external vhost-user-net backend) are placed the same way.
//!
//! It also says what happens when a device's driver fails ([`FaultPolicy`]): the VM ends
//! (the only honest outcome for a driver inside the hypervisor), the device fails, or a new
//! partition takes over with the device's state and every request that was in flight, and
//! the guest never notices. One supervisor thread watches every driver (process exit,
//! backend hang-up, a watchdog on requests that stop completing); the control socket
//! ([`api`]) lists drivers and restarts, upgrades or fails them while the VM runs.
//!
//! ```no_run
//! use splitvisor_layout::{ConsoleOutput, VmBuilder};
//!
//! let guest = splitvisor_guests::find("hello").unwrap();
//! let vm = VmBuilder::new(guest.elf)
//!     .memory(128 << 20)
//!     .vcpus(2)
//!     .console(ConsoleOutput::Stdout)
//!     .build()?;
//! let report = vm.run()?;
//! assert!(report.guest_result.unwrap().passed());
//! # Ok::<(), splitvisor_layout::Error>(())
//! ```

pub mod api;
mod boot;
pub mod console;
mod device;
mod drivers;
pub mod host_signals;
mod hypervisor_sandbox;
mod lifecycle;
mod net;
mod placement;
mod vm;

pub use boot::{BootImage, OnReboot};
pub use console::{ConsoleState, ConsoleTap, SharedBuffer};
pub use device::DiskConfig;
pub use lifecycle::{
    Command, CommandError, CommandOutcome, DeviceEvent, DriverControl, DriverStatus, Fault, Health,
};
pub use net::NetConfig;
pub use placement::{DevicePlacement, DriverProgram, FaultPolicy, Layout, Placement};
pub use splitvisor_isolation::sandbox::hypervisor::{FORBIDDEN_SYSCALL_EXIT_STATUS, HypervisorSandbox};
pub use vm::{BusReport, ConsoleOutput, Vm, VmBuilder, VmReport};

use splitvisor_bus::{AllocatorError, BusError};
use splitvisor_vcpu::loader::LoaderError;
use splitvisor_vcpu::{VcpuError, VmError};

/// Errors assembling or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest memory size does not fit.
    #[error(transparent)]
    Memory(#[from] splitvisor_memory::Error),
    /// Creating or setting up the KVM VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the guest program failed.
    #[error(transparent)]
    Load(#[from] LoaderError),
    /// A kernel or initrd file cannot be used.
    #[error("{what} {path}: {why}")]
    BootFile {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The ACPI tables cannot describe the VM.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] splitvisor_vcpu::acpi::AcpiError),
    /// The VM could not be booted again after the guest rebooted.
    #[error("cannot restart the VM: {0}")]
    Restart(String),
    /// Writing the boot page tables failed.
    #[error(transparent)]
    BootTables(#[from] splitvisor_vcpu::boot::BootTablesError),
    /// A vCPU failed: the VM ended because of it.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be placed on its bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Address or interrupt allocation failed.
    #[error(transparent)]
    Allocator(#[from] AllocatorError),
    /// More vCPUs than the guest program's long-mode start supports.
    #[error(
        "{requested} vCPUs asked for, but at most {max} can be started in long mode (the guest's application processors each need a stack below 640 KiB)"
    )]
    TooManyApStacks {
        /// Asked for.
        requested: u32,
        /// Supported.
        max: u64,
    },
    /// An extra device's MMIO range is outside the MMIO window.
    #[error("MMIO range {0} is outside the 32-bit MMIO window")]
    OutsideMmioWindow(splitvisor_bus::BusRange),
    /// The console output file cannot be opened.
    #[error("cannot open the console output {path}: {source}")]
    ConsoleFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] splitvisor_devices::virtio::block::BlockError),
    /// A TAP device cannot be opened.
    #[error("{device}: {source}")]
    Tap {
        /// The device.
        device: String,
        /// What went wrong.
        #[source]
        source: splitvisor_devices::virtio::tap::TapError,
    },
    /// A device's driver partition could not be started.
    #[error("{device}: {source}")]
    Partition {
        /// The device.
        device: String,
        /// What went wrong.
        #[source]
        source: splitvisor_isolation::partition::PartitionError,
    },
    /// A vhost-user backend could not be reached or refused us.
    #[error("{device}: {source}")]
    VhostUser {
        /// The device.
        device: String,
        /// What went wrong.
        #[source]
        source: splitvisor_isolation::frontend::FrontendError,
    },
    /// A device must run in a driver partition, but no driver program was found.
    #[error(
        "{0} runs in a driver partition, but splitvisor-driver was not found (set SPLITVISOR_DRIVER or build it: cargo build --release --bin splitvisor-driver)"
    )]
    NoDriverProgram(String),
    /// Creating an eventfd (or another small kernel object) failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A thread of the VM could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An fd a device hands on (to a partition, to a watcher) could not be duplicated.
    #[error("{device}: cannot duplicate the fd of its {what}: {source}")]
    DuplicateFd {
        /// The device.
        device: String,
        /// What the fd is: `image`, `TAP`, `vhost-user connection`.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Two disks of the VM name the same image (one file, whatever the paths), and one of
    /// them may write it.
    #[error(
        "{second} names the same image as {first} ({path}): a VM can write an image through one disk only"
    )]
    SameImageTwice {
        /// The disk given first.
        first: String,
        /// The disk given later.
        second: String,
        /// The later disk's path.
        path: std::path::PathBuf,
    },
    /// A placement, fault policy or fault names a device the VM does not have.
    #[error("unknown device '{name}' (devices: {known})")]
    UnknownDevice {
        /// The name given.
        name: String,
        /// The VM's devices.
        known: String,
    },
    /// A restart policy for a device whose driver runs in the hypervisor.
    #[error(
        "{0} runs in the hypervisor: its driver cannot be restarted (give it a partition, or the policy halt or fail)"
    )]
    RestartInHypervisor(String),
    /// A policy other than halt for a plain device (COM1, the i8042) in the hypervisor,
    /// where its emulation runs on the vCPU threads.
    #[error(
        "{0} runs in the hypervisor, where a fault in its emulation ends the VM: only the policy halt applies (give it a partition for restart or fail)"
    )]
    PolicyInHypervisor(String),
    /// A fault to inject is not one.
    #[error("fault injection: {0}")]
    Fault(String),
    /// The host's stop signals cannot be blocked or watched.
    #[error("cannot watch the host's stop signals (SIGINT, SIGTERM, SIGHUP): {0}")]
    HostSignals(#[source] std::io::Error),
    /// The supervisor thread could not be started.
    #[error("cannot start the driver supervisor: {0}")]
    Supervisor(#[source] std::io::Error),
    /// The hypervisor could not sandbox itself (seccomp filters, the jail).
    #[error(transparent)]
    HypervisorSandbox(#[from] splitvisor_isolation::sandbox::hypervisor::HypervisorSandboxError),
    /// The control socket cannot be served.
    #[error("control socket {path}: {why}")]
    ApiSocket {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl Error {
    /// Names `device` in its partition's start error.
    pub(crate) fn partition(
        device: &str,
    ) -> impl FnOnce(splitvisor_isolation::partition::PartitionError) -> Self {
        move |source| Self::Partition { device: device.to_string(), source }
    }
}
