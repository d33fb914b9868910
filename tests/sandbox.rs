//! The driver partitions' sandbox, checked from outside: ids, capabilities, namespaces,
//! root, limits and fds as /proc shows them, and what a partition that tries something
//! forbidden gets (SIGSYS).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use splitvisor::guests::{self, GuestResult};
use splitvisor::isolation::partition::{Partition, PartitionError};
use splitvisor::isolation::proxy::ProxyConnection;
use splitvisor::isolation::sandbox::testing::{Forbidden, Outcome, survived_exit_code};
use splitvisor::isolation::sandbox::{self, ReadySignal};
use splitvisor::layout::{
    ConsoleOutput, DiskConfig, DriverProgram, FaultPolicy, Layout, Placement, VmBuilder,
};
use support::Capture;
use support::images::Image;

const MIB: u64 = 1 << 20;
/// Generous bound on any wait for a partition (a loaded 2-core machine).
const PATIENCE: Duration = Duration::from_secs(60);

fn driver_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))
}

/// The host ids partitions run as: nobody when we are root, else our own.
fn expected_ids() -> (u32, u32) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    if uid == 0 { (sandbox::NOBODY.uid, sandbox::NOBODY.gid) } else { (uid, gid) }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} of {pid}"))
        .trim()
        .to_string()
}

/// `Max processes` etc. of /proc/PID/limits: (soft, hard).
fn limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    let mut values = line[name.len()..].split_whitespace();
    (values.next().unwrap().to_string(), values.next().unwrap().to_string())
}

/// The serving child of the watcher `watched`: PID 1 of its own PID namespace.
fn serving_child(watched: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{watched}/task/{watched}/children")).unwrap();
    let pid: u32 = children.split_whitespace().next().expect("the serving child").parse().unwrap();
    assert_eq!(status_field(pid, "NSpid:").split_whitespace().last(), Some("1"), "PID 1 in its namespace");
    pid
}

fn fd_targets(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let fd = entry.file_name().to_string_lossy().parse().unwrap();
            (fd, std::fs::read_link(entry.path()).unwrap().to_string_lossy().into_owned())
        })
        .collect()
}

/// Whether `pid`'s fd `fd` (to `target`) is the write end of a pipe: the report pipe a
/// spawned partition says why it ended on, which it only ever writes.
fn is_report_pipe(pid: u32, fd: u32, target: &str) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let flags = info.lines().find_map(|line| line.strip_prefix("flags:")).map(str::trim);
    let flags = flags.and_then(|octal| i32::from_str_radix(octal, 8).ok()).unwrap_or(-1);
    target.starts_with("pipe:") && flags >= 0 && flags & libc::O_ACCMODE == libc::O_WRONLY
}

/// What one partition should look like.
struct Expected {
    max_tasks: u64,
    address_space: u64,
    /// Whether an fd target (above stderr) of the serving process is one it was handed.
    handed: fn(&str) -> bool,
}

/// What processes a partition is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One process, PID 1 of its own PID namespace, with no child: a partition the
    /// spawner started.
    OneProcess,
    /// The process that was started, which only waits, and its serving child, PID 1 of a
    /// PID namespace it forked into: a driver started by hand, not in a PID namespace.
    Watched,
}

