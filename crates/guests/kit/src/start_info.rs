//! `hvm_start_info`: what a PVH loader tells the guest.

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// The fields of `hvm_start_info` the runtime uses.
#[derive(Clone, Copy)]
pub struct StartInfo {
    /// Physical address of the NUL-terminated command line (0: none).
    pub cmdline_paddr: u64,
    /// Physical address of the `hvm_memmap_table_entry` array (version 1 and later).
    pub memmap_paddr: u64,
    /// Entries in the memory map.
    pub memmap_entries: u32,
}

/// One memory map entry (`hvm_memmap_table_entry`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct MemmapEntry {
    /// Start of the range.
    pub addr: u64,
    /// Bytes in the range.
    pub size: u64,
    /// 1: RAM, 2: reserved, ... (the e820 types).
    pub kind: u32,
    reserved: u32,
}

impl StartInfo {
    /// Reads `hvm_start_info` at `addr`; `None` if its magic is wrong.
    ///
    /// # Safety
    /// `addr` is 0 or identity-mapped memory holding a `hvm_start_info`.
    pub unsafe fn from_addr(addr: u64) -> Option<Self> {
        if addr == 0 {
            return None;
        }
        let base = addr as *const u8;
        // SAFETY: field offsets of `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
        unsafe {
            let magic = (base as *const u32).read_volatile();
            if magic != HVM_START_MAGIC {
                return None;
            }
            let version = (base.add(4) as *const u32).read_volatile();
            let cmdline_paddr = (base.add(24) as *const u64).read_volatile();
            let (memmap_paddr, memmap_entries) = if version >= 1 {
                (
                    (base.add(40) as *const u64).read_volatile(),
                    (base.add(48) as *const u32).read_volatile(),
                )
            } else {
                (0, 0)
            };
            Some(Self { cmdline_paddr, memmap_paddr, memmap_entries })
        }
    }

    /// The command line (empty if none or not UTF-8).
    pub fn cmdline(&self) -> &'static str {
        if self.cmdline_paddr == 0 {
            return "";
        }
        let base = self.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the loader wrote a NUL-terminated string; the scan is bounded.
        while len < 4096 && unsafe { base.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read.
        let bytes = unsafe { core::slice::from_raw_parts(base, len) };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// The value of `key=value` on the command line.
    pub fn cmdline_value(&self, key: &str) -> Option<&'static str> {
        self.cmdline().split(' ').find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// The memory map.
    pub fn memmap(&self) -> &'static [MemmapEntry] {
        if self.memmap_paddr == 0 {
            return &[];
        }
        // SAFETY: the loader wrote `memmap_entries` entries at `memmap_paddr`.
        unsafe {
            core::slice::from_raw_parts(
                self.memmap_paddr as *const MemmapEntry,
                self.memmap_entries.min(128) as usize,
            )
        }
    }

    /// Bytes of RAM in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap().iter().filter(|e| e.kind == 1).map(|e| e.size).sum()
    }
}

/// Parses a decimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}
