//! A filesystem of a test's own that it can freeze, as a backup agent freezes the
//! filesystem under a VM's image for a snapshot: ext4 on a loop device, mounted under the
//! temporary directory. Writes to a frozen filesystem wait in the kernel until it thaws.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted loop filesystem; dropping it thaws, unmounts and removes it.
pub struct FreezableFs {
    backing: PathBuf,
    mount: PathBuf,
    mounted: bool,
    frozen: bool,
}

/// Runs `program` with `args`; an error says what failed.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Makes a `mib` MiB ext4 filesystem in the new file `backing` and mounts it (on a loop
/// device) on the new directory `mount`; `mounted` says whether it got that far.
fn mount_new_ext4(backing: &Path, mib: u64, mount: &Path, mounted: &mut bool) -> Result<(), String> {
    let file = std::fs::File::create(backing).map_err(|e| e.to_string())?;
    file.set_len(mib << 20).map_err(|e| e.to_string())?;
    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), backing.as_os_str()])?;
    std::fs::create_dir(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
    run("mount", &["-o".as_ref(), "loop".as_ref(), backing.as_os_str(), mount.as_os_str()])?;
    *mounted = true;
    Ok(())
}

/// Unmounts `mount`, trying again for up to 10 s. The loop device goes with the mount
/// (mount -o loop sets it to clear itself). A killed process that was stuck on a frozen
/// filesystem may still hold a file there for a moment after the thaw: the mount is busy
/// until it ends.
fn unmount(mount: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(why) = run("umount", &[mount.as_os_str()]) {
        if std::time::Instant::now() >= deadline {
            eprintln!("cannot unmount {}: {why}", mount.display());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl FreezableFs {
    /// A new `mib` MiB filesystem `name` (made unique per test process); `None` (after
    /// [`super::require`]: a failure under CI=true) where this host cannot make one
    /// (root, loop devices, mkfs.ext4 and fsfreeze are needed).
    pub fn new(name: &str, mib: u64) -> Option<Self> {
        if !super::root("to mount a filesystem it can freeze") {
            return None;
        }
        let base = std::env::temp_dir().join(format!("splitvisor-{}-{name}", std::process::id()));
        let mut fs = Self {
            backing: base.with_extension("ext4"),
            mount: base.with_extension("mnt"),
            mounted: false,
            frozen: false,
        };
        let made = mount_new_ext4(&fs.backing, mib, &fs.mount, &mut fs.mounted);
        match made {
            Ok(()) => Some(fs),
            Err(why) => {
                super::require("a loop-mounted ext4 filesystem", Err(why));
                None
            }
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Freezes it: writes wait until [`thaw`](Self::thaw).
    pub fn freeze(&mut self) {
        run("fsfreeze", &["-f".as_ref(), self.mount.as_os_str()]).unwrap();
        self.frozen = true;
    }

    /// Thaws it.
    pub fn thaw(&mut self) {
        run("fsfreeze", &["-u".as_ref(), self.mount.as_os_str()]).unwrap();
        self.frozen = false;
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        // Thawed first, whatever happened: a frozen filesystem left behind would hold
        // every writer on it.
        if self.frozen {
            let _ = run("fsfreeze", &["-u".as_ref(), self.mount.as_os_str()]);
        }
        if self.mounted {
            unmount(&self.mount);
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// A filesystem on a loop device whose backing file lies on a [`FreezableFs`]. Freezing
/// that lower filesystem holds the loop device's writes: an O_DIRECT writer's requests
/// then wait in flight in the block layer with no thread of the writer waiting for them,
/// as on a slow disk (a frozen filesystem under the image itself holds the writer's own
/// thread instead).
pub struct StackedFs {
    lower: FreezableFs,
    mount: PathBuf,
    mounted: bool,
}

impl StackedFs {
    /// A new `mib` MiB filesystem `name` on a loop device over a file of a new
    /// [`FreezableFs`]; `None` where this host cannot make one (as for [`FreezableFs::new`]).
    pub fn new(name: &str, mib: u64) -> Option<Self> {
        let lower = FreezableFs::new(name, mib + 32)?;
        let backing = lower.path().join("upper.ext4");
        let mut fs = Self { mount: lower.path().with_extension("upper"), lower, mounted: false };
        let made = mount_new_ext4(&backing, mib, &fs.mount, &mut fs.mounted);
        match made {
            Ok(()) => Some(fs),
            Err(why) => {
                super::require("ext4 on a loop device over a file of another", Err(why));
                None
            }
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Freezes the filesystem under its loop device: its writes wait until
    /// [`thaw_lower`](Self::thaw_lower).
    pub fn freeze_lower(&mut self) {
        self.lower.freeze();
    }

    /// Thaws the filesystem under its loop device.
    pub fn thaw_lower(&mut self) {
        self.lower.thaw();
    }
}

impl Drop for StackedFs {
    fn drop(&mut self) {
        // Thawed below first: unmounting flushes through the loop device.
        if self.lower.frozen {
            self.lower.thaw();
        }
        if self.mounted {
            unmount(&self.mount);
        }
        let _ = std::fs::remove_dir(&self.mount);
    }
}
