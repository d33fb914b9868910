//! A bench's scratch directory, shared by the benches with `#[path]` (each bench is a crate
//! of its own).

use std::path::{Path, PathBuf};

/// A directory this bench makes for itself under the system's temporary directory
/// (`splitvisor-NAME-PID`), removed with everything in it when dropped: at the end of the
/// bench, and when a failed assertion unwinds it, which would otherwise leave its images
/// (the blk bench's is 256 MiB) behind in /tmp.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes the directory; a bench that cannot is no use, so this panics.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("splitvisor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot make {}: {e}", path.display()));
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
