//! Shared by the integration tests: prerequisites that skip outside CI and fail in it.

#![allow(dead_code)]

pub mod images;

use std::io::Write;
use std::sync::{Arc, Mutex};

/// True under CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether a test needing `what` may run. Outside CI a missing prerequisite skips the
/// test with a printed reason; under CI=true it fails it.
pub fn require(what: &str, available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if in_ci() => panic!("CI=true and {what} is not available: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: {what} is not available: {why}");
            false
        }
    }
}

/// /dev/kvm can be opened read-write.
pub fn kvm() -> bool {
    require(
        "/dev/kvm",
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string()),
    )
}

/// A console writer the test can read back.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
