//! The driver lifecycle: drivers killed, stopped, upgraded and restarted under a running
//! guest that must not notice, and whose every acknowledged write must be on the image.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use splitvisor::guests::{self, GuestResult};
use splitvisor::isolation::sandbox::testing::READY_DELAY_ENV;
use splitvisor::layout::{
    Command, ConsoleOutput, DiskConfig, DriverControl, DriverProgram, FaultPolicy, Layout, VmBuilder,
    VmReport,
};
use splitvisor::vcpu::VmEnd;
use support::images::{Image, pattern_mismatches};
use support::{Capture, WaitBounded};

const MIB: u64 = 1 << 20;

fn driver() -> DriverProgram {
    DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver")))
}

/// A tiny deterministic random sequence (xorshift), seeded per run.
struct Random(u64);

impl Random {
    fn new() -> Self {
        Self(u64::from(std::process::id()) << 20 | 0x9e37)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The process that serves a partition's device: the process the hypervisor started (PID 1
/// of the partition's PID namespace), or its child if it has one (a driver that forked into
/// its PID namespace).
fn serving_process(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|children| children.split_whitespace().next().and_then(|c| c.parse().ok()))
        .unwrap_or(pid)
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: sends a signal to a process of this test's VM.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Waits (bounded) until `device`'s driver is served by another process than `old`.
fn wait_replaced(control: &DriverControl, device: &str, old: u32, done: &AtomicBool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !done.load(Ordering::Acquire) {
        if control.driver(device).and_then(|d| d.pid).is_some_and(|pid| pid != old) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs blk-verify on `disk` while `chaos` runs on another thread with the VM's driver
/// control; returns the report, the console and what `chaos` returned.
fn blk_verify_under<T: Send + 'static>(
    layout: Layout,
    disk: DiskConfig,
    generation: u64,
    chaos: impl FnOnce(DriverControl, Arc<AtomicBool>) -> T + Send + 'static,
) -> (VmReport, String, T) {
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find("blk-verify").unwrap().elf)
        .layout(layout)
        .driver(driver())
        .cmdline(&format!("blk_verify.generation={generation}"))
        .disk(disk)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(300)))
        .build()
        .unwrap();
    let control = vm.driver_control();
    let done = Arc::new(AtomicBool::new(false));
    let chaos = {
        let done = done.clone();
        std::thread::spawn(move || chaos(control, done))
    };
    let report = vm.run().unwrap();
    done.store(true, Ordering::Release);
    let outcome = chaos.join().unwrap();
    (report, console.text(), outcome)
}

fn restart_without_limit() -> FaultPolicy {
    "restart:max=1000:backoff=0".parse().unwrap()
}

/// Runs `splitvisor-ctl --api-socket SOCKET ARGS`: its status and its output (stdout, then
/// stderr).
fn splitvisor_ctl(socket: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitvisor-ctl"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A file the test made, removed when dropped.
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A VM's log, each line with when it came, read from its standard error by a thread
/// (which ends with the VM).
struct TimedLog(Arc<std::sync::Mutex<Vec<(Instant, String)>>>);

/// Starts reading `vm`'s standard error.
fn stderr_lines(vm: &mut support::KillOnDrop) -> TimedLog {
    let lines: Arc<std::sync::Mutex<Vec<(Instant, String)>>> = Arc::default();
    let (kept, stderr) = (lines.clone(), vm.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            kept.lock().unwrap().push((Instant::now(), line));
        }
    });
    TimedLog(lines)
}

