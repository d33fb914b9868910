//! The guest kit's programs that measure the VMM and stress the disk path, on KVM: `marker`,
//! `hello` with every vCPU splitvisor starts, `blk-stress` (its image checked on the host)
//! and `blk-bench` with its loop in ring 3.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use splitvisor::bus::BusRange;
use splitvisor::guests::{self, GuestResult, blk_stress_check, stress};
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Error, Layout, VmBuilder, VmReport};
use support::Capture;
use support::images::Image;

const MIB: u64 = 1 << 20;
/// Generous: each of these takes seconds at most on the emulating KVM.
const TIMEOUT: Duration = Duration::from_secs(120);

fn run(
    guest: &str,
    cmdline: &str,
    disk: Option<&Image>,
    layout: Layout,
) -> (Result<VmReport, Error>, String) {
    let console = Capture::default();
    let mut builder = VmBuilder::new(guests::find(guest).unwrap().elf)
        .cmdline(cmdline)
        .layout(layout)
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(TIMEOUT));
    if let Some(image) = disk {
        builder = builder.disk(DiskConfig::image(&image.0));
    }
    (builder.build().unwrap().run(), console.text())
}

/// A generation that differs run to run, so a stale image cannot pass.
fn fresh_generation() -> u64 {
    u64::from(std::process::id()) * 1000 + 17
}

#[test]
fn marker_writes_its_byte_first_then_passes() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("marker", "console=ttyS0", None, Layout::monolithic());
    let report = report.unwrap();
    assert!(console.starts_with("M\n"), "the marker byte is the first console output: {console:?}");
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(report.first_output.is_some_and(|first| first >= report.created));
}

#[test]
fn hello_brings_up_as_many_vcpus_as_splitvisor_starts() {
    if !support::kvm() {
        return;
    }
    // The most vCPUs splitvisor starts: one more than the application processors' stacks.
    let most = splitvisor::memory::layout::MAX_AP_STACKS as u32 + 1;
    let console = Capture::default();
    let report = VmBuilder::new(guests::find("hello").unwrap().elf)
        .vcpus(most)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(TIMEOUT))
        .build()
        .unwrap()
        .run()
        .unwrap();
    let console = console.text();
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains(&format!("vcpus={most} ")), "{console}");
}

#[test]
fn blk_stress_two_passes_leave_the_last_generation_in_every_block() {
    if !support::kvm() {
        return;
    }
    let blocks = 2 * MIB / stress::BLOCK_SIZE as u64;
    let image = Image::new("stress-2-passes", 2 * MIB);
    let first = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={first} blk_stress.passes=2");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains(", ring 3\n"), "the loop ran in ring 3: {console}");
    assert!(
        console
            .contains(&format!("pass 2/2 generation {}: {blocks}/{blocks} writes acknowledged", first + 1)),
        "{console}"
    );
    let bytes = image.bytes();
    assert_eq!(blk_stress_check(&bytes, first + 1, blocks), Ok(()));
    // The second pass rewrote every block: none still holds the first generation.
    let stale = blk_stress_check(&bytes, first, blocks).unwrap_err();
    assert!(stale.last().unwrap().contains(&format!("{blocks} bad blocks of {blocks}")), "{stale:?}");
}

#[test]
fn blk_stress_writes_only_the_blocks_it_is_given() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-some", 4 * MIB);
    let generation = fresh_generation();
    let cmdline =
        format!("console=ttyS0 blk_stress.generation={generation} blk_stress.blocks=300 blk_stress.depth=3");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("300 blocks of 4 KiB (disk 1024), 1 passes"), "{console}");
    let bytes = image.bytes();
    assert_eq!(blk_stress_check(&bytes, generation, 300), Ok(()));
    assert!(bytes[300 * 4096..].iter().all(|b| *b == 0), "nothing written past block 299");
}

/// The ring-3 loop against a disk served by a driver partition over vhost-user.
#[test]
fn blk_stress_in_ring_3_against_a_driver_partition() {
    if !support::kvm() {
        return;
    }
    let blocks = MIB / stress::BLOCK_SIZE as u64;
    let image = Image::new("stress-partition", MIB);
    let generation = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={generation} blk_stress.passes=2");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::microkernel());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert_eq!(blk_stress_check(&image.bytes(), generation + 1, blocks), Ok(()));
}

