//! Time: the TSC, converted to nanoseconds with kvm-clock's scale when the VMM offers it.

use core::arch::x86_64::__cpuid;

/// CPUID leaf with the hypervisor signature.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf with the KVM paravirtual features.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Feature bit: the "new" kvm-clock MSRs.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// MSR that takes the physical address of this CPU's pvclock structure.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

#[repr(C, align(32))]
struct PvclockTime {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvclockTime = PvclockTime {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// Converts TSC ticks to nanoseconds.
#[derive(Clone, Copy)]
pub struct TscScale {
    mul: u32,
    shift: i8,
}

impl TscScale {
    /// Nanoseconds in `ticks` TSC ticks.
    pub fn ns(&self, ticks: u64) -> u64 {
        let shifted = if self.shift >= 0 { ticks << self.shift } else { ticks >> -self.shift };
        ((u128::from(shifted) * u128::from(self.mul)) >> 32) as u64
    }

    /// TSC ticks in `ns` nanoseconds (the inverse of [`Self::ns`], rounded down).
    pub fn ticks(&self, ns: u64) -> u64 {
        let shifted = ((u128::from(ns) << 32) / u128::from(self.mul.max(1))) as u64;
        if self.shift >= 0 { shifted >> self.shift } else { shifted << -self.shift }
    }
}

/// TSC ticks in `ns` nanoseconds with kvm-clock's scale; without it, ticks of a TSC of up
/// to 4 GHz (so at least `ns` on any TSC up to that, at most 4x longer on a slow one).
pub fn ticks_in(scale: Option<TscScale>, ns: u64) -> u64 {
    scale.map_or(ns.saturating_mul(4), |scale| scale.ticks(ns))
}

/// kvm-clock's TSC scale, if the VMM offers kvm-clock.
pub fn kvm_clock_scale() -> Option<TscScale> {
    let signature = __cpuid(KVM_CPUID_SIGNATURE);
    let kvm = signature.ebx == 0x4b4d_564b && signature.ecx == 0x564b_4d56 && signature.edx == 0x4d;
    if !kvm || __cpuid(KVM_CPUID_FEATURES).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let addr = (&raw const PVCLOCK) as u64;
    // SAFETY: the MSR takes the physical (identity-mapped) address of a 32-byte aligned
    // pvclock structure, with bit 0 enabling updates.
    unsafe { crate::cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr | 1) };
    // SAFETY: KVM has filled the structure; read its fields once (an odd version means an
    // update is in progress, retried).
    unsafe {
        let clock = &raw const PVCLOCK;
        for _ in 0..1000 {
            let version = core::ptr::read_volatile(&raw const (*clock).version);
            let mul = core::ptr::read_volatile(&raw const (*clock).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*clock).tsc_shift);
            if version & 1 == 0 && version == core::ptr::read_volatile(&raw const (*clock).version) && mul != 0 {
                return Some(TscScale { mul, shift });
            }
        }
    }
    None
}
