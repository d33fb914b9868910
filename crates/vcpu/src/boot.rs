//! x86_64 boot state: the register values and in-memory tables a vCPU starts with.
//!
//! Two ways in:
//! * [`BootState::Pvh`]: the PVH ABI. 32-bit protected mode, paging off, flat segments,
//!   `ebx` = physical address of `hvm_start_info`. This is how the bootstrap processor of a
//!   PVH guest (our guest programs, a Linux vmlinux) starts.
//! * [`BootState::LongMode`]: 64-bit mode at an entry point, on identity-mapped page tables
//!   covering the first 4 GiB, with its own stack and one argument in `rdi`. This is how
//!   splitvisor starts application processors of guests that ask for it (see the loader).
//! * [`BootState::Linux64`]: the 64-bit entry of the Linux x86 boot protocol (a bzImage):
//!   long mode on the same identity map, `rsi` = the `boot_params` ("zero page"), and the
//!   GDT the protocol asks for ([`LINUX_BOOT_GDT`]: flat code at `__BOOT_CS` = 0x10, flat
//!   data at `__BOOT_DS` = 0x18).
//!
//! Everything here is plain data, so it is tested without KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use splitvisor_memory::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// CR0 bits.
pub mod cr0 {
    /// Protected mode.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Extension type (always 1 on modern CPUs).
    pub const ET: u64 = 1 << 4;
    /// Native FPU error reporting.
    pub const NE: u64 = 1 << 5;
    /// Supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Physical address extension (required for long mode).
    pub const PAE: u64 = 1 << 5;
    /// The OS supports FXSAVE/FXRSTOR (enables SSE).
    pub const OSFXSR: u64 = 1 << 9;
    /// The OS handles SIMD floating-point exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
}

/// EFER bits.
pub mod efer {
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
}

/// Selector of the flat code segment (64-bit in long mode, 32-bit for PVH).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task state segment.
pub const TSS_SELECTOR: u16 = 0x18;

/// Where the GDT of a [`BootState::Linux64`] vCPU lives: after the boot GDT and IDT at
/// [`layout::BOOT_GDT_START`], in the same page.
pub const LINUX_BOOT_GDT_START: u64 = 0x540;
/// `__BOOT_CS` of the Linux boot protocol: the flat 64-bit code segment.
pub const LINUX_BOOT_CODE_SELECTOR: u16 = 0x10;
/// `__BOOT_DS` of the Linux boot protocol: the flat data segment.
pub const LINUX_BOOT_DATA_SELECTOR: u16 = 0x18;
/// The task state segment of a [`BootState::Linux64`] vCPU.
pub const LINUX_BOOT_TSS_SELECTOR: u16 = 0x20;
/// The GDT the Linux boot protocol's 64-bit entry expects: null, unused, code
/// (`__BOOT_CS`), data (`__BOOT_DS`), then a TSS, which KVM needs for a valid task register.
pub const LINUX_BOOT_GDT: [u64; 5] =
    [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_0067];
/// The initial stack of a [`BootState::Linux64`] vCPU, growing down from here. The kernel
/// switches to its own stack within a few instructions, but pushes before it does.
pub const LINUX_BOOT_STACK_TOP: u64 = 0x6000;

/// Where and how a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootState {
    /// PVH: 32-bit protected mode at `entry`, `ebx` = `start_info`.
    Pvh {
        /// The `XEN_ELFNOTE_PHYS32_ENTRY` address.
        entry: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// 64-bit long mode at `entry` with `rsp` = `stack_top` and `rdi` = `arg`.
    LongMode {
        /// The 64-bit entry point.
        entry: u64,
        /// Initial stack pointer (16-byte aligned).
        stack_top: u64,
        /// First argument (the vCPU index for application processors).
        arg: u64,
    },
    /// The Linux x86 boot protocol's 64-bit entry: long mode at `entry` (a bzImage's load
    /// address + 0x200), `rsi` = `boot_params`, interrupts off, segments from
    /// [`LINUX_BOOT_GDT`], stack at [`LINUX_BOOT_STACK_TOP`].
    Linux64 {
        /// The 64-bit entry point.
        entry: u64,
        /// Guest-physical address of `struct boot_params` (the zero page).
        boot_params: u64,
    },
}

/// A flat segment as KVM wants it.
fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    let code = type_ & 0x8 != 0;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        // 64-bit code segments must have D clear; everything else here is 32-bit.
        db: u8::from(!(code && long)),
        s: 1,
        l: u8::from(code && long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn task_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0x67,
        selector,
        type_: 0xb, // busy 32/64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    }
}

