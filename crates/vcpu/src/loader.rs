//! Loading a guest kernel and telling it about the machine.
//!
//! Two kernel formats, recognised by [`load_kernel`]:
//! * a **PVH ELF** (a Linux `vmlinux`, splitvisor's own guest programs): loaded at its
//!   physical addresses, started at its `XEN_ELFNOTE_PHYS32_ENTRY` in 32-bit protected mode
//!   with `hvm_start_info` ([`write_pvh_boot_info`]: command line, memory map, an initrd as
//!   its one module, the ACPI RSDP);
//! * a **bzImage** (the Linux x86 boot protocol, 2.12 or later): its protected-mode part
//!   loaded at `code32_start` (1 MiB), started at the 64-bit entry 0x200 bytes in, with a
//!   `boot_params` zero page ([`write_boot_params`]: the kernel's own setup header, the
//!   e820 map, command line, ramdisk fields, the ACPI RSDP).
//!
//! An initrd ([`load_initrd`]) goes at the top of low RAM, below what the kernel can reach
//! (`initrd_addr_max` for a bzImage, 4 GiB for PVH) and above the kernel's footprint.
//!
//! ```
//! use splitvisor_memory::GuestRam;
//! use splitvisor_vcpu::loader::{self, BootConfig};
//! # fn kernel_image() -> Vec<u8> { Vec::new() }
//!
//! let ram = GuestRam::new(256 << 20)?;
//! let low_ram_end = ram.regions()[0].size;
//! # let image = kernel_image();
//! # if image.is_empty() { return Ok(()); }
//! let kernel = loader::load_kernel(ram.memory(), &image, low_ram_end)?;
//! let initrd = loader::load_initrd(ram.memory(), &kernel, b"070701...", low_ram_end)?;
//! let e820 = ram.e820();
//! let config = BootConfig { cmdline: "console=ttyS0", e820: &e820, initrd: Some(initrd), rsdp: None };
//! let bsp = kernel.write_boot_info(ram.memory(), &config)?; // the BSP's BootState
//! # let _ = bsp;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use splitvisor_memory::{E820Entry, layout};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot::BootState;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Name of splitvisor's own ELF notes.
pub const SPLITVISOR_NOTE_NAME: &[u8] = b"Splitvisor\0";
/// Note type: the 64-bit entry for application processors started in long mode (an u64).
pub const SPLITVISOR_ELFNOTE_AP_ENTRY64: u32 = 0x5356_0001;

/// Where the PVH module list (the initrd) goes: in the page of `hvm_start_info`
/// ([`layout::PVH_INFO_START`]), after it.
pub const PVH_MODLIST_START: u64 = layout::PVH_INFO_START + 0x800;
/// Where a bzImage's `boot_params` (the zero page, 4 KiB) goes: free low RAM between the
/// boot GDT/IDT page and `hvm_start_info`, clear of the boot stack below
/// [`crate::boot::LINUX_BOOT_STACK_TOP`].
pub const BOOT_PARAMS_START: u64 = 0x1000;

