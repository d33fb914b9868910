//! Guest programs on KVM, through the monolithic layout.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use splitvisor::guests::{self, GuestResult};
use splitvisor::layout::{ConsoleOutput, DiskConfig, Error, Layout, VmBuilder, VmReport};
use splitvisor::vcpu::acpi::AcpiError;
use std::sync::Arc;

use splitvisor::vcpu::boot::BootState;
use splitvisor::vcpu::{Buses, KvmVm, VcpuError, VcpuSetup, VmControl, VmEnd, VmError};
use support::Capture;

/// Generous: these guests take well under a second even on the emulating KVM.
const TIMEOUT: Duration = Duration::from_secs(60);

fn run(guest: &str, vcpus: u32) -> (Result<VmReport, Error>, String) {
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find(guest).unwrap().elf)
        .memory(128 << 20)
        .vcpus(vcpus)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(TIMEOUT))
        .build()
        .expect("the VM builds");
    (vm.run(), console.text())
}

#[test]
fn hello_on_one_vcpu() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("hello", 1);
    let report = report.unwrap();
    assert!(console.contains("Hello from the splitvisor guest kit!"), "{console}");
    assert!(console.contains("vcpus=1 "), "{console}");
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}");
    assert_eq!(report.end, VmEnd::GuestReset);
    assert!(report.first_output.is_some());
    assert!(report.pio_exits > 0);
    let com1 = report.buses[0].devices.iter().find(|d| d.name.starts_with("com1")).unwrap();
    assert!(com1.writes >= console.len() as u64, "every console byte went through the bus");
}

#[test]
fn hello_on_two_vcpus() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("hello", 2);
    assert!(console.contains("vcpus=2 "), "{console}");
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
}

#[test]
fn irq_guest_takes_interrupts_raised_through_irqfd() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("irq", 1);
    assert!(console.contains("interrupts=16 "), "{console}");
    assert_eq!(report.unwrap().guest_result, Some(GuestResult::Pass), "{console}");
}

#[test]
fn triple_fault_ends_the_vm_with_a_typed_error() {
    if !support::kvm() {
        return;
    }
    let (report, console) = run("triple-fault", 1);
    assert!(console.contains("faulting on purpose"), "{console}");
    match report {
        Err(Error::Vcpu(VcpuError::Shutdown { vcpu: 0, rip })) => {
            assert!(rip >= 0x10_0000, "rip {rip:#x}")
        }
        other => panic!("expected a shutdown error, got {other:?}"),
    }
}

#[test]
fn the_host_stops_a_halted_guest_and_joins_every_vcpu() {
    if !support::kvm() {
        return;
    }
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
        .vcpus(2)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .build()
        .unwrap();
    let stop = vm.stop_handle();
    let stopper = std::thread::spawn(move || {
        // Wait for the guest to get to its halt, then stop it.
        let start = Instant::now();
        while !console.text().contains("halting") && start.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.stop();
    });
    let report = vm.run().unwrap();
    stopper.join().unwrap();
    assert_eq!(report.end, VmEnd::Stopped);
    assert_eq!(report.guest_result, None);
}

/// Two vCPUs spinning on `jmp $`, straight on the vCPU API.
fn spinning_vcpus() -> (splitvisor::memory::GuestRam, KvmVm, Vec<splitvisor::vcpu::Vcpu>, Buses) {
    vcpus_running(2, &[0xeb, 0xfe])
}

/// `count` vCPUs that run `code` (32-bit, flat) from its first byte, straight on the vCPU
/// API.
fn vcpus_running(
    count: u32,
    code: &[u8],
) -> (splitvisor::memory::GuestRam, KvmVm, Vec<splitvisor::vcpu::Vcpu>, Buses) {
    use splitvisor::bus::{Bus, BusKind};
    use vm_memory::{Bytes, GuestAddress};

    let ram = splitvisor::memory::GuestRam::new(64 << 20).unwrap();
    ram.memory().write_slice(code, GuestAddress(0x10_0000)).unwrap();
    let vm = KvmVm::with_memory(&ram).unwrap();
    let vcpus = vm.create_vcpus(count).unwrap();
    let state = BootState::Pvh { entry: 0x10_0000, start_info: 0x6000 };
    for vcpu in &vcpus {
        vcpu.configure(vm.supported_cpuid(), Some(&state)).unwrap();
    }
    let buses = Buses { pio: Arc::new(Bus::new(BusKind::Pio)), mmio: Arc::new(Bus::new(BusKind::Mmio)) };
    (ram, vm, vcpus, buses)
}

