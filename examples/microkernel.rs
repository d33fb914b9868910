//! The microkernel layout: device emulators run in sandboxed driver partitions, the
//! hypervisor process holds only their proxies. Same command line as `monolithic`; add
//! `--layout` to see where each device runs.
//!
//! `cargo run --release --example microkernel -- --guest blk-verify --disk disk.img --layout`

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    splitvisor::cli::main("microkernel", splitvisor::layout::Layout::microkernel(), process_start)
}