/// Without polling, ring 3 waits for the device's interrupts through ring 0: every wait is
/// `ud2` to the service, `sti; hlt`, the virtio interrupt handler (which must be reached
/// whatever its vector), back to ring 3. The FLUSH at least (an fdatasync on the host)
/// outlasts the few checks before a wait.
#[test]
fn blk_stress_in_ring_3_waits_for_interrupts_when_it_does_not_poll() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-irq", MIB);
    let generation = fresh_generation();
    let cmdline = format!("console=ttyS0 blk_stress.generation={generation} blk_stress.poll_us=0");
    let (report, console) = run("blk-stress", &cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    let interrupts: u64 = console
        .split_once(", interrupts ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count: {console}"));
    assert!(interrupts > 0, "the guest never took the device's interrupt: {console}");
    assert_eq!(blk_stress_check(&image.bytes(), generation, MIB / 4096), Ok(()));
}

/// A stand-in virtio-blk device on virtio-mmio that misbehaves in a chosen way, to check
/// that the guest's waits are bounded. It speaks just enough of the transport for the kit's
/// driver; when it completes requests, it does so from a thread of its own, later than the
/// doorbell, writing the used ring through the guest RAM's memfd, and never interrupts.
mod fake_blk {
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use splitvisor::bus::BusDevice;

    /// Where the device sits, and the command-line word that names it to the guest.
    pub const BASE: u64 = 0xd000_0000;
    pub const CMDLINE: &str = "virtio_mmio.device=512@0xd0000000:11";
    const CAPACITY_SECTORS: u64 = 8192;

    #[derive(Default)]
    struct Queue {
        size: u32,
        desc: u64,
        avail: u64,
        used: u64,
        used_idx: u16,
        next_avail: u16,
    }

    pub struct FakeBlk {
        features_sel: u32,
        status: u32,
        queue: Arc<Mutex<Queue>>,
        /// Guest RAM (its memfd), once the VM is built; requests complete only with it.
        ram: Arc<Mutex<Option<std::fs::File>>>,
    }

    impl FakeBlk {
        pub fn new(ram: Arc<Mutex<Option<std::fs::File>>>) -> Self {
            Self { features_sel: 0, status: 0, queue: Arc::default(), ram }
        }
    }

    fn set_low(value: &mut u64, low: u32) {
        *value = (*value & !0xffff_ffff) | u64::from(low);
    }

    fn set_high(value: &mut u64, high: u32) {
        *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
    }

    /// Completes every request offered so far with status OK, without an interrupt.
    fn complete(queue: &Mutex<Queue>, ram: &std::fs::File) {
        let mut q = queue.lock().unwrap();
        let read = |addr: u64, len: usize| {
            let mut bytes = vec![0u8; len];
            ram.read_exact_at(&mut bytes, addr).unwrap();
            bytes
        };
        let avail_idx = u16::from_le_bytes(read(q.avail + 2, 2).try_into().unwrap());
        while q.next_avail != avail_idx {
            let slot = u64::from(q.next_avail) % u64::from(q.size);
            let head = u16::from_le_bytes(read(q.avail + 4 + 2 * slot, 2).try_into().unwrap());
            // The status byte is the chain's last descriptor.
            let mut index = head;
            loop {
                let desc = read(q.desc + 16 * u64::from(index), 16);
                let (addr, flags, next) = (
                    u64::from_le_bytes(desc[0..8].try_into().unwrap()),
                    u16::from_le_bytes(desc[12..14].try_into().unwrap()),
                    u16::from_le_bytes(desc[14..16].try_into().unwrap()),
                );
                if flags & 1 == 0 {
                    ram.write_all_at(&[0], addr).unwrap();
                    break;
                }
                index = next;
            }
            let entry = q.used + 4 + 8 * (u64::from(q.used_idx) % u64::from(q.size));
            ram.write_all_at(&u32::from(head).to_le_bytes(), entry).unwrap();
            ram.write_all_at(&1u32.to_le_bytes(), entry + 4).unwrap();
            q.used_idx = q.used_idx.wrapping_add(1);
            ram.write_all_at(&q.used_idx.to_le_bytes(), q.used + 2).unwrap();
            q.next_avail = q.next_avail.wrapping_add(1);
        }
    }