impl TimedLog {
    /// When the first line holding `needle` came (waiting for it at most `within`).
    fn wait_for(&self, needle: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.0.lock().unwrap();
            if let Some((at, _)) = lines.iter().find(|(_, line)| line.contains(needle)) {
                return *at;
            }
            assert!(Instant::now() < deadline, "no line with '{needle}' in the VM's log: {:?}", *lines);
            drop(lines);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A microkernel VM running blk-stress (its console in a file), whose bus devices'
/// partitions each take 3.5 s to put their sandbox in place (spares and upgrades
/// included), with a control socket; the i8042 fails on a fault (handled without starting
/// anything). Killed when dropped.
struct SlowSandboxVm {
    vm: support::KillOnDrop,
    log: TimedLog,
    socket: Removed,
    console: Removed,
    _disk: Image,
}

impl SlowSandboxVm {
    /// Starts it, with `extra` options, and waits (at most 60 s) for its control socket.
    fn start(name: &str, extra: &[&str]) -> Self {
        let path = |what: &str| {
            std::env::temp_dir().join(format!("splitvisor-{}-{name}-{what}", std::process::id()))
        };
        // Both left behind by the VM, which is killed.
        let (socket, console) = (Removed(path("sock")), Removed(path("console")));
        let disk = Image::new(name, 32 * MIB);
        let mut vm = support::KillOnDrop(
            std::process::Command::new(support::example("microkernel"))
                .args(["--guest", "blk-stress", "--timeout", "300", "--cmdline", "blk_stress.passes=1000000"])
                .arg("--disk")
                .arg(&disk.0)
                .arg("--api-socket")
                .arg(&socket.0)
                .args(["--fault-policy", "i8042=fail"])
                .args(extra)
                .env(READY_DELAY_ENV, "3500")
                .stdout(std::fs::File::create(&console.0).unwrap())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let log = stderr_lines(&mut vm);
        let (status, list) = splitvisor_ctl(&socket.0, &["--wait", "60", "list"]);
        assert_eq!(status, Some(0), "{list}");
        Self { vm, log, socket, console, _disk: disk }
    }

    /// The process serving `device` now.
    fn pid(&self, device: &str) -> u32 {
        let (status, list) = splitvisor_ctl(&self.socket.0, &["--json", "list"]);
        assert_eq!(status, Some(0), "{list}");
        let answer: serde_json::Value = serde_json::from_str(&list).unwrap();
        let row =
            answer["devices"].as_array().unwrap().iter().find(|d| d["device"] == device).unwrap().clone();
        u32::try_from(row["pid"].as_u64().unwrap()).unwrap()
    }

    /// Waits (at most 60 s) until the guest has verified two more passes.
    fn goes_on(&mut self) {
        let passes =
            |console: &Removed| std::fs::read_to_string(&console.0).unwrap().matches("pass ").count();
        let before = passes(&self.console);
        let deadline = Instant::now() + Duration::from_secs(60);
        while passes(&self.console) < before + 2 {
            let console = std::fs::read_to_string(&self.console.0).unwrap();
            assert!(Instant::now() < deadline, "blk-stress stopped: {console}");
            assert!(
                self.vm.0.try_wait().unwrap().is_none(),
                "the VM ended: {console} {:?}",
                self.log.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn twenty_kills_and_stops_of_the_disk_partition_go_unnoticed() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-kills", 48 * MIB);
    let layout = Layout::microkernel()
        .with_fault_policy("disk0", restart_without_limit())
        .with_watchdog(Duration::from_millis(300));
    let (report, console, kills) =
        blk_verify_under(layout, DiskConfig::image(&disk.0), 71, |control, done| {
            let mut random = Random::new();
            let mut kills = Vec::new();
            while !done.load(Ordering::Acquire) && kills.len() < 24 {
                std::thread::sleep(Duration::from_millis(50 + random.below(350)));
                let Some(pid) = control.driver("disk0").and_then(|d| d.pid) else { continue };
                // SIGKILL the process the hypervisor watches, or stop the one that serves: the
                // watchdog must notice that one.
                let how = if random.below(3) == 0 { libc::SIGSTOP } else { libc::SIGKILL };
                match how {
                    libc::SIGSTOP => signal(serving_process(pid), libc::SIGSTOP),
                    _ => signal(pid, libc::SIGKILL),
                }
                kills.push(how);
                if !wait_replaced(&control, "disk0", pid, &done) {
                    break;
                }
            }
            kills
        });
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}\n{:#?}", report.device_events);
    assert!(kills.len() >= 20, "the guest finished after only {} kills", kills.len());
    assert!(kills.contains(&libc::SIGSTOP) && kills.contains(&libc::SIGKILL));
    let restarts = report.drivers.iter().find(|d| d.device == "disk0").unwrap().restarts;
    assert!(restarts as usize >= kills.len(), "{restarts} restarts for {} faults", kills.len());
    let bad = pattern_mismatches(&disk.bytes(), (48 * MIB / 512) as usize, 71);
    assert!(bad.is_empty(), "{} sectors lost, first {:?}", bad.len(), &bad[..bad.len().min(8)]);
}

#[test]
fn a_live_upgrade_every_half_second_goes_unnoticed() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-upgrades", 24 * MIB);
    let (report, console, pauses) =
        blk_verify_under(Layout::microkernel(), DiskConfig::image(&disk.0), 72, |control, done| {
            let mut pauses = Vec::new();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(500));
                match control.command("disk0", Command::Upgrade(None), Duration::from_secs(30)) {
                    Ok(splitvisor::layout::CommandOutcome::Upgraded { paused, .. }) => pauses.push(paused),
                    Ok(other) => panic!("upgrade answered {other:?}"),
                    Err(e) if done.load(Ordering::Acquire) => eprintln!("late upgrade: {e}"),
                    Err(e) => panic!("upgrade failed: {e}"),
                }
            }
            pauses
        });
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}\n{:#?}", report.device_events);
    assert!(pauses.len() >= 3, "only {} upgrades", pauses.len());
    assert_eq!(
        report.drivers.iter().find(|d| d.device == "disk0").unwrap().restarts,
        0,
        "upgrades are no faults"
    );
    let bad = pattern_mismatches(&disk.bytes(), (24 * MIB / 512) as usize, 72);
    assert!(bad.is_empty(), "{} sectors lost", bad.len());
}

/// An external backend that can be killed and started again on its socket.
trait Restartable: Send + 'static {
    fn kill(&mut self);
    fn restart(&mut self);
}

impl Restartable for support::HandStartedDriver {
    fn kill(&mut self) {
        support::HandStartedDriver::kill(self)
    }
    fn restart(&mut self) {
        support::HandStartedDriver::restart(self)
    }
}

impl Restartable for support::StorageDaemon {
    fn kill(&mut self) {
        support::StorageDaemon::kill(self)
    }
    fn restart(&mut self) {
        support::StorageDaemon::restart(self)
    }
}

/// blk-verify on an external backend that is killed and started again `kills` times.
fn external_backend_restarts<B: Restartable>(
    backend: B,
    socket: std::path::PathBuf,
    disk: &Image,
    generation: u64,
) {
    let backend = Arc::new(std::sync::Mutex::new(backend));
    let restarted = backend.clone();
    let (report, console, kills) = blk_verify_under(
        Layout::microkernel(),
        DiskConfig::VhostUser { socket },
        generation,
        move |_control, done| {
            let mut kills = 0;
            while !done.load(Ordering::Acquire) && kills < 5 {
                std::thread::sleep(Duration::from_millis(700));
                let mut backend = restarted.lock().unwrap();
                backend.kill();
                std::thread::sleep(Duration::from_millis(100));
                backend.restart();
                kills += 1;
            }
            kills
        },
    );
    drop(backend);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}\n{:#?}", report.device_events);
    assert!(kills >= 3, "only {kills} kills");
    let reconnects = report.device_events.iter().filter(|e| e.what.contains("took over")).count();
    assert!(reconnects >= 3, "{:#?}", report.device_events);
    let bad = pattern_mismatches(&disk.bytes(), (24 * MIB / 512) as usize, generation);
    assert!(bad.is_empty(), "{} sectors lost", bad.len());
}

#[test]
fn an_external_splitvisor_driver_killed_and_started_again_is_reconnected() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-external", 24 * MIB);
    let backend = support::HandStartedDriver::start("lifecycle-external", &disk.0);
    let socket = backend.socket.clone();
    external_backend_restarts(backend, socket, &disk, 73);
}

#[test]
fn kills_while_many_requests_are_in_flight_out_of_order_lose_no_acknowledged_write() {
    if !support::kvm() {
        return;
    }
    // blk-verify keeps 8 requests in flight; this backend holds every batch and completes
    // one transfer every 3 ms, the last taken first: whenever it is killed, several requests
    // are in flight and some later ones are already in the used ring before earlier ones.
    let disk = Image::new("lifecycle-out-of-order", 24 * MIB);
    let backend = Arc::new(std::sync::Mutex::new(support::HandStartedDriver::start_with(
        "lifecycle-out-of-order",
        &disk.0,
        &["--test-slow-reversed-io", "3"],
    )));
    let socket = backend.lock().unwrap().socket.clone();
    let restarted = backend.clone();
    let (report, console, kills) = blk_verify_under(
        Layout::microkernel(),
        DiskConfig::VhostUser { socket },
        77,
        move |_control, done| {
            let mut random = Random::new();
            let mut kills = 0;
            while !done.load(Ordering::Acquire) && kills < 12 {
                std::thread::sleep(Duration::from_millis(100 + random.below(400)));
                let mut backend = restarted.lock().unwrap();
                backend.kill();
                backend.restart();
                kills += 1;
            }
            kills
        },
    );
    drop(backend);
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{console}\n{:#?}", report.device_events);
    assert!(kills >= 8, "only {kills} kills before the guest finished");
    let bad = pattern_mismatches(&disk.bytes(), (24 * MIB / 512) as usize, 77);
    assert!(bad.is_empty(), "{} sectors lost, first {:?}", bad.len(), &bad[..bad.len().min(8)]);
}

#[test]
fn an_external_qemu_storage_daemon_killed_and_started_again_is_reconnected() {
    if !support::kvm() || !support::StorageDaemon::available() {
        return;
    }
    let disk = Image::new("lifecycle-qsd", 24 * MIB);
    let backend = support::StorageDaemon::start("lifecycle-qsd", &disk.0);
    let socket = backend.socket.clone();
    external_backend_restarts(backend, socket, &disk, 75);
}

#[test]
fn a_restart_limit_fails_the_device_and_the_vm_goes_on() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-limit", 48 * MIB);
    let layout = Layout::microkernel().with_fault_policy("disk0", "restart:max=2:backoff=0".parse().unwrap());
    let (report, console, kills) =
        blk_verify_under(layout, DiskConfig::image(&disk.0), 74, |control, done| {
            let mut kills = 0;
            while !done.load(Ordering::Acquire) && kills < 3 {
                std::thread::sleep(Duration::from_millis(100));
                let Some(pid) = control.driver("disk0").and_then(|d| d.pid) else { break };
                signal(pid, libc::SIGKILL);
                kills += 1;
                if kills < 3 && !wait_replaced(&control, "disk0", pid, &done) {
                    break;
                }
            }
            kills
        });
    let events: Vec<&str> = report.device_events.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(kills, 3, "{console}\n{events:#?}");
    assert!(events.iter().any(|e| e.contains("2 restarts within")), "{events:#?}");
    // The guest saw its disk fail, said so, and ended the VM itself.
    assert_eq!(report.guest_result, Some(GuestResult::Fail("device needs reset".into())), "{console}");
    assert_eq!(report.end, VmEnd::GuestReset);
    let status = report.drivers.iter().find(|d| d.device == "disk0").unwrap();
    assert!(matches!(status.health, splitvisor::layout::Health::Failed(_)), "{status:?}");
}

#[test]
fn killing_the_hypervisor_leaves_no_partition_behind() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-orphans", MIB);
    let mut hypervisor = std::process::Command::new(support::example("microkernel"))
        .args(["--guest", "idle", "--disk"])
        .arg(&disk.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = hypervisor.id();
    // Every process of the VM: the partitions and their spares.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut family = Vec::new();
    while Instant::now() < deadline {
        family = support::descendants(pid);
        // 3 partitions and 3 spares, each one process (PID 1 of its own PID namespace).
        if family.len() >= 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(family.len() >= 6, "only {} partition processes: {family:?}", family.len());
    signal(pid, libc::SIGKILL);
    let _ = hypervisor.wait();
    let killed = Instant::now();
    while family.iter().any(support::alive) && killed.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<u32> = family.iter().copied().filter(support::alive).collect();
    assert!(left.is_empty(), "partitions alive 1 s after the hypervisor died: {left:?}");
}

#[test]
fn an_injected_driver_fault_ends_a_monolithic_vm_and_goes_unnoticed_in_a_partition() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-inject", 8 * MIB);
    let run = |example: &str, fault: &str| {
        let out = std::process::Command::new(support::example(example))
            .args(["--guest", "blk-verify", "--timeout", "300", "--watchdog", "300", "--disk"])
            .arg(&disk.0)
            .args(["--inject-fault", &format!("disk0:{fault}")])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // In the hypervisor, a driver that crashes or hangs ends the VM, and the report says
    // which device and how.
    let (status, stderr) = run("monolithic", "crash-after=20");
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("the driver of disk0 failed") && stderr.contains("panicked"), "{stderr}");
    let (status, stderr) = run("monolithic", "hang-after=20");
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("the driver of disk0 failed") && stderr.contains("no request completed"),
        "{stderr}"
    );
    // In a partition, the same faults are replaced and the guest never knows.
    for fault in ["crash-after=20", "hang-after=20"] {
        let (status, stderr) = run("microkernel", fault);
        assert_eq!(status, Some(0), "{fault}: {stderr}");
        assert!(stderr.contains("disk0: a new driver took over"), "{fault}: {stderr}");
    }
}

