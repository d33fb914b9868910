//! The hypervisor process's own sandbox, seen from outside (/proc) while the examples run:
//! a seccomp filter on every thread, no inherited fd, the jail, and what a forbidden call
//! from a vCPU does.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::KillOnDrop;
use support::images::Image;

/// The exit status of a forbidden system call (128 + SIGSYS), as documented.
const FORBIDDEN: i32 = 159;

/// Bound of every wait on a running example.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running example whose stdout lines arrive on a channel.
struct Running {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(example: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(support::example(example));
        command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Self { child: KillOnDrop(child), lines }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Waits (bounded) for a stdout line containing `needle`.
    fn wait_line(&self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("no line with '{needle}' from the example"),
            }
        }
    }

    /// Waits (bounded) for the end; the exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let child: &mut Child = &mut self.child.0;
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the example did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (status.code(), stderr)
    }
}

fn status_field(pid: u32, tid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// Every thread of `pid`: tid -> name.
fn threads(pid: u32) -> BTreeMap<String, String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|task| {
            let tid = task.file_name().to_string_lossy().into_owned();
            let name =
                std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
            (tid, name)
        })
        .collect()
}

/// PF_USER_WORKER: a thread the kernel runs in the process for itself (KVM's NX huge page
/// recovery worker, `kvm-nx-lpage-re`): it runs no user code, and inherits the filter of
/// the vCPU thread whose KVM_RUN created it.
const PF_USER_WORKER: u64 = 0x4000;

fn kernel_worker(pid: u32, tid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    let flags = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
    flags.is_some_and(|flags| flags & PF_USER_WORKER != 0)
}

/// The thread kind each thread name stands for (the kernel keeps 15 bytes of a name).
fn kind_of(name: &str, program: &str) -> Option<&'static str> {
    Some(match name {
        n if n == &program[..program.len().min(15)] => "main",
        n if n.starts_with("vcpu") => "vcpu",
        "virtio-blk" => "device worker",
        "supervisor" => "supervisor",
        "api" => "control socket",
        "console-input" => "console input",
        "partition-spawn" => "partition spawner",
        "host-signals" => "signals",
        "thread-launcher" => "launcher",
        _ => return None,
    })
}

/// Waits (bounded) until every one of `expected` kinds has a thread with a filter, then
/// checks that every thread of the process has one and is of a known kind.
fn assert_every_thread_filtered(pid: u32, program: &str, expected: &[&str]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let threads = threads(pid);
        let filtered: Vec<(&str, bool)> = threads
            .iter()
            .filter(|(tid, _)| !kernel_worker(pid, tid))
            .map(|(tid, name)| {
                (kind_of(name, program).unwrap_or("?"), status_field(pid, tid, "Seccomp") == "2")
            })
            .collect();
        let all_there = expected.iter().all(|kind| filtered.iter().any(|(k, on)| k == kind && *on));
        if all_there {
            for (tid, name) in &threads {
                // A thread that ended since the listing (a device worker whose guest reset
                // its device) has nothing left to check.
                let ended = || !Path::new(&format!("/proc/{pid}/task/{tid}")).exists();
                if status_field(pid, tid, "Seccomp").is_empty() && ended() {
                    continue;
                }
                if kernel_worker(pid, tid) {
                    assert_eq!(status_field(pid, tid, "Seccomp"), "2", "kernel worker {tid} '{name}'");
                    continue;
                }
                let kind = kind_of(name, program);
                assert!(kind.is_some(), "thread {tid} '{name}' is of no known kind: {threads:?}");
                assert_eq!(status_field(pid, tid, "Seccomp"), "2", "thread {tid} '{name}' has no filter");
                assert_eq!(status_field(pid, tid, "NoNewPrivs"), "1", "thread {tid} '{name}'");
            }
            return;
        }
        assert!(Instant::now() < deadline, "not every kind has a filtered thread: {threads:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("splitvisor-{}-{name}.sock", std::process::id()))
}

/// One request on the control socket.
fn api(socket: &Path, request: &str) -> serde_json::Value {
    try_api(socket, request).unwrap()
}

/// One request on the control socket; what went wrong if there was no answer.
fn try_api(socket: &Path, request: &str) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + DEADLINE;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "no control socket at {}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writeln!(writer, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("{e} in {line:?}"))
}