    impl BusDevice for FakeBlk {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let value: u64 = match offset {
                0x000 => 0x7472_6976,                       // "virt"
                0x004 => 2,                                 // version
                0x008 => 2,                                 // block device
                0x010 => u64::from(self.features_sel == 1), // VERSION_1 only
                0x034 => 64,                                // QueueNumMax
                0x070 => u64::from(self.status),
                0x100 => CAPACITY_SECTORS,
                _ => 0,
            };
            let bytes = value.to_le_bytes();
            let n = data.len().min(8);
            data[..n].copy_from_slice(&bytes[..n]);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            let mut bytes = [0u8; 4];
            let n = data.len().min(4);
            bytes[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(bytes);
            let mut q = self.queue.lock().unwrap();
            match offset {
                0x014 => self.features_sel = value,
                0x038 => q.size = value,
                0x070 => self.status = value,
                0x080 => set_low(&mut q.desc, value),
                0x084 => set_high(&mut q.desc, value),
                0x090 => set_low(&mut q.avail, value),
                0x094 => set_high(&mut q.avail, value),
                0x0a0 => set_low(&mut q.used, value),
                0x0a4 => set_high(&mut q.used, value),
                0x050 => {
                    // QueueNotify: complete later, from another thread, silently.
                    drop(q);
                    let (queue, ram) = (self.queue.clone(), self.ram.clone());
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(5));
                        if let Some(ram) = ram.lock().unwrap().as_ref() {
                            complete(&queue, ram);
                        }
                    });
                }
                _ => {}
            }
        }
    }
}

/// Runs blk-stress (ring 3, no polling: it waits at once) against a [`fake_blk::FakeBlk`];
/// `completes` gives the device the guest's RAM, without which it never completes anything.
fn blk_stress_against_a_fake_device(completes: bool, timeout_s: u64) -> (GuestResult, String) {
    let ram = Arc::new(std::sync::Mutex::new(None));
    let device = Arc::new(std::sync::Mutex::new(fake_blk::FakeBlk::new(ram.clone())));
    let console = Capture::default();
    let cmdline = format!(
        "console=ttyS0 {} blk_stress.blocks=64 blk_stress.passes=1000 blk_stress.poll_us=0 blk_stress.timeout_s={timeout_s}",
        fake_blk::CMDLINE
    );
    let vm = VmBuilder::new(guests::find("blk-stress").unwrap().elf)
        .cmdline(&cmdline)
        .mmio_device(BusRange::new(fake_blk::BASE, 0x200).unwrap(), "fake-blk", device)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(TIMEOUT))
        .build()
        .unwrap();
    if completes {
        let region = vm.ram().regions()[0];
        assert_eq!((region.guest_addr, region.file_offset), (0, 0), "low RAM starts the memfd");
        *ram.lock().unwrap() = Some(std::fs::File::from(vm.ram().memfd().try_clone_to_owned().unwrap()));
    }
    let report = vm.run().unwrap();
    (report.guest_result.unwrap_or_else(|| panic!("no result: {}", console.text())), console.text())
}

/// A device that never completes a request must not leave the guest halted forever: it wakes
/// on its timer, sees no completion within `blk_stress.timeout_s` and fails, saying so.
#[test]
fn blk_stress_fails_when_no_request_completes_in_time() {
    if !support::kvm() {
        return;
    }
    let (result, console) = blk_stress_against_a_fake_device(false, 1);
    assert_eq!(result, GuestResult::Fail("no request completed within the time limit".into()), "{console}");
    assert!(console.contains("the device failed: no request completed within the time limit"), "{console}");
}

