//! The splitvisor guest kit: the project's own small guest programs.
//!
//! Each is a standard PVH guest (`XEN_ELFNOTE_PHYS32_ENTRY`, a 32-bit entry that enters
//! long mode, `hvm_start_info` read at start), written in `#![no_std]` Rust in `kit/` and
//! built by this crate's build script for the host target as a freestanding static ELF.
//! Any PVH-capable VMM runs them unchanged (splitvisor, QEMU `-M microvm -kernel`,
//! Firecracker). Every program ends by printing a result line (see [`GuestResult`]) and
//! resetting the machine through the i8042.
//!
//! ```
//! let hello = splitvisor_guests::find("hello").unwrap();
//! assert_eq!(&hello.elf[..4], b"\x7fELF");
//! assert_eq!(
//!     splitvisor_guests::GuestResult::parse_line("SPLITVISOR-RESULT: PASS"),
//!     Some(splitvisor_guests::GuestResult::Pass)
//! );
//! ```

/// One guest program.
#[derive(Debug)]
pub struct Guest {
    /// Its name (`--guest NAME`).
    pub name: &'static str,
    /// What it does, in one line.
    pub summary: &'static str,
    /// The ELF image.
    pub elf: &'static [u8],
}

/// Every program of the kit.
pub const GUESTS: &[Guest] = &[
    Guest {
        name: "hello",
        summary: "greets over the 8250, reports its vCPU count, powers off",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_HELLO")),
    },
    Guest {
        name: "marker",
        summary: "writes one byte to COM1 as its very first instruction (VMM start-up time), then passes",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_MARKER")),
    },
    Guest {
        name: "irq",
        summary: "takes 16 COM1 interrupts raised by the host through an irqfd",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_IRQ")),
    },
    Guest {
        name: "triple-fault",
        summary: "triple-faults on purpose",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_TRIPLE_FAULT")),
    },
    Guest {
        name: "idle",
        summary: "halts with interrupts off until the host stops the VM",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_IDLE")),
    },
    Guest {
        name: "echo",
        summary: "reads a line of host input from the console and prints it back",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_ECHO")),
    },
    Guest {
        name: "blk-verify",
        summary: "writes a numbered pattern to every virtio-blk disk, reads it back, checks it",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_BLK_VERIFY")),
    },
    Guest {
        name: "blk-bench",
        summary: "sequential 1 MiB and random 4 KiB reads and writes at queue depth 1 and 16",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_BLK_BENCH")),
    },
    Guest {
        name: "blk-stress",
        summary: "writes every 4 KiB block with its index and a generation in shuffled order, flushes, reads back, checks; pass after pass",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_BLK_STRESS")),
    },
    Guest {
        name: "blk-break",
        summary: "breaks its virtio-blk queue on purpose and expects the device to ask for a reset",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_BLK_BREAK")),
    },
    Guest {
        name: "exit-bench",
        summary: "times PIO and MMIO exit round trips with the TSC",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_EXIT_BENCH")),
    },
];

/// The program called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|guest| guest.name == name)
}

/// The names of every program, for error messages and `--help`.
pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|guest| guest.name).collect()
}

/// The command that runs a kit program under QEMU's `microvm` machine with KVM: the
/// program booted through PVH (`-kernel`), COM1 on standard output, the i8042 reset ending
/// QEMU (`-no-reboot`), `append` as the command line, each of `disks` (image, read-only) as
/// a virtio-blk device on virtio-mmio, which QEMU announces on the command line.
///
/// `-cpu host,-arch-capabilities` because plain `-cpu host` fails to start on hosts whose KVM
/// refuses the ARCH_CAPABILITIES MSR; `force-legacy=false` because QEMU's virtio-mmio is
/// legacy (version 1) by default and the kit speaks virtio 1.x.
pub fn qemu_microvm_command(
    elf: &std::path::Path,
    memory_mib: u32,
    append: Option<&str>,
    disks: &[(&std::path::Path, bool)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-m", &format!("{memory_mib}M"), "-smp", "1"])
        .args(["-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(elf);
    if let Some(append) = append {
        cmd.args(["-append", append]);
    }
    for (index, (path, read_only)) in disks.iter().enumerate() {
        let mut drive =
            std::ffi::OsString::from(format!("id=disk{index},format=raw,if=none,aio=threads,file="));
        drive.push(path.as_os_str());
        if *read_only {
            drive.push(",readonly=on");
        }
        cmd.arg("-drive").arg(drive);
        cmd.args(["-device", &format!("virtio-blk-device,drive=disk{index}")]);
    }
    cmd
}

#[path = "../kit/src/stress.rs"]
pub mod stress;

impl std::fmt::Display for stress::Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Magic(word) => write!(f, "not a blk-stress block (word 0 is {word:#x})"),
            Self::Index(index) => write!(f, "holds block {index}"),
            Self::Generation(generation) => write!(f, "holds generation {generation}"),
            Self::Checksum(sum) => write!(f, "bad checksum {sum:#x} (torn or corrupted)"),
            Self::Pattern(word) => write!(f, "pattern word {word} is wrong"),
        }
    }
}

/// Problems [`blk_stress_check`] lists one by one before it only counts.
const MAX_LISTED_PROBLEMS: usize = 16;