/// The disk partition's pid (none while it is being replaced).
fn disk_pid(socket: &Path) -> Option<u32> {
    let list = api(socket, r#"{"op":"list"}"#);
    let disk = list["devices"].as_array().unwrap().iter().find(|d| d["device"] == "disk0").unwrap();
    disk["pid"].as_u64().map(|pid| pid as u32)
}

#[test]
fn every_thread_of_a_running_hypervisor_has_the_filter_of_its_kind() {
    if !support::kvm() {
        return;
    }
    for (program, extra) in [("monolithic", vec![]), ("microkernel", vec!["partition spawner"])] {
        let socket = socket_path(&format!("threads-{program}"));
        let socket_arg = socket.to_str().unwrap().to_string();
        let vm = Running::start(
            program,
            &["--guest", "idle", "--timeout", "120", "--api-socket", &socket_arg],
            |_| {},
        );
        vm.wait_line("halting");
        let mut expected =
            vec!["main", "vcpu", "supervisor", "control socket", "console input", "signals", "launcher"];
        expected.extend(extra);
        assert_every_thread_filtered(vm.pid(), program, &expected);
        // SAFETY: asks our own child to stop, as Ctrl-C would.
        unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGINT) };
        let (code, stderr) = vm.finish();
        assert_eq!(code, Some(3), "{program}: {stderr}");
    }
}