/// Checks the partition whose process is `started` from outside: that process and, for a
/// [`Shape::Watched`] one, its serving child.
fn assert_sandboxed(name: &str, started: u32, shape: Shape, expected: &Expected) {
    let (child, processes) = match shape {
        Shape::OneProcess => {
            assert_eq!(status_field(started, "NSpid:").split_whitespace().last(), Some("1"), "{name}: PID 1");
            let children =
                std::fs::read_to_string(format!("/proc/{started}/task/{started}/children")).unwrap();
            assert_eq!(children.trim(), "", "{name}: the partition is one process");
            (started, vec![(started, "2")])
        }
        Shape::Watched => {
            let child = serving_child(started);
            (child, vec![(started, "1"), (child, "2")])
        }
    };
    let (uid, gid) = expected_ids();
    for (pid, filters) in processes {
        let what = |field: &str| format!("{name} pid {pid}: {field}");
        assert_eq!(status_field(pid, "Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"), "{}", what("uid"));
        assert_eq!(status_field(pid, "Gid:"), format!("{gid}\t{gid}\t{gid}\t{gid}"), "{}", what("gid"));
        if is_root() {
            assert_eq!(status_field(pid, "Groups:"), "", "{}", what("groups"));
        }
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(pid, caps), "0000000000000000", "{}", what(caps));
        }
        assert_eq!(status_field(pid, "NoNewPrivs:"), "1", "{}", what("no_new_privs"));
        assert_eq!(status_field(pid, "Seccomp:"), "2", "{}", what("seccomp filter mode"));
        // The watcher has its own filter, the child the clone3 one and its allowlist.
        assert_eq!(status_field(pid, "Seccomp_filters:"), filters, "{}", what("seccomp filters"));
        let tasks = expected.max_tasks.to_string();
        assert_eq!(limit(pid, "Max processes"), (tasks.clone(), tasks), "{}", what("RLIMIT_NPROC"));
        let bytes = expected.address_space.to_string();
        assert_eq!(limit(pid, "Max address space"), (bytes.clone(), bytes), "{}", what("RLIMIT_AS"));
        assert_eq!(limit(pid, "Max open files"), ("64".into(), "64".into()), "{}", what("RLIMIT_NOFILE"));
        assert_eq!(limit(pid, "Max core file size"), ("0".into(), "0".into()), "{}", what("RLIMIT_CORE"));
        if !is_root() {
            // The rest needs ptrace access to a non-dumpable process: root only.
            continue;
        }
        for ns in ["user", "mnt", "net", "ipc", "uts", "cgroup"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "{}", what(ns));
        }
        // Its network namespace (its own, or the one the spawner made for the partitions it
        // starts) has no interface but the loopback.
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let interfaces: Vec<_> =
            table.lines().skip(2).filter_map(|line| line.split(':').next()).map(str::trim).collect();
        assert_eq!(interfaces, ["lo"], "{}", what("network interfaces"));
        // The root is empty, and it is the only mount left.
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root")).unwrap().collect();
        assert!(root.is_empty(), "{}: {root:?}", what("root"));
        // Not dumpable: another process of the same uid cannot look inside (nor ptrace it,
        // which needs the same access).
        let peek = Command::new("/bin/ls")
            .arg(format!("/proc/{pid}/fd"))
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!peek.success(), "{}", what("fds readable by another process of its uid"));
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        assert_eq!(mounts.lines().count(), 1, "{}: {mounts}", what("mounts"));
        assert!(mounts.contains(" / / ro,") && mounts.contains(" - tmpfs "), "{}: {mounts}", what("mounts"));
    }
    if !is_root() {
        return;
    }
    let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(std::fs::read_link(format!("/proc/{child}/ns/pid")).unwrap(), ours, "{name}: pid namespace");
    // A watcher holds nothing; the serving process only what it was handed: stdin and
    // stdout on /dev/null, stderr (inherited, for its log), then its own.
    if shape == Shape::Watched {
        let watcher_fds: BTreeSet<u32> = fd_targets(started).into_iter().map(|(fd, _)| fd).collect();
        assert_eq!(watcher_fds, BTreeSet::from([0, 1, 2]), "{name}: the watcher's fds");
    }
    for (fd, target) in fd_targets(child) {
        assert!(!target.contains("kvm"), "{name} holds {target}");
        let allowed = match fd {
            0 | 1 => target == "/dev/null",
            2 => true,
            _ => (expected.handed)(&target) || is_report_pipe(child, fd, &target),
        };
        assert!(allowed, "{name} holds {target} on fd {fd}");
    }
}

