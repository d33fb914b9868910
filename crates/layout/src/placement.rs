//! Where each device runs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where one device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside the hypervisor process (the monolithic layout): fastest, a fault takes the
    /// hypervisor down.
    InHypervisor,
    /// In a sandboxed driver partition of its own (the microkernel layout): a fault stays
    /// contained.
    Partition,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::InHypervisor => "in hypervisor",
            Placement::Partition => "driver partition",
        })
    }
}

/// A placement policy: a default, and overrides per device.
///
/// Devices are named `com1`, `i8042`, `disk0`, `disk1`, ...
///
/// ```
/// use splitvisor_layout::{Layout, Placement};
///
/// // Hybrid: everything in the hypervisor but the second disk.
/// let layout = Layout::monolithic().with("disk1", Placement::Partition);
/// assert_eq!(layout.placement("disk0"), Placement::InHypervisor);
/// assert_eq!(layout.placement("disk1"), Placement::Partition);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    default: Placement,
    overrides: BTreeMap<String, Placement>,
}

impl Layout {
    /// Every device inside the hypervisor process.
    pub fn monolithic() -> Self {
        Self { default: Placement::InHypervisor, overrides: BTreeMap::new() }
    }

    /// Every device in a driver partition of its own.
    pub fn microkernel() -> Self {
        Self { default: Placement::Partition, overrides: BTreeMap::new() }
    }

    /// Overrides the placement of one device.
    pub fn with(mut self, device: &str, placement: Placement) -> Self {
        self.overrides.insert(device.to_string(), placement);
        self
    }

    /// Where `device` runs.
    pub fn placement(&self, device: &str) -> Placement {
        self.overrides.get(device).copied().unwrap_or(self.default)
    }
}

/// The program a driver partition runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverProgram {
    /// The executable.
    pub path: PathBuf,
    /// Arguments before the driver's own (for a program that hosts the driver behind a
    /// sub-command).
    pub prefix: Vec<String>,
}

impl DriverProgram {
    /// The `splitvisor-driver` binary at `path`.
    pub fn at(path: &Path) -> Self {
        Self { path: path.to_path_buf(), prefix: Vec::new() }
    }

    /// `SPLITVISOR_DRIVER` if set, else a `splitvisor-driver` next to this executable (or
    /// one directory up, as for cargo's examples).
    pub fn find() -> Option<Self> {
        if let Some(path) = std::env::var_os("SPLITVISOR_DRIVER") {
            return Some(Self::at(Path::new(&path)));
        }
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        [dir.join("splitvisor-driver"), dir.parent()?.join("splitvisor-driver")]
            .into_iter()
            .find(|candidate| candidate.is_file())
            .map(|path| Self { path, prefix: Vec::new() })
    }
}

/// Where one device ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlacement {
    /// The device's name.
    pub device: String,
    /// What it is.
    pub kind: String,
    /// Where it runs.
    pub placement: Placement,
    /// The partition's process ID, or a note (an external backend's socket).
    pub partition: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microkernel_puts_every_device_in_a_partition() {
        let layout = Layout::microkernel();
        assert_eq!(layout.placement("disk0"), Placement::Partition);
        assert_eq!(layout.placement("com1"), Placement::Partition);
        assert_eq!(Layout::monolithic().placement("i8042"), Placement::InHypervisor);
        let hybrid = Layout::microkernel().with("disk1", Placement::InHypervisor);
        assert_eq!(hybrid.placement("disk0"), Placement::Partition);
        assert_eq!(hybrid.placement("disk1"), Placement::InHypervisor);
    }
}