#[test]
fn the_control_socket_lists_restarts_and_upgrades_drivers_of_a_running_vm() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-api", 32 * MIB);
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-api.sock", std::process::id()));
    let mut vm = support::KillOnDrop(
        std::process::Command::new(support::example("microkernel"))
            .args([
                "--guest",
                "blk-verify",
                "--timeout",
                "300",
                "--cmdline",
                "blk_verify.generation=76",
                "--disk",
            ])
            .arg(&disk.0)
            .arg("--api-socket")
            .arg(&socket)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let ctl = |args: &[&str]| splitvisor_ctl(&socket, args);
    // The VM is still setting up: splitvisor-ctl waits for its socket.
    let (status, list) = ctl(&["--wait", "60", "list"]);
    assert_eq!(status, Some(0), "{list}");
    for device in ["com1", "i8042", "disk0"] {
        let row = list.lines().find(|l| l.starts_with(device)).unwrap_or_else(|| panic!("{list}"));
        assert!(row.contains("driver partition") && row.contains("pid ") && row.contains("running"), "{row}");
    }
    let (status, out) = ctl(&["restart", "disk0"]);
    assert_eq!(status, Some(0), "{out}");
    let (status, out) = ctl(&["upgrade", "disk0", "--driver", env!("CARGO_BIN_EXE_splitvisor-driver")]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("paused"), "{out}");
    let (status, out) = ctl(&["upgrade", "com1"]);
    assert_eq!(status, Some(0), "{out}");
    // Another program (the same driver under another name): its partition is started,
    // watched until it is up, and takes over, for a virtio device and a bus device.
    // Later restarts run it too: it stays until the VM has ended.
    let other_driver =
        Removed(std::env::temp_dir().join(format!("splitvisor-{}-api-driver", std::process::id())));
    std::fs::copy(env!("CARGO_BIN_EXE_splitvisor-driver"), &other_driver.0).unwrap();
    for device in ["disk0", "com1"] {
        let (status, out) = ctl(&["upgrade", device, "--driver", other_driver.0.to_str().unwrap()]);
        assert_eq!(status, Some(0), "{device}: {out}");
        assert!(out.contains(&format!("{device}: now served by pid ")), "{device}: {out}");
    }
    // An upgrade to a driver that cannot start leaves the device as it was: the program
    // its partitions run is still the old one, so a restart works.
    for device in ["disk0", "com1"] {
        let (status, out) = ctl(&["upgrade", device, "--driver", "/bin/true"]);
        assert_eq!(status, Some(1), "{device}: {out}");
        assert!(out.contains("the device keeps its driver"), "{device}: {out}");
        let (status, out) = ctl(&["restart", device]);
        assert_eq!(status, Some(0), "{device}: a restart after a failed upgrade: {out}");
    }
    let (status, out) = ctl(&["restart", "disk9"]);
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("unknown device 'disk9'"), "{out}");
    let (status, list) = ctl(&["--json", "list"]);
    assert_eq!(status, Some(0));
    let answer: serde_json::Value = serde_json::from_str(&list).unwrap();
    let disk0 =
        answer["devices"].as_array().unwrap().iter().find(|d| d["device"] == "disk0").unwrap().clone();
    assert_eq!(disk0["restarts"], 2, "{disk0}");
    let out = vm.0.wait_with_output_bounded();
    assert_eq!(out.0, Some(0), "{}", out.1);
    let bad = pattern_mismatches(&disk.bytes(), (32 * MIB / 512) as usize, 76);
    assert!(bad.is_empty(), "{} sectors lost", bad.len());
    assert!(!socket.exists(), "the control socket is removed when the VM ends");
}