impl BootState {
    /// General-purpose registers at start.
    pub fn regs(&self) -> kvm_regs {
        match *self {
            BootState::Pvh { entry, start_info } => {
                kvm_regs { rip: entry, rbx: start_info, rflags: 0x2, ..Default::default() }
            }
            BootState::LongMode { entry, stack_top, arg } => kvm_regs {
                rip: entry,
                rsp: stack_top,
                rbp: stack_top,
                rdi: arg,
                rflags: 0x2,
                ..Default::default()
            },
            BootState::Linux64 { entry, boot_params } => kvm_regs {
                rip: entry,
                rsi: boot_params,
                rsp: LINUX_BOOT_STACK_TOP,
                rflags: 0x2,
                ..Default::default()
            },
        }
    }

    /// Applies segment and control registers to `sregs` (read from KVM first, so that
    /// fields this code does not own, such as the APIC base, stay as KVM set them).
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        let long = !matches!(self, BootState::Pvh { .. });
        let (code, data, tss, gdt_base, gdt_entries) = match self {
            BootState::Linux64 { .. } => (
                LINUX_BOOT_CODE_SELECTOR,
                LINUX_BOOT_DATA_SELECTOR,
                LINUX_BOOT_TSS_SELECTOR,
                LINUX_BOOT_GDT_START,
                LINUX_BOOT_GDT.len(),
            ),
            _ => {
                (CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR, layout::BOOT_GDT_START, layout::BOOT_GDT_ENTRIES)
            }
        };
        sregs.cs = segment(code, 0xb, long);
        let data = segment(data, 0x3, long);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = task_segment(tss);
        sregs.gdt.base = gdt_base;
        sregs.gdt.limit = (gdt_entries * 8 - 1) as u16;
        sregs.idt.base = layout::BOOT_IDT_START;
        sregs.idt.limit = 7;
        match self {
            BootState::Pvh { .. } => {
                sregs.cr0 = cr0::PE | cr0::ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            BootState::LongMode { .. } | BootState::Linux64 { .. } => {
                sregs.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::AM | cr0::PG;
                sregs.cr3 = layout::BOOT_PML4_START;
                sregs.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
                sregs.efer = efer::LME | efer::LMA;
            }
        }
    }
}

/// The FPU at start: x87 default control word, SSE exceptions masked.
pub fn fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// The boot GDT: null, code (64-bit), data, TSS. Its hidden parts are what
/// [`BootState::apply_sregs`] loads; the table is there for a guest that reloads a selector.
pub const BOOT_GDT: [u64; layout::BOOT_GDT_ENTRIES] =
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_0067];

/// Errors writing boot tables.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} at {addr:#x}: {source}")]
pub struct BootTablesError {
    what: &'static str,
    addr: u64,
    #[source]
    source: vm_memory::GuestMemoryError,
}

fn write<M: GuestMemoryBackend, T: vm_memory::ByteValued>(
    mem: &M,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), BootTablesError> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| BootTablesError { what, addr, source })
}

