//! `hello`: greets over the 8250, reports how many vCPUs came up, powers off.
//!
//! The number of vCPUs the VMM started is `splitvisor.vcpus=N` on the command line (1 if
//! absent, as under QEMU); the program passes only if exactly that many check in.

#![no_std]
#![no_main]

use core::sync::atomic::Ordering;

use splitvisor_guest_kit::{Boot, CPUS_ONLINE, Line, guest_main, rdtsc, start_info};

guest_main!(main);

/// How long to wait for application processors: 5e9 TSC ticks, at least a second on any
/// TSC up to 5 GHz.
const AP_TIMEOUT_TICKS: u64 = 5_000_000_000;

fn main(boot: &Boot) -> Result<(), &'static str> {
    Line::new().str("Hello from the splitvisor guest kit!").print();
    let Some(info) = &boot.start_info else {
        return Err("no hvm_start_info");
    };
    let expected = info
        .cmdline_value("splitvisor.vcpus")
        .and_then(start_info::parse_u64)
        .unwrap_or(1);
    let deadline = rdtsc() + AP_TIMEOUT_TICKS;
    while u64::from(CPUS_ONLINE.load(Ordering::Acquire)) < expected && rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let online = u64::from(CPUS_ONLINE.load(Ordering::Acquire));
    Line::new()
        .str("vcpus=")
        .dec(online)
        .str(" ram_mib=")
        .dec(info.ram_bytes() >> 20)
        .str(" cmdline=\"")
        .str(info.cmdline())
        .str("\"")
        .print();
    if online != expected {
        return Err("not every vCPU came online");
    }
    Ok(())
}
