//! The x86_64 guest-physical address map.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   low RAM: boot structures (GDT, page tables, start info,
//!                              command line)
//! 0x0009_fc00 .. 0x0010_0000   EBDA, VGA hole, BIOS area: not RAM
//! 0x0010_0000 .. MMIO32_START  RAM: the guest program, loaded at 1 MiB
//! MMIO32_START .. IOAPIC_START 32-bit MMIO window for devices
//! IOAPIC_START .. 4 GiB        IOAPIC, local APIC, firmware hole
//! 4 GiB ..                     the rest of RAM, for guests larger than MMIO32_START
//! ```

/// Where the guest program (a PVH ELF) is loaded and where RAM resumes above the BIOS area.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the Extended BIOS Data Area: the end of usable low RAM.
pub const EBDA_START: u64 = 0x9_fc00;

/// The boot GDT for vCPUs started directly in long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// Entries in the boot GDT: null, code, data, TSS.
pub const BOOT_GDT_ENTRIES: usize = 4;
/// The (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// `hvm_start_info` for PVH boot.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Most memory map entries that fit before the page tables.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0x2000 / 24;
/// Top-level page table (PML4) of the identity map for long-mode vCPUs.
pub const BOOT_PML4_START: u64 = 0x9000;
/// The page-directory-pointer table.
pub const BOOT_PDPT_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages: the identity map covers the first 4 GiB.
pub const BOOT_PD_START: u64 = 0xb000;
/// The guest command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Most bytes of command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Stacks of application processors started in long mode, one [`AP_STACK_SIZE`] each,
/// growing down from here.
pub const AP_STACKS_TOP: u64 = EBDA_START & !0xf;
/// Bytes of stack per application processor.
pub const AP_STACK_SIZE: u64 = 0x2000;
/// Most application processors the low stack area holds.
pub const MAX_AP_STACKS: u64 = (AP_STACKS_TOP - (CMDLINE_START + CMDLINE_MAX_SIZE as u64)) / AP_STACK_SIZE;

/// Start of the 32-bit MMIO window, and so the end of low RAM.
pub const MMIO32_START: u64 = 0xc000_0000;
/// The IOAPIC's registers; the 32-bit MMIO window for devices ends here.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Bytes in the 32-bit MMIO window given to devices.
pub const MMIO32_SIZE: u64 = IOAPIC_START - MMIO32_START;
/// Where RAM resumes above the 32-bit MMIO window.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Smallest guest RAM.
pub const MIN_RAM_SIZE: u64 = 16 << 20;
/// Largest guest RAM: 1 TiB, well inside the 40 physical address bits of the oldest
/// x86_64 hosts KVM supports (a guest needs RAM plus the MMIO hole below 4 GiB).
pub const MAX_RAM_SIZE: u64 = 1 << 40;
