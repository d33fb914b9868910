//! What a VM boots: the kernel and initrd images, what the VMM tells the kernel (command
//! line, memory map, ACPI tables), and booting it again when the guest reboots.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use splitvisor_memory::{GuestRam, layout};
use splitvisor_vcpu::acpi::AcpiTables;
use splitvisor_vcpu::boot::{self, BootState};
use splitvisor_vcpu::loader::{self, BootConfig, LoadedInitrd, LoadedKernel};
use vm_memory::{Bytes, GuestAddress};

use crate::Error;

/// A kernel or initrd image: a file, read when the VM is built, or bytes.
///
/// ```
/// use splitvisor_layout::BootImage;
///
/// let file = BootImage::from(std::path::Path::new("/boot/vmlinuz"));
/// let bytes = BootImage::from(vec![0x7f, b'E', b'L', b'F']);
/// assert_ne!(file, bytes);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootImage {
    /// A file, read in full when the VM is built.
    File(PathBuf),
    /// The image itself.
    Bytes(Vec<u8>),
}

impl From<PathBuf> for BootImage {
    fn from(path: PathBuf) -> Self {
        Self::File(path)
    }
}

impl From<&std::path::Path> for BootImage {
    fn from(path: &std::path::Path) -> Self {
        Self::File(path.to_path_buf())
    }
}

impl From<Vec<u8>> for BootImage {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes)
    }
}

impl From<&[u8]> for BootImage {
    fn from(bytes: &[u8]) -> Self {
        Self::Bytes(bytes.to_vec())
    }
}

impl BootImage {
    /// The image's bytes; a file larger than `limit` (the guest's RAM: it could never
    /// be loaded) is refused before it is read.
    pub(crate) fn read(&self, what: &'static str, limit: u64) -> Result<Vec<u8>, Error> {
        let path = match self {
            Self::Bytes(bytes) => return Ok(bytes.clone()),
            Self::File(path) => path,
        };
        let error = |why: String| Error::BootFile { what, path: path.clone(), why };
        let size = std::fs::metadata(path).map_err(|e| error(e.to_string()))?.len();
        if size > limit {
            return Err(error(format!("{size} bytes do not fit in {limit} bytes of guest RAM")));
        }
        std::fs::read(path).map_err(|e| error(e.to_string()))
    }
}

/// What the VM does when the guest resets it (a Linux `reboot`, the guest kit's end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReboot {
    /// The VM ends ([`VmEnd::GuestReset`](splitvisor_vcpu::VmEnd::GuestReset)).
    #[default]
    End,
    /// The VM boots again: devices reset, the kernel and initrd loaded afresh, every
    /// vCPU back in its power-on state. A reset that follows a kernel panic still ends
    /// the VM ([`VmEnd::GuestPanic`](splitvisor_vcpu::VmEnd::GuestPanic)).
    Restart,
}

impl fmt::Display for OnReboot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::End => "end",
            Self::Restart => "restart",
        })
    }
}

impl FromStr for OnReboot {
    type Err = String;

    /// `end` or `restart`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "end" => Ok(Self::End),
            "restart" => Ok(Self::Restart),
            other => Err(format!("unknown reboot action '{other}' (use end or restart)")),
        }
    }
}

/// Everything written into guest memory to boot, kept to boot again at a restart.
pub(crate) struct BootPlan {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    /// The whole command line, once the devices are placed.
    pub cmdline: String,
    /// The ACPI tables, if the VM has them.
    pub acpi: Option<AcpiTables>,
}

/// A kernel and initrd in guest memory.
pub(crate) struct Loaded {
    pub kernel: LoadedKernel,
    pub initrd: Option<LoadedInitrd>,
}

impl BootPlan {
    /// Copies the kernel and the initrd into guest memory (the images' format and size
    /// are checked here, before any device is set up).
    pub fn load_images(&self, ram: &GuestRam) -> Result<Loaded, Error> {
        let mem = ram.memory();
        let low_ram_end = low_ram_end(ram);
        let kernel = loader::load_kernel(mem, &self.kernel, low_ram_end)?;
        let initrd = match &self.initrd {
            Some(initrd) => Some(loader::load_initrd(mem, &kernel, initrd, low_ram_end)?),
            None => None,
        };
        Ok(Loaded { kernel, initrd })
    }

    /// Writes the page tables and GDTs the vCPUs start on, the ACPI tables and the
    /// kernel's boot structures (command line, memory map, initrd, RSDP); returns the
    /// bootstrap processor's state.
    pub fn write_boot_info(&self, ram: &GuestRam, loaded: &Loaded) -> Result<BootState, Error> {
        let mem = ram.memory();
        boot::write_long_mode_tables(mem)?;
        let rsdp = match &self.acpi {
            Some(tables) => Some(tables.write_to(mem)?),
            None => None,
        };
        let e820 = ram.e820();
        let config = BootConfig { cmdline: &self.cmdline, e820: &e820, initrd: loaded.initrd, rsdp };
        Ok(loaded.kernel.write_boot_info(mem, &config)?)
    }

    /// Boots again: clears the memory the kernel occupied (its data and bss), then
    /// loads the images and writes the boot structures as at the first boot.
    pub fn reload(&self, ram: &GuestRam, previous: &Loaded) -> Result<(Loaded, BootState), Error> {
        let mem = ram.memory();
        let start = layout::HIMEM_START;
        let end = previous.kernel.end().min(low_ram_end(ram));
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK as u64) as usize;
            mem.write_slice(&zeros[..len], GuestAddress(at)).map_err(|source| {
                Error::Restart(format!("cannot clear guest memory at {at:#x}: {source}"))
            })?;
            at += len as u64;
        }
        let loaded = self.load_images(ram)?;
        let bsp = self.write_boot_info(ram, &loaded)?;
        Ok((loaded, bsp))
    }
}

/// The end of the RAM below the MMIO hole, where kernels and initrds go.
pub(crate) fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.regions()[0].size
}
