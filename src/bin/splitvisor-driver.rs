//! `splitvisor-driver`: a driver partition. Started by splitvisor's microkernel layout for
//! each device it places in a partition, or by hand as a vhost-user backend for any
//! frontend (QEMU included):
//!
//! ```text
//! splitvisor-driver blk --socket PATH --disk IMG[,ro]
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    match splitvisor::isolation::driver::run(std::env::args().skip(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitvisor-driver: error: {e}");
            ExitCode::from(2)
        }
    }
}
