//! The monolithic layout: every device emulator runs inside the hypervisor process.
//!
//! `cargo run --release --example monolithic -- --help`

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    splitvisor::cli::main("monolithic", splitvisor::layout::Layout::monolithic(), process_start)
}
