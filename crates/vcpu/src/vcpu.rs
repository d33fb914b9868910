//! One KVM vCPU: its configuration and its run loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvm_bindings::{
    CpuId, KVM_EXIT_IO_IN, KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use splitvisor_bus::{Bus, BusError};

use crate::boot::{self, BootState};
use crate::vm::Control;
use crate::{SystemEventKind, VcpuError};

/// Model-specific registers set at boot (the values Linux's own boot code expects).
mod msr {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MISC_ENABLE: fast string operations.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// MTRRs enabled, default type write-back.
    pub const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    pub const IA32_PAT: u32 = 0x277;
    /// The PAT's power-on value (WB, WT, UC-, UC, twice).
    pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

    /// KVM's paravirtual MSRs that make KVM write into guest memory (kvm-clock, steal
    /// time, async page faults, PV EOI) or change its behaviour (halt polling), with their
    /// power-on values. A guest that restarts must not find them armed: KVM would go on
    /// writing at the old kernel's addresses, now the new kernel's memory. (The wall-clock
    /// MSRs are left alone: writing one makes KVM write the clock at that address.)
    pub const KVM_PARAVIRT: [(u32, u64); 7] = [
        (0x12, 0),        // MSR_KVM_SYSTEM_TIME
        (0x4b56_4d01, 0), // MSR_KVM_SYSTEM_TIME_NEW
        (0x4b56_4d02, 0), // MSR_KVM_ASYNC_PF_EN
        (0x4b56_4d03, 0), // MSR_KVM_STEAL_TIME
        (0x4b56_4d04, 0), // MSR_KVM_PV_EOI_EN
        (0x4b56_4d05, 1), // MSR_KVM_POLL_CONTROL: host halt polling on
        (0x4b56_4d06, 0), // MSR_KVM_ASYNC_PF_INT
    ];
}

/// CPUID leaves and bits splitvisor changes.
mod cpuid {
    /// KVM's feature leaf (`KVM_CPUID_FEATURES`).
    pub const KVM_FEATURES: u32 = 0x4000_0001;
    /// `KVM_FEATURE_PV_SEND_IPI`: IPIs through a hypercall instead of the local APIC.
    pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
}

/// Local APIC register offsets and LVT delivery modes used at boot.
mod lapic {
    pub const LVT0: usize = 0x350;
    pub const LVT1: usize = 0x360;
    pub const DELIVERY_MODE_MASK: u32 = 0x700;
    pub const EXTINT: u32 = 0x700;
    pub const NMI: u32 = 0x400;
}

/// The PIO and MMIO buses a vCPU dispatches its exits to.
#[derive(Clone, Debug)]
pub struct Buses {
    /// I/O ports.
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// A vCPU, created by [`crate::KvmVm::create_vcpus`].
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    power_on: PowerOnState,
}

/// What KVM gave a vCPU when it created it: the state a reset returns it to, before the
/// boot state (if any) is applied.
#[derive(Clone, Debug)]
struct PowerOnState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
}

/// How long KVM_RUN may answer EAGAIN before the vCPU fails (see [`VcpuError::RunRefused`]).
const RUN_REFUSED_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// The wait between two tries meanwhile.
const RUN_REFUSED_BACKOFF: std::time::Duration = std::time::Duration::from_millis(5);

/// What the run loop does after an exit, once the borrow of the exit data has ended.
enum Step {
    Continue,
    Pio,
    Stop(fn(u32, u64) -> VcpuError),
    SystemEvent(u32),
    FailEntry(u64),
    InternalError,
    Unexpected(String),
}

impl Vcpu {
    /// Wraps a freshly created vCPU, recording its power-on state.
    pub(crate) fn new(index: u32, fd: VcpuFd) -> Result<Self, VcpuError> {
        let error = |what, source| VcpuError::Setup { vcpu: index, what, source };
        let power_on = PowerOnState {
            regs: fd.get_regs().map_err(|e| error("read the power-on registers", e))?,
            sregs: fd.get_sregs().map_err(|e| error("read the power-on segment registers", e))?,
            lapic: fd.get_lapic().map_err(|e| error("read the power-on local APIC", e))?,
            mp_state: fd.get_mp_state().map_err(|e| error("read the power-on MP state", e))?,
        };
        Ok(Self { index, fd, power_on })
    }

