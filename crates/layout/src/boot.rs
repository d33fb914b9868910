//! What a VM boots: the kernel and initrd images, what the VMM tells the kernel (command
//! line, memory map, ACPI tables), and booting it again when the guest reboots.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use splitvisor_memory::{GuestRam, layout};
use splitvisor_vcpu::acpi::{self, AcpiError, AcpiTables};
use splitvisor_vcpu::boot::{self, BootState};
use splitvisor_vcpu::loader::{self, BootConfig, LoadedInitrd, LoadedKernel};
use splitvisor_vcpu::{KvmVm, VmError};
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

/// Refuses more vCPUs than the VM could run, before anything of it exists (no partition
/// started, no KVM VM created): KVM's limit on this host, then the guest's own (see
/// [`guest_vcpu_limit`]). One vCPU is never refused (every KVM allows it): /dev/kvm is
/// asked only for more.
pub(crate) fn check_vcpus(vcpus: u32, guest: Option<&[u8]>, acpi: bool) -> Result<(), Error> {
    if vcpus > 1 {
        let max = KvmVm::host_max_vcpus()?;
        if vcpus as usize > max {
            return Err(VmError::TooManyVcpus { requested: vcpus, max }.into());
        }
    }
    guest_vcpu_limit(vcpus, guest, acpi)
}

/// What the guest itself can start: `guest`, a program whose application processors the
/// VMM starts in long mode (the guest kit's, known by its ELF note), needs one stack each
/// below the EBDA; `acpi` tables describe at most [`acpi::MAX_VCPUS`] local APICs. (A
/// kernel given as a file is checked once it is read, when its vCPUs' states are made.)
pub(crate) fn guest_vcpu_limit(vcpus: u32, guest: Option<&[u8]>, acpi: bool) -> Result<(), Error> {
    let ap_entry = guest.and_then(|elf| {
        loader::find_note_u64(elf, loader::SPLITVISOR_NOTE_NAME, loader::SPLITVISOR_ELFNOTE_AP_ENTRY64)
    });
    if ap_entry.is_some() && u64::from(vcpus).saturating_sub(1) > layout::MAX_AP_STACKS {
        return Err(Error::TooManyApStacks { requested: vcpus, max: layout::MAX_AP_STACKS + 1 });
    }
    if acpi && vcpus > acpi::MAX_VCPUS {
        return Err(AcpiError::TooManyVcpus(vcpus).into());
    }
    Ok(())
}

/// The end of the RAM below the MMIO hole, where kernels and initrds go.
pub(crate) fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.regions()[0].size
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_vcpu::loader::LoadedGuest;

    fn hello() -> Vec<u8> {
        splitvisor_guests::find("hello").expect("the kit's hello").elf.to_vec()
    }

    fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        ram.memory().read_slice(&mut bytes, GuestAddress(addr)).expect("in RAM");
        bytes
    }

    #[test]
    fn the_guest_kit_starts_at_most_one_vcpu_per_ap_stack_and_acpi_describes_at_most_255() {
        let max = layout::MAX_AP_STACKS as u32 + 1;
        assert_eq!(max, 56);
        assert!(guest_vcpu_limit(max, Some(&hello()), false).is_ok());
        assert!(matches!(
            guest_vcpu_limit(max + 1, Some(&hello()), false),
            Err(Error::TooManyApStacks { requested: 57, max: 56 })
        ));
        // A kernel starts its application processors itself: only ACPI's limit applies.
        assert!(guest_vcpu_limit(255, None, true).is_ok());
        assert!(guest_vcpu_limit(1000, None, false).is_ok());
        assert!(matches!(guest_vcpu_limit(256, None, true), Err(Error::Acpi(AcpiError::TooManyVcpus(256)))));
        assert!(matches!(guest_vcpu_limit(256, Some(&hello()), true), Err(Error::TooManyApStacks { .. })));
    }

    #[test]
    fn a_reload_clears_what_the_last_boot_left_and_loads_everything_again() {
        let ram = GuestRam::new(64 << 20).expect("RAM");
        let initrd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let plan = BootPlan {
            kernel: hello(),
            initrd: Some(initrd.clone()),
            cmdline: "console=ttyS0 splitvisor.vcpus=1".into(),
            acpi: None,
        };
        let loaded = plan.load_images(&ram).expect("load");
        let first = plan.write_boot_info(&ram, &loaded).expect("boot info");
        let LoadedKernel::Pvh(LoadedGuest { end, .. }) = loaded.kernel else { panic!("a PVH ELF") };
        let image = read(&ram, layout::HIMEM_START, (end - layout::HIMEM_START) as usize);
        let initrd_at = loaded.initrd.expect("an initrd").addr;

        // What a guest does to memory while it runs: its data, its bss, its initrd, the
        // low pages where the boot structures were.
        let dirt = [0xa5u8; 64];
        for addr in
            [layout::HIMEM_START + 0x100, end - 64, initrd_at, layout::CMDLINE_START, layout::PVH_INFO_START]
        {
            ram.memory().write_slice(&dirt, GuestAddress(addr)).expect("in RAM");
        }
        let (again, bsp) = plan.reload(&ram, &loaded).expect("reload");
        assert_eq!(bsp, first, "the same entry and start info");
        assert_eq!(again.initrd, loaded.initrd);
        assert!(read(&ram, layout::HIMEM_START, image.len()) == image, "the kernel image as first loaded");
        assert_eq!(read(&ram, initrd_at, initrd.len()), initrd);
        assert_eq!(read(&ram, layout::CMDLINE_START, 14), b"console=ttyS0 ");
        assert_ne!(read(&ram, layout::PVH_INFO_START, 64), dirt.to_vec(), "hvm_start_info written again");
    }

    #[test]
    fn a_file_larger_than_guest_ram_is_refused_before_it_is_read() {
        let path = std::env::temp_dir().join(format!("splitvisor-boot-image-{}", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(4096)).expect("a file");
        let image = BootImage::from(path.as_path());
        assert_eq!(image.read("initrd", 4096).expect("fits").len(), 4096);
        let error = image.read("initrd", 4095).expect_err("too large").to_string();
        assert!(error.contains("4096 bytes do not fit in 4095 bytes of guest RAM"), "{error}");
        std::fs::remove_file(&path).expect("removed");
        let error = image.read("kernel", 1 << 20).expect_err("gone").to_string();
        assert!(error.starts_with(&format!("kernel {}: ", path.display())), "{error}");
        assert_eq!(BootImage::from(&b"abc"[..]).read("kernel", 1).expect("bytes"), b"abc");
    }

    #[test]
    fn reboot_actions_parse() {
        assert_eq!("end".parse(), Ok(OnReboot::End));
        assert_eq!("restart".parse(), Ok(OnReboot::Restart));
        assert!("reboot".parse::<OnReboot>().is_err());
        assert_eq!(OnReboot::Restart.to_string(), "restart");
    }
}
