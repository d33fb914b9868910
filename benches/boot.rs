//! splitvisor against QEMU on the same guest ELF, measured side by side in one run.
//!
//! `cargo bench --bench boot` prints these tables:
//! 1. process start to first guest output and to VM exit for `hello` (median of N runs),
//!    splitvisor's monolithic hypervisor vs `qemu-system-x86_64 -M microvm -enable-kvm`;
//!    then process start to the first byte of the `marker` guest, written by its very first
//!    instructions (the VMM's own start), with issue 11's targets (≤ 3 ms, ≤ 4 MiB) as
//!    pass/fail columns, beside the same binary started only to write a byte (what
//!    starting a process costs here), each with the CPU time all its processes (driver
//!    partitions included) had used by its first byte, and that time over the host's CPUs:
//!    a floor under the first byte however the work is ordered;
//! 2. the round trip of one PIO exit and one MMIO exit as the guest sees it (`exit-bench`,
//!    TSC-timed, median of 101 per run, median over BOOT_BENCH_EXIT_RUNS runs, default 9),
//!    under both, plus the bus dispatch alone on the host, and
//!    a COM1 read forwarded to a driver partition against the same read in the hypervisor
//!    (target ≤ 1.2x; the median of each run's own ratio, the two measured a moment apart,
//!    printed with the runs' range);
//! 3. peak RSS of each hypervisor process with a 128 MiB guest, and of each driver
//!    partition of the microkernel layout (com1, i8042 with `hello`; a disk with
//!    `blk-verify` on a 1 MiB image, counted beyond the guest RAM it maps), with the
//!    issue's targets (≤ 4 MiB, ≤ 2 MiB, ≤ 3 MiB) as pass/fail columns; and (as root) a
//!    partition's start, from the request to its sandbox in place (an i8042 partition, one
//!    at a time), with an empty root of its own against the one the spawner makes for the
//!    partitions it starts after its first pause: each run a fresh process starts
//!    BOOT_BENCH_STARTS (default 40) before a pause and as many after.
//!
//! Peak RSS is read from the process itself (`VmHWM` in /proc/PID/status, sampled every
//! millisecond until it exits), not from wait4's `ru_maxrss`: Linux folds into that the
//! high-water mark of the address space the child had *before* its exec, which for a
//! child started with vfork (posix_spawn, as `Command` does) is this bench's own. A
//! partition is the process the hypervisor started (PID 1 of a PID namespace of its own,
//! which serves) plus any children it has (none today; a driver that forks into its PID
//! namespace serves from a child): its figure is the sum over them (shared pages counted
//! once per process, as processes' RSS are), less the guest RAM they map (RssShmem),
//! sampled.
//!
//! The splitvisor process is this very binary, re-run with `--hypervisor`: it then behaves
//! exactly as `examples/monolithic` (or `microkernel`, with `--microkernel-layout`; it is also
//! its own driver partition program). Set BOOT_BENCH_RUNS to change N (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

#[path = "common/scratch.rs"]
mod scratch;

use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitvisor::bus::{BusDevice, BusRange};
use splitvisor::layout::{ConsoleOutput, VmBuilder};
use splitvisor::memory::layout::MMIO32_START;

/// One hypervisor run as seen from outside.
struct Run {
    first_output: Option<Duration>,
    /// CPU time its own threads and the processes under it (driver partitions) had used
    /// when the first output came (see [`cpu_time_of_tree`]).
    cpu_at_first_output: Option<(Duration, Duration)>,
    exit: Duration,
    max_rss_kib: i64,
    /// Peak RSS beyond guest RAM of each driver partition it started, by what it serves
    /// (`serial`, `i8042`, `blk`, ...), KiB.
    partitions: Vec<(String, u64)>,
    stdout: String,
    success: bool,
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// The children of `pid` (its threads' children included).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// CPU time used so far by the live threads of process `pid`, summed from
/// /proc/PID/task/*/schedstat (nanoseconds on a CPU). Threads that already ended are not
/// counted: at a VM's first output none of its own has.
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let nanos = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// CPU time used so far by process `pid` and by every process under it (its driver
/// partitions), each as [`cpu_time`] counts it.
fn cpu_time_of_tree(pid: u32) -> (Duration, Duration) {
    let mut below = Duration::ZERO;
    let mut pending = children(pid);
    while let Some(process) = pending.pop() {
        below += cpu_time(process);
        pending.extend(children(process));
    }
    (cpu_time(pid), below)
}

/// What a partition process serves: the driver's sub-command on its command line.
fn partition_kind(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    ["serial", "i8042", "acpi-power", "blk", "net"]
        .iter()
        .find(|k| args.iter().any(|a| a == *k))
        .map(|k| k.to_string())
}

/// Peak RSS beyond guest RAM of `pid` as far as one look tells: its high-water mark less
/// the guest RAM it maps now, or what it maps now beyond guest RAM (each a lower bound).
fn peak_beyond_shmem_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let shmem = status_kib(&status, "RssShmem:").unwrap_or(0);
    let now = status_kib(&status, "VmRSS:")?.saturating_sub(shmem);
    Some(now.max(status_kib(&status, "VmHWM:")?.saturating_sub(shmem)))
}