/// An upgrade to a program whose partition does not come up in time holds up only the
/// upgrade: meanwhile the supervisor handles the other devices' faults at once, and the
/// guest's disk goes on.
#[test]
fn an_upgrade_waiting_for_its_partition_holds_up_no_other_device() {
    if !support::kvm() {
        return;
    }
    // The same driver under another name: another program to upgrade to.
    let path = std::env::temp_dir().join(format!("splitvisor-{}-slow-upgrade-driver", std::process::id()));
    let other_driver = Removed(path);
    std::fs::copy(env!("CARGO_BIN_EXE_splitvisor-driver"), &other_driver.0).unwrap();
    // No spares: nothing else for the supervisor to start.
    let mut vm = SlowSandboxVm::start("slow-upgrade", &["--no-spare"]);
    let i8042 = vm.pid("i8042");
    let upgrade = {
        let (socket, program) = (vm.socket.0.clone(), other_driver.0.to_str().unwrap().to_string());
        std::thread::spawn(move || {
            let answer = splitvisor_ctl(&socket, &["upgrade", "com1", "--driver", &program]);
            (answer, Instant::now())
        })
    };
    // Well inside the upgrade's wait for its partition (3 s) ...
    std::thread::sleep(Duration::from_millis(500));
    signal(i8042, libc::SIGKILL);
    let killed = Instant::now();
    // ... the i8042's fault is handled.
    let handled = vm.log.wait_for("the device fails (policy fail)", Duration::from_secs(30));
    let ((status, out), answered) = upgrade.join().unwrap();
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("was not sandboxed within 3s (the device keeps its driver)"), "{out}");
    // A supervisor that waited for the upgrade's partition would have handled the fault
    // only after the upgrade's answer.
    assert!(
        handled + Duration::from_secs(1) < answered,
        "the fault was handled {:?} after the kill, and the upgrade answered {:?} after it: {out}",
        handled.saturating_duration_since(killed),
        answered.saturating_duration_since(killed),
    );
    vm.goes_on();
}

