//! A pids cgroup of a test's own: a limit on the tasks (processes and threads) of the
//! processes put in it, which binds root too (RLIMIT_NPROC does not).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// A pids cgroup, removed when dropped (once the processes put in it have ended).
pub struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    /// A new cgroup `name` (made unique per test process) allowing `max` tasks; `None`
    /// (after [`super::require`]: a failure under CI=true) where the host has no pids
    /// controller this process can use.
    pub fn new(name: &str, max: u32) -> Option<Self> {
        let made = pids_hierarchy().and_then(|root| {
            let dir = root.join(format!("splitvisor-test-{}-{name}", std::process::id()));
            std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            let cgroup = Self { dir };
            std::fs::write(cgroup.dir.join("pids.max"), max.to_string())
                .map_err(|e| format!("write pids.max: {e}"))?;
            Ok(cgroup)
        });
        match made {
            Ok(cgroup) => Some(cgroup),
            Err(why) => {
                super::require("a pids cgroup", Err(why));
                None
            }
        }
    }

    /// Has `command`'s process put itself in this cgroup before it execs.
    pub fn put_in(&self, command: &mut std::process::Command) {
        let procs =
            CString::new(self.dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
        let enter = move || {
            // SAFETY: open, write and close (async-signal-safe) on a path and buffer the
            // closure owns; "0" is the writing process.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: as above.
            let wrote = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
            let error = std::io::Error::last_os_error();
            // SAFETY: as above.
            unsafe { libc::close(fd) };
            if wrote == 2 { Ok(()) } else { Err(error) }
        };
        // SAFETY: the closure only makes async-signal-safe calls.
        unsafe { command.pre_exec(enter) };
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Where this host's pids controller is mounted: a cgroup v1 hierarchy of its own, or the
/// cgroup v2 hierarchy with pids enabled for its children.
fn pids_hierarchy() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, path, kind, options, ..] = fields[..] else { continue };
        if kind == "cgroup" && options.split(',').any(|o| o == "pids") {
            return Ok(PathBuf::from(path));
        }
        if kind == "cgroup2" {
            let root = PathBuf::from(path);
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "pids")
                && std::fs::write(root.join("cgroup.subtree_control"), "+pids").is_ok()
            {
                return Ok(root);
            }
        }
    }
    Err("no pids cgroup controller is mounted".to_string())
}