    /// The vCPU's index (and APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// KVM's statistics of this vCPU, if the kernel offers them.
    pub fn stats(&self) -> Option<crate::stats::VcpuStats> {
        crate::stats::VcpuStats::open(&self.fd)
    }

    /// The TSC frequency of this vCPU in kHz, as KVM reports it.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(|source| self.setup_error("read the TSC frequency", source))
    }

    fn setup_error(&self, what: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Setup { vcpu: self.index, what, source }
    }

    /// Sets CPUID ([`set_cpuid`](Self::set_cpuid)), then puts the vCPU in its power-on
    /// state with `boot` applied ([`reset`](Self::reset)). Without a `boot` state, an
    /// application processor waits for the guest's INIT/SIPI, as on real hardware.
    pub fn configure(&self, supported_cpuid: &CpuId, boot: Option<&BootState>) -> Result<(), VcpuError> {
        self.set_cpuid(supported_cpuid)?;
        self.reset(boot)
    }

    /// Gives the vCPU the CPUID KVM supports, with this vCPU's APIC ID: before its first
    /// run and before [`reset`](Self::reset), whose MSRs KVM checks against it. A VM sets
    /// it as soon as its vCPUs exist, while it waits for its driver partitions.
    ///
    /// KVM's paravirtual send-IPI (`KVM_FEATURE_PV_SEND_IPI`) is hidden from every guest:
    /// the build machines' software KVM never completes that hypercall (a Linux bootstrap
    /// processor hangs in it while starting the others), and without it a guest sends IPIs
    /// through its local APIC, which KVM's in-kernel APIC serves on any host. The cost on
    /// hardware KVM is one exit per IPI instead of one per multicast; splitvisor's own
    /// guests never use the hypercall. One path for every host keeps what CI tests what
    /// users run.
    pub fn set_cpuid(&self, supported_cpuid: &CpuId) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC ID in EBX[31:24].
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (self.index << 24),
                // x2APIC ID of the extended topology leaves.
                0xb | 0x1f => entry.edx = self.index,
                cpuid::KVM_FEATURES => entry.eax &= !cpuid::KVM_FEATURE_PV_SEND_IPI,
                _ => {}
            }
        }
        self.fd.set_cpuid2(&cpuid).map_err(|e| self.setup_error("set CPUID", e))
    }

    /// Puts the vCPU back in the state KVM created it in (registers, segments, local APIC,
    /// MP state; no pending event; the boot MSRs; KVM's paravirtual MSRs off), then, if
    /// given a `boot` state, applies it and makes the vCPU runnable. Used at the first
    /// boot and at every restart of the VM, from the vCPU's own thread at a restart.
    pub fn reset(&self, boot: Option<&BootState>) -> Result<(), VcpuError> {
        let entries = [
            (msr::IA32_SYSENTER_CS, 0),
            (msr::IA32_SYSENTER_ESP, 0),
            (msr::IA32_SYSENTER_EIP, 0),
            (msr::STAR, 0),
            (msr::CSTAR, 0),
            (msr::KERNEL_GS_BASE, 0),
            (msr::SYSCALL_MASK, 0),
            (msr::LSTAR, 0),
            (msr::IA32_TSC, 0),
            (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
            (msr::MTRR_DEF_TYPE, msr::MTRR_ENABLE_WRITEBACK),
            (msr::IA32_PAT, msr::PAT_POWER_ON),
            (msr::IA32_TSC_DEADLINE, 0),
        ]
        .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() });
        let written = self.set_msrs(&entries)?;
        if written != entries.len() {
            log::warn!("vCPU {}: KVM took {written} of {} boot MSRs", self.index, entries.len());
        }
        // KVM stops at the first MSR it does not know, and a KVM without some paravirtual
        // feature does not know its MSR (nor offers it to the guest): that one is skipped
        // and the rest written again, so a KVM that knows them all takes one call.
        let paravirt =
            msr::KVM_PARAVIRT.map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() });
        for unknown in write_known_msrs(&paravirt, |entries| self.set_msrs(entries))? {
            log::debug!("vCPU {}: KVM has no MSR {unknown:#x}", self.index);
        }

        self.fd.set_fpu(&boot::fpu()).map_err(|e| self.setup_error("set the FPU", e))?;
        // No exception, interrupt, NMI or SIPI left pending from before a restart.
        let events = kvm_vcpu_events {
            flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR,
            ..Default::default()
        };
        self.fd.set_vcpu_events(&events).map_err(|e| self.setup_error("clear pending events", e))?;

        // The local APIC as KVM created it, with LINT0 taking the 8259's ExtINT and LINT1
        // the NMI, as on a PC.
        let mut lapic = self.power_on.lapic;
        for (reg, mode) in [(lapic::LVT0, lapic::EXTINT), (lapic::LVT1, lapic::NMI)] {
            let bytes: &mut [u8] = lapic_bytes(&mut lapic.regs[reg..reg + 4]);
            let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let value = (value & !lapic::DELIVERY_MODE_MASK) | mode;
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        // The APIC base (enabled, xAPIC mode, BSP flag) before the APIC registers: KVM
        // takes the register page in the mode the base says.
        let mut sregs = self.power_on.sregs;
        if let Some(boot) = boot {
            boot.apply_sregs(&mut sregs);
        }
        self.fd.set_sregs(&sregs).map_err(|e| self.setup_error("set segment registers", e))?;
        self.fd.set_lapic(&lapic).map_err(|e| self.setup_error("set the local APIC", e))?;
        let regs = boot.map_or(self.power_on.regs, BootState::regs);
        self.fd.set_regs(&regs).map_err(|e| self.setup_error("set registers", e))?;
        // With an in-kernel local APIC, application processors wait for INIT/SIPI; a vCPU
        // given a boot state runs at once.
        let mp_state = if boot.is_some() {
            kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }
        } else {
            self.power_on.mp_state
        };
        self.fd.set_mp_state(mp_state).map_err(|e| self.setup_error("set the MP state", e))?;
        Ok(())
    }

    /// Writes `entries`; returns how many KVM took (it stops at the first it refuses).
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<usize, VcpuError> {
        let msrs = Msrs::from_entries(entries).map_err(|_| VcpuError::Setup {
            vcpu: self.index,
            what: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.fd.set_msrs(&msrs).map_err(|e| self.setup_error("set boot MSRs", e))
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|regs| regs.rip).unwrap_or(u64::MAX)
    }

    /// Runs the vCPU until the VM stops or this vCPU fails; `first_exit_served` is called
    /// when KVM_RUN first returned and what it returned was served, as the vCPU is about to
    /// enter the guest again.
    pub(crate) fn run(
        &mut self,
        buses: &Buses,
        control: &Control,
        first_exit_served: impl FnOnce(),
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut first_exit_served = Some(first_exit_served);
        let mut entered = false;
        // Since when KVM_RUN has answered EAGAIN without a break.
        let mut refused_since: Option<std::time::Instant> = None;
        while !control.stopping() {
            if entered {
                if let Some(served) = first_exit_served.take() {
                    served();
                }
            }
            entered = true;
            let result = self.fd.run();
            let step = match result {
                Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => Step::Pio,
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    control.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = buses.mmio.read(addr, data) {
                        unassigned(index, &e);
                        data.fill(0xff);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    control.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = buses.mmio.write(addr, data) {
                        unassigned(index, &e);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::Hlt) => Step::Stop(|vcpu, rip| VcpuError::Hlt { vcpu, rip }),
                Ok(VcpuExit::Shutdown) => Step::Stop(|vcpu, rip| VcpuError::Shutdown { vcpu, rip }),
                Ok(VcpuExit::InternalError) => Step::InternalError,
                Ok(VcpuExit::FailEntry(reason, _cpu)) => Step::FailEntry(reason),
                Ok(VcpuExit::SystemEvent(kind, _)) => Step::SystemEvent(kind),
                Ok(exit) => Step::Unexpected(format!("{exit:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    // Kicked by `RunningVm` (or a stray signal): look at the stop flag.
                    Step::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => {
                    // The kernel could not start a thread of the VM's (a pids limit): it
                    // may free up, so retry, spaced out and for a bounded time, not in a
                    // loop that burns a CPU for ever.
                    let refused = *refused_since.get_or_insert_with(std::time::Instant::now);
                    if refused.elapsed() >= RUN_REFUSED_LIMIT {
                        return Err(VcpuError::RunRefused { vcpu: index, waited: refused.elapsed() });
                    }
                    std::thread::sleep(RUN_REFUSED_BACKOFF);
                    continue;
                }
                Err(source) => {
                    return Err(VcpuError::Run { vcpu: index, source });
                }
            };
            refused_since = None;
            match step {
                Step::Continue => {}
                Step::Pio => {
                    control.stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                    self.dispatch_pio(&buses.pio);
                }
                Step::Stop(error) => return Err(error(index, self.rip())),
                Step::SystemEvent(kind) => {
                    return Err(VcpuError::SystemEvent {
                        vcpu: index,
                        kind: SystemEventKind::from(kind),
                        rip: self.rip(),
                    });
                }
                Step::FailEntry(reason) => {
                    return Err(VcpuError::FailEntry { vcpu: index, reason, rip: self.rip() });
                }
                Step::InternalError => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
                    // the active member of the exit union.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.rip();
                    return Err(if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        VcpuError::EmulationFailure { vcpu: index, rip }
                    } else {
                        VcpuError::InternalError { vcpu: index, suberror, rip }
                    });
                }
                Step::Unexpected(exit) => {
                    return Err(VcpuError::UnexpectedExit { vcpu: index, exit, rip: self.rip() });
                }
            }
        }
        Ok(())
    }

    /// Dispatches a port I/O exit, string I/O (`rep outsb`, `rep insw`, ...) included: KVM
    /// hands over `count` accesses of `size` bytes at once, each one a device access.
    fn dispatch_pio(&mut self, pio: &Bus) {
        let index = self.index;
        let run: &mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the active member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size).max(1);
        let len = size * io.count as usize;
        let data_offset = io.data_offset as usize;
        let base = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: KVM places the data at `data_offset` inside the kvm_run mapping.
        let start = unsafe { base.add(data_offset) };
        // SAFETY: the `count * size` data bytes from `start` lie in the kvm_run mapping,
        // which `run` borrows mutably for the duration of this function.
        let data = unsafe { std::slice::from_raw_parts_mut(start, len) };
        let port = u64::from(io.port);
        for access in data.chunks_mut(size) {
            let result = if u32::from(io.direction) == KVM_EXIT_IO_IN {
                pio.read(port, access).inspect_err(|_| access.fill(0xff))
            } else {
                pio.write(port, access)
            };
            if let Err(e) = result {
                unassigned(index, &e);
            }
        }
    }
}