#[test]
fn partitions_are_sandboxed_as_seen_from_outside() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("sandbox", MIB);
    let ram = 64 * MIB;
    let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
        .layout(Layout::microkernel())
        .driver(DriverProgram::at(driver_path()))
        .memory(ram)
        .disk(DiskConfig::image(&disk.0))
        .console(ConsoleOutput::Discard)
        .timeout(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    // Every partition said its sandbox is in place (build() waits for the disk's, the
    // VM's run or this for the others). Nothing below may change from now on.
    vm.wait_for_partitions().unwrap();
    // Three partitions run as the same host uid with a task budget of 2 or 16 each: the
    // budget counts each partition's own tasks (per user namespace), or the disk's could
    // not even have started its threads.
    let proxy = Expected {
        max_tasks: 2,
        address_space: sandbox::PROXY_ADDRESS_SPACE,
        handed: |target| target.starts_with("socket:") || target == "anon_inode:[eventfd]",
    };
    let blk = Expected {
        max_tasks: 16,
        address_space: sandbox::address_space_for_guest_ram(ram),
        handed: |target| {
            target.starts_with("socket:")
                || target.starts_with("anon_inode:")
                || target.starts_with("/memfd:splitvisor-guest-ram")
                || target.contains("-sandbox.img")
        },
    };
    let mut seen = Vec::new();
    for placed in vm.placements() {
        let started: u32 =
            placed.partition.as_deref().unwrap().strip_prefix("pid ").unwrap().parse().unwrap();
        let expected = if placed.device == "disk0" { &blk } else { &proxy };
        assert_sandboxed(&placed.device, started, Shape::OneProcess, expected);
        seen.push(placed.device.clone());
    }
    assert_eq!(seen, ["com1", "i8042", "disk0"]);
    let report = vm.run().unwrap();
    assert!(report.device_events.is_empty(), "{:?}", report.device_events);
}

/// The spawner makes the partitions' empty root in its first pause and hands it to every
/// root partition it starts from then on: they enter that one mount namespace, whose root
/// is empty and read-only, instead of making one each, and keep no fd of it.
#[test]
fn partitions_started_after_the_spawners_first_pause_share_one_empty_root() {
    if !support::root("to see inside the partitions") {
        return;
    }
    let driver = DriverProgram::at(driver_path());
    let start = || {
        let (starting, connection) = Partition::start_proxy(&driver, "i8042", None).unwrap();
        (starting.wait().unwrap(), connection)
    };
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mnt =
        |partition: &Partition| std::fs::read_link(format!("/proc/{}/ns/mnt", partition.pid())).unwrap();
    let _first = start();
    // Other tests of this process may keep the spawner busy for a while: bounded retries.
    let mut shared = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let (a, b) = (start(), start());
        if mnt(&a.0) == mnt(&b.0) {
            shared = Some([a, b]);
            break;
        }
    }
    let shared = shared.expect("two partitions in one mount namespace within 5 s");
    for (partition, _) in &shared {
        let pid = partition.pid();
        assert_ne!(mnt(partition), ours, "pid {pid}: the host's mount namespace");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        assert_eq!(mounts.lines().count(), 1, "pid {pid}: {mounts}");
        assert!(mounts.contains(" / / ro,") && mounts.contains(" - tmpfs "), "pid {pid}: {mounts}");
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root")).unwrap().collect();
        assert!(root.is_empty(), "pid {pid}: {root:?}");
        let held: Vec<_> =
            fd_targets(pid).into_iter().filter(|(_, target)| target.starts_with("mnt:")).collect();
        assert!(held.is_empty(), "pid {pid} holds {held:?}");
    }
}

/// Duplicates `fd` to 10 or above, close-on-exec, so that the child can move it to 3, 4, ...
fn dup_high(fd: RawFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd and returns a new one or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    assert!(new >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `new` was just created and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(new) }
}

/// A proxy partition (`serial` or `i8042`) started by hand: fd 3 the proxy socket, fd 4
/// its readiness pipe.
struct ProxyPartition {
    child: Child,
    /// Our end of the proxy connection (the partition exits when it closes).
    _connection: ProxyConnection,
    ready: std::io::Result<()>,
}