/// Spares that take their time to come up hold up nothing: the supervisor watches them
/// rather than wait, and handles a fault meanwhile at once.
#[test]
fn spares_coming_up_slowly_hold_up_no_fault() {
    if !support::kvm() {
        return;
    }
    // The supervisor starts a spare for each device at its first tick, once the control
    // socket answers: a supervisor that waited for the bus devices' would be busy for 7 s.
    let mut vm = SlowSandboxVm::start("slow-spares", &[]);
    let i8042 = vm.pid("i8042");
    std::thread::sleep(Duration::from_millis(500));
    signal(i8042, libc::SIGKILL);
    let killed = Instant::now();
    let handled = vm.log.wait_for("the device fails (policy fail)", Duration::from_secs(30));
    assert!(
        handled.saturating_duration_since(killed) < Duration::from_secs(1),
        "the fault was handled {:?} after the kill",
        handled.saturating_duration_since(killed)
    );
    vm.goes_on();
}

/// Starts `example` running blk-stress with `args` (its own options: --timeout, --disk,
/// --cmdline, ...), its console to `output`; returns once the guest's first pass is done,
/// so that a freeze then catches it at work.
fn blk_stress_under_way(example: &str, args: &[&std::ffi::OsStr], output: &Path) -> support::KillOnDrop {
    let mut vm = support::KillOnDrop(
        std::process::Command::new(support::example(example))
            .args(["--guest", "blk-stress"])
            .args(args)
            .stdout(std::fs::File::create(output).unwrap())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(output).unwrap().contains("pass 1/") {
        assert!(Instant::now() < deadline, "blk-stress did not get going");
        assert!(vm.0.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(output).unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

/// A filesystem frozen under the image (as a backup agent does for a snapshot) holds the
/// disk's requests for seconds: the driver is waiting in the kernel, not hung, so the
/// watchdog neither replaces the partition nor, in the hypervisor, ends the VM; the guest
/// goes on once it thaws, every block as it wrote it. Both cache modes, both placements,
/// with the threads sandboxed as the examples run them.
#[test]
fn a_frozen_filesystem_under_the_image_is_waited_for_not_taken_for_a_hang() {
    if !support::kvm() {
        return;
    }
    let Some(mut fs) = support::frozen_fs::FreezableFs::new("lifecycle-freeze", 64) else { return };
    for (example, cache) in [("microkernel", "writeback"), ("monolithic", "none")] {
        let image = fs.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
        // The console's file is outside the filesystem that freezes.
        let output = fs.path().with_extension(format!("{example}.out"));
        storage_held_for_three_seconds(example, &image, cache, &output, &mut |frozen| match frozen {
            true => fs.freeze(),
            false => fs.thaw(),
        });
    }
}

/// O_DIRECT requests held by the storage below the image's filesystem (here a loop device
/// whose own backing file's filesystem is frozen; a slow disk holds them the same way)
/// wait in flight in the block layer with no thread of the driver waiting for them: the
/// device's queue says they are there, and the watchdog waits instead of replacing the
/// partition or, in the hypervisor, ending the VM. The guest goes on once they complete.
#[test]
fn o_direct_requests_held_below_the_image_are_waited_for_not_taken_for_a_hang() {
    if !support::kvm() {
        return;
    }
    let Some(mut fs) = support::frozen_fs::StackedFs::new("lifecycle-stacked", 32) else { return };
    for example in ["microkernel", "monolithic"] {
        let image = fs.path().join("disk.img");
        // Written, not sparse: an overwrite needs no block allocated at the freeze.
        std::fs::write(&image, vec![0u8; 8 * MIB as usize]).unwrap();
        let output = fs.path().with_extension(format!("{example}.out"));
        storage_held_for_three_seconds(example, &image, "none", &output, &mut |frozen| match frozen {
            true => fs.freeze_lower(),
            false => fs.thaw_lower(),
        });
    }
}

/// Runs `blk-stress` under `example` on `image` with `cache` (its console to `output`),
/// has `freeze` hold its storage (`true`) for three times the watchdog's second and let it
/// go (`false`), and checks that the requests were held up, the driver was waited for and
/// neither replaced nor failed, and the guest passed; then removes the image.
fn storage_held_for_three_seconds(
    example: &str,
    image: &std::path::Path,
    cache: &str,
    output: &std::path::Path,
    freeze: &mut dyn FnMut(bool),
) {
    let disk = format!("{},cache={cache}", image.display());
    let args = ["--timeout", "120", "--cmdline", "blk_stress.passes=60", "--disk", &disk];
    let mut vm = blk_stress_under_way(example, &args.map(std::ffi::OsStr::new), output);
    freeze(true);
    std::thread::sleep(Duration::from_secs(3));
    freeze(false);
    let (status, stderr) = vm.0.wait_with_output_bounded();
    let stdout = std::fs::read_to_string(output).unwrap();
    let _ = std::fs::remove_file(output);
    let what = format!("{example}, cache={cache}:\n{stdout}\n{stderr}");
    assert_eq!(status, Some(0), "{what}");
    assert!(stdout.contains("SPLITVISOR-RESULT: PASS"), "{what}");
    assert!(stderr.contains("disk0: no request completed for"), "the freeze held no request up: {what}");
    assert!(stderr.contains("waiting in the kernel"), "{what}");
    assert!(stderr.contains("disk0: requests complete again"), "{what}");
    assert!(!stderr.contains("driver failed"), "{what}");
    std::fs::remove_file(image).unwrap();
}

/// A restart or an upgrade asked for while the filesystem under the image is frozen: the
/// old partition, its write waiting in the kernel, cannot die until the thaw, and a write
/// of its landing after the new driver's would undo a newer one. So the new driver waits
/// for it, the supervisor and the control socket stay free meanwhile, and once thawed the
/// new driver takes over with every acknowledged write on the image.
#[test]
fn a_restart_or_upgrade_during_a_storage_freeze_waits_for_the_old_driver_to_end() {
    if !support::kvm() {
        return;
    }
    let Some(mut fs) = support::frozen_fs::FreezableFs::new("lifecycle-freeze-restart", 64) else { return };
    // An upgrade first asks the old driver to stop its queues, and gives up on it after
    // the vhost-user reply timeout (2 s).
    for (command, answered_within, answer) in [
        ("restart", Duration::from_secs(1), "the restart goes on"),
        ("upgrade", Duration::from_secs(4), "has not ended yet"),
    ] {
        let image = fs.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
        let output = fs.path().with_extension(format!("{command}.out"));
        let socket = fs.path().with_extension(format!("{command}.sock"));
        let passes = 60;
        let cmdline = format!("blk_stress.passes={passes}");
        let args = ["--timeout", "120", "--cmdline", &cmdline, "--disk"].map(std::ffi::OsStr::new);
        let args = [&args[..], &[image.as_os_str(), "--api-socket".as_ref(), socket.as_os_str()]].concat();
        let mut vm = blk_stress_under_way("microkernel", &args, &output);
        fs.freeze();
        // Let the partition's writes reach the frozen filesystem.
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        let (status, said) = splitvisor_ctl(&socket, &[command, "disk0"]);
        let answered = asked.elapsed();
        let (_, list) = splitvisor_ctl(&socket, &["list"]);
        std::thread::sleep(Duration::from_secs(1));
        fs.thaw();
        let (exit, stderr) = vm.0.wait_with_output_bounded();
        let stdout = std::fs::read_to_string(&output).unwrap();
        let _ = std::fs::remove_file(&output);
        let what = format!("{command}: {status:?} {said}\nlist: {list}\n{stdout}\n{stderr}");
        // Answered before the thaw, not at it.
        assert!(answered < answered_within, "answered after {answered:?}: {what}");
        assert_ne!(status, Some(0), "{what}");
        assert!(said.contains(answer), "{what}");
        assert!(list.contains("restarting"), "{what}");
        // Taken over after the thaw, the guest saw no error and every block is as it
        // wrote it.
        assert!(stderr.contains("disk0: a new driver took over"), "{what}");
        // Asked for, not a fault (which would count against the restart budget).
        assert!(!stderr.contains("driver failed"), "{what}");
        assert_eq!(exit, Some(0), "{what}");
        assert!(stdout.contains("SPLITVISOR-RESULT: PASS"), "{what}");
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(guests::blk_stress_check(&bytes, passes, bytes.len() as u64 / 4096), Ok(()), "{what}");
        std::fs::remove_file(&image).unwrap();
    }
}

/// A VM whose disk partition is stuck on a frozen filesystem still ends at its timeout:
/// the partition is killed and left to end at the thaw (it keeps the image locked till
/// then), instead of holding the hypervisor's exit as long as the freeze lasts.
#[test]
fn a_vm_ends_at_its_timeout_while_its_disk_partition_is_stuck_on_a_frozen_filesystem() {
    if !support::kvm() {
        return;
    }
    let Some(mut fs) = support::frozen_fs::FreezableFs::new("lifecycle-freeze-exit", 64) else { return };
    let image = fs.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let output = fs.path().with_extension("exit.out");
    let timeout = Duration::from_secs(5);
    let started = Instant::now();
    let seconds = timeout.as_secs().to_string();
    let args =
        ["--cmdline", "blk_stress.passes=100000 blk_stress.timeout_s=600", "--timeout", &seconds, "--disk"]
            .map(std::ffi::OsStr::new);
    let mut vm = blk_stress_under_way("microkernel", &[&args[..], &[image.as_os_str()]].concat(), &output);
    fs.freeze();
    // The timeout, then the partition's last words (2 s) and its kill (2 s) at most.
    let bound = timeout + Duration::from_secs(8);
    let mut ended = None;
    while started.elapsed() < bound {
        if let Some(status) = vm.0.try_wait().unwrap() {
            ended = Some((status, started.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fs.thaw();
    let (_, stderr) = vm.0.wait_with_output_bounded();
    let _ = std::fs::remove_file(&output);
    let (status, after) =
        ended.unwrap_or_else(|| panic!("still running {bound:?} after its start:\n{stderr}"));
    // Stopped by its timeout (status 3), while the filesystem was still frozen.
    assert_eq!(status.code(), Some(3), "after {after:?}:\n{stderr}");
    assert!(stderr.contains("has not ended after"), "{stderr}");
    std::fs::remove_file(&image).unwrap();
}

/// Clients are served side by side, under the control thread's sandbox: one that trickles
/// its request a byte at a time, and more that connect and say nothing, hold nobody up.
#[test]
fn control_clients_that_trickle_or_idle_hold_up_nobody() {
    if !support::kvm() {
        return;
    }
    use std::io::Write;
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-api-slow.sock", std::process::id()));
    let vm = support::KillOnDrop(
        std::process::Command::new(support::example("microkernel"))
            .args(["--guest", "idle", "--timeout", "120", "--api-socket"])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (status, list) = splitvisor_ctl(&socket, &["--wait", "60", "list"]);
    assert_eq!(status, Some(0), "{list}");
    // A trickler, first in line: a byte every 100 ms, never a whole line.
    let mut trickler = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let trickling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let trickle = {
        let trickling = trickling.clone();
        std::thread::spawn(move || {
            while trickling.load(std::sync::atomic::Ordering::Relaxed) && trickler.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Idle clients behind it, more than the server has room for, then real ones.
    let _idle: Vec<_> = (0..20).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let asked = Instant::now();
        let (status, list) = splitvisor_ctl(&socket, &["list"]);
        let took = asked.elapsed();
        assert_eq!(status, Some(0), "{list}");
        assert!(list.contains("com1"), "{list}");
        // Served one at a time, as before, this took 4 s and more per client ahead.
        assert!(took < Duration::from_secs(2), "served after {took:?}");
    }
    trickling.store(false, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
    // Killed, the VM leaves its socket file behind (the next start would replace it).
    drop(vm);
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn the_control_socket_refuses_to_restart_a_driver_inside_the_hypervisor_and_the_vm_goes_on() {
    if !support::kvm() {
        return;
    }
    let disk = Image::new("lifecycle-api-monolithic", MIB);
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-api-mono.sock", std::process::id()));
    // The echo guest waits for a line on its console: the VM runs until the test is done.
    let mut vm = support::KillOnDrop(
        std::process::Command::new(support::example("monolithic"))
            .args(["--guest", "echo", "--timeout", "300", "--disk"])
            .arg(&disk.0)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let ctl = |args: &[&str]| splitvisor_ctl(&socket, args);
    let (status, list) = ctl(&["--wait", "60", "--json", "list"]);
    assert_eq!(status, Some(0), "{list}");
    let answer: serde_json::Value = serde_json::from_str(&list).unwrap();
    // Every device runs in the hypervisor, and the list says so alike for each.
    for device in answer["devices"].as_array().unwrap() {
        assert_eq!(device["placement"], "in hypervisor", "{device}");
        assert_eq!(device["driver"], "in hypervisor", "{device}");
        assert_eq!(device["pid"], serde_json::Value::Null, "{device}");
        assert_eq!(device["health"], "running", "{device}");
    }
    for command in ["restart", "upgrade", "fail"] {
        for device in ["disk0", "com1"] {
            let (status, out) = ctl(&[command, device]);
            assert_eq!(status, Some(1), "{command} {device}: {out}");
            assert!(
                out.contains(&format!("{device} runs in the hypervisor: it has no driver partition")),
                "{command} {device}: {out}"
            );
        }
    }
    let (status, list) = ctl(&["list"]);
    assert_eq!(status, Some(0), "the VM still answers: {list}");
    let disk0 = list.lines().find(|l| l.starts_with("disk0")).unwrap_or_else(|| panic!("{list}"));
    assert!(disk0.contains("running") && !disk0.contains("failed"), "{disk0}");
    use std::io::Write;
    let mut stdin = vm.0.stdin.take().unwrap();
    writeln!(stdin, "still here").unwrap();
    drop(stdin);
    let (status, output) = vm.0.wait_with_output_bounded();
    assert_eq!(status, Some(0), "{output}");
    assert!(output.contains("still here") && output.contains("SPLITVISOR-RESULT: PASS"), "{output}");
}

/// Lines `console-flood` writes in the lifecycle tests: about 117 KiB of output, several
/// seconds of a debug build's proxied console on the build machines.
const FLOOD_LINES: u64 = 3000;

/// The share of `console-flood`'s lines that have reached `console`, in percent.
fn flood_progress(console: &Capture) -> u64 {
    let text = console.text();
    let lines = text.lines().filter(|line| line.starts_with("flood ")).count() as u64;
    lines * 100 / FLOOD_LINES
}

/// Runs `console-flood` (`extra` appended to its command line) while `chaos` runs on
/// another thread with the VM's driver control and its console; returns the report, the
/// console and what `chaos` returned, once the console has been checked line by line.
fn console_flood_under<T: Send + 'static>(
    layout: Layout,
    extra: &str,
    chaos: impl FnOnce(DriverControl, Capture, Arc<AtomicBool>) -> T + Send + 'static,
) -> (VmReport, String, T) {
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find("console-flood").unwrap().elf)
        .layout(layout)
        .driver(driver())
        .cmdline(&format!("console_flood.lines={FLOOD_LINES} {extra}"))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(300)))
        .build()
        .unwrap();
    let control = vm.driver_control();
    let done = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (done, console) = (done.clone(), console.clone());
        std::thread::spawn(move || chaos(control, console, done))
    };
    let report = vm.run();
    done.store(true, Ordering::Release);
    let outcome = chaos.join().unwrap();
    let text = console.text();
    let report = report.unwrap_or_else(|e| panic!("the VM failed: {e}; its console ends:\n{}", tail(&text)));
    // The run ended by the guest's own i8042 reset, after its result line.
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "{}\n{:#?}", tail(&text), report.device_events);
    assert_eq!(report.end, VmEnd::GuestReset, "{:#?}", report.device_events);
    if let Err(problems) = guests::console_flood_check(&text, FLOOD_LINES) {
        panic!("console bytes lost or duplicated:\n{}\n{:#?}", problems.join("\n"), report.device_events);
    }
    (report, text, outcome)
}

/// The last lines of a console.
fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Waits (bounded) until `console-flood` is `percent` done; false if the VM ended first.
fn wait_progress(console: &Capture, percent: u64, done: &AtomicBool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !done.load(Ordering::Acquire) {
        if flood_progress(console) >= percent {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// How the lifecycle tests take a partition down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blow {
    /// SIGKILL of the process the hypervisor watches.
    KillWatched,
    /// SIGKILL of the process that serves (PID 1 of the partition's PID namespace).
    KillServing,
    /// SIGSTOP of the process that serves: only a request that gets no answer tells.
    StopServing,
}

impl Blow {
    fn deal(self, pid: u32) {
        match self {
            Blow::KillWatched => signal(pid, libc::SIGKILL),
            Blow::KillServing => signal(serving_process(pid), libc::SIGKILL),
            Blow::StopServing => signal(serving_process(pid), libc::SIGSTOP),
        }
    }
}

fn restarts_of(report: &VmReport, device: &str) -> u32 {
    report.drivers.iter().find(|d| d.device == device).unwrap().restarts
}

#[test]
fn the_console_partition_killed_and_stopped_during_output_loses_no_byte() {
    if !support::kvm() {
        return;
    }
    let layout = Layout::microkernel().with_fault_policy("com1", restart_without_limit());
    // Blows at fixed points of the output, so their number does not depend on speed.
    const BLOWS: [(u64, Blow); 8] = [
        (5, Blow::KillWatched),
        (15, Blow::KillServing),
        (25, Blow::KillWatched),
        (35, Blow::StopServing),
        (45, Blow::KillWatched),
        (55, Blow::KillServing),
        (65, Blow::StopServing),
        (75, Blow::KillWatched),
    ];
    // FIFO mode and THRE before every byte: a blow lands in a string write, or between
    // the status read and the byte.
    for extra in ["console_flood.fifo=1", "console_flood.fifo=0"] {
        let (report, _, dealt) = console_flood_under(layout.clone(), extra, |control, console, done| {
            let mut dealt = Vec::new();
            for (percent, blow) in BLOWS {
                if !wait_progress(&console, percent, &done) {
                    break;
                }
                let Some(pid) = control.driver("com1").and_then(|d| d.pid) else { break };
                blow.deal(pid);
                dealt.push(blow);
                if !wait_replaced(&control, "com1", pid, &done) {
                    break;
                }
            }
            dealt
        });
        assert_eq!(dealt, BLOWS.map(|(_, blow)| blow), "{extra}: the guest finished first");
        // (More restarts than blows only if a partition starved of CPU missed the proxy's
        // deadline: that is replaced the same way.)
        let restarts = restarts_of(&report, "com1") as usize;
        assert!(restarts >= BLOWS.len(), "{extra}: {restarts} restarts: {:#?}", report.device_events);
        eprintln!("{extra}: {} blows to com1, every line arrived once", dealt.len());
    }
}

#[test]
fn the_i8042_partition_killed_and_stopped_during_output_still_resets_the_vm() {
    if !support::kvm() {
        return;
    }
    // The default fault policy (restart, at most 10 within a minute, with a back-off).
    let (report, _, dealt) = console_flood_under(Layout::microkernel(), "", |control, console, done| {
        let mut dealt = Vec::new();
        for (percent, device, blow) in [
            (10, "i8042", Blow::KillWatched),
            (20, "com1", Blow::KillWatched),
            (30, "i8042", Blow::KillServing),
            (40, "i8042", Blow::KillWatched),
            (50, "com1", Blow::KillServing),
            (60, "i8042", Blow::KillWatched),
            // Stopped, the i8042 partition is noticed by the supervisor's liveness probe or
            // at the guest's reset, whichever comes first; the reset must still end the VM:
            // the proxy hears nothing, the supervisor replaces the partition, and the new
            // one takes the write.
            (80, "i8042", Blow::StopServing),
        ] {
            if !wait_progress(&console, percent, &done) {
                break;
            }
            let Some(pid) = control.driver(device).and_then(|d| d.pid) else { break };
            blow.deal(pid);
            dealt.push((device, blow));
            if blow != Blow::StopServing && !wait_replaced(&control, device, pid, &done) {
                break;
            }
        }
        dealt
    });
    assert_eq!(dealt.len(), 7, "the guest finished first: {dealt:?}");
    // Every kill was replaced, and so was the stopped partition, at the reset.
    assert!(restarts_of(&report, "i8042") >= 5, "{:#?}", report.device_events);
    assert!(restarts_of(&report, "com1") >= 2, "{:#?}", report.device_events);
    let stopped = report
        .device_events
        .iter()
        .filter(|e| e.device == "i8042")
        .any(|e| e.what.contains("stopped answering") || e.what.contains("liveness probe"));
    assert!(stopped, "the stopped i8042 was not taken as failed: {:#?}", report.device_events);
    for event in &report.device_events {
        eprintln!("{:>8.3} s {}: {}", event.at.as_secs_f64(), event.device, event.what);
    }
}

#[test]
fn stopped_partitions_of_devices_the_guest_leaves_alone_are_replaced_all_the_same() {
    if !support::kvm() {
        return;
    }
    // `idle` halts with interrupts off after its first line: it never touches COM1 or the
    // i8042 again, so no access can find their partitions stopped; only the supervisor's
    // liveness probe can.
    let console = Capture::default();
    let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
        .layout(Layout::microkernel().with_watchdog(Duration::from_millis(300)))
        .driver(driver())
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap();
    let (control, stop) = (vm.driver_control(), vm.stop_handle());
    let done = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (done, console) = (done.clone(), console.clone());
        std::thread::spawn(move || {
            // The whole line, its newline included: the guest's last COM1 access. A part of
            // it may show while the vCPU still writes the rest, and that access, not the
            // probe, would then find the partition stopped.
            const LAST_LINE: &str = "halting until the host stops the VM\n";
            let deadline = Instant::now() + Duration::from_secs(60);
            while !console.text().contains(LAST_LINE) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let halted = console.text().contains(LAST_LINE);
            let mut replaced = Vec::new();
            for device in ["com1", "i8042"] {
                let Some(pid) = control.driver(device).and_then(|d| d.pid) else { break };
                signal(serving_process(pid), libc::SIGSTOP);
                replaced.push((device, wait_replaced(&control, device, pid, &done)));
            }
            stop.stop();
            (halted, replaced)
        })
    };
    let report = vm.run().unwrap();
    done.store(true, Ordering::Release);
    let (halted, replaced) = chaos.join().unwrap();
    assert!(halted, "the guest never halted: {}", console.text());
    assert_eq!(replaced, [("com1", true), ("i8042", true)], "{:#?}", report.device_events);
    for device in ["com1", "i8042"] {
        let probed =
            report.device_events.iter().any(|e| e.device == device && e.what.contains("liveness probe"));
        assert!(probed, "{device}: not found by a probe: {:#?}", report.device_events);
    }
}

#[test]
fn console_flood_passes_in_the_monolithic_layout() {
    if !support::kvm() {
        return;
    }
    let (report, _, ()) = console_flood_under(Layout::monolithic(), "", |_, _, _| ());
    assert!(report.device_events.is_empty(), "{:#?}", report.device_events);
}