/// Writes the GDTs, the empty IDT and identity-mapped page tables for the first 4 GiB
/// (2 MiB pages) that [`BootState::LongMode`] and [`BootState::Linux64`] vCPUs start on.
pub fn write_long_mode_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootTablesError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "GDT", layout::BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    for (i, entry) in LINUX_BOOT_GDT.iter().enumerate() {
        write(mem, "Linux boot GDT", LINUX_BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", layout::BOOT_IDT_START, 0u64)?;
    write(mem, "PML4", layout::BOOT_PML4_START, layout::BOOT_PDPT_START | 0x3)?;
    for gib in 0..4u64 {
        let pd = layout::BOOT_PD_START + gib * 0x1000;
        write(mem, "PDPT", layout::BOOT_PDPT_START + gib * 8, pd | 0x3)?;
    }
    // The four page directories are contiguous: one write, not 2048 (this is on the way
    // to the guest's first instruction).
    let mut directories = [0u8; 4 * 512 * 8];
    for (index, entry) in directories.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page; entry `index` maps `index` * 2 MiB.
        let page = ((index as u64) << 21) | 0x83;
        entry.copy_from_slice(&page.to_le_bytes());
    }
    mem.write_slice(&directories, GuestAddress(layout::BOOT_PD_START)).map_err(|source| BootTablesError {
        what: "page directories",
        addr: layout::BOOT_PD_START,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_memory::GuestRam;

    #[test]
    fn pvh_state_is_flat_32_bit_protected_mode() {
        let state = BootState::Pvh { entry: 0x10_0000, start_info: layout::PVH_INFO_START };
        let regs = state.regs();
        assert_eq!(regs.rip, 0x10_0000);
        assert_eq!(regs.rbx, layout::PVH_INFO_START);
        assert_eq!(regs.rflags, 0x2);
        let mut sregs = kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & cr0::PG, 0, "PVH starts with paging off");
        assert_eq!(sregs.cr0 & cr0::PE, cr0::PE);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.type_), (1, 0, 0xb));
        assert_eq!((sregs.ds.base, sregs.ds.limit, sregs.ds.g), (0, 0xffff_ffff, 1));
        assert_eq!(sregs.tr.type_, 0xb);
    }

    #[test]
    fn long_mode_state_has_paging_pae_and_lma() {
        let state = BootState::LongMode { entry: 0x10_00dc, stack_top: 0x9_0000, arg: 3 };
        let regs = state.regs();
        assert_eq!((regs.rip, regs.rsp, regs.rdi), (0x10_00dc, 0x9_0000, 3));
        let mut sregs = kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x8005_0033);
        assert_eq!(sregs.cr3, layout::BOOT_PML4_START);
        assert_eq!(sregs.cr4 & cr4::PAE, cr4::PAE);
        assert_eq!(sregs.efer, efer::LME | efer::LMA);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.selector), (1, 0, CODE_SELECTOR));
        assert_eq!(sregs.ss.selector, DATA_SELECTOR);
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
    }

    #[test]
    fn linux64_state_follows_the_boot_protocol() {
        // Documentation/x86/boot.rst, "64-bit Boot Protocol": long mode, paging on an
        // identity map, CS = __BOOT_CS (0x10) and DS/ES/SS = __BOOT_DS (0x18) with 4 GiB
        // flat descriptors, interrupts disabled, %rsi = boot_params.
        let state = BootState::Linux64 { entry: 0x10_0200, boot_params: 0x1000 };
        let regs = state.regs();
        assert_eq!((regs.rip, regs.rsi), (0x10_0200, 0x1000));
        assert_eq!(regs.rflags & (1 << 9), 0, "interrupts off");
        assert!(regs.rsp > 0 && regs.rsp % 16 == 0, "a usable stack for the first pushes");
        let mut sregs = kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.efer, efer::LME | efer::LMA);
        assert_eq!(sregs.cr0 & cr0::PG, cr0::PG);
        assert_eq!(sregs.cr3, layout::BOOT_PML4_START);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.type_), (0x10, 1, 0xb));
        for data in [sregs.ds, sregs.es, sregs.ss] {
            assert_eq!((data.selector, data.base, data.limit, data.g), (0x18, 0, 0xffff_ffff, 1));
        }
        assert_eq!(sregs.gdt.base, LINUX_BOOT_GDT_START);
        assert_eq!(sregs.tr.selector, LINUX_BOOT_TSS_SELECTOR);
        // The selectors name descriptors of the right kind in the GDT written for them.
        let descriptor = |selector: u16| LINUX_BOOT_GDT[usize::from(selector / 8)];
        assert_eq!(descriptor(sregs.cs.selector), BOOT_GDT[1], "64-bit code");
        assert_eq!(descriptor(sregs.ds.selector), BOOT_GDT[2], "flat data");
        assert_eq!(descriptor(sregs.tr.selector), BOOT_GDT[3], "TSS");
        assert!(usize::from(sregs.gdt.limit) + 1 >= 8 * LINUX_BOOT_GDT.len());
    }

    #[test]
    fn linux_boot_gdt_does_not_overlap_the_boot_gdt_and_idt() {
        let boot_end = layout::BOOT_IDT_START + 8;
        assert!(LINUX_BOOT_GDT_START >= boot_end);
        assert!(LINUX_BOOT_GDT_START + 8 * LINUX_BOOT_GDT.len() as u64 <= 0x1000);
    }

    #[test]
    fn fpu_enables_sse_defaults() {
        let fpu = fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        write_long_mode_tables(mem).unwrap();
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(layout::BOOT_PML4_START), layout::BOOT_PDPT_START | 3);
        // Walk a few addresses through the tables by hand.
        for addr in [0u64, 0x20_0000, 0xfee0_0000, 0xffff_ffff] {
            let pdpte = read(layout::BOOT_PDPT_START + ((addr >> 30) & 511) * 8);
            let pde = read((pdpte & !0xfff) + ((addr >> 21) & 511) * 8);
            assert_eq!(pde & 0x83, 0x83, "{addr:#x} is mapped by a present 2 MiB page");
            assert_eq!(pde & !0x1f_ffff, addr & !0x1f_ffff);
        }
        assert_eq!(read(layout::BOOT_GDT_START + 8), BOOT_GDT[1]);
        assert_eq!(read(LINUX_BOOT_GDT_START + 8 * u64::from(LINUX_BOOT_CODE_SELECTOR / 8)), BOOT_GDT[1]);
    }
}