/// Boot protocol constants (Documentation/arch/x86/boot.rst).
pub mod bzimage {
    /// `HdrS`, the setup header's magic at offset 0x202.
    pub const HEADER_MAGIC: u32 = 0x5372_6448;
    /// Offset of the setup header in the image and in `boot_params`.
    pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
    /// Oldest protocol with a 64-bit entry point (`xloadflags`): 2.12.
    pub const MIN_VERSION: u16 = 0x020c;
    /// `loadflags`: the protected-mode code is loaded at 0x100000.
    pub const LOADED_HIGH: u8 = 1 << 0;
    /// `loadflags`: `heap_end_ptr` is valid.
    pub const CAN_USE_HEAP: u8 = 1 << 7;
    /// `xloadflags`: the kernel has the 64-bit entry at load address + 0x200.
    pub const XLF_KERNEL_64: u16 = 1 << 0;
    /// Offset of the 64-bit entry from the load address.
    pub const ENTRY64_OFFSET: u64 = 0x200;
    /// `type_of_loader`: a boot loader without an assigned ID.
    pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
    /// `vid_mode`: "normal" (no mode change; the 64-bit entry skips video set-up anyway).
    pub const VID_MODE_NORMAL: u16 = 0xffff;
    /// Entries in `boot_params.e820_table`.
    pub const E820_MAX_ENTRIES: usize = 128;
    /// Sector size of the real-mode setup code.
    pub const SECTOR_SIZE: u64 = 512;
}

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image starts with neither an ELF header nor a bzImage setup header.
    #[error("the kernel is neither a PVH ELF nor a bzImage (it starts with {magic:02x?})")]
    NotAKernel {
        /// Its first bytes (at most four).
        magic: Vec<u8>,
    },
    /// The image is shorter than its own headers say.
    #[error("the {format} kernel is truncated: {len} bytes, but its headers need {needed}")]
    Truncated {
        /// `ELF` or `bzImage`.
        format: &'static str,
        /// Bytes given.
        len: usize,
        /// Bytes the headers describe.
        needed: u64,
    },
    /// linux-loader refused the image.
    #[error("cannot load the guest ELF: {0}")]
    Elf(#[source] linux_loader::loader::Error),
    /// The ELF has no `XEN_ELFNOTE_PHYS32_ENTRY` note.
    #[error("the guest ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): {0}")]
    NotPvh(PvhBootCapability),
    /// A bzImage this loader cannot start.
    #[error("unsupported bzImage (boot protocol {major}.{minor:02}): {reason}", major = version >> 8, minor = version & 0xff)]
    UnsupportedBzImage {
        /// The boot protocol version in its setup header.
        version: u16,
        /// What is missing.
        reason: &'static str,
    },
    /// linux-loader could not copy the bzImage.
    #[error("cannot load the bzImage: {0}")]
    BzImage(#[source] linux_loader::loader::Error),
    /// The image extends past the end of low RAM.
    #[error("the guest image ends at {end:#x}, past the end of low RAM at {ram_end:#x}")]
    TooLarge {
        /// End of the loaded image.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is longer than the kernel (or the command line area) takes.
    #[error("the command line is {len} bytes long; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line has invalid characters.
    #[error("invalid guest command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the guest command line: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Too many memory map entries for `hvm_start_info`.
    #[error("{0} memory map entries do not fit the PVH memory map area")]
    MemmapTooLarge(usize),
    /// Too many memory map entries for `boot_params`.
    #[error("{entries} memory map entries do not fit boot_params, which holds {max}")]
    E820TooLarge {
        /// Entries given.
        entries: usize,
        /// What `boot_params.e820_table` holds.
        max: usize,
    },
    /// Writing `hvm_start_info` failed.
    #[error("cannot write hvm_start_info: {0}")]
    StartInfo(#[source] linux_loader::configurator::Error),
    /// Writing `boot_params` failed.
    #[error("cannot write boot_params: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The initrd is empty.
    #[error("the initrd is empty")]
    InitrdEmpty,
    /// The initrd does not fit between the kernel and the highest address it may use.
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM: {room} bytes free between the kernel's end at {lowest:#x} and {highest:#x}"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Bytes available.
        room: u64,
        /// The lowest address it may take (the kernel's end).
        lowest: u64,
        /// One past the highest address it may take.
        highest: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot write the initrd at {addr:#x}: {source}")]
    WriteInitrd {
        /// Where.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What loading a guest ELF found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedGuest {
    /// The PVH 32-bit entry of the bootstrap processor.
    pub pvh_entry: u64,
    /// The 64-bit entry for application processors, if the guest asks to have them
    /// started in long mode. Without it, they wait for INIT/SIPI from the guest, as a
    /// Linux vmlinux expects.
    pub ap_entry: Option<u64>,
    /// First byte after the loaded image.
    pub end: u64,
}

/// What loading a bzImage found: where it went and the setup header fields that matter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedBzImage {
    /// The setup header as the image carries it (the base of `boot_params.hdr`).
    pub header: setup_header,
    /// Where the protected-mode kernel was loaded (`code32_start`).
    pub load_addr: u64,
    /// The 64-bit entry point: `load_addr` + 0x200.
    pub entry64: u64,
    /// First byte after the memory the kernel needs before it reads its memory map (the
    /// loaded image, and `init_size` bytes from where it decompresses itself).
    pub end: u64,
}

impl LoadedBzImage {
    /// The boot protocol version (0x020f is 2.15).
    pub fn version(&self) -> u16 {
        self.header.version
    }

    /// Most bytes of command line the kernel reads, NUL excluded (`cmdline_size`).
    pub fn cmdline_max(&self) -> usize {
        let declared = self.header.cmdline_size as usize;
        declared.min(layout::CMDLINE_MAX_SIZE - 1)
    }

    /// Highest address the initrd may occupy (`initrd_addr_max`).
    pub fn initrd_addr_max(&self) -> u64 {
        u64::from(self.header.initrd_addr_max)
    }
}

/// A kernel loaded into guest memory, in either format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadedKernel {
    /// A PVH ELF.
    Pvh(LoadedGuest),
    /// A bzImage.
    BzImage(LoadedBzImage),
}

/// Highest address + 1 a PVH kernel can take an initrd at: Linux copies the module's
/// address into the 32-bit `ramdisk_image`.
const PVH_INITRD_LIMIT: u64 = 1 << 32;

impl LoadedKernel {
    /// First byte after the kernel's memory footprint at boot.
    pub fn end(&self) -> u64 {
        match self {
            Self::Pvh(guest) => guest.end,
            Self::BzImage(image) => image.end,
        }
    }

    /// The 64-bit entry for application processors, for guests that ask to have them
    /// started in long mode (splitvisor's own programs). Linux starts them itself.
    pub fn ap_entry(&self) -> Option<u64> {
        match self {
            Self::Pvh(guest) => guest.ap_entry,
            Self::BzImage(_) => None,
        }
    }

    /// Most bytes of command line the kernel takes, NUL excluded.
    pub fn cmdline_max(&self) -> usize {
        match self {
            Self::Pvh(_) => layout::CMDLINE_MAX_SIZE - 1,
            Self::BzImage(image) => image.cmdline_max(),
        }
    }

    /// One past the highest address an initrd may occupy.
    pub fn initrd_limit(&self) -> u64 {
        match self {
            Self::Pvh(_) => PVH_INITRD_LIMIT,
            Self::BzImage(image) => image.initrd_addr_max().saturating_add(1),
        }
    }

    /// Writes the command line and the boot structures of the kernel's format; returns
    /// the state the bootstrap processor starts in.
    pub fn write_boot_info<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        config: &BootConfig<'_>,
    ) -> Result<BootState, LoaderError> {
        match self {
            Self::Pvh(guest) => {
                let start_info = write_pvh_boot_info(mem, config)?;
                Ok(BootState::Pvh { entry: guest.pvh_entry, start_info })
            }
            Self::BzImage(image) => {
                let boot_params = write_boot_params(mem, image, config)?;
                Ok(BootState::Linux64 { entry: image.entry64, boot_params })
            }
        }
    }
}

/// What the kernel is told at boot besides its image.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// The command line.
    pub cmdline: &'a str,
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// The initrd, if one was loaded ([`load_initrd`]).
    pub initrd: Option<LoadedInitrd>,
    /// Guest-physical address of the ACPI RSDP, if the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// An initrd in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical address (page aligned).
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// The formats [`load_kernel`] recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF (to be started at its PVH entry).
    Elf,
    /// A bzImage.
    BzImage,
}

/// Recognises the format of a kernel image and checks that it is as long as its headers
/// say.
pub fn kernel_format(image: &[u8]) -> Result<KernelFormat, LoaderError> {
    if image.starts_with(b"\x7fELF") {
        let needed = elf_extent(image);
        if needed > image.len() as u64 {
            return Err(LoaderError::Truncated { format: "ELF", len: image.len(), needed });
        }
        return Ok(KernelFormat::Elf);
    }
    if read_u32(image, 0x202) == Some(bzimage::HEADER_MAGIC) {
        let needed = bzimage_extent(image);
        if needed > image.len() as u64 {
            return Err(LoaderError::Truncated { format: "bzImage", len: image.len(), needed });
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::NotAKernel { magic: image.iter().take(4).copied().collect() })
}

/// Bytes an ELF64's headers say it has: the program headers and every segment's file
/// contents. Unreadable fields count as needing one byte more than the image has.
fn elf_extent(elf: &[u8]) -> u64 {
    const EHDR_SIZE: u64 = 64;
    const PHDR_SIZE: u64 = 56;
    const PT_LOAD: u32 = 1;
    let past_end = elf.len() as u64 + 1;
    let (Some(phoff), Some(phnum)) = (read_u64(elf, 0x20), elf.get(0x38..0x3a)) else {
        return past_end.max(EHDR_SIZE);
    };
    let phnum = u64::from(u16::from_le_bytes([phnum[0], phnum[1]]));
    let mut needed = phoff.saturating_add(phnum.saturating_mul(PHDR_SIZE)).max(EHDR_SIZE);
    for i in 0..phnum {
        let Some(phdr) = usize::try_from(phoff.saturating_add(i * PHDR_SIZE)).ok() else {
            return needed.max(past_end);
        };
        let (Some(kind), Some(offset), Some(filesz)) = (
            read_u32(elf, phdr),
            read_u64(elf, phdr.saturating_add(8)),
            read_u64(elf, phdr.saturating_add(32)),
        ) else {
            return needed.max(past_end);
        };
        if kind == PT_LOAD {
            needed = needed.max(offset.saturating_add(filesz));
        }
    }
    needed
}

/// Bytes a bzImage's setup header says it has: the real-mode setup sectors and the
/// protected-mode kernel (`syssize` 16-byte paragraphs).
fn bzimage_extent(image: &[u8]) -> u64 {
    let syssize = read_u32(image, 0x1f4).map_or(u64::MAX, u64::from);
    bzimage_setup_size(image).saturating_add(syssize.saturating_mul(16))
}

/// Bytes of real-mode setup code at the start of a bzImage, boot sector included.
fn bzimage_setup_size(image: &[u8]) -> u64 {
    let setup_sects = image.get(bzimage::SETUP_HEADER_OFFSET).copied().unwrap_or(0);
    // 0 means 4, for compatibility with very old images.
    let setup_sects = if setup_sects == 0 { 4 } else { u64::from(setup_sects) };
    (setup_sects + 1) * bzimage::SECTOR_SIZE
}

/// Loads a PVH ELF or a bzImage; see [`kernel_format`].
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
    low_ram_end: u64,
) -> Result<LoadedKernel, LoaderError> {
    match kernel_format(image)? {
        KernelFormat::Elf => load_pvh_elf(mem, image, low_ram_end).map(LoadedKernel::Pvh),
        KernelFormat::BzImage => load_bzimage(mem, image, low_ram_end).map(LoadedKernel::BzImage),
    }
}

/// Loads a PVH ELF at its physical addresses.
pub fn load_pvh_elf<M: GuestMemoryBackend>(
    mem: &M,
    elf: &[u8],
    low_ram_end: u64,
) -> Result<LoadedGuest, LoaderError> {
    let result = Elf::load(mem, None, &mut Cursor::new(elf), Some(GuestAddress(layout::HIMEM_START)))
        .map_err(LoaderError::Elf)?;
    let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
        return Err(LoaderError::NotPvh(result.pvh_boot_cap));
    };
    if result.kernel_end > low_ram_end {
        return Err(LoaderError::TooLarge { end: result.kernel_end, ram_end: low_ram_end });
    }
    Ok(LoadedGuest {
        pvh_entry: entry.0,
        ap_entry: find_note_u64(elf, SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64),
        end: result.kernel_end,
    })
}

