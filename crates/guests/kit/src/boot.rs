//! The first instructions: the PVH 32-bit entry, the switch to long mode, and the 64-bit
//! entry for application processors started by splitvisor.
//!
//! PVH (Xen's "HVM direct boot" ABI, also spoken by QEMU, Firecracker and Cloud Hypervisor)
//! enters at the address in the `XEN_ELFNOTE_PHYS32_ENTRY` note in 32-bit protected mode,
//! paging off, flat segments, with `ebx` holding the physical address of `hvm_start_info`.
//! The GDT is undefined, so the first thing to do before touching a segment register is to
//! load ours.
//!
//! The note names `__pvh_entry`, which the link script makes `pvh_start32` unless the program
//! defines its own (the `marker` program writes a byte to COM1 before anything else, then
//! jumps to `pvh_start32` with `ebx` untouched).

use core::arch::global_asm;

/// Address of `hvm_start_info`, stored by the 32-bit entry (kept out of .bss, which the
/// entry zeroes).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data")]
pub static mut PVH_START_INFO: u32 = 0;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long __pvh_entry           /* pvh_start32, unless the program has its own (guest.ld) */
    .balign 4

    /* splitvisor's own note: a 64-bit entry for application processors that the */
    /* hypervisor starts directly in long mode (rdi = vCPU index, rsp = its stack).  */
    .section .note.splitvisor, "a", @note
    .balign 4
    .long 11
    .long 8
    .long 0x53560001            /* SPLITVISOR_ELFNOTE_AP_ENTRY64 */
    .asciz "Splitvisor"
    .balign 4
    .quad ap_entry64
    .balign 4

    .section .text.pvh, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    /* Zero .bss (the page tables and stacks live there). */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd
    mov dword ptr [PVH_START_INFO], ebx
    /* PVH gives no stack: use ours (the far return below needs one). */
    mov esp, offset BOOT_STACK + {boot_stack_size}

    /* Identity map the first GiB (RAM) and the last GiB below 4 GiB (the 32-bit MMIO */
    /* window, IOAPIC, local APIC; uncached) with 2 MiB pages. The user bit is set on */
    /* RAM for later ring-3 code. */
    mov eax, offset BOOT_PDPT
    or eax, 0x7
    mov dword ptr [BOOT_PML4], eax
    mov eax, offset BOOT_PD_LOW
    or eax, 0x7
    mov dword ptr [BOOT_PDPT], eax
    mov eax, offset BOOT_PD_HIGH
    or eax, 0x7
    mov dword ptr [BOOT_PDPT + 24], eax
    mov edi, offset BOOT_PD_LOW
    mov eax, 0x87
    mov ecx, 512
.Lfill_pd:
    mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz .Lfill_pd
    mov edi, offset BOOT_PD_HIGH
    mov eax, 0xc0000000 | 0x9b
    mov ecx, 512
.Lfill_pd_high:
    mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz .Lfill_pd_high

    /* Long mode: PAE (+ OSFXSR/OSXMMEXCPT for user-mode SSE), EFER.LME, then paging. */
    mov eax, offset BOOT_PML4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb
    or eax, 0x80010023
    mov cr0, eax
    lgdt [BOOT_GDT_PTR]
    push 0x08
    mov eax, offset pvh_long_mode
    push eax
    retf

    .code64
pvh_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + BOOT_STACK + {boot_stack_size}]
    xor edi, edi
    call guest_bsp_main
    ud2

    .global ap_entry64
ap_entry64:
    cli
    cld
    call guest_ap_main
    ud2

    .section .rodata
    .balign 16
BOOT_GDT:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
BOOT_GDT_PTR:
    .word 23
    .long BOOT_GDT

    .section .bss
    .balign 4096
BOOT_PML4:
    .zero 4096
    .global BOOT_PDPT
BOOT_PDPT:
    .zero 4096
BOOT_PD_LOW:
    .zero 4096
BOOT_PD_HIGH:
    .zero 4096
    /* Not zeroed (guest.ld): a stack needs no initial value. */
    .section .bss.noinit, "aw", @nobits
    .balign 16
    .global BOOT_STACK
BOOT_STACK:
    .skip {boot_stack_size}
    .global BOOT_PML4
    .text
"#,
    boot_stack_size = const BOOT_STACK_SIZE,
);

/// Stack of the bootstrap processor.
const BOOT_STACK_SIZE: usize = 64 * 1024;

unsafe extern "C" {
    static BOOT_PML4: u8;
    static BOOT_PDPT: u8;
}

/// Physical address of the page tables the 32-bit entry built (application processors
/// switch to them from the hypervisor's).
pub fn boot_page_table() -> u64 {
    &raw const BOOT_PML4 as u64
}

/// Physical address of the page-directory-pointer table for the low 512 GiB: entry 0 maps
/// RAM (the first GiB), entry 3 the last GiB below 4 GiB; the others are free.
pub fn boot_pdpt() -> u64 {
    &raw const BOOT_PDPT as u64
}
