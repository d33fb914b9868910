//! Loading a PVH guest: the ELF, its notes, the command line and `hvm_start_info`.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability, load_cmdline};
use splitvisor_memory::{E820Entry, layout};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Name of splitvisor's own ELF notes.
pub const SPLITVISOR_NOTE_NAME: &[u8] = b"Splitvisor\0";
/// Note type: the 64-bit entry for application processors started in long mode (an u64).
pub const SPLITVISOR_ELFNOTE_AP_ENTRY64: u32 = 0x5356_0001;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// linux-loader refused the image.
    #[error("cannot load the guest ELF: {0}")]
    Elf(#[source] linux_loader::loader::Error),
    /// The ELF has no `XEN_ELFNOTE_PHYS32_ENTRY` note.
    #[error("the guest ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): {0}")]
    NotPvh(PvhBootCapability),
    /// The image extends past the end of low RAM.
    #[error("the guest image ends at {end:#x}, past the end of low RAM at {ram_end:#x}")]
    TooLarge {
        /// End of the loaded image.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is too long or has invalid characters.
    #[error("invalid guest command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the guest command line: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Too many memory map entries.
    #[error("{0} memory map entries do not fit the PVH memory map area")]
    MemmapTooLarge(usize),
    /// Writing `hvm_start_info` failed.
    #[error("cannot write hvm_start_info: {0}")]
    StartInfo(#[source] linux_loader::configurator::Error),
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

/// Writes the command line and `hvm_start_info` with the memory map; returns the
/// guest-physical address of `hvm_start_info`.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    e820: &[E820Entry],
) -> Result<u64, LoaderError> {
    let mut line = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    line.insert_str(cmdline).map_err(LoaderError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &line).map_err(LoaderError::WriteCmdline)?;

    if e820.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(LoaderError::MemmapTooLarge(e820.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(LoaderError::StartInfo)?;
    Ok(layout::PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_memory::{E820Kind, GuestRam};
    use vm_memory::Bytes;

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
