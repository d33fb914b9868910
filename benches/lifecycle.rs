//! The driver lifecycle, measured: how fast a killed partition is replaced, what a guest
//! sees of a restart and of a live upgrade, what a kill every second costs in throughput,
//! and the seed's four claims side by side in one table.
//!
//! `cargo bench --bench lifecycle`. Environment: LIFECYCLE_KILLS (default 50),
//! LIFECYCLE_UPGRADES (default 20).
//!
//! * "death to serving": from the SIGKILL the bench sends to the disk partition to the
//!   moment a new partition serves the device's queues (the supervisor's restart done).
//! * "I/O stall": what the guest sees: the longest time without a completion around the
//!   event, with requests waiting, read from the queue's used index in guest memory every
//!   50 µs by the bench (the guest keeps 16 requests in flight throughout).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

#[path = "common/scratch.rs"]
mod scratch;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitvisor::layout::{
    Command, CommandOutcome, ConsoleOutput, DiskConfig, DriverControl, DriverProgram, FaultPolicy, Layout,
    Placement, SharedBuffer, VmBuilder, VmReport,
};

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn driver() -> DriverProgram {
    DriverProgram {
        path: std::env::current_exe().unwrap(),
        prefix: vec![splitvisor::cli::DRIVER_SUBCOMMAND.to_string()],
    }
}

/// Every change of the disk queue's used index the sampler saw, with its time, while
/// requests were waiting.
#[derive(Default)]
struct Completions(Mutex<Vec<Instant>>);

impl Completions {
    /// The longest gap between completions that spans `at` (within `window`).
    fn stall_around(&self, at: Instant, window: Duration) -> Option<Duration> {
        let times = self.0.lock().unwrap();
        let before = times.iter().rev().find(|t| **t <= at)?;
        let after = times.iter().find(|t| **t > at && t.duration_since(at) < window)?;
        Some(after.duration_since(*before))
    }
}

/// Samples the used index of `device`'s queue every 50 µs until `done`.
fn sample(
    control: DriverControl,
    device: &'static str,
    done: Arc<AtomicBool>,
) -> (Arc<Completions>, std::thread::JoinHandle<()>) {
    let completions = Arc::new(Completions::default());
    let seen = completions.clone();
    let thread = std::thread::spawn(move || {
        let mut last = None;
        while !done.load(Ordering::Acquire) {
            if let Some(Some((_, used))) = control.queue_indices(device).first().copied() {
                if last != Some(used) {
                    seen.0.lock().unwrap().push(Instant::now());
                    last = Some(used);
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    (completions, thread)
}

/// A VM running blk-stress (endless passes, 16 in flight) on `disk`, its driver control,
/// and a flag that stops it.
struct Workload {
    vm: Option<splitvisor::layout::Vm>,
    console: SharedBuffer,
}

impl Workload {
    fn start(layout: Layout, disk: &Path, generation: u64) -> Self {
        let console = SharedBuffer::new();
        let vm = VmBuilder::new(splitvisor::guests::find("blk-stress").expect("the blk-stress guest").elf)
            .memory(256 << 20)
            .layout(layout)
            .driver(driver())
            .cmdline(&format!("blk_stress.generation={generation} blk_stress.passes=100000"))
            .disk(DiskConfig::image(disk))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(1800)))
            .build()
            .unwrap();
        Self { vm: Some(vm), console }
    }

    fn control(&self) -> DriverControl {
        self.vm.as_ref().unwrap().driver_control()
    }

    /// Runs the VM while `chaos` runs, stops it after, and checks the guest saw no error.
    fn run<T: Send + 'static>(
        mut self,
        chaos: impl FnOnce(DriverControl) -> T + Send + 'static,
    ) -> (T, VmReport) {
        let vm = self.vm.take().unwrap();
        let control = vm.driver_control();
        let stop = vm.stop_handle();
        let chaos = std::thread::spawn(move || {
            // Let the guest get going.
            std::thread::sleep(Duration::from_secs(2));
            let result = chaos(control);
            stop.stop();
            result
        });
        let report = vm.run().unwrap();
        let result = chaos.join().unwrap();
        let console = self.console.text();
        assert!(!console.contains("FAIL"), "the guest saw an error:\n{console}");
        (result, report)
    }
}

fn pid(control: &DriverControl) -> u32 {
    control.driver("disk0").and_then(|d| d.pid).expect("a disk partition")
}

/// Kills the disk partition `kills` times; returns (death to serving, I/O stall) per kill.
fn kill_loop(control: DriverControl, kills: u64) -> Vec<(Duration, Option<Duration>)> {
    let done = Arc::new(AtomicBool::new(false));
    let (completions, sampler) = sample(control.clone(), "disk0", done.clone());
    let mut figures = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(300));
        let old = pid(&control);
        let killed = Instant::now();
        // SAFETY: kills the bench's own VM's partition.
        unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) };
        while control.driver("disk0").and_then(|d| d.pid) == Some(old) {
            std::thread::sleep(Duration::from_micros(20));
            assert!(killed.elapsed() < Duration::from_secs(30), "no restart");
        }
        figures.push((killed.elapsed(), None));
        let index = figures.len() - 1;
        std::thread::sleep(Duration::from_millis(100));
        figures[index].1 = completions.stall_around(killed, Duration::from_secs(5));
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    figures
}

