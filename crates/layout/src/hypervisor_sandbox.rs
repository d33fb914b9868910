//! The hypervisor's own sandbox as a VM uses it (see
//! [`splitvisor_isolation::sandbox::hypervisor`] for the filters and the jail): when each
//! step happens while a VM is built and run.
//!
//! * [`VmBuilder::build`](crate::VmBuilder::build), first thing: the filters are compiled
//!   and the thread hook registered ([`before_build`]), so every thread started from then
//!   on (the partition spawner included) installs its kind's filter;
//! * at the end of `build`, with everything open (KVM, guest memory, images, the control
//!   socket bound, partitions started): the jail, if asked for ([`after_build`]);
//! * [`Vm::run`](crate::Vm::run): the launcher before the vCPUs (a vCPU activating a
//!   virtio device asks for its worker thread), and the main thread's own filter once
//!   every thread it starts itself runs ([`main_thread`]).

use splitvisor_bus::threads::{self, ThreadKind};
use splitvisor_isolation::sandbox::hypervisor::{self, HypervisorSandbox, HypervisorSandboxError};

/// Before anything of the VM exists.
pub(crate) fn before_build(sandbox: &HypervisorSandbox) -> Result<(), HypervisorSandboxError> {
    if sandbox.seccomp_enabled() {
        hypervisor::enable()?;
    }
    Ok(())
}

/// Once everything the VM needs is open; `partitions`: whether it has any (the spawner is
/// then started, if it is not already, outside the jail).
pub(crate) fn after_build(
    sandbox: &HypervisorSandbox,
    partitions: bool,
) -> Result<(), HypervisorSandboxError> {
    if sandbox.jail_enabled() {
        if partitions {
            splitvisor_isolation::partition::start_spawner()
                .map_err(|source| HypervisorSandboxError::Thread {
                    what: "start the partition spawner thread",
                    source,
                })?
                .make();
        }
        hypervisor::enter_jail()?;
    }
    Ok(())
}

/// The launcher's queue, opened before any thread that may ask for a thread runs (`None`
/// without seccomp: every thread then starts its own).
pub(crate) fn open_launcher(
    sandbox: &HypervisorSandbox,
) -> Result<Option<threads::LauncherQueue>, HypervisorSandboxError> {
    if !sandbox.seccomp_enabled() {
        return Ok(None);
    }
    threads::open_launcher()
        .map_err(|source| HypervisorSandboxError::Thread { what: "open the thread launcher's queue", source })
}

/// The launcher's thread, which serves the queue [`open_launcher`] opened.
pub(crate) fn start_launcher(queue: Option<threads::LauncherQueue>) -> Result<(), HypervisorSandboxError> {
    queue.map_or(Ok(()), |queue| {
        queue
            .start()
            .map_err(|source| HypervisorSandboxError::Thread { what: "start the thread launcher", source })
    })
}

/// The calling (main) thread's own filter.
pub(crate) fn main_thread(sandbox: &HypervisorSandbox) -> Result<(), HypervisorSandboxError> {
    if sandbox.seccomp_enabled() {
        threads::enter(ThreadKind::Main)
            .map_err(|source| HypervisorSandboxError::Thread { what: "filter the main thread", source })?;
    }
    Ok(())
}

/// Test hook: an MMIO register whose read makes the reading thread (a vCPU) call
/// `socket()`, which no vCPU filter allows: the sandbox must end the process with its
/// report. Placed at the address in `SPLITVISOR_TEST_FORBIDDEN_MMIO` (hex), for the
/// `exit-bench` guest (`exit_bench.mmio=ADDR`). Only with the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub(crate) mod forbidden_call {
    use std::sync::{Arc, Mutex};

    use splitvisor_bus::{BusDevice, BusRange, SharedDevice};

    /// The environment variable naming the register's address.
    pub(crate) const VARIABLE: &str = "SPLITVISOR_TEST_FORBIDDEN_MMIO";

    struct ForbiddenCall;

    impl BusDevice for ForbiddenCall {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            // SAFETY: socket() takes plain integers; a sandboxed vCPU never returns from it.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            if fd >= 0 {
                // SAFETY: the fd was just created and is closed once.
                unsafe { libc::close(fd) };
            }
            data.fill(0);
        }

        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// The register's range and device, if the variable asks for one.
    pub(crate) fn device() -> Option<(BusRange, SharedDevice)> {
        let text = std::env::var(VARIABLE).ok()?;
        let addr = u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()?;
        let range = BusRange::new(addr, 4).ok()?;
        let device: SharedDevice = Arc::new(Mutex::new(ForbiddenCall));
        Some((range, device))
    }
}
