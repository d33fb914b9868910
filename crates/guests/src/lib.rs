//! The splitvisor guest kit: the project's own small guest programs.
//!
//! Each is a standard PVH guest (`XEN_ELFNOTE_PHYS32_ENTRY`, a 32-bit entry that enters
//! long mode, `hvm_start_info` read at start), written in `#![no_std]` Rust in `kit/` and
//! built by this crate's build script for the host target as a freestanding static ELF.
//! Any PVH-capable VMM runs them unchanged (splitvisor, QEMU `-M microvm -kernel`,
//! Firecracker). Every program ends by printing a result line (see [`GuestResult`]) and
//! resetting the machine through the i8042.
//!
//! The I/O programs (`blk-bench`, `blk-stress`) run their loops in ring 3, which runs
//! natively even on a KVM that emulates guest ring 0; `blk-stress` writes blocks in the
//! format of [`stress`], and [`blk_stress_check`] checks an image after it; `console-flood`
//! writes the lines of [`flood`], and [`console_flood_check`] checks a console after it. The
//! guest table, with each program's command-line keys, is in this crate's README.
//!
//! Depending on this crate from crates.io needs nothing beyond the Rust toolchain that
//! builds the depending crate: the build script compiles the kit (`kit/`, shipped in the
//! package) with that same rustc for the host target.
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
        name: "console-flood",
        summary: "writes numbered, self-checking lines to COM1 as fast as the UART takes them, then passes",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_CONSOLE_FLOOD")),
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
    Guest {
        name: "net-ping",
        summary: "ARP and ICMP echo to the host side of the first virtio-net NIC, reports round trips",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_NET_PING")),
    },
    Guest {
        name: "net-echo",
        summary: "a TCP echo server (smoltcp) the host connects to",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_NET_ECHO")),
    },
    Guest {
        name: "net-bench",
        summary: "TCP and UDP throughput and packets per second against a host peer",
        elf: include_bytes!(env!("SPLITVISOR_GUEST_NET_BENCH")),
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

#[path = "../kit/src/flood.rs"]
pub mod flood;

/// The line `console-flood` prints before its numbered lines (followed by the count).
const FLOOD_HEADER: &str = "console-flood: writing ";
/// The line `console-flood` prints after them.
const FLOOD_FOOTER: &str = "console-flood: done: ";

/// Checks the console of a `console-flood` run that wrote `lines` lines: every line from 0
/// to `lines - 1` arrived exactly once, in order, and intact, between the program's first
/// and last line (a damaged one of those counts too: a byte lost there is a byte lost).
///
/// Returns one line per problem (the first few, then a count): a line that is not a
/// well-formed flood line (a lost, duplicated or changed byte; quoted), lines lost (a gap
/// in the numbers), a line that came again or out of order, output that ends early.
///
/// ```
/// use splitvisor_guests::{console_flood_check, flood};
///
/// let mut console = String::from("console-flood: writing 3 lines of 39 bytes\n");
/// for n in 0..3 {
///     let mut line = [0u8; flood::LINE_LEN];
///     flood::format(n, &mut line);
///     console.push_str(std::str::from_utf8(&line).unwrap());
/// }
/// console.push_str("console-flood: done: 3 lines\nSPLITVISOR-RESULT: PASS\n");
/// assert_eq!(console_flood_check(&console, 3), Ok(()));
/// let lost_byte = console.replacen("flood 000001 ", "flood 00001 ", 1);
/// assert_eq!(console_flood_check(&lost_byte, 3).unwrap_err().len(), 2); // damaged, so lost
/// ```
pub fn console_flood_check(console: &str, lines: u64) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut bad = 0u64;
    let mut note = |problem: String| {
        bad += 1;
        if problems.len() < MAX_LISTED_PROBLEMS {
            problems.push(problem);
        }
    };
    let mut rows = console.lines();
    match rows.by_ref().find(|row| row.starts_with(FLOOD_HEADER)) {
        Some(header) => {
            let said = header[FLOOD_HEADER.len()..].split(' ').next().and_then(|n| n.parse::<u64>().ok());
            if said != Some(lines) {
                note(format!("the program says it writes {header:?}, expected {lines} lines"));
            }
        }
        None => note(format!("no {FLOOD_HEADER:?} line: the program did not start its lines")),
    }
    let mut expected = 0u64;
    let mut ended = false;
    for row in rows {
        if row.starts_with(FLOOD_FOOTER) {
            ended = true;
            break;
        }
        match flood::parse(row.as_bytes()) {
            Some(n) if n == expected => expected += 1,
            Some(n) if n > expected => {
                note(format!("lines {expected}..={} lost (line {n} came next)", n - 1));
                expected = n + 1;
            }
            Some(n) => note(format!("line {n} again (or out of order), {}", after(expected))),
            None => {
                let quoted: String = row.chars().take(80).collect();
                note(format!("a damaged line {}: {quoted:?}", after(expected)));
            }
        }
    }
    if expected < lines {
        note(format!("lines {expected}..={} lost (none came {})", lines - 1, after(expected)));
    } else if expected > lines {
        note(format!("lines up to {} arrived, {lines} were written", expected - 1));
    }
    if !ended {
        note(format!("no {FLOOD_FOOTER:?} line: the output ends early or it was damaged"));
    }
    if bad as usize > problems.len() {
        problems.push(format!("... {bad} problems in all"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Where the next expected flood line `expected` stands, in words.
fn after(expected: u64) -> String {
    match expected {
        0 => "before line 0".into(),
        n => format!("after line {}", n - 1),
    }
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

    /// The disassembly of `guest`, or `None` (skip) where objdump is missing outside CI.
    fn disassembly(guest: &Guest) -> Option<String> {
        // One file per call: the tests that read disassemblies run in parallel.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "splitvisor-disasm-{}-{call}-{}",
            std::process::id(),
            guest.name
        ));
        std::fs::write(&path, guest.elf).unwrap();
        let output = std::process::Command::new("objdump").arg("-d").arg(&path).output();
        let _ = std::fs::remove_file(&path);
        match output {
            Ok(output) => {
                assert!(output.status.success(), "objdump failed on {}", guest.name);
                Some(String::from_utf8_lossy(&output.stdout).into_owned())
            }
            Err(e) if std::env::var_os("CI").is_some() => panic!("objdump is needed in CI: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: the disassembly checks need objdump: {e}");
                None
            }
        }
    }

    /// Ring-0 guest code must not use SSE: the build machines' software KVM cannot emulate
    /// it. The kit has one build configuration, so ring-3 code is held to the same rule.
    /// Checked on the disassembly (CI installs binutils).
    #[test]
    fn no_program_uses_sse_registers() {
        for guest in GUESTS {
            let Some(text) = disassembly(guest) else { return };
            let sse: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("%xmm") || l.contains("%ymm") || l.contains("%zmm"))
                .collect();
            assert!(sse.is_empty(), "{} uses SSE registers:\n{}", guest.name, sse.join("\n"));
        }
    }

    /// Nor the other instructions that emulator is known to lack (`int3` is left out: the
    /// linker pads between functions with it, never reached).
    #[test]
    fn no_program_uses_instructions_the_emulator_lacks() {
        const MISSING: [&str; 4] = ["cmpxchg16b", "xsave", "xrstor", "fwait"];
        for guest in GUESTS {
            let Some(text) = disassembly(guest) else { return };
            let bad: Vec<&str> = text
                .lines()
                .filter(|line| {
                    let mnemonic = line.split('\t').nth(2).and_then(|i| i.split_whitespace().next());
                    mnemonic.is_some_and(|m| MISSING.iter().any(|missing| m.starts_with(missing)))
                })
                .collect();
            assert!(
                bad.is_empty(),
                "{} uses instructions the emulator lacks:\n{}",
                guest.name,
                bad.join("\n")
            );
        }
    }

    /// The address in the `XEN_ELFNOTE_PHYS32_ENTRY` note, and the bytes of the ELF from there.
    fn pvh_entry(elf: &[u8]) -> (u64, &[u8]) {
        let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
        let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) as usize;
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
        let (phoff, phnum) = (u64_at(0x20), u16_at(0x38));
        let headers: Vec<(usize, usize, usize, usize)> = (0..phnum)
            .map(|i| phoff + i * 56)
            .map(|at| (u32_at(at), u64_at(at + 8), u64_at(at + 16), u64_at(at + 32)))
            .collect();
        let mut entry = None;
        for &(_, offset, _, size) in headers.iter().filter(|h| h.0 == 4) {
            let mut at = offset;
            while at + 12 <= offset + size {
                let (name_len, desc_len, kind) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
                let desc = at + 12 + name_len.next_multiple_of(4);
                if kind == 18 && &elf[at + 12..at + 15] == b"Xen" {
                    entry = Some(u32_at(desc) as u64);
                }
                at = desc + desc_len.next_multiple_of(4);
            }
        }
        let entry = entry.expect("a XEN_ELFNOTE_PHYS32_ENTRY note");
        let (_, offset, vaddr, _) = headers
            .iter()
            .find(|h| h.0 == 1 && h.2 as u64 <= entry && entry < (h.2 + h.3) as u64)
            .expect("a PT_LOAD segment holding the entry");
        (entry, &elf[offset + (entry as usize - vaddr)..])
    }

    #[test]
    fn marker_writes_com1_before_anything_else_and_no_other_program_does() {
        // mov dx, 0x3f8; mov al, 'M'; out dx, al
        const MARKER_ENTRY: [u8; 7] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'M', 0xee];
        for guest in GUESTS {
            let (entry, code) = pvh_entry(guest.elf);
            assert_eq!(entry, 0x10_0000, "{}", guest.name);
            if guest.name == "marker" {
                assert_eq!(code[..7], MARKER_ENTRY, "marker's first instructions");
            } else {
                assert_eq!(code[..2], [0xfa, 0xfc], "{} starts with the runtime's cli; cld", guest.name);
            }
        }
    }

    /// Every program is in the README's table exactly once, and the table names no other.
    #[test]
    fn the_readme_table_lists_every_program_once() {
        let readme = include_str!("../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter_map(|line| line.strip_prefix("| `")?.split_once('`').map(|(name, _)| name))
            .collect();
        for guest in GUESTS {
            assert_eq!(
                rows.iter().filter(|row| **row == guest.name).count(),
                1,
                "{} in README.md",
                guest.name
            );
        }
        for row in &rows {
            assert!(find(row).is_some(), "README.md lists `{row}`, which is not a program");
        }
        let names = names();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "program names are unique");
    }

    /// A console as `console-flood` writes it: the lines `numbers`, in that order.
    fn flood_console(lines: u64, numbers: impl Iterator<Item = u64>) -> String {
        let mut console = format!("hello\n{FLOOD_HEADER}{lines} lines of {} bytes\n", flood::LINE_LEN);
        for n in numbers {
            let mut line = [0u8; flood::LINE_LEN];
            flood::format(n, &mut line);
            console.push_str(std::str::from_utf8(&line).unwrap());
        }
        console + FLOOD_FOOTER + &format!("{lines} lines\nSPLITVISOR-RESULT: PASS\n")
    }

    #[test]
    fn flood_lines_round_trip_and_refuse_any_damage() {
        let mut line = [0u8; flood::LINE_LEN];
        flood::format(123, &mut line);
        assert!(line.starts_with(b"flood 000123 "), "{:?}", std::str::from_utf8(&line));
        assert_eq!(line[flood::LINE_LEN - 1], b'\n');
        let text = &line[..flood::LINE_LEN - 1];
        assert_eq!(flood::parse(text), Some(123));
        for at in 0..text.len() {
            let mut changed = text.to_vec();
            changed[at] ^= 0x01;
            assert_eq!(flood::parse(&changed), None, "a changed byte {at}");
            let mut lost = text.to_vec();
            lost.remove(at);
            assert_eq!(flood::parse(&lost), None, "a lost byte {at}");
            let mut doubled = text.to_vec();
            doubled.insert(at, text[at]);
            assert_eq!(flood::parse(&doubled), None, "a doubled byte {at}");
        }
        let mut other = [0u8; flood::LINE_LEN];
        flood::format(124, &mut other);
        assert_ne!(line[13..], other[13..], "neighbouring lines differ beyond their numbers");
    }

    #[test]
    fn console_flood_check_finds_lost_duplicated_and_damaged_lines() {
        assert_eq!(console_flood_check(&flood_console(50, 0..50), 50), Ok(()));
        // Carriage returns (a terminal's) are fine.
        assert_eq!(console_flood_check(&flood_console(50, 0..50).replace('\n', "\r\n"), 50), Ok(()));

        let lost = console_flood_check(&flood_console(50, (0..50).filter(|&n| n != 17)), 50).unwrap_err();
        assert_eq!(lost, ["lines 17..=17 lost (line 18 came next)"]);
        let tail = console_flood_check(&flood_console(50, 0..40), 50).unwrap_err();
        assert_eq!(tail, ["lines 40..=49 lost (none came after line 39)"]);
        let again = console_flood_check(&flood_console(50, (0..30).chain(29..50)), 50).unwrap_err();
        assert_eq!(again, ["line 29 again (or out of order), after line 29"]);

        let console = flood_console(50, 0..50);
        let mut bytes = console.clone().into_bytes();
        let at = console.find("flood 000020").unwrap() + 20;
        bytes[at] ^= 0x20;
        let damaged = console_flood_check(&String::from_utf8(bytes).unwrap(), 50).unwrap_err();
        assert_eq!(damaged.len(), 2, "{damaged:?}");
        assert!(damaged[0].starts_with("a damaged line after line 19: \"flood 000020 "), "{damaged:?}");
        assert_eq!(damaged[1], "lines 20..=20 lost (line 21 came next)");
        // A lost newline joins two lines: both are gone.
        let at = console.find("flood 000031").unwrap() - 1;
        let joined =
            console_flood_check(&format!("{}{}", &console[..at], &console[at + 1..]), 50).unwrap_err();
        assert_eq!(joined.len(), 2, "{joined:?}");
        assert_eq!(joined[1], "lines 30..=31 lost (line 32 came next)");
        // The output stops: no footer.
        let at = console.find(FLOOD_FOOTER).unwrap();
        let cut = console_flood_check(&console[..at], 50).unwrap_err();
        assert!(cut[0].contains("no \"console-flood: done: \" line"), "{cut:?}");
        // No header, or another count.
        assert!(
            console_flood_check("SPLITVISOR-RESULT: PASS\n", 1).unwrap_err()[0].contains("did not start")
        );
        assert!(console_flood_check(&console, 51).unwrap_err()[0].contains("expected 51 lines"));
        // Many problems: listed, then counted.
        let sparse = console_flood_check(&flood_console(100, (0..100).step_by(2)), 100).unwrap_err();
        assert_eq!(sparse.len(), MAX_LISTED_PROBLEMS + 1);
        assert_eq!(sparse[MAX_LISTED_PROBLEMS], "... 50 problems in all");
    }

    #[test]
    fn stress_blocks_round_trip_and_every_kind_of_damage_is_named() {
        use stress::{BLOCK_SIZE, Mismatch, check, fill};
        let mut block = [0u8; BLOCK_SIZE];
        fill(&mut block, 12345, 9);
        assert_eq!(check(&block, 12345, 9), Ok(()));
        assert_eq!(&block[..8], b"SVSTRESS");
        assert_eq!(u64::from_le_bytes(block[8..16].try_into().unwrap()), 12345);
        assert_eq!(u64::from_le_bytes(block[16..24].try_into().unwrap()), 9);
        // Word 3 holds its own disk offset keyed by the generation.
        assert_eq!(
            u64::from_le_bytes(block[24..32].try_into().unwrap()),
            (12345 * 4096 + 24) ^ 9u64.wrapping_mul(stress::GENERATION_KEY)
        );
        assert_eq!(check(&block, 12345, 10), Err(Mismatch::Generation(9)));
        assert_eq!(check(&block, 12346, 9), Err(Mismatch::Index(12345)));
        assert_eq!(check(&[0u8; BLOCK_SIZE], 0, 0), Err(Mismatch::Magic(0)));

        let mut torn = block;
        let mut other = [0u8; BLOCK_SIZE];
        fill(&mut other, 12345, 8);
        torn[2048..].copy_from_slice(&other[2048..]);
        assert!(matches!(check(&torn, 12345, 9), Err(Mismatch::Checksum(_))));

        // A wrong pattern word with a checksum made to match is still caught.
        let mut forged = block;
        forged[800] ^= 1;
        let sum = stress::checksum(&forged);
        forged[4088..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(check(&forged, 12345, 9), Err(Mismatch::Pattern(100)));
    }

    #[test]
    fn blk_stress_check_names_bad_blocks_then_counts_them() {
        let blocks = 40u64;
        let mut image = vec![0u8; blocks as usize * stress::BLOCK_SIZE];
        for (index, block) in image.chunks_exact_mut(stress::BLOCK_SIZE).enumerate() {
            stress::fill(block.try_into().unwrap(), index as u64, 3);
        }
        assert_eq!(blk_stress_check(&image, 3, blocks), Ok(()));
        // Fewer blocks than the image holds are fine; more are not.
        assert_eq!(blk_stress_check(&image, 3, 10), Ok(()));
        assert_eq!(blk_stress_check(&image, 3, blocks + 1).unwrap_err().len(), 1);

        let problems = blk_stress_check(&image, 4, blocks).unwrap_err();
        assert_eq!(problems.len(), MAX_LISTED_PROBLEMS + 1, "{problems:?}");
        assert_eq!(problems[0], "block 0: holds generation 3");
        assert!(problems[MAX_LISTED_PROBLEMS].contains("40 bad blocks of 40"), "{problems:?}");

        image[5 * 4096 + 100] ^= 0x40;
        let problems = blk_stress_check(&image, 3, blocks).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("block 5: bad checksum"), "{problems:?}");
    }
}