/// Starts `splitvisor-driver DEVICE --fd 3 --ready-fd 4 --page-fd 5 ..` (the proxy
/// connection's fds) `ARGS..`; `before_exec` runs in the child just before the driver
/// (async-signal-safe calls only).
fn start_proxy(
    device: &str,
    args: &[String],
    before_exec: Option<fn() -> std::io::Result<()>>,
) -> ProxyPartition {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let ours = ProxyConnection::new(ours).unwrap();
    let ready = ReadySignal::new().unwrap();
    let [page, doorbell, hypervisor_doorbell] = ours.partition_fds();
    let sources = [
        dup_high(theirs.as_raw_fd()),
        dup_high(ready.partition_fd()),
        dup_high(page.as_raw_fd()),
        dup_high(doorbell.as_raw_fd()),
        dup_high(hypervisor_doorbell.as_raw_fd()),
    ];
    let moves: Vec<(RawFd, RawFd)> = sources.iter().zip(3..).map(|(fd, to)| (fd.as_raw_fd(), to)).collect();
    let mut command = Command::new(driver_path());
    command
        .args([device, "--fd", "3", "--ready-fd", "4", "--page-fd", "5", "--doorbell-fd", "6"])
        .args(["--hypervisor-doorbell-fd", "7"])
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let setup = move || {
        for (from, to) in &moves {
            // SAFETY: dup2 on fds this process owns; async-signal-safe.
            if unsafe { libc::dup2(*from, *to) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        before_exec.map_or(Ok(()), |f| f())
    };
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe { command.pre_exec(setup) };
    let child = command.spawn().unwrap();
    drop((sources, theirs));
    let ready = ready.wait(PATIENCE);
    ProxyPartition { child, _connection: ours, ready }
}

/// Waits, at most [`PATIENCE`], for `child` to end; returns how, and what it logged.
fn wait_exit(child: &mut Child) -> (ExitStatus, String) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(pidfd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the fd was just returned by pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let mut pollfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, bounded wait.
    let ready = unsafe { libc::poll(&mut pollfd, 1, PATIENCE.as_millis() as libc::c_int) };
    if ready != 1 {
        let _ = child.kill();
        panic!("partition {} still running after {PATIENCE:?}", child.id());
    }
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status, log)
}

/// Whether the partition ended as the sandbox answers `what` (killed by SIGSYS, mostly):
/// from its exit `status`, or from the supervisor's report `exit` of it.
fn outcome_matches(what: &Forbidden, exit: &str, status: Option<ExitStatus>) -> bool {
    match what.expected() {
        Outcome::Killed(signal) => {
            let name = if signal == libc::SIGSYS { "SIGSYS" } else { "SIGABRT" };
            status.map_or(exit.contains(name), |s| s.signal() == Some(signal))
        }
        Outcome::Failed(errno) => {
            let code = survived_exit_code(&Err(std::io::Error::from_raw_os_error(errno)));
            status.map_or(exit.contains(&format!("(exit status: {code})")), |s| s.code() == Some(code))
        }
    }
}

/// What a proxy partition should look like.
const PROXY: Expected = Expected {
    max_tasks: 2,
    address_space: sandbox::PROXY_ADDRESS_SPACE,
    // Its socket and its two doorbells; the shared page is mapped, its fd closed.
    handed: |target| target.starts_with("socket:") || target == "anon_inode:[eventfd]",
};

/// Starts `splitvisor-driver DEVICE` serving a proxy connection, with `args`, through the
/// hypervisor's partition spawner (no KVM needed).
fn spawn_proxy(device: &str, args: &[String]) -> (Result<Partition, PartitionError>, ProxyConnection) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let ours = ProxyConnection::new(ours).unwrap();
    let mut fds = vec![theirs.as_fd()];
    fds.extend(ours.partition_fds());
    let mut all: Vec<String> =
        [device, "--fd", "3", "--page-fd", "4", "--doorbell-fd", "5", "--hypervisor-doorbell-fd", "6"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    all.extend_from_slice(args);
    let started = Partition::start(&DriverProgram::at(driver_path()), &all, &fds).unwrap();
    (started.wait(), ours)
}

#[test]
fn a_spawned_partition_is_one_process_pid_1_of_its_own_namespace() {
    for device in ["serial", "i8042"] {
        let (partition, connection) = spawn_proxy(device, &[]);
        let mut partition = partition.unwrap();
        assert_sandboxed(device, partition.pid(), Shape::OneProcess, &PROXY);
        drop(connection);
        // Its connection closed: it ends on its own.
        let status = partition.wait_exit(PATIENCE).expect("the partition ended");
        assert!(status.success(), "{device}: {status}");
    }
}

#[test]
fn the_spawner_sees_how_a_spawned_partition_died() {
    // Twice the address-space budget: aborts inside the sandbox. An init cannot die of its
    // own SIGABRT; the spawner still reports that it aborted.
    let too_much = Forbidden::Allocate(2 * sandbox::PROXY_ADDRESS_SPACE);
    for what in Forbidden::all().into_iter().chain([too_much]) {
        let (partition, _connection) = spawn_proxy("serial", &["--test-attempt".into(), what.to_string()]);
        // The attempt comes after the sandbox is in place.
        let mut partition = partition.unwrap();
        let status = partition.wait_exit(PATIENCE).expect("the partition ended");
        assert!(outcome_matches(&what, "", Some(status)), "{what}: {status}");
    }
}

#[test]
fn proxy_partitions_started_by_hand_are_sandboxed_as_seen_from_outside() {
    // A driver started by hand (not as PID 1 of a PID namespace of its own, as a hand-started
    // vhost-user backend is) forks into one.
    for device in ["serial", "i8042"] {
        let mut partition = start_proxy(device, &[], None);
        partition.ready.as_ref().unwrap();
        assert_sandboxed(device, partition.child.id(), Shape::Watched, &PROXY);
        drop(partition._connection);
        // Its connection closed: it ends on its own.
        let (status, log) = wait_exit(&mut partition.child);
        assert!(status.success(), "{device}: {status}: {log}");
    }
}

#[test]
fn forbidden_operations_kill_proxy_partitions() {
    // Twice the address-space budget: a plain allocation that size would succeed outside
    // the sandbox (memory is overcommitted), and aborts inside it.
    let too_much = Forbidden::Allocate(2 * sandbox::PROXY_ADDRESS_SPACE);
    for device in ["serial", "i8042"] {
        for what in Forbidden::all().into_iter().chain([too_much.clone()]) {
            let mut partition = start_proxy(device, &["--test-attempt".into(), what.to_string()], None);
            // The attempt comes after the sandbox is in place.
            partition.ready.as_ref().unwrap();
            let (status, log) = wait_exit(&mut partition.child);
            assert!(outcome_matches(&what, "", Some(status)), "{device}: {what}: {status}: {log}");
        }
    }
}

#[test]
fn forbidden_operations_kill_a_disk_partition_while_it_serves() {
    if !support::kvm() {
        return;
    }
    let ram = 64 * MIB;
    // Twice its address-space budget: aborts inside the sandbox, would succeed outside.
    let too_much = Forbidden::Allocate(2 * sandbox::address_space_for_guest_ram(ram));
    for what in Forbidden::all().into_iter().chain([too_much]) {
        let disk = Image::new(&format!("forbidden-{what}").replace(['/', ':'], "-"), MIB);
        let console = Capture::default();
        let report = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
            .layout(
                Layout::microkernel()
                    .with("com1", Placement::InHypervisor)
                    .with("i8042", Placement::InHypervisor)
                    .with_fault_policy("disk0", FaultPolicy::FailDevice),
            )
            .driver(DriverProgram::at(driver_path()))
            .partition_test_attempt(what.clone())
            .memory(ram)
            .cmdline("blk_verify.generation=31")
            .disk(DiskConfig::image(&disk.0))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(PATIENCE))
            .build()
            .unwrap()
            .run()
            .unwrap();
        let console = console.text();
        // The partition died at its first request, from its worker thread, and the guest
        // heard that its disk needs a reset (after the exit was recorded).
        let events = &report.device_events;
        assert_eq!(events.len(), 1, "{what}: {events:?}");
        assert_eq!(events[0].device, "disk0", "{what}");
        assert!(outcome_matches(&what, &events[0].what, None), "{what}: {events:?}");
        assert_eq!(
            report.guest_result,
            Some(GuestResult::Fail("device needs reset".into())),
            "{what}: {console}"
        );
        assert!(disk.bytes().iter().all(|b| *b == 0), "{what}: nothing reached the disk");
    }
}

/// Makes `unshare` fail with EPERM, as a container runtime's or an LSM's policy does.
fn refuse_unshare() -> std::io::Result<()> {
    const LOAD_SYSCALL_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let program = [
        libc::sock_filter { code: LOAD_SYSCALL_NR, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: JUMP_IF_EQUAL, jt: 0, jf: 1, k: libc::SYS_unshare as u32 },
        libc::sock_filter { code: RETURN, jt: 0, jf: 0, k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32 },
        libc::sock_filter { code: RETURN, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a valid filter program that outlives the call.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_partition_refuses_to_start_when_the_kernel_refuses_namespaces() {
    let mut partition = start_proxy("serial", &[], Some(refuse_unshare));
    // It never says it is ready, and it exits with the typed error (not serving unsandboxed).
    let error = partition.ready.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
    let (status, log) = wait_exit(&mut partition.child);
    assert_eq!(status.code(), Some(2), "{status}: {log}");
    assert!(log.contains("refused new namespaces") && log.contains("--no-sandbox"), "{log}");
}