/// The setup header of a bzImage, checked for what this loader needs: boot protocol 2.12
/// or later, loaded high, with a 64-bit entry.
pub fn bzimage_header(image: &[u8]) -> Result<setup_header, LoaderError> {
    if kernel_format(image)? != KernelFormat::BzImage {
        return Err(LoaderError::NotAKernel { magic: image.iter().take(4).copied().collect() });
    }
    let size = std::mem::size_of::<setup_header>();
    let mut header = setup_header::default();
    let bytes = image.get(bzimage::SETUP_HEADER_OFFSET..bzimage::SETUP_HEADER_OFFSET + size).ok_or(
        LoaderError::Truncated {
            format: "bzImage",
            len: image.len(),
            needed: (bzimage::SETUP_HEADER_OFFSET + size) as u64,
        },
    )?;
    header.as_mut_slice().copy_from_slice(bytes);
    let version = header.version;
    let unsupported = |reason| Err(LoaderError::UnsupportedBzImage { version, reason });
    if version < bzimage::MIN_VERSION {
        return unsupported("boot protocol 2.12 or later is needed for the 64-bit entry");
    }
    if header.loadflags & bzimage::LOADED_HIGH == 0 {
        return unsupported("it must be loaded low (a zImage)");
    }
    if header.xloadflags & bzimage::XLF_KERNEL_64 == 0 {
        return unsupported("it has no 64-bit entry point (XLF_KERNEL_64)");
    }
    Ok(header)
}

