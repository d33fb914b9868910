//! Shared by the integration tests: prerequisites that skip outside CI and fail in it.

#![allow(dead_code)]

pub mod images;

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
pub type Capture = splitvisor::layout::SharedBuffer;

/// `splitvisor-driver blk --socket ... --disk ...`, started by hand; killed on drop.
pub struct HandStartedDriver {
    child: std::process::Child,
    pub socket: std::path::PathBuf,
}

impl HandStartedDriver {
    pub fn start(name: &str, disk: &std::path::Path) -> Self {
        let socket = std::env::temp_dir().join(format!("splitvisor-{}-{name}.sock", std::process::id()));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_splitvisor-driver"))
            .args(["blk", "--socket"])
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
            .spawn()
            .expect("start splitvisor-driver");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self { child, socket }
    }
}

impl Drop for HandStartedDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