/// Accesses no device takes are normal (guests probe for hardware): log them quietly.
fn unassigned(vcpu: u32, error: &BusError) {
    log::debug!("vCPU {vcpu}: {error}");
}

/// Writes `entries` with `write`, which, as KVM_SET_MSRS, takes them in order up to the
/// first it refuses and returns how many it took: the refused one is skipped and the rest
/// written again. Returns the indices refused.
fn write_known_msrs<E>(
    entries: &[kvm_msr_entry],
    mut write: impl FnMut(&[kvm_msr_entry]) -> Result<usize, E>,
) -> Result<Vec<u32>, E> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let written = write(rest)?;
        if let Some(entry) = rest.get(written) {
            refused.push(entry.index);
        }
        rest = rest.get(written + 1..).unwrap_or_default();
    }
    Ok(refused)
}

/// Views the `i8`/`c_char` LAPIC register bytes as `u8`.
fn lapic_bytes(regs: &mut [libc::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment, and every bit pattern is
    // valid for both.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_kvm_refuses_are_skipped_and_the_rest_still_written() {
        let entries: Vec<kvm_msr_entry> =
            (1..=6).map(|index| kvm_msr_entry { index, data: 0, ..Default::default() }).collect();
        let known = |index: u32| index != 2 && index != 3 && index != 6;
        let mut written = Vec::new();
        let mut calls = 0;
        let refused = write_known_msrs(&entries, |batch| {
            calls += 1;
            // As KVM_SET_MSRS: in order, up to the first unknown.
            let taken = batch.iter().take_while(|e| known(e.index)).count();
            written.extend(batch[..taken].iter().map(|e| e.index));
            Ok::<_, ()>(taken)
        })
        .unwrap();
        assert_eq!(written, [1, 4, 5]);
        assert_eq!(refused, [2, 3, 6]);
        assert_eq!(calls, 3);
        // A KVM that knows them all takes one call.
        let mut calls = 0;
        let refused = write_known_msrs(&entries, |batch| {
            calls += 1;
            Ok::<_, ()>(batch.len())
        })
        .unwrap();
        assert!(refused.is_empty());
        assert_eq!(calls, 1);
        // An error ends the writing.
        assert_eq!(write_known_msrs(&entries, |_| Err::<usize, _>("refused")), Err("refused"));
    }
}