#[test]
fn the_vcpu_threads_are_known_to_run_even_when_their_set_up_failed() {
    if !support::kvm() {
        return;
    }
    let (_ram, _vm, vcpus, buses) = spinning_vcpus();
    let running = VmControl::new().start(vcpus, buses.clone()).unwrap();
    assert!(running.wait_until_running(TIMEOUT), "both vCPU threads came to their run loop");
    running.stop_handle().guest_reset();
    let stopped = running.wait_until(None);
    assert!(stopped.restartable());
    // A restart whose set-up fails on every vCPU: no thread runs its vCPU, and whoever
    // waits for them to run hears so at once rather than at its bound.
    let failing: VcpuSetup = Arc::new(|vcpu| Err(VcpuError::SetupTimeout { vcpu: vcpu.index() }));
    let running = stopped.restart(buses, failing).unwrap();
    assert!(running.wait_until_running(TIMEOUT), "the threads that gave up were counted");
    let end = running.wait(Some(TIMEOUT));
    assert!(matches!(end, Err(VcpuError::SetupTimeout { .. })), "{end:?}");
}

#[test]
fn the_boot_vcpu_is_known_to_have_run_once_it_served_the_exit_of_its_first_kvm_run() {
    if !support::kvm() {
        return;
    }
    // `out 0x80, al` then `jmp $`: the first KVM_RUN returns at the port write, which the
    // vCPU serves (nothing there) before it enters again.
    let (_ram, _vm, vcpus, buses) = vcpus_running(1, &[0xe6, 0x80, 0xeb, 0xfe]);
    let running = VmControl::new().start(vcpus, buses).unwrap();
    assert!(running.wait_until_boot_vcpu_served_first_exit(TIMEOUT));
    running.stop_handle().stop();
    running.wait(Some(TIMEOUT)).unwrap();

    // A guest that spins from its first instruction makes no exit: the wait ends at its
    // bound, saying so.
    let (_ram, _vm, vcpus, buses) = spinning_vcpus();
    let running = VmControl::new().start(vcpus, buses.clone()).unwrap();
    let started = Instant::now();
    assert!(!running.wait_until_boot_vcpu_served_first_exit(Duration::from_millis(100)));
    assert!(started.elapsed() >= Duration::from_millis(100));
    running.stop_handle().guest_reset();
    let stopped = running.wait_until(None);
    // A boot vCPU whose set-up fails never enters KVM_RUN: the wait ends at once.
    let failing: VcpuSetup = Arc::new(|vcpu| Err(VcpuError::SetupTimeout { vcpu: vcpu.index() }));
    let running = stopped.restart(buses, failing).unwrap();
    assert!(
        running.wait_until_boot_vcpu_served_first_exit(TIMEOUT),
        "the boot vCPU that gave up was counted"
    );
    let end = running.wait(Some(TIMEOUT));
    assert!(matches!(end, Err(VcpuError::SetupTimeout { .. })), "{end:?}");
}

#[test]
fn the_supported_cpuid_read_ahead_on_the_boot_vcpu_s_thread_is_the_one_kvm_gives() {
    if !support::kvm() {
        return;
    }
    let ram = splitvisor::memory::GuestRam::new(16 << 20).unwrap();
    assert!(VmControl::new().read_supported_cpuid().is_none(), "no prepared thread to read it");
    let mut control = VmControl::new();
    control.prepare_threads(1).unwrap();
    let ahead = control.read_supported_cpuid().expect("read on vCPU 0's thread");
    let vm = KvmVm::with_memory_and_cpuid(&ram, Some(ahead)).unwrap();
    let here = KvmVm::with_memory(&ram).unwrap();
    // KVM answers with the APIC ID of the host CPU the reading thread ran on, which
    // `Vcpu::configure` replaces with the vCPU's: the rest is the same.
    let host_independent = |vm: &KvmVm| {
        let mut entries = vm.supported_cpuid().as_slice().to_vec();
        for entry in &mut entries {
            match entry.function {
                1 => entry.ebx &= 0x00ff_ffff,
                0xb | 0x1f => entry.edx = 0,
                _ => {}
            }
        }
        entries
    };
    assert!(host_independent(&vm).len() > 1);
    assert_eq!(host_independent(&vm), host_independent(&here));
}