/// Upgrades the disk driver `upgrades` times; returns (reported pause, I/O stall).
fn upgrade_loop(control: DriverControl, upgrades: u64) -> Vec<(Duration, Option<Duration>)> {
    let done = Arc::new(AtomicBool::new(false));
    let (completions, sampler) = sample(control.clone(), "disk0", done.clone());
    let mut figures = Vec::new();
    for _ in 0..upgrades {
        std::thread::sleep(Duration::from_millis(300));
        let at = Instant::now();
        let paused = match control.command("disk0", Command::Upgrade(None), Duration::from_secs(30)) {
            Ok(CommandOutcome::Upgraded { paused, .. }) => paused,
            other => panic!("upgrade: {other:?}"),
        };
        std::thread::sleep(Duration::from_millis(100));
        figures.push((paused, completions.stall_around(at + paused / 2, Duration::from_secs(5))));
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    figures
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(values: &mut [Duration]) -> (f64, f64) {
    values.sort();
    (millis(values[values.len() / 2]), millis(values[values.len() - 1]))
}

fn row(name: &str, figures: &[(Duration, Option<Duration>)]) {
    let mut first: Vec<Duration> = figures.iter().map(|f| f.0).collect();
    let mut stalls: Vec<Duration> = figures.iter().filter_map(|f| f.1).collect();
    let (median, max) = stats(&mut first);
    let (stall_median, stall_max) = if stalls.is_empty() { (f64::NAN, f64::NAN) } else { stats(&mut stalls) };
    println!(
        "| {name:<38} | {:>5} | {median:>9.2} | {max:>9.2} | {stall_median:>9.2} | {stall_max:>9.2} |",
        figures.len()
    );
}

/// blk-bench's IOPS per workload, from its result lines.
fn blk_bench(layout: Layout, disk: &Path, kill_every: Option<Duration>) -> Vec<(String, f64)> {
    let console = SharedBuffer::new();
    // A partition may be killed as often as the bench likes; a driver in the hypervisor
    // keeps its own policy (it cannot be restarted).
    let layout = match layout.placement("disk0") {
        Placement::Partition => {
            layout.with_fault_policy("disk0", "restart:max=100000:backoff=0".parse().unwrap())
        }
        Placement::InHypervisor => layout,
    };
    let vm = VmBuilder::new(splitvisor::guests::find("blk-bench").unwrap().elf)
        .memory(256 << 20)
        .layout(layout)
        .driver(driver())
        .disk(DiskConfig::image(disk))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(1800)))
        .build()
        .unwrap();
    let control = vm.driver_control();
    let done = Arc::new(AtomicBool::new(false));
    let killer = kill_every.map(|every| {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(every);
                if let Some(pid) = control.driver("disk0").and_then(|d| d.pid) {
                    // SAFETY: kills the bench's own VM's partition.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    kills += 1;
                }
            }
            kills
        })
    });
    let report = vm.run().unwrap();
    done.store(true, Ordering::Release);
    let kills = killer.map(|k| k.join().unwrap());
    let text = console.text();
    assert!(report.guest_result.is_some_and(|r| r.passed()), "blk-bench failed:\n{text}");
    if let Some(kills) = kills {
        eprintln!("  ({kills} kills during the run)");
    }
    // `blk-bench: NAME ops=N ns=T bytes=B ...`
    text.lines()
        .filter_map(|l| l.strip_prefix("blk-bench: "))
        .filter_map(|l| {
            let name = l.split_whitespace().next()?.to_string();
            let field = |key: &str| -> Option<f64> {
                l.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?.parse().ok()
            };
            Some((name, field("ops")? * 1e9 / field("ns")?))
        })
        .collect()
}

/// A partition's view of the host: (uid, CapEff, Seccomp, fds, root entries).
fn reach(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("?").trim().to_string();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let root = std::fs::read_dir(format!("/proc/{pid}/root")).map(|d| d.count()).unwrap_or(0);
    let kvm = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("kvm")));
    format!(
        "uid {}, CapEff {}, seccomp {}, {fds} fds{}, {root} entries in /",
        field("Uid:").split_whitespace().next().unwrap_or("?"),
        field("CapEff:"),
        field("Seccomp:"),
        if kvm { " incl. KVM" } else { "" }
    )
}