/// Samples the peak RSS of process `pid` and of its driver partitions until `done`,
/// once `begin` is set (the first output: sampling then cannot delay the start measured)
/// or 50 ms have passed.
fn sample_rss(
    pid: u32,
    begin: &std::sync::atomic::AtomicBool,
    done: &std::sync::atomic::AtomicBool,
) -> (i64, Vec<(String, u64)>) {
    use std::sync::atomic::Ordering;
    let started = Instant::now();
    let mut own = 0;
    let mut partitions: std::collections::BTreeMap<u32, (String, u64)> = Default::default();
    while !done.load(Ordering::Acquire) {
        if !begin.load(Ordering::Acquire) && started.elapsed() < Duration::from_millis(50) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if let Some(hwm) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| status_kib(&status, "VmHWM:"))
        {
            own = own.max(hwm as i64);
        }
        for partition in children(pid) {
            let Some(kind) = partition_kind(partition) else { continue };
            let total: u64 =
                std::iter::once(partition).chain(children(partition)).filter_map(peak_beyond_shmem_kib).sum();
            let entry = partitions.entry(partition).or_insert((kind, 0));
            entry.1 = entry.1.max(total);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (own, partitions.into_values().collect())
}

/// Spawns `cmd`, timing its first stdout byte and its exit, and sampling its peak RSS and
/// its partitions' (reaped with wait4, not with `Child::wait`).
#[allow(clippy::zombie_processes)]
fn measure(mut cmd: Command) -> Run {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().unwrap();
    let begin = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let output_began = begin.clone();
    let pid = child.id();
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut cpu = None;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if first.is_none() {
                        first = Some(start.elapsed());
                        cpu = Some(cpu_time_of_tree(pid));
                    }
                    output_began.store(true, std::sync::atomic::Ordering::Release);
                    all.extend_from_slice(&buf[..n]);
                }
            }
        }
        (first, cpu, String::from_utf8_lossy(&all).into_owned())
    });
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, pid) = (done.clone(), child.id());
        std::thread::spawn(move || sample_rss(pid, &begin, &done))
    };
    // Waits until the child has exited, leaving it a zombie (its /proc entry stays, so the
    // sampler never reads another process's), then stops the sampler and reaps it.
    // SAFETY: siginfo_t is plain data, filled in by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child without reaping it, writing into `info`.
    let waited = unsafe { libc::waitid(libc::P_PID, child.id(), &mut info, libc::WEXITED | libc::WNOWAIT) };
    assert_eq!(waited, 0, "waitid failed");
    let exit = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let (max_rss_kib, partitions) = sampler.join().unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child, writing into `status`.
    let pid = unsafe { libc::waitpid(child.id() as libc::pid_t, &mut status, 0) };
    assert_eq!(pid, child.id() as libc::pid_t, "waitpid failed");
    let (first_output, cpu_at_first_output, stdout) = reader.join().unwrap();
    Run {
        first_output,
        cpu_at_first_output,
        exit,
        max_rss_kib,
        partitions,
        stdout,
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

fn splitvisor(guest: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--hypervisor", "--guest", guest, "--mem", "128M"]).args(extra);
    cmd
}

fn qemu(elf: &std::path::Path, append: Option<&str>) -> Command {
    splitvisor::guests::qemu_microvm_command(elf, 128, append, &[])
}

/// The table of 1c: `runs` processes of [`partition_starts`].
fn partition_start_table(runs: usize) {
    let starts: usize = std::env::var("BOOT_BENCH_STARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let (mut own, mut shared, mut counts) = (Vec::new(), Vec::new(), (0, 0));
    for _ in 0..runs {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--partition-starts", &starts.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<f64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let [own_ms, shared_ms, own_n, shared_n] = fields[..] else {
            println!("\n(a partition's start: a run failed: {})", text.trim());
            return;
        };
        own.push(own_ms);
        shared.push(shared_ms);
        counts = (counts.0 + own_n as usize, counts.1 + shared_n as usize);
    }
    let (own, shared) = (median(own), median(shared));
    println!(
        "\n## a partition's start: request to sandbox in place (i8042, one after another, median of {runs} runs' medians, ms)\n"
    );
    println!(
        "| empty root of its own | the partitions' shared empty root | ratio shared / own | starts (own, shared) |"
    );
    println!("|---:|---:|---:|---:|");
    println!("| {own:.3} | {shared:.3} | {:.3} | {}, {} |", shared / own, counts.0, counts.1);
}

/// In a process of its own: starts `n` i8042 partitions one after another, each waited
/// for until sandboxed; pauses, so that the spawner makes the partitions' shared empty
/// root; starts `n` more. Each start counts for the root it used, as its mount namespace
/// says (the shared one is the last start's): on a busy host the spawner may make it
/// before the pause. Prints the two medians (ms) and how many starts each had.
fn partition_starts(n: usize) -> ExitCode {
    use splitvisor::isolation::partition::{DriverProgram, Partition};
    let driver = DriverProgram {
        path: std::env::current_exe().unwrap(),
        prefix: vec![splitvisor::cli::DRIVER_SUBCOMMAND.to_string()],
    };
    // Each is kept until the end: a mount namespace's number is reused once it is gone.
    let start = || {
        let begun = Instant::now();
        let (starting, connection) = Partition::start_proxy(&driver, "i8042", None).unwrap();
        let partition = starting.wait().unwrap();
        let took = ms(begun.elapsed());
        let namespace = std::fs::read_link(format!("/proc/{}/ns/mnt", partition.pid())).unwrap();
        (took, namespace, partition, connection)
    };
    // The first starts pay for the spawner's own set-up.
    let warm: Vec<_> = (0..3).map(|_| start()).collect();
    let own: Vec<_> = (0..n).map(|_| start()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let shared: Vec<_> = (0..n).map(|_| start()).collect();
    drop(warm);
    let root = &shared[n - 1].1;
    let (in_root, own_root): (Vec<_>, Vec<_>) =
        own.iter().chain(&shared).partition(|started| started.1 == *root);
    let ms = |starts: &[&(f64, _, _, _)]| median(starts.iter().map(|started| started.0).collect());
    if own_root.is_empty() || in_root.is_empty() {
        println!("no start with {} root", if own_root.is_empty() { "its own" } else { "the shared" });
        return ExitCode::FAILURE;
    }
    println!("{} {} {} {}", ms(&own_root), ms(&in_root), own_root.len(), in_root.len());
    ExitCode::SUCCESS
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn field(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A register that reads as zero: the MMIO target of `exit-bench`.
struct Register;

impl BusDevice for Register {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<String> = std::env::args().collect();
    // This bench binary doubles as the driver partition program.
    if let Some(status) = splitvisor::cli::driver_subcommand("bench") {
        return status;
    }
    // The marker table's baseline: this process, started only to write one byte.
    if args.iter().any(|a| a == "--write-a-byte") {
        let _ = std::io::Write::write_all(&mut std::io::stdout(), b"M");
        return ExitCode::SUCCESS;
    }
    if let Some(starts) = args.iter().skip_while(|a| *a != "--partition-starts").nth(1) {
        return partition_starts(starts.parse().unwrap());
    }
    if args.iter().any(|a| a == "--hypervisor") {
        let layout = if args.iter().any(|a| a == "--microkernel-layout") {
            splitvisor::layout::Layout::microkernel()
        } else {
            splitvisor::layout::Layout::monolithic()
        };
        let args = args
            .iter()
            .filter(|a| !matches!(a.as_str(), "--hypervisor" | "--bench" | "--microkernel-layout"));
        return splitvisor::cli::main_from("boot-bench", layout, args, start);
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("boot bench: /dev/kvm is not available; nothing to measure");
        return ExitCode::FAILURE;
    }
    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    if !have_qemu {
        eprintln!("boot bench: qemu-system-x86_64 not found: the QEMU columns are empty");
    }
    let runs: usize = std::env::var("BOOT_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let scratch = scratch::ScratchDir::new("boot-bench");
    let dir = scratch.path();
    let elf_path = |name: &str| {
        let path = dir.join(format!("{name}.elf"));
        std::fs::write(&path, splitvisor::guests::find(name).unwrap().elf).unwrap();
        path
    };
    let hello = elf_path("hello");
    let exit_bench = elf_path("exit-bench");

    // 1. Boot, alternating the two hypervisors so drift on a shared machine hits both.
    let (mut ours, mut theirs, mut microkernel) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let run = measure(splitvisor("hello", &[]));
        assert!(run.success && run.stdout.contains("PASS"), "splitvisor run failed:\n{}", run.stdout);
        ours.push(run);
        let run = measure(splitvisor("hello", &["--microkernel-layout"]));
        assert!(
            run.success && run.stdout.contains("PASS"),
            "splitvisor microkernel run failed:\n{}",
            run.stdout
        );
        microkernel.push(run);
        if have_qemu {
            let run = measure(qemu(&hello, None));
            assert!(run.stdout.contains("PASS"), "QEMU run failed:\n{}", run.stdout);
            theirs.push(run);
        }
    }
    let verdict = |value: f64, target: f64| if value <= target { "pass" } else { "FAIL" };
    let first = |runs: &[Run]| median(runs.iter().map(|r| ms(r.first_output.unwrap())).collect());
    let exit = |runs: &[Run]| median(runs.iter().map(|r| ms(r.exit)).collect());
    // CPU time by the first output: the process's own, and its partitions'.
    let cpu = |runs: &[Run]| {
        let (own, below): (Vec<_>, Vec<_>) =
            runs.iter().map(|r| r.cpu_at_first_output.unwrap()).map(|(o, b)| (ms(o), ms(b))).unzip();
        let total =
            median(runs.iter().map(|r| r.cpu_at_first_output.unwrap()).map(|(o, b)| ms(o + b)).collect());
        (total, median(own), median(below))
    };
    let rss = |runs: &[Run]| median(runs.iter().map(|r| r.max_rss_kib as f64 / 1024.0).collect());
    println!("\n## hello: process start to first guest output and to exit (median of {runs} runs, ms)\n");
    println!("| hypervisor | first output | exit | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|");
    println!("| splitvisor monolithic | {:.2} | {:.2} | {:.1} |", first(&ours), exit(&ours), rss(&ours));
    println!(
        "| splitvisor microkernel (8250, i8042 in partitions; hypervisor RSS) | {:.2} | {:.2} | {:.1} |",
        first(&microkernel),
        exit(&microkernel),
        rss(&microkernel)
    );
    if have_qemu {
        println!(
            "| QEMU microvm (KVM) | {:.2} | {:.2} | {:.1} |",
            first(&theirs),
            exit(&theirs),
            rss(&theirs)
        );
        println!(
            "| ratio splitvisor monolithic / QEMU | {:.3} | {:.3} | {:.3} |",
            first(&ours) / first(&theirs),
            exit(&ours) / exit(&theirs),
            rss(&ours) / rss(&theirs)
        );
    }

    // 1a. The driver partitions' own peak RSS: com1 and i8042 from the hello runs above, a
    // disk from blk-verify runs on a small image.
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let disk_arg = image.to_str().unwrap().replace(',', ",,");
    let disk_runs: Vec<Run> = (0..runs.min(5))
        .map(|_| {
            let run = measure(splitvisor("blk-verify", &["--microkernel-layout", "--disk", &disk_arg]));
            assert!(run.success && run.stdout.contains("PASS"), "blk-verify run failed:\n{}", run.stdout);
            run
        })
        .collect();
    // Per run, the largest partition of a kind (spares included); the median over runs.
    let partition_mib = |runs: &[Run], kind: &str| {
        median(
            runs.iter()
                .filter_map(|r| r.partitions.iter().filter(|(k, _)| k == kind).map(|(_, kib)| *kib).max())
                .map(|kib| kib as f64 / 1024.0)
                .collect(),
        )
    };
    println!(
        "\n## driver partitions: peak RSS beyond guest RAM (microkernel layout, median, MiB; targets of issue 11)\n"
    );
    println!("| partition | guest | runs | peak RSS | target | pass/FAIL |");
    println!("|---|---|---:|---:|---:|:---:|");
    for (name, kind, guest, runs, target) in [
        ("com1 (8250)", "serial", "hello", &microkernel, 2.0),
        ("i8042", "i8042", "hello", &microkernel, 2.0),
        ("disk0 (virtio-blk, 1 MiB image)", "blk", "blk-verify", &disk_runs, 3.0),
    ] {
        let peak = partition_mib(runs, kind);
        println!(
            "| {name} | {guest} | {} | {peak:.1} | ≤ {target} | {} |",
            runs.len(),
            verdict(peak, target)
        );
    }

    // 1b. The VMM alone: the marker guest writes COM1 before anything else it does.
    let marker = elf_path("marker");
    let (mut ours_marker, mut micro_marker, mut theirs_marker) = (Vec::new(), Vec::new(), Vec::new());
    let mut baseline = Vec::new();
    for _ in 0..runs {
        let mut write_a_byte = Command::new(std::env::current_exe().unwrap());
        write_a_byte.arg("--write-a-byte");
        baseline.push(measure(write_a_byte));
        let run = measure(splitvisor("marker", &[]));
        assert!(run.success && run.stdout.starts_with('M'), "splitvisor marker run failed:\n{}", run.stdout);
        ours_marker.push(run);
        let run = measure(splitvisor("marker", &["--microkernel-layout"]));
        assert!(run.success && run.stdout.starts_with('M'), "microkernel marker run failed:\n{}", run.stdout);
        micro_marker.push(run);
        if have_qemu {
            theirs_marker.push(measure(qemu(&marker, None)));
        }
    }
    println!(
        "\n## marker: process start to the guest's first byte (median of {runs} runs, ms; targets of issue 11)\n"
    );
    // The CPU time its processes had used by then (partitions included) over the host's
    // CPUs is a floor under the first byte: on a small host a layout that needs more CPU
    // time than that to start cannot meet the target, however its work is ordered.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "| hypervisor | first byte | ≤ 3 ms | CPU time to it: all (hypervisor + partitions) | all over {cpus} CPUs | peak RSS (MiB) | ≤ 4 MiB |"
    );
    println!("|---|---:|:---:|---:|---:|---:|:---:|");
    for (name, runs) in [("splitvisor monolithic", &ours_marker), ("splitvisor microkernel", &micro_marker)] {
        let (first, (cpu, own, below), rss) = (first(runs), cpu(runs), rss(runs));
        println!(
            "| {name} | {first:.2} | {} | {cpu:.2} ({own:.2} + {below:.2}) | {:.2} | {rss:.1} | {} |",
            verdict(first, 3.0),
            cpu / cpus as f64,
            verdict(rss, 4.0)
        );
    }
    if have_qemu {
        let (first, (cpu, ..), rss) = (first(&theirs_marker), cpu(&theirs_marker), rss(&theirs_marker));
        println!("| QEMU microvm (KVM) | {first:.2} | | {cpu:.2} | {:.2} | {rss:.1} | |", cpu / cpus as f64);
    }
    // (Its CPU time is not shown: the process may have ended before it is read.)
    println!(
        "| for scale: this binary, started only to write one byte | {:.2} | | | | | |",
        first(&baseline)
    );

    // 1c. A partition's start, own root against the shared one (which only a root
    // hypervisor makes), each run in a process of its own (the spawner is a process's, and
    // makes the shared root once).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        partition_start_table(runs.min(5));
    } else {
        println!("\n(a partition's start, own root against the shared one: needs root)");
    }

    // 2. Exit round trips as the guest sees them: each run reports the median of its 101
    // accesses; the table shows the median over the runs, the three hypervisors taking
    // turns so that drift on a shared machine hits all of them.
    let exit_runs: usize =
        std::env::var("BOOT_BENCH_EXIT_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let append = format!("exit_bench.mmio={MMIO32_START:#x}");
    let (mut pio, mut mmio, mut forwarded) = (Vec::new(), Vec::new(), Vec::new());
    let (mut qemu_pio, mut qemu_mmio) = (Vec::new(), Vec::new());
    let (mut tsc_khz, mut exits) = (0.0, (0, 0));
    for _ in 0..exit_runs {
        let console = splitvisor::layout::SharedBuffer::new();
        let report = VmBuilder::new(splitvisor::guests::find("exit-bench").unwrap().elf)
            .cmdline(&append)
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .mmio_device(
                BusRange::new(MMIO32_START, 0x1000).unwrap(),
                "bench register",
                Arc::new(Mutex::new(Register)),
            )
            .timeout(Some(Duration::from_secs(120)))
            .build()
            .unwrap()
            .run()
            .unwrap();
        let text = console.text();
        tsc_khz = f64::from(report.tsc_khz.expect("KVM reports the TSC frequency"));
        exits = (report.pio_exits, report.mmio_exits);
        pio.push(field(&text, "pio_ticks=").expect("pio result"));
        mmio.push(field(&text, "mmio_ticks=").expect("mmio result"));
        // The same, with COM1 in a driver partition: every LSR read is forwarded.
        let console = splitvisor::layout::SharedBuffer::new();
        VmBuilder::new(splitvisor::guests::find("exit-bench").unwrap().elf)
            .layout(splitvisor::layout::Layout::microkernel())
            .driver(splitvisor::layout::DriverProgram {
                path: std::env::current_exe().unwrap(),
                prefix: vec![splitvisor::cli::DRIVER_SUBCOMMAND.to_string()],
            })
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(120)))
            .build()
            .unwrap()
            .run()
            .unwrap();
        forwarded.push(field(&console.text(), "pio_ticks=").expect("pio result"));
        if have_qemu {
            let run = measure(qemu(&exit_bench, Some(&append)));
            qemu_pio.extend(field(&run.stdout, "pio_ticks="));
            qemu_mmio.extend(field(&run.stdout, "mmio_ticks="));
        }
    }
    // Each run's forwarded access over its in-hypervisor one, measured a moment apart: the
    // machine's drift between runs weighs on both alike.
    let mut forwarded_ratios: Vec<f64> = forwarded.iter().zip(&pio).map(|(f, p)| f / p).collect();
    forwarded_ratios.sort_by(f64::total_cmp);
    let to_ns = |ticks: f64| ticks * 1e6 / tsc_khz;
    let median_ns = |ticks: Vec<f64>| if ticks.is_empty() { f64::NAN } else { to_ns(median(ticks)) };
    let (ours_pio, ours_mmio, forwarded_pio) = (median_ns(pio), median_ns(mmio), median_ns(forwarded));
    let (qemu_pio, qemu_mmio) = (median_ns(qemu_pio), median_ns(qemu_mmio));

    // The bus alone, without KVM: what splitvisor adds to each exit.
    let bus = splitvisor::bus::Bus::new(splitvisor::bus::BusKind::Mmio);
    bus.insert(BusRange::new(MMIO32_START, 0x1000).unwrap(), "register", Arc::new(Mutex::new(Register)))
        .unwrap();
    let iterations = 1_000_000u32;
    let mut data = [0u8; 4];
    let start = Instant::now();
    for i in 0..iterations {
        bus.read(MMIO32_START + u64::from(i & 0xffc), std::hint::black_box(&mut data)).unwrap();
    }
    let bus_ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(iterations);

    println!(
        "\n## one exit round trip, as the guest times it (median over {exit_runs} runs of each run's median of 101, ns; TSC {tsc_khz} kHz)\n"
    );
    println!("| exit | splitvisor | QEMU microvm | ratio splitvisor / QEMU |");
    println!("|---|---:|---:|---:|");
    println!("| PIO read (COM1 LSR) | {ours_pio:.0} | {qemu_pio:.0} | {:.3} |", ours_pio / qemu_pio);
    println!(
        "| MMIO read (a device register; unassigned in QEMU) | {ours_mmio:.0} | {qemu_mmio:.0} | {:.3} |",
        ours_mmio / qemu_mmio
    );
    println!("| bus dispatch alone (host, no exit) | {bus_ns:.1} | | |");
    let forwarded_ratio = median(forwarded_ratios.clone());
    let (low, high) = (forwarded_ratios[0], forwarded_ratios[forwarded_ratios.len() - 1]);
    println!(
        "| PIO read, COM1 in a driver partition (forwarded) | {forwarded_pio:.0} | | forwarded / in-hypervisor {forwarded_ratio:.3}, runs {low:.2}–{high:.2} (≤ 1.2: {}) |",
        verdict(forwarded_ratio, 1.2)
    );
    println!("\nsplitvisor exits during one exit-bench run: {} PIO, {} MMIO", exits.0, exits.1);
    ExitCode::SUCCESS
}