/// Checks a disk image after `blk-stress`: each of the first `blocks` 4 KiB blocks must be
/// that block in generation `generation`, in the format of [`stress`] (for a run with
/// `blk_stress.generation=G` and `blk_stress.passes=P`, the last generation is `G + P - 1`).
///
/// Returns one line per bad block (the first few, then a count), each naming the block and
/// what it holds instead: an older generation is a lost acknowledged write, another index a
/// misplaced one, a bad checksum a torn or corrupted block.
///
/// ```
/// use splitvisor_guests::{blk_stress_check, stress};
///
/// let mut image = vec![0u8; 3 * stress::BLOCK_SIZE];
/// for (index, block) in image.chunks_exact_mut(stress::BLOCK_SIZE).enumerate() {
///     stress::fill(block.try_into().unwrap(), index as u64, 7);
/// }
/// assert_eq!(blk_stress_check(&image, 7, 3), Ok(()));
/// stress::fill((&mut image[4096..8192]).try_into().unwrap(), 1, 6);
/// assert_eq!(blk_stress_check(&image, 7, 3), Err(vec!["block 1: holds generation 6".to_string()]));
/// ```
pub fn blk_stress_check(image: &[u8], generation: u64, blocks: u64) -> Result<(), Vec<String>> {
    let needed = u128::from(blocks) * stress::BLOCK_SIZE as u128;
    if (image.len() as u128) < needed {
        return Err(vec![format!(
            "the image holds {} bytes, fewer than {blocks} blocks of {} bytes",
            image.len(),
            stress::BLOCK_SIZE
        )]);
    }
    let mut problems = Vec::new();
    let mut bad = 0u64;
    for (index, block) in image.chunks_exact(stress::BLOCK_SIZE).take(blocks as usize).enumerate() {
        let block: &[u8; stress::BLOCK_SIZE] = block.try_into().expect("chunks_exact gives whole blocks");
        if let Err(mismatch) = stress::check(block, index as u64, generation) {
            bad += 1;
            if problems.len() < MAX_LISTED_PROBLEMS {
                problems.push(format!("block {index}: {mismatch}"));
            }
        }
    }
    if bad as usize > problems.len() {
        problems.push(format!("... {bad} bad blocks of {blocks} in all (expected generation {generation})"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// What starts the line a guest program ends with.
pub const RESULT_MARKER: &str = "SPLITVISOR-RESULT: ";

/// How a guest program says it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestResult {
    /// `SPLITVISOR-RESULT: PASS`.
    Pass,
    /// `SPLITVISOR-RESULT: FAIL <why>`.
    Fail(String),
}

impl GuestResult {
    /// Parses one console line; `None` if it is not a result line.
    pub fn parse_line(line: &str) -> Option<Self> {
        let rest = line.trim_end_matches(['\r', '\n']).split_once(RESULT_MARKER)?.1;
        if rest == "PASS" {
            Some(Self::Pass)
        } else {
            let why = rest.strip_prefix("FAIL").map(str::trim).unwrap_or(rest);
            Some(Self::Fail(why.to_string()))
        }
    }

    /// Whether the program passed.
    pub fn passed(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        assert_eq!(GuestResult::parse_line("SPLITVISOR-RESULT: PASS\n"), Some(GuestResult::Pass));
        assert_eq!(
            GuestResult::parse_line("SPLITVISOR-RESULT: FAIL not every vCPU came online"),
            Some(GuestResult::Fail("not every vCPU came online".into()))
        );
        assert_eq!(GuestResult::parse_line("hello"), None);
        assert_eq!(
            GuestResult::parse_line("SPLITVISOR-RESULT: PASSED?"),
            Some(GuestResult::Fail("PASSED?".into()))
        );
    }

    fn pt_note_and_entry(elf: &[u8]) -> (bool, u64) {
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
        let has_note = (0..phnum).any(|i| {
            let at = phoff + i * 56;
            u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 4
        });
        (has_note, u64::from_le_bytes(elf[0x18..0x20].try_into().unwrap()))
    }

    #[test]
    fn every_program_is_a_static_elf_with_a_note_segment() {
        for guest in GUESTS {
            assert_eq!(&guest.elf[..4], b"\x7fELF", "{}", guest.name);
            assert_eq!(guest.elf[4], 2, "{} is ELF64", guest.name);
            assert_eq!(u16::from_le_bytes([guest.elf[16], guest.elf[17]]), 2, "{} is ET_EXEC", guest.name);
            let (has_note, entry) = pt_note_and_entry(guest.elf);
            assert!(has_note, "{} has a PT_NOTE segment for the PVH note", guest.name);
            assert_eq!(entry, 0x10_0000, "{} starts at its PVH entry", guest.name);
        }
    }

    /// Ring-0 guest code must not use SSE: the build machines' software KVM cannot emulate
    /// it. Checked on the disassembly when objdump is there (CI installs binutils).
    #[test]
    fn no_program_uses_sse_registers() {
        for guest in GUESTS {
            let path = std::env::temp_dir().join(format!(
                "splitvisor-sse-check-{}-{}",
                std::process::id(),
                guest.name
            ));
            std::fs::write(&path, guest.elf).unwrap();
            let output = std::process::Command::new("objdump").arg("-d").arg(&path).output();
            let _ = std::fs::remove_file(&path);
            let output = match output {
                Ok(output) => output,
                Err(e) if std::env::var_os("CI").is_some() => {
                    panic!("objdump is needed in CI: {e}")
                }
                Err(e) => {
                    eprintln!("skipping the SSE check: objdump: {e}");
                    return;
                }
            };
            let text = String::from_utf8_lossy(&output.stdout);
            let sse: Vec<&str> = text.lines().filter(|l| l.contains("%xmm") || l.contains("%ymm")).collect();
            assert!(sse.is_empty(), "{} uses SSE registers:\n{}", guest.name, sse.join("\n"));
        }
    }
}
