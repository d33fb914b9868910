//! `splitvisor-driver`: a driver partition. Started by splitvisor's microkernel layout for
//! each device it places in a partition, or by hand as a vhost-user backend for any
//! frontend (QEMU included):
//!
//! ```text
//! splitvisor-driver blk --socket PATH --disk IMAGE [--read-only] [--serial ID] [--no-sandbox]
//! ```
//!
//! It logs warnings and errors to stderr; with `RUST_LOG` set, env_logger's filters apply
//! instead (`RUST_LOG=debug`, `RUST_LOG=splitvisor_isolation=trace`, ...).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
            .format_timestamp(None)
            .init();
    } else {
        // Without RUST_LOG, a logger that only writes lines: env_logger's set-up (its filter
        // parser, colour detection) touches code that would stay in every partition's
        // resident set.
        log::set_max_level(log::LevelFilter::Warn);
        let _ = log::set_logger(&WARNINGS);
    }
    splitvisor::isolation::driver::main("splitvisor-driver", std::env::args_os())
}

/// Warnings and errors to stderr, one line each, in env_logger's format.
struct Warnings;

static WARNINGS: Warnings = Warnings;

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ =
                writeln!(std::io::stderr(), "[{:<5} {}] {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}