/// Loads a bzImage's protected-mode kernel at its `code32_start`.
pub fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
    low_ram_end: u64,
) -> Result<LoadedBzImage, LoaderError> {
    let header = bzimage_header(image)?;
    let load_addr = u64::from(header.code32_start);
    // linux-loader copies everything after the setup code.
    let image_end = load_addr.saturating_add((image.len() as u64).saturating_sub(bzimage_setup_size(image)));
    // Where the kernel decompresses itself and then runs: its preferred address unless it
    // is relocatable, then wherever it was loaded, aligned.
    let runtime_start = if header.relocatable_kernel != 0 {
        let align = u64::from(header.kernel_alignment).max(1);
        load_addr.div_ceil(align).saturating_mul(align)
    } else {
        header.pref_address
    };
    let end = image_end.max(runtime_start.saturating_add(u64::from(header.init_size)));
    if end > low_ram_end {
        return Err(LoaderError::TooLarge { end, ram_end: low_ram_end });
    }
    let result = BzImage::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(layout::HIMEM_START)))
        .map_err(LoaderError::BzImage)?;
    Ok(LoadedBzImage {
        header,
        load_addr: result.kernel_load.0,
        entry64: result.kernel_load.0 + bzimage::ENTRY64_OFFSET,
        end,
    })
}

/// Copies an initrd to the top of low RAM below what `kernel` can reach, page aligned and
/// above the kernel.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    initrd: &[u8],
    low_ram_end: u64,
) -> Result<LoadedInitrd, LoaderError> {
    const PAGE: u64 = 4096;
    if initrd.is_empty() {
        return Err(LoaderError::InitrdEmpty);
    }
    let size = initrd.len() as u64;
    let lowest = kernel.end().div_ceil(PAGE).saturating_mul(PAGE);
    let highest = low_ram_end.min(kernel.initrd_limit());
    let room = highest.saturating_sub(lowest);
    if size > room || (highest - size) & !(PAGE - 1) < lowest {
        return Err(LoaderError::InitrdTooLarge { size, room, lowest, highest });
    }
    let addr = (highest - size) & !(PAGE - 1);
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|source| LoaderError::WriteInitrd { addr, source })?;
    Ok(LoadedInitrd { addr, size })
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Finds an ELF note with `name` (NUL included) and `kind` whose descriptor is an u64.
/// Any malformed header or note just means "not found".
pub fn find_note_u64(elf: &[u8], name: &[u8], kind: u32) -> Option<u64> {
    const PT_NOTE: u32 = 4;
    const PHDR_SIZE: usize = 56;
    let phoff = usize::try_from(read_u64(elf, 0x20)?).ok()?;
    let phnum = usize::from(u16::from_le_bytes(elf.get(0x38..0x3a)?.try_into().ok()?));
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    for i in 0..phnum {
        let phdr = phoff.checked_add(i.checked_mul(PHDR_SIZE)?)?;
        if read_u32(elf, phdr)? != PT_NOTE {
            continue;
        }
        let offset = usize::try_from(read_u64(elf, phdr + 8)?).ok()?;
        let size = usize::try_from(read_u64(elf, phdr + 32)?).ok()?;
        let notes = elf.get(offset..offset.checked_add(size)?)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = read_u32(notes, at)? as usize;
            let descsz = read_u32(notes, at + 4)? as usize;
            let n_type = read_u32(notes, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at.checked_add(align4(namesz)?)?;
            if n_type == kind && notes.get(name_at..name_at.checked_add(namesz)?) == Some(name) && descsz == 8
            {
                return read_u64(notes, desc_at);
            }
            at = desc_at.checked_add(align4(descsz)?)?;
        }
    }
    None
}

/// Writes `cmdline` at [`layout::CMDLINE_START`] if it is at most `max` bytes long.
fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str, max: usize) -> Result<(), LoaderError> {
    if cmdline.len() > max {
        return Err(LoaderError::CmdlineTooLong { len: cmdline.len(), max });
    }
    let mut line = Cmdline::new(max + 1).map_err(LoaderError::Cmdline)?;
    line.insert_str(cmdline).map_err(LoaderError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &line).map_err(LoaderError::WriteCmdline)
}

/// Writes the command line and `hvm_start_info` with the memory map; returns the
/// guest-physical address of `hvm_start_info`. (No initrd, no ACPI: see
/// [`write_pvh_boot_info`].)
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    e820: &[E820Entry],
) -> Result<u64, LoaderError> {
    write_pvh_boot_info(mem, &BootConfig { cmdline, e820, initrd: None, rsdp: None })
}

