//! `splitvisor-driver`: a driver partition. Started by splitvisor's microkernel layout for
//! each device it places in a partition, or by hand as a vhost-user backend for any
//! frontend (QEMU included):
//!
//! ```text
//! splitvisor-driver blk --socket PATH --disk IMAGE [--read-only] [--serial ID] [--no-sandbox]
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    splitvisor::isolation::driver::main("splitvisor-driver", std::env::args_os())
}
