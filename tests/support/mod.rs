//! Shared by the integration tests: prerequisites that skip outside CI and fail in it.

#![allow(dead_code)]

pub mod frozen_fs;
pub mod images;
pub mod linux_guest;
pub mod netns;
pub mod pids_cgroup;

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
            // Straight to the terminal, not through the test harness's capture: a skipped
            // test passes, and its reason must show in a plain `cargo test`.
            use std::io::Write;
            let test = std::thread::current().name().unwrap_or("a test").to_string();
            let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {what} is not available: {why}");
            false
        }
    }
}

/// Whether this process runs as root, which a test needs `for_what` (under CI=true it must).
pub fn root(for_what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require(&format!("root, {for_what}"), root.then_some(()).ok_or_else(|| "not root".to_string()))
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

/// An example binary (`monolithic`, `microkernel`), built if missing: `cargo test` builds
/// examples next to the tests, but a lone `cargo test --test NAME` does not.
pub fn example(name: &str) -> std::path::PathBuf {
    static BUILD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut built = BUILD.lock().unwrap();
    if !built.iter().any(|b| b == name) {
        let release = profile_dir.file_name().is_some_and(|dir| dir == "release");
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--example", name]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cargo.arg("--release");
        }
        assert!(cargo.status().unwrap().success(), "cannot build the {name} example");
        built.push(name.to_string());
    }
    profile_dir.join("examples").join(name)
}

/// `splitvisor-driver blk --socket ... --disk ...`, started by hand; killed on drop.
pub struct HandStartedDriver {
    child: std::process::Child,
    disk: std::path::PathBuf,
    pub socket: std::path::PathBuf,
    /// More arguments for `splitvisor-driver blk`.
    extra: Vec<String>,
    /// The uid it runs as and the most tasks (processes and threads) that uid may have.
    limit: Option<(u32, u64)>,
}

impl HandStartedDriver {
    /// Starts it and waits (bounded) for its "serving" line.
    pub fn start(name: &str, disk: &std::path::Path) -> Self {
        Self::start_with(name, disk, &[])
    }

    /// Starts it with `extra` arguments (every restart gets them too).
    pub fn start_with(name: &str, disk: &std::path::Path, extra: &[&str]) -> Self {
        let socket = std::env::temp_dir().join(format!("splitvisor-{}-{name}.sock", std::process::id()));
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(&socket, disk, &extra, None);
        Self { child, disk: disk.to_path_buf(), socket, extra, limit: None }
    }

    /// Starts it as `uid` (and gid), which may have at most `max_tasks` processes and
    /// threads (RLIMIT_NPROC; the caller, root, makes sure nothing else runs as `uid`).
    pub fn start_limited(name: &str, disk: &std::path::Path, uid: u32, max_tasks: u64) -> Self {
        let socket = std::env::temp_dir().join(format!("splitvisor-{}-{name}.sock", std::process::id()));
        let child = Self::spawn(&socket, disk, &[], Some((uid, max_tasks)));
        Self { child, disk: disk.to_path_buf(), socket, extra: Vec::new(), limit: Some((uid, max_tasks)) }
    }

    fn spawn(
        socket: &std::path::Path,
        disk: &std::path::Path,
        extra: &[String],
        limit: Option<(u32, u64)>,
    ) -> std::process::Child {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_splitvisor-driver"));
        command
            .args(["blk", "--socket"])
            .arg(socket)
            .arg("--disk")
            .arg(disk)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some((uid, max_tasks)) = limit {
            command.uid(uid).gid(uid);
            let tasks = libc::rlimit { rlim_cur: max_tasks, rlim_max: max_tasks };
            let limit_tasks = move || {
                // SAFETY: sets a limit from a struct the closure owns.
                match unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &tasks) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            };
            // SAFETY: between fork and exec the child only calls setrlimit, which is
            // async-signal-safe.
            unsafe { command.pre_exec(limit_tasks) };
        }
        let mut child = command.spawn().expect("start splitvisor-driver");
        let mut stderr = child.stderr.take().unwrap();
        let line = first_line(child.stdout.take().unwrap());
        if !line.contains("serving") {
            let _ = child.kill();
            let mut errors = String::new();
            let _ = stderr.read_to_string(&mut errors);
            panic!("splitvisor-driver did not get ready: {line}{errors}");
        }
        // Its log goes on to ours.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stderr, &mut std::io::stderr());
        });
        child
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL), as a crash would, and waits (bounded) until the process that
    /// served, in its own PID namespace, is gone too.
    pub fn kill(&mut self) {
        let serving = descendants(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        wait_gone(&serving);
    }

    /// Starts it again on the same socket and image.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.socket, &self.disk, &self.extra, self.limit);
    }
}

/// The first line `stdout` gives within 30 s (empty if none came).
pub fn first_line(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let (ready, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = ready.send(line);
    });
    wait.recv_timeout(std::time::Duration::from_secs(30)).unwrap_or_default()
}

/// Every process below `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).into_iter().flatten().flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

/// The value of `field` (with its colon: `"NoNewPrivs:"`) in /proc/`pid`/status, empty if
/// it has none.
pub fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// Whether any thread of `pid` is still running (a killed process's leader can be a zombie
/// while its other threads are still finishing a system call, files still open).
pub fn alive(pid: &u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    })
}

/// Waits at most 10 s until none of `pids` is alive.
pub fn wait_gone(pids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A child process killed on drop (so that a failing test leaves nothing running).
pub struct KillOnDrop(pub std::process::Child);

/// Waiting for a child with its own deadline.
pub trait WaitBounded {
    /// Waits (at most 10 minutes; the child is killed then) and returns the exit status
    /// and what it wrote on stdout and stderr.
    fn wait_with_output_bounded(&mut self) -> (Option<i32>, String);
}

impl WaitBounded for std::process::Child {
    fn wait_with_output_bounded(&mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let collect = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = collect(self.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let stderr = collect(self.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        let status = loop {
            if let Ok(Some(status)) = self.try_wait() {
                break status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        (status, stdout.join().unwrap_or_default() + &stderr.join().unwrap_or_default())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for HandStartedDriver {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// qemu-storage-daemon exporting an image as vhost-user-blk on a socket; killed on drop.
pub struct StorageDaemon {
    child: std::process::Child,
    image: std::path::PathBuf,
    pub socket: std::path::PathBuf,
}

impl StorageDaemon {
    /// Whether qemu-storage-daemon can run here (under CI=true it must).
    pub fn available() -> bool {
        require(
            "qemu-storage-daemon",
            std::process::Command::new("qemu-storage-daemon")
                .arg("--version")
                .output()
                .map(drop)
                .map_err(|e| e.to_string()),
        )
    }

    /// Starts it and waits (bounded) for its socket.
    pub fn start(name: &str, image: &std::path::Path) -> Self {
        let socket = std::env::temp_dir().join(format!("splitvisor-{}-{name}-qsd.sock", std::process::id()));
        let child = Self::spawn(&socket, image);
        Self { child, image: image.to_path_buf(), socket }
    }

    fn spawn(socket: &std::path::Path, image: &std::path::Path) -> std::process::Child {
        let _ = std::fs::remove_file(socket);
        let child = std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=f", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "qemu-storage-daemon never listened");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    /// Kills it (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same socket and image.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.socket, &self.image);
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}