fn main() -> ExitCode {
    if let Some(status) = splitvisor::cli::driver_subcommand("bench") {
        return status;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("lifecycle bench: /dev/kvm is not available; nothing to measure");
        return ExitCode::FAILURE;
    }
    let kills = env_u64("LIFECYCLE_KILLS", 50);
    let upgrades = env_u64("LIFECYCLE_UPGRADES", 20);
    let scratch = scratch::ScratchDir::new("lifecycle-bench");
    let dir = scratch.path();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
    let restart_always = || "restart:max=100000:backoff=0".parse::<FaultPolicy>().unwrap();

    println!("## Driver restart and upgrade under blk-stress (16 requests in flight)\n");
    println!(
        "| event                                  | count | median ms |    max ms | stall med | stall max |"
    );
    println!(
        "|----------------------------------------|------:|----------:|----------:|----------:|----------:|"
    );
    let layout = Layout::microkernel().with_fault_policy("disk0", restart_always());
    let (figures, _) =
        Workload::start(layout.clone(), &disk, 1).run(move |control| kill_loop(control, kills));
    row("SIGKILL -> serving (spare partition)", &figures);
    let (figures, _) = Workload::start(layout.clone().with_standby(false), &disk, 2)
        .run(move |control| kill_loop(control, kills.min(20)));
    row("SIGKILL -> serving (no spare)", &figures);
    let (figures, _) = Workload::start(layout, &disk, 3).run(move |control| upgrade_loop(control, upgrades));
    row("live upgrade (paused; stall)", &figures);
    println!("\n(stall: the longest gap between two completions around the event, requests waiting)");

    println!("\n## blk-bench with the disk partition killed every second\n");
    let quiet = blk_bench(Layout::microkernel(), &disk, None);
    let killed = blk_bench(Layout::microkernel(), &disk, Some(Duration::from_secs(1)));
    let monolithic = blk_bench(Layout::monolithic(), &disk, None);
    println!(
        "| workload              | monolithic | microkernel | kill every 1 s | ratio kill/none | mk/mono |"
    );
    println!(
        "|-----------------------|-----------:|------------:|---------------:|----------------:|--------:|"
    );
    for (name, iops) in &quiet {
        let under_kills = killed.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v);
        let mono = monolithic.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v);
        println!(
            "| {name:<21} | {mono:>10.0} | {iops:>11.0} | {under_kills:>14.0} | {:>15.3} | {:>7.3} |",
            under_kills / iops,
            iops / mono
        );
    }

    println!("\n## The seed's four claims, measured in this run\n");
    // A fault in each layout: the same injected crash.
    let inject = |layout: Layout| {
        let console = SharedBuffer::new();
        let report = VmBuilder::new(splitvisor::guests::find("blk-verify").unwrap().elf)
            .layout(layout)
            .driver(driver())
            .inject_fault("disk0", "crash-after=50")
            .disk(DiskConfig::image(&disk))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(600)))
            .build()
            .unwrap()
            .run()
            .unwrap();
        let restarts = report.drivers.iter().find(|d| d.device == "disk0").map_or(0, |d| d.restarts);
        match (&report.guest_result, &report.end) {
            (Some(result), _) if result.passed() => {
                format!("guest PASS after {restarts} restart(s): nothing seen")
            }
            (_, end) => format!("VM ends: {end}"),
        }
    };
    let mono_fault = inject(Layout::monolithic());
    let mk_fault = inject(Layout::microkernel());
    // What a driver can reach: the hypervisor process itself, or its partition.
    let probe = Workload::start(Layout::microkernel(), &disk, 4);
    let control = probe.control();
    let partition = pid(&control);
    let serving = std::fs::read_to_string(format!("/proc/{partition}/task/{partition}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(partition);
    let mk_reach = reach(serving);
    let mono_reach = reach(std::process::id());
    let (pauses, _) = probe.run(|control| upgrade_loop(control, 5));
    let mut paused: Vec<Duration> = pauses.iter().map(|p| p.0).collect();
    let (pause_median, _) = stats(&mut paused);
    let speed = |name: &str| {
        let mk = quiet.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v);
        let mono = monolithic.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v);
        (mono, mk)
    };
    let (mono_iops, mk_iops) = speed("rand-read-4K-qd16");
    println!("| claim                          | monolithic                              | microkernel |");
    println!("|--------------------------------|-----------------------------------------|-------------|");
    println!(
        "| speed (rand-read-4K-qd16 IOPS) | {mono_iops:.0} | {mk_iops:.0} ({:.3}x) |",
        mk_iops / mono_iops
    );
    println!("| a driver fault (crash-after=50)| {mono_fault} | {mk_fault} |");
    println!("| what the driver can reach      | {mono_reach} | {mk_reach} |");
    println!(
        "| driver upgrade downtime        | the whole VM (restart the hypervisor) | {pause_median:.2} ms device pause (median of 5) |"
    );
    ExitCode::SUCCESS
}