#[test]
fn the_driver_program_is_looked_for_only_when_a_device_runs_in_a_partition() {
    if !support::kvm() {
        return;
    }
    let looked = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let builder = |layout: Layout| {
        let looked = looked.clone();
        VmBuilder::new(guests::find("marker").unwrap().elf)
            .layout(layout)
            .console(ConsoleOutput::Discard)
            .timeout(Some(TIMEOUT))
            .find_driver_with(move || {
                looked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                None
            })
    };
    let vm = builder(Layout::monolithic()).build().unwrap();
    assert_eq!(looked.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(vm);
    let refused = builder(Layout::microkernel()).build().map(drop).unwrap_err();
    assert_eq!(looked.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(matches!(refused, Error::NoDriverProgram(_)), "{refused}");
}

/// Whether the calling thread blocks `signal`.
fn blocked_here(signal: libc::c_int) -> bool {
    // SAFETY: a zeroed sigset_t is valid storage; pthread_sigmask fills it.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads this thread's mask into `mask`; no new mask.
    assert_eq!(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) }, 0);
    // SAFETY: `mask` was filled above.
    unsafe { libc::sigismember(&mask, signal) == 1 }
}

#[test]
fn a_vm_that_stops_on_host_signals_blocks_them_from_build_to_the_end_of_run() {
    if !support::kvm() {
        return;
    }
    // On a thread of its own: the mask is per thread.
    std::thread::spawn(|| {
        let stop = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
        let build = || {
            VmBuilder::new(guests::find("hello").unwrap().elf)
                .console(ConsoleOutput::Discard)
                .stop_on_host_signals(true)
                .timeout(Some(TIMEOUT))
                .build()
                .unwrap()
        };
        assert!(stop.iter().all(|&s| !blocked_here(s)));
        let vm = build();
        assert!(stop.iter().all(|&s| blocked_here(s)), "a signal sent now must wait for the VM");
        let report = vm.run().unwrap();
        assert_eq!(report.guest_result, Some(GuestResult::Pass));
        assert!(stop.iter().all(|&s| !blocked_here(s)), "the caller's mask is as it was");

        // A mask the caller set itself stays.
        // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid storage for a signal set.
        unsafe { libc::sigemptyset(&mut set) };
        // SAFETY: `set` is initialised; SIGTERM is a valid signal.
        unsafe { libc::sigaddset(&mut set, libc::SIGTERM) };
        // SAFETY: a valid set; the old mask is not asked for.
        assert_eq!(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) }, 0);
        build().run().unwrap();
        assert!(blocked_here(libc::SIGTERM) && !blocked_here(libc::SIGINT));
    })
    .join()
    .unwrap();
}

#[test]
fn a_timeout_ends_a_guest_that_never_reports() {
    if !support::kvm() {
        return;
    }
    let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
        .console(ConsoleOutput::Discard)
        .timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let start = Instant::now();
    let report = vm.run().unwrap();
    assert_eq!(report.end, VmEnd::TimedOut);
    assert!(start.elapsed() < TIMEOUT);
}

#[test]
fn too_many_vcpus_is_a_typed_error() {
    if !support::kvm() {
        return;
    }
    let err = VmBuilder::new(guests::find("hello").unwrap().elf).vcpus(100_000).build().unwrap_err();
    assert!(matches!(err, Error::Vm(splitvisor::vcpu::VmError::TooManyVcpus { .. })), "{err}");
}

#[test]
fn more_vcpus_than_the_guest_can_start_are_refused_before_anything_is_created() {
    if !support::kvm() {
        return;
    }
    // A disk whose image does not exist: a build that got as far as the devices (its
    // partitions started, KVM's VM and its vCPUs created) would fail on it instead.
    let missing = std::env::temp_dir().join(format!("splitvisor-{}-no-such-image.img", std::process::id()));
    let err = VmBuilder::new(guests::find("hello").unwrap().elf)
        .vcpus(57)
        .layout(Layout::microkernel())
        .disk(DiskConfig::image(&missing))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::TooManyApStacks { requested: 57, max: 56 }), "{err}");
    assert!(err.to_string().contains("at most 56"), "{err}");
    // A kernel with ACPI tables: at most 255 local APICs, refused before the kernel file
    // is even read (unless this host's KVM allows fewer, which is then the limit named).
    let err = VmBuilder::new(&[]).kernel(missing.as_path()).vcpus(256).build().unwrap_err();
    if KvmVm::host_max_vcpus().unwrap() >= 256 {
        assert!(matches!(err, Error::Acpi(AcpiError::TooManyVcpus(256))), "{err}");
    } else {
        assert!(matches!(err, Error::Vm(VmError::TooManyVcpus { requested: 256, .. })), "{err}");
    }
}

#[test]
fn a_non_pvh_image_is_refused() {
    if !support::kvm() {
        return;
    }
    let err = VmBuilder::new(b"\x7fELF not really").build().unwrap_err();
    assert!(matches!(err, Error::Load(_)), "{err}");
}
