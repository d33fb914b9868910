//! How a microkernel VM starts: the guest runs while the partitions of its plain bus
//! devices still set themselves up. A test binary of its own: its one test sets an
//! environment variable every partition this process starts inherits.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::Duration;

use splitvisor::guests::{self, GuestResult};
use splitvisor::isolation::sandbox::testing::READY_DELAY_ENV;
use splitvisor::layout::{ConsoleOutput, DriverProgram, Layout, VmBuilder};
use support::Capture;

#[test]
fn the_guest_runs_while_the_partitions_of_its_bus_devices_set_up() {
    if !support::kvm() {
        return;
    }
    // SAFETY: the only test of this binary sets it before it starts any thread that reads
    // the environment.
    unsafe { std::env::set_var(READY_DELAY_ENV, "3000") };
    let console = Capture::default();
    // No spares: each would wait as long before its sandbox.
    let vm = VmBuilder::new(guests::find("hello").unwrap().elf)
        .layout(Layout::microkernel().with_standby(false))
        .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap();
    // Every proxy partition waits 3 s before its sandbox, and build() did not wait for it:
    // none has set no_new_privs yet (a step of its sandbox that /proc shows; the VM's own
    // threads have no filter, as VmBuilder's default is, so none was inherited).
    let pids: Vec<(String, u32)> = vm
        .placements()
        .iter()
        .map(|placed| {
            let pid = placed.partition.as_deref().unwrap().strip_prefix("pid ").unwrap().parse().unwrap();
            (placed.device.clone(), pid)
        })
        .collect();
    assert_eq!(pids.iter().map(|(device, _)| device.as_str()).collect::<Vec<_>>(), ["com1", "i8042"]);
    for (device, pid) in &pids {
        assert_eq!(
            support::status_field(*pid, "NoNewPrivs:"),
            "0",
            "{device}: sandboxed before build() returned"
        );
    }
    // The guest runs, its first console access waits for its partition, and then every
    // partition is sandboxed.
    let report = vm.run().unwrap();
    let text = console.text();
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{text}\n{:#?}", report.device_events);
    assert!(text.contains("Hello from the splitvisor guest kit!"), "{text}");
    assert!(report.device_events.is_empty(), "{:#?}", report.device_events);
}