/// A device that completes requests but never interrupts: a guest that only halted would
/// hang; blk-stress sees the completion on a timer wake-up, gives the interrupt a second,
/// and fails naming the fault.
#[test]
fn blk_stress_fails_on_a_completion_without_an_interrupt() {
    if !support::kvm() {
        return;
    }
    let (result, console) = blk_stress_against_a_fake_device(true, 60);
    assert_eq!(
        result,
        GuestResult::Fail("the device completed a request but raised no interrupt".into()),
        "{console}"
    );
}

#[test]
fn blk_stress_refuses_bad_settings_with_a_reason() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("stress-bad", MIB);
    for (cmdline, why) in [
        ("blk_stress.depth=17", "blk_stress.depth must be 1 to 16"),
        ("blk_stress.ring=1", "blk_stress.ring must be 0 or 3"),
        ("blk_stress.passes=x", "bad command line"),
    ] {
        let (report, console) = run("blk-stress", cmdline, Some(&image), Layout::monolithic());
        assert_eq!(report.unwrap().guest_result, Some(GuestResult::Fail(why.into())), "{console}");
    }
    assert!(image.bytes().iter().all(|b| *b == 0), "nothing written");
}

#[test]
fn blk_bench_runs_its_loop_in_ring_3_by_default() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("bench-ring3", 16 * MIB);
    let (report, console) = run(
        "blk-bench",
        "console=ttyS0 blk_bench.mib=4 blk_bench.ops=200",
        Some(&image),
        Layout::monolithic(),
    );
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("clock kvm-clock, ring 3\n"), "{console}");
    for workload in ["seq-read-1M-qd1", "rand-write-4K-qd16"] {
        assert!(console.contains(&format!("blk-bench: {workload} ops=")), "{workload}: {console}");
    }
    // The untimed warm-up ran first, and did requests.
    let warm_up = console.find("blk-bench: warm-up 50 ms, ").expect("no warm-up line");
    assert!(warm_up < console.find(" ops=").unwrap(), "{console}");
    let requests: u64 = console[warm_up..].split(' ').nth(4).and_then(|n| n.parse().ok()).unwrap();
    assert!(requests > 0, "{console}");
}

#[test]
fn blk_bench_ring_0_stays_selectable() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("bench-ring0", 4 * MIB);
    let cmdline = "console=ttyS0 blk_bench.ring=0 blk_bench.mib=1 blk_bench.ops=10";
    let (report, console) = run("blk-bench", cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("clock kvm-clock, ring 0\n"), "{console}");
}

#[test]
fn blk_bench_runs_only_the_workloads_named() {
    if !support::kvm() {
        return;
    }
    let image = Image::new("bench-only", 4 * MIB);
    let cmdline = "console=ttyS0 blk_bench.mib=1 blk_bench.ops=10 blk_bench.warmup_ms=0 \
                   blk_bench.only=rand-read-4K-qd1,seq-write-1M-qd16";
    let (report, console) = run("blk-bench", cmdline, Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
    assert!(console.contains("blk-bench: warm-up 0 ms, 0 requests, untimed\n"), "{console}");
    let ran: Vec<&str> = console
        .lines()
        .filter_map(|line| line.strip_prefix("blk-bench: ")?.split_once(" ops=").map(|(name, _)| name))
        .collect();
    assert_eq!(ran, ["rand-read-4K-qd1", "seq-write-1M-qd16"], "{console}");

    // A name it does not know fails the run before any request.
    let cmdline = "console=ttyS0 blk_bench.only=rand-read-4K-qd1,rand-read-8K-qd1";
    let (report, console) = run("blk-bench", cmdline, Some(&image), Layout::monolithic());
    let why = "blk_bench.only names a workload blk-bench does not have";
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Fail(why.into())), "{console}");
    assert!(!console.contains(" ops="), "{console}");
}

/// A failure found in ring 3 comes back to ring 0 and is reported like any other.
#[test]
fn a_failure_in_ring_3_is_reported() {
    if !support::kvm() {
        return;
    }
    // Smaller than one 1 MiB request: the first workload fails, in ring 3.
    let image = Image::new("bench-tiny", MIB / 2);
    let (report, console) = run("blk-bench", "console=ttyS0", Some(&image), Layout::monolithic());
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Fail("disk too small".into())), "{console}");
    assert!(console.contains(", ring 3\n"), "{console}");
}