#[test]
fn a_device_worker_thread_runs_under_its_filter() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("sandbox-worker.img", 16 << 20);
    let disk_arg = disk.0.to_str().unwrap().to_string();
    let vm = Running::start(
        "monolithic",
        &["--guest", "blk-verify", "--disk", &disk_arg, "--timeout", "300"],
        |_| {},
    );
    assert_every_thread_filtered(vm.pid(), "monolithic", &["main", "vcpu", "device worker", "launcher"]);
    let (code, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn an_inherited_fd_is_closed() {
    if !support::kvm() {
        return;
    }
    let marker = Image::new("sandbox-inherited-fd.img", 4096);
    let file = std::fs::File::open(&marker.0).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let vm = Running::start("monolithic", &["--guest", "idle", "--timeout", "120"], |command| {
        let give_fd = move || {
            // SAFETY: dup2 is async-signal-safe; it gives the child the file as fd 9
            // without close-on-exec, as a careless parent would.
            if unsafe { libc::dup2(fd, 9) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only calls dup2, which is async-signal-safe.
        unsafe { command.pre_exec(give_fd) };
    });
    vm.wait_line("halting");
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    let name = marker.0.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!held.iter().any(|target| target.contains(&name)), "the inherited fd is still open: {held:?}");
    assert!(!held.is_empty(), "the hypervisor's fds could not be read");
    // SAFETY: asks our own child to stop.
    unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGINT) };
    assert_eq!(vm.finish().0, Some(3));
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_jailed_hypervisor_has_an_empty_root_its_own_namespaces_and_still_restarts_a_partition() {
    if !support::kvm() || !support::require("root", if is_root() { Ok(()) } else { Err("not root".into()) }) {
        return;
    }
    let disk = Image::new("sandbox-jail.img", 64 << 20);
    let disk_arg = disk.0.to_str().unwrap().to_string();
    let socket = socket_path("jail");
    let socket_arg = socket.to_str().unwrap().to_string();
    let vm = Running::start(
        "microkernel",
        &[
            "--guest",
            "blk-verify",
            "--disk",
            &disk_arg,
            "--jail",
            "--api-socket",
            &socket_arg,
            "--timeout",
            "300",
        ],
        |_| {},
    );
    let pid = vm.pid();
    // The first answer from inside the jail; if there is none, the hypervisor says why.
    if let Err(e) = try_api(&socket, r#"{"op":"list"}"#) {
        let (code, output) = vm.finish();
        panic!("no answer on the control socket ({e}); the hypervisor ended with {code:?}:\n{output}");
    }
    let old = disk_pid(&socket).expect("a disk partition");

    // Every thread but the partition spawner sees an empty root; the process has its own
    // mount, network, IPC and UTS namespaces and no capability but CAP_KILL.
    for (tid, name) in threads(pid) {
        if kernel_worker(pid, &tid) {
            continue;
        }
        // A thread that ended since the listing has nothing left to check.
        let root: Vec<_> = match std::fs::read_dir(format!("/proc/{pid}/task/{tid}/root")) {
            Ok(entries) => entries.flatten().collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("thread {tid} '{name}': {e}"),
        };
        // The spawner keeps the host's root (to exec the driver); the deadline thread only
        // shuts sockets down and started before the jail.
        if name == "partition-spawn" || name == "deadlines" {
            continue;
        }
        assert!(root.is_empty(), "thread {tid} '{name}' sees {} entries in its root", root.len());
        let (effective, bounding) = (status_field(pid, &tid, "CapEff"), status_field(pid, &tid, "CapBnd"));
        if effective.is_empty() && !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
            continue;
        }
        assert_eq!(effective, "0000000000000020", "thread {tid} '{name}'");
        assert_eq!(bounding, "0000000000000020", "thread {tid} '{name}'");
    }
    for kind in ["mnt", "net", "ipc", "uts"] {
        assert_ne!(namespace(&pid.to_string(), kind), namespace("self", kind), "{kind}");
    }

    // A partition restart still works: kill the disk's serving process while the guest
    // runs blk-verify.
    let serving = std::fs::read_to_string(format!("/proc/{old}/task/{old}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|c| c.parse::<u32>().ok()))
        .unwrap_or(old);
    // SAFETY: kills a partition of our own child's VM.
    unsafe { libc::kill(serving as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + DEADLINE;
    while disk_pid(&socket).is_none_or(|pid| pid == old) {
        assert!(Instant::now() < deadline, "the disk partition was not replaced");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("disk0: a new driver took over"), "{stderr}");
    // Removed from inside the jail, where its path leads nowhere.
    let left = socket.exists();
    let _ = std::fs::remove_file(&socket);
    assert!(!left, "the control socket {} was left behind", socket.display());
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The MMIO register of the test hook: the top page of the 32-bit MMIO window, clear of
/// every allocated device.
fn forbidden_register() -> String {
    let top = splitvisor::memory::layout::MMIO32_START + splitvisor::memory::layout::MMIO32_SIZE - 0x1000;
    format!("{top:#x}")
}

#[test]
fn a_forbidden_system_call_from_a_vcpu_thread_ends_the_process_with_a_clear_report() {
    if !support::kvm() {
        return;
    }
    let register = forbidden_register();
    let cmdline = format!("console=ttyS0 exit_bench.mmio={register}");
    for program in ["monolithic", "microkernel"] {
        let run = |no_seccomp: bool| {
            let mut args = vec!["--guest", "exit-bench", "--cmdline", &cmdline, "--timeout", "120"];
            if no_seccomp {
                args.push("--no-seccomp");
            }
            let vm = Running::start(program, &args, |command| {
                command.env("SPLITVISOR_TEST_FORBIDDEN_MMIO", &register);
            });
            vm.finish()
        };
        // The guest reads the register: the vCPU thread calls socket().
        let (code, stderr) = run(false);
        assert_eq!(code, Some(FORBIDDEN), "{program}: {stderr}");
        let report = format!(
            "splitvisor: seccomp: the vcpu thread 'vcpu0' made a forbidden system call: socket ({}); \
             exiting with status {FORBIDDEN}",
            libc::SYS_socket
        );
        assert!(stderr.lines().any(|line| line == report), "{program}: {stderr}");
        // Without the filters (the escape hatch) the same run succeeds: the call is what
        // ended it.
        let (code, stderr) = run(true);
        assert_eq!(code, Some(0), "{program} --no-seccomp: {stderr}");
    }
}