/// Writes the command line and `hvm_start_info` with the memory map, the initrd as its
/// one module and the RSDP; returns the guest-physical address of `hvm_start_info`.
pub fn write_pvh_boot_info<M: GuestMemoryBackend>(
    mem: &M,
    config: &BootConfig<'_>,
) -> Result<u64, LoaderError> {
    write_cmdline(mem, config.cmdline, layout::CMDLINE_MAX_SIZE - 1)?;
    if config.e820.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(LoaderError::MemmapTooLarge(config.e820.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = config
        .e820
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: config.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = config
        .initrd
        .iter()
        .map(|initrd| hvm_modlist_entry { paddr: initrd.addr, size: initrd.size, ..Default::default() })
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(LoaderError::StartInfo)?;
    Ok(layout::PVH_INFO_START)
}

/// Writes the command line and `boot_params` (the zero page) for a bzImage's 64-bit entry:
/// the kernel's setup header with the fields a boot loader fills in, the e820 map, the
/// ramdisk and the RSDP. Returns the guest-physical address of `boot_params`.
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    image: &LoadedBzImage,
    config: &BootConfig<'_>,
) -> Result<u64, LoaderError> {
    write_cmdline(mem, config.cmdline, image.cmdline_max())?;
    if config.e820.len() > bzimage::E820_MAX_ENTRIES {
        return Err(LoaderError::E820TooLarge { entries: config.e820.len(), max: bzimage::E820_MAX_ENTRIES });
    }
    let mut params = boot_params { hdr: image.header, ..Default::default() };
    params.hdr.type_of_loader = bzimage::LOADER_TYPE_UNDEFINED;
    params.hdr.vid_mode = bzimage::VID_MODE_NORMAL;
    // No heap for the real-mode code: the 64-bit entry skips it.
    params.hdr.loadflags = (image.header.loadflags | bzimage::LOADED_HIGH) & !bzimage::CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0;
    params.hdr.code32_start = image.load_addr as u32;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (layout::CMDLINE_START >> 32) as u32;
    if let Some(initrd) = config.initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = config.rsdp.unwrap_or(0);
    for (slot, entry) in params.e820_table.iter_mut().zip(config.e820) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind as u32 };
    }
    params.e820_entries = config.e820.len() as u8;
    let boot = BootParams::new(&params, GuestAddress(BOOT_PARAMS_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(LoaderError::BootParams)?;
    Ok(BOOT_PARAMS_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_memory::{E820Kind, GuestMemoryMmap, GuestRam};

    /// A minimal ELF64 header + one PT_NOTE program header + the given notes.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes());
        elf[64 + 32..64 + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn finds_the_ap_entry_note_after_others() {
        let mut notes = note(b"Xen\0", 18, &0x10_0000u32.to_le_bytes());
        notes.extend(note(SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64, &0x10_00dcu64.to_le_bytes()));
        let elf = elf_with_notes(&notes);
        assert_eq!(find_note_u64(&elf, SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64), Some(0x10_00dc));
        assert_eq!(find_note_u64(&elf, SPLITVISOR_NOTE_NAME, 7), None);
    }

    #[test]
    fn malformed_notes_are_not_found_and_do_not_panic() {
        let good = elf_with_notes(&note(SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64, &[1; 8]));
        for cut in 0..good.len() {
            let _ = find_note_u64(&good[..cut], SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64);
        }
        let mut huge = good.clone();
        huge[120..124].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_note_u64(&huge, SPLITVISOR_NOTE_NAME, SPLITVISOR_ELFNOTE_AP_ENTRY64), None);
        assert_eq!(find_note_u64(b"not an elf", b"x", 1), None);
    }

    #[test]
    fn non_elf_images_are_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let err = load_pvh_elf(
            ram.memory(),
            b"definitely not an ELF file, but long enough to read a header from it....",
            16 << 20,
        );
        assert!(matches!(err, Err(LoaderError::Elf(_))));
    }

    /// Real bzImages: the test kernel `.ci/build-linux-kernel` builds and Debian's, which
    /// `.ci/build-linux-guest` fetches, whichever are there. None: a failure under CI=true,
    /// else a skip.
    fn real_bzimages() -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let found: Vec<_> =
            [root.join("target/linux-kernel/bzImage"), root.join("target/linux-guest/vmlinuz")]
                .into_iter()
                .filter(|path| path.is_file())
                .map(|path| {
                    let image = std::fs::read(&path).unwrap();
                    (path, image)
                })
                .collect();
        if found.is_empty() {
            let why = "no bzImage: run `bash .ci/build-linux-kernel` or `bash .ci/build-linux-guest`";
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true: {why}");
            eprintln!("SKIPPED: {why}");
        }
        found
    }

    fn u16_at(mem: &GuestMemoryMmap, addr: u64) -> u16 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn u64_at(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Offsets into `boot_params` from Documentation/arch/x86/zero-page.rst and boot.rst,
    /// independent of the structure definitions the loader uses.
    mod zero_page {
        pub const ACPI_RSDP_ADDR: u64 = 0x070;
        pub const EXT_RAMDISK_IMAGE: u64 = 0x0c0;
        pub const EXT_RAMDISK_SIZE: u64 = 0x0c4;
        pub const EXT_CMD_LINE_PTR: u64 = 0x0c8;
        pub const E820_ENTRIES: u64 = 0x1e8;
        pub const SENTINEL: u64 = 0x1ef;
        pub const VID_MODE: u64 = 0x1fa;
        pub const BOOT_FLAG: u64 = 0x1fe;
        pub const HEADER: u64 = 0x202;
        pub const VERSION: u64 = 0x206;
        pub const TYPE_OF_LOADER: u64 = 0x210;
        pub const LOADFLAGS: u64 = 0x211;
        pub const CODE32_START: u64 = 0x214;
        pub const RAMDISK_IMAGE: u64 = 0x218;
        pub const RAMDISK_SIZE: u64 = 0x21c;
        pub const HEAP_END_PTR: u64 = 0x224;
        pub const CMD_LINE_PTR: u64 = 0x228;
        pub const INITRD_ADDR_MAX: u64 = 0x22c;
        pub const XLOADFLAGS: u64 = 0x236;
        pub const CMDLINE_SIZE: u64 = 0x238;
        pub const E820_TABLE: u64 = 0x2d0;
        pub const E820_ENTRY_SIZE: u64 = 20;
    }

    /// Boots nothing: loads `image`, an initrd and the boot structures the way a VMM does
    /// and checks `boot_params` field by field against the boot protocol.
    fn check_boot_params(image: &[u8], ram_size: u64) {
        use zero_page::*;
        let ram = GuestRam::new(ram_size).unwrap();
        let mem = ram.memory();
        let low_ram_end = ram.regions()[0].size;
        let kernel = load_kernel(mem, image, low_ram_end).unwrap();
        let LoadedKernel::BzImage(bz) = kernel else { panic!("a bzImage loads as one: {kernel:?}") };
        let initrd_bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let initrd = load_initrd(mem, &kernel, &initrd_bytes, low_ram_end).unwrap();
        let e820 = ram.e820();
        let cmdline = "console=ttyS0 panic=-1 splitvisor.gen=3";
        let config = BootConfig { cmdline, e820: &e820, initrd: Some(initrd), rsdp: Some(0xe_0000) };
        let state = kernel.write_boot_info(mem, &config).unwrap();
        assert_eq!(state, BootState::Linux64 { entry: 0x10_0200, boot_params: BOOT_PARAMS_START });

        let zp = |offset: u64| BOOT_PARAMS_START + offset;
        // The kernel's own header, kept.
        assert_eq!(u32_at(mem, zp(HEADER)), 0x5372_6448, "HdrS");
        assert_eq!(u16_at(mem, zp(BOOT_FLAG)), 0xaa55);
        let version = u16_at(mem, zp(VERSION));
        assert!(version >= 0x020c, "protocol {version:#x}");
        assert_eq!(u16_at(mem, zp(XLOADFLAGS)) & 1, 1, "XLF_KERNEL_64");
        // What the boot loader fills in.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp(TYPE_OF_LOADER))).unwrap(), 0xff);
        let loadflags = mem.read_obj::<u8>(GuestAddress(zp(LOADFLAGS))).unwrap();
        assert_eq!(loadflags & 0x01, 0x01, "LOADED_HIGH");
        assert_eq!(loadflags & 0x80, 0, "CAN_USE_HEAP: no heap_end_ptr is given");
        assert_eq!(u16_at(mem, zp(HEAP_END_PTR)), 0);
        assert_eq!(u16_at(mem, zp(VID_MODE)), 0xffff);
        assert_eq!(u32_at(mem, zp(CODE32_START)), 0x10_0000);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp(SENTINEL))).unwrap(), 0);
        // The command line: pointer, NUL-terminated text, within the kernel's limit.
        let cmd_line_ptr =
            u64::from(u32_at(mem, zp(CMD_LINE_PTR))) | u64::from(u32_at(mem, zp(EXT_CMD_LINE_PTR))) << 32;
        assert_eq!(cmd_line_ptr, layout::CMDLINE_START);
        let mut text = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut text, GuestAddress(cmd_line_ptr)).unwrap();
        assert_eq!(&text[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(text[cmdline.len()], 0);
        assert!(cmdline.len() <= u32_at(mem, zp(CMDLINE_SIZE)) as usize);
        // The ramdisk: where it was put, its bytes there, page aligned, above the kernel,
        // below initrd_addr_max and the end of RAM.
        let ramdisk =
            u64::from(u32_at(mem, zp(RAMDISK_IMAGE))) | u64::from(u32_at(mem, zp(EXT_RAMDISK_IMAGE))) << 32;
        let ramdisk_size =
            u64::from(u32_at(mem, zp(RAMDISK_SIZE))) | u64::from(u32_at(mem, zp(EXT_RAMDISK_SIZE))) << 32;
        assert_eq!((ramdisk, ramdisk_size), (initrd.addr, initrd_bytes.len() as u64));
        assert_eq!(ramdisk % 4096, 0);
        assert!(ramdisk >= bz.end, "initrd {ramdisk:#x} overlaps the kernel (ends {:#x})", bz.end);
        let max = u64::from(u32_at(mem, zp(INITRD_ADDR_MAX)));
        assert!(ramdisk + ramdisk_size - 1 <= max);
        assert!(ramdisk + ramdisk_size <= low_ram_end);
        assert!(low_ram_end.min(max + 1) - (ramdisk + ramdisk_size) < 4096, "at the top of what it may use");
        let mut copied = vec![0u8; initrd_bytes.len()];
        mem.read_slice(&mut copied, GuestAddress(ramdisk)).unwrap();
        assert!(copied == initrd_bytes);
        // The e820 map, entry by entry.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp(E820_ENTRIES))).unwrap() as usize, e820.len());
        for (i, entry) in e820.iter().enumerate() {
            let at = zp(E820_TABLE) + i as u64 * E820_ENTRY_SIZE;
            assert_eq!(
                (u64_at(mem, at), u64_at(mem, at + 8), u32_at(mem, at + 16)),
                (entry.addr, entry.size, entry.kind as u32)
            );
        }
        assert_eq!(u64_at(mem, zp(ACPI_RSDP_ADDR)), 0xe_0000);
        // The protected-mode kernel is at code32_start, as the file has it after the setup.
        let setup = (usize::from(image[0x1f1].max(4)) + 1) * 512;
        let mut start = [0u8; 4096];
        mem.read_slice(&mut start, GuestAddress(0x10_0000)).unwrap();
        assert!(start[..] == image[setup..setup + 4096]);
        // The boot GDT of the 64-bit entry is what the boot state points at.
        let mut sregs = kvm_bindings::kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(state.regs().rsi, BOOT_PARAMS_START);
    }

    #[test]
    fn a_real_bzimage_gets_boot_params_by_the_protocol() {
        for (path, image) in real_bzimages() {
            eprintln!("bzImage: {}", path.display());
            check_boot_params(&image, 256 << 20);
            // With more RAM than initrd_addr_max reaches or the MMIO hole allows.
            check_boot_params(&image, 4 << 30);
        }
    }

    /// A synthetic bzImage: one setup sector after the boot sector, a setup header of
    /// protocol 2.15 and `payload` bytes of protected-mode "kernel".
    fn fake_bzimage(payload: usize) -> Vec<u8> {
        let mut image = vec![0u8; 1024 + payload];
        let put =
            |image: &mut Vec<u8>, at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
        image[0x1f1] = 1; // setup_sects
        put(&mut image, 0x1f4, &(payload.div_ceil(16) as u32).to_le_bytes()); // syssize
        put(&mut image, 0x1fe, &0xaa55u16.to_le_bytes());
        put(&mut image, 0x202, b"HdrS");
        put(&mut image, 0x206, &0x020fu16.to_le_bytes());
        image[0x211] = bzimage::LOADED_HIGH;
        put(&mut image, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut image, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(&mut image, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
        put(&mut image, 0x236, &bzimage::XLF_KERNEL_64.to_le_bytes());
        put(&mut image, 0x238, &2047u32.to_le_bytes()); // cmdline_size
        put(&mut image, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(&mut image, 0x260, &0x40_0000u32.to_le_bytes()); // init_size
        for (i, byte) in image[1024..].iter_mut().enumerate() {
            *byte = (i % 253) as u8;
        }
        image
    }

    fn set_u32(image: &mut [u8], at: usize, value: u32) {
        image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn a_synthetic_bzimage_gets_boot_params_by_the_protocol() {
        check_boot_params(
            &{
                let mut image = fake_bzimage(8192);
                // check_boot_params compares the first 4 KiB after four or more setup sectors.
                image[0x1f1] = 4;
                image.splice(1024..1024, std::iter::repeat_n(0u8, 1536));
                image
            },
            64 << 20,
        );
    }

    #[test]
    fn the_kernel_footprint_counts_init_size_from_where_it_decompresses() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let bz = load_bzimage(ram.memory(), &fake_bzimage(4096), 64 << 20).unwrap();
        assert_eq!((bz.load_addr, bz.entry64), (0x10_0000, 0x10_0200));
        assert_eq!(bz.end, 0x100_0000 + 0x40_0000, "pref_address + init_size: not relocatable");
        let mut relocatable = fake_bzimage(4096);
        relocatable[0x234] = 1;
        let bz = load_bzimage(ram.memory(), &relocatable, 64 << 20).unwrap();
        assert_eq!(bz.end, 0x20_0000 + 0x40_0000, "load address aligned to 2 MiB + init_size");
        // Not enough RAM for the decompressed kernel.
        let small = load_bzimage(ram.memory(), &fake_bzimage(4096), 0x120_0000);
        assert!(matches!(small, Err(LoaderError::TooLarge { end: 0x140_0000, .. })), "{small:?}");
    }

    #[test]
    fn images_that_are_no_kernel_are_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        for image in [&b""[..], b"MZ", b"#!/bin/sh\necho not a kernel\n", &[0u8; 4096]] {
            let err = load_kernel(ram.memory(), image, 16 << 20).unwrap_err();
            assert!(matches!(err, LoaderError::NotAKernel { .. }), "{err}");
        }
        let err = load_kernel(ram.memory(), b"MZ\x90\x00junk", 16 << 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel is neither a PVH ELF nor a bzImage (it starts with [4d, 5a, 90, 00])"
        );
    }

    #[test]
    fn truncated_kernels_are_refused_before_loading() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let image = fake_bzimage(8192);
        for cut in [0x206, 1024, 1024 + 8191] {
            let err = load_kernel(ram.memory(), &image[..cut], 16 << 20).unwrap_err();
            assert!(
                matches!(err, LoaderError::Truncated { format: "bzImage", needed, .. } if needed == 1024 + 8192),
                "{cut}: {err}"
            );
        }
        // An ELF whose segment runs past the end of the file.
        let mut elf = elf_with_notes(&[]);
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[64 + 32..64 + 40].copy_from_slice(&4096u64.to_le_bytes()); // p_filesz
        let err = load_kernel(ram.memory(), &elf, 16 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::Truncated { format: "ELF", needed: 4216, .. }), "{err}");
        // Cut inside the program headers.
        let err = load_kernel(ram.memory(), &elf[..100], 16 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::Truncated { format: "ELF", .. }), "{err}");
    }

    #[test]
    fn bzimages_this_loader_cannot_start_are_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut old = fake_bzimage(4096);
        old[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
        let mut low = fake_bzimage(4096);
        low[0x211] = 0;
        let mut no_64 = fake_bzimage(4096);
        no_64[0x236..0x238].copy_from_slice(&0u16.to_le_bytes());
        for (image, reason) in [(old, "2.12"), (low, "loaded low"), (no_64, "64-bit entry")] {
            let err = load_kernel(ram.memory(), &image, 32 << 20).unwrap_err();
            assert!(matches!(err, LoaderError::UnsupportedBzImage { .. }), "{err}");
            assert!(err.to_string().contains(reason), "{err}");
        }
    }

    #[test]
    fn a_command_line_longer_than_the_kernel_takes_is_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut image = fake_bzimage(4096);
        set_u32(&mut image, 0x238, 16); // cmdline_size
        let kernel = load_kernel(ram.memory(), &image, 32 << 20).unwrap();
        assert_eq!(kernel.cmdline_max(), 16);
        let e820 = ram.e820();
        let config = |cmdline| BootConfig { cmdline, e820: &e820, initrd: None, rsdp: None };
        assert!(kernel.write_boot_info(ram.memory(), &config("console=ttyS0 ab")).is_ok());
        let err = kernel.write_boot_info(ram.memory(), &config("console=ttyS0 abc")).unwrap_err();
        assert!(matches!(err, LoaderError::CmdlineTooLong { len: 17, max: 16 }), "{err}");
        // PVH: the command line area is the limit.
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        let err = write_pvh_boot_info(ram.memory(), &config(&long)).unwrap_err();
        assert!(
            matches!(err, LoaderError::CmdlineTooLong { max, .. } if max == layout::CMDLINE_MAX_SIZE - 1),
            "{err}"
        );
        assert!(write_pvh_boot_info(ram.memory(), &config(&long[1..])).is_ok());
    }

    #[test]
    fn an_initrd_goes_at_the_top_of_what_the_kernel_reaches() {
        let ram = GuestRam::new(1 << 30).unwrap();
        let mut image = fake_bzimage(4096);
        set_u32(&mut image, 0x22c, 0x37ff_ffff); // initrd_addr_max of old kernels
        let kernel = load_kernel(ram.memory(), &image, 1 << 30).unwrap();
        let initrd = load_initrd(ram.memory(), &kernel, &[7u8; 5000], 1 << 30).unwrap();
        assert_eq!(initrd, LoadedInitrd { addr: 0x3800_0000 - 0x2000, size: 5000 });
        // PVH: below 4 GiB and the end of low RAM.
        let pvh = LoadedKernel::Pvh(LoadedGuest { pvh_entry: 0x100_0000, ap_entry: None, end: 0x200_0000 });
        let initrd = load_initrd(ram.memory(), &pvh, &[7u8; 4096], 1 << 30).unwrap();
        assert_eq!(initrd.addr, (1 << 30) - 4096);
        assert_eq!(ram.memory().read_obj::<u8>(GuestAddress(initrd.addr + 4095)).unwrap(), 7);
    }

    #[test]
    fn an_initrd_that_does_not_fit_is_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let kernel = load_kernel(ram.memory(), &fake_bzimage(4096), 32 << 20).unwrap();
        // The kernel needs up to 20 MiB; 12 MiB remain.
        let room = (32 << 20) - kernel.end();
        assert!(load_initrd(ram.memory(), &kernel, &vec![1u8; room as usize], 32 << 20).is_ok());
        let err = load_initrd(ram.memory(), &kernel, &vec![1u8; room as usize + 1], 32 << 20).unwrap_err();
        assert!(
            matches!(err, LoaderError::InitrdTooLarge { size, room: r, .. } if size == room + 1 && r == room),
            "{err}"
        );
        let err = load_initrd(ram.memory(), &kernel, &[], 32 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdEmpty));
        // initrd_addr_max below the kernel's end: no room at all.
        let mut image = fake_bzimage(4096);
        set_u32(&mut image, 0x22c, 0x00ff_ffff);
        let kernel = load_kernel(ram.memory(), &image, 32 << 20).unwrap();
        let err = load_initrd(ram.memory(), &kernel, &[1u8; 16], 32 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooLarge { room: 0, .. }), "{err}");
    }

    #[test]
    fn too_many_e820_entries_for_boot_params_are_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let kernel = load_kernel(ram.memory(), &fake_bzimage(4096), 32 << 20).unwrap();
        let e820: Vec<E820Entry> = (0..129u64)
            .map(|i| E820Entry { addr: i << 20, size: 4096, kind: splitvisor_memory::E820Kind::Ram })
            .collect();
        let config = BootConfig { cmdline: "", e820: &e820, initrd: None, rsdp: None };
        let err = kernel.write_boot_info(ram.memory(), &config).unwrap_err();
        assert!(matches!(err, LoaderError::E820TooLarge { entries: 129, max: 128 }), "{err}");
        assert!(kernel.write_boot_info(ram.memory(), &BootConfig { e820: &e820[..128], ..config }).is_ok());
    }

    #[test]
    fn pvh_start_info_carries_the_initrd_module_and_the_rsdp() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mem = ram.memory();
        let e820 = ram.e820();
        let initrd = LoadedInitrd { addr: 0x1f0_0000, size: 0x1234 };
        let config =
            BootConfig { cmdline: "console=ttyS0", e820: &e820, initrd: Some(initrd), rsdp: Some(0xe_0000) };
        let addr = write_pvh_boot_info(mem, &config).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr, info.rsdp_paddr), (1, PVH_MODLIST_START, 0xe_0000));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size, module.cmdline_paddr), (0x1f0_0000, 0x1234, 0));
        // The module list stays clear of hvm_start_info and the memory map.
        assert!(PVH_MODLIST_START >= addr + std::mem::size_of::<hvm_start_info>() as u64);
        const { assert!(PVH_MODLIST_START + 32 <= layout::PVH_MEMMAP_START) };
        // Without an initrd or ACPI: no modules, no RSDP (what write_pvh_start_info writes).
        let addr = write_pvh_start_info(mem, "console=ttyS0", &e820).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr, info.rsdp_paddr), (0, 0, 0));
    }

    #[test]
    fn start_info_carries_the_memory_map_and_command_line() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let e820 = ram.e820();
        let addr = write_pvh_start_info(ram.memory(), "console=ttyS0 splitvisor.vcpus=2", &e820).unwrap();
        let mem = ram.memory();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, E820Kind::Ram as u32));
        let mut cmdline = [0u8; 33];
        mem.read_slice(&mut cmdline, GuestAddress(info.cmdline_paddr)).unwrap();
        assert_eq!(&cmdline[..32], b"console=ttyS0 splitvisor.vcpus=2");
        assert_eq!(cmdline[32], 0);
    }
}
