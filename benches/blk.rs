//! virtio-blk throughput, side by side in one run: the same `blk-bench` guest ELF and the
//! same image under splitvisor's monolithic layout, its microkernel layout with
//! `splitvisor-driver` and with qemu-storage-daemon as the vhost-user backend, QEMU microvm
//! with KVM and its in-process virtio-blk (a peer), and fio on the host file (the limit),
//! every row at the same cache mode and queue depth, for 1 and 2 vCPUs.
//!
//! `cargo bench --bench blk`. Environment: BLK_BENCH_MIB (MiB per 1 MiB workload, default
//! 128), BLK_BENCH_OPS (requests per 4 KiB workload, default 50,000: at 8,000 a QD1 row
//! lasted about 20 ms, and which placement the scheduler favoured in those few
//! milliseconds moved the microkernel/monolithic ratio from 0.39 to 1.11 between rounds),
//! BLK_BENCH_IMAGE_MIB
//! (default 256), BLK_BENCH_CACHE (`writeback`, `none` or both, comma-separated; default
//! both), BLK_BENCH_VCPUS (default `1,2`), BLK_BENCH_REPEAT (rounds, default 3).
//!
//! A round runs every row once, back to back, fio included, with the image written back
//! before each; the two placements take turns going first. An IOPS cell is the median of
//! its rounds; a ratio is the median of the rounds' own ratios, so that the load of this
//! shared machine, which drifts by minutes (host fio has moved 3x within an hour on one
//! file), weighs on both sides of a ratio alike. The range of the rounds' ratios is printed
//! beside each. On the machines this project is measured on, the microkernel/monolithic
//! ratio of one row, taken from pairs of runs back to back, spread from 0.54 to 1.02 over 8
//! pairs (rand-read-4K-qd1, 40,000 requests a run): a verdict whose range straddles its
//! target is within the noise, and more rounds (BLK_BENCH_REPEAT) narrow the median's.
//!
//! Cache modes: `writeback` is splitvisor's `cache=writeback`, QEMU's and
//! qemu-storage-daemon's `cache.direct=off`, fio's `--direct=0`; `none` is O_DIRECT
//! everywhere (`cache=none`, `cache.direct=on`, `--direct=1`). fio runs psync at queue
//! depth 1 and io_uring at 16. splitvisor serves one queue per vCPU (VIRTIO_BLK_F_MQ with 2),
//! qemu-storage-daemon is given as many (`num-queues`); QEMU's virtio-blk-device the
//! same (`num-queues`).
//!
//! Guest RAM is alike in every row: splitvisor keeps it in a shared memfd (a partition
//! maps it), and QEMU is given the same (`memory-backend-memfd,share=on`, what it needs
//! for any vhost-user backend anyway). QEMU's default, anonymous RAM it marks
//! MADV_HUGEPAGE, is backed by transparent huge pages where shmem is not (this host's
//! `shmem_enabled` is `never`), and O_DIRECT into huge pages hands the host's disk a
//! 1 MiB request in one piece instead of 256: on the nested virtio disk of the machines
//! this project is measured on, that alone made QEMU 3-4x faster on the 1 MiB rows with
//! cache=none (and faster than fio, whose buffers are small pages too), whatever the VMM.
//!
//! Beside fio, each round measures the *cross-core floor* of the 4 KiB QD1 rows
//! ([`handoff_floor`]): the same system call as fio's, handed from one thread of this
//! process to another and back, which is what is left of a request when the device serves
//! it on another CPU than the guest's, with no virtio at all. Its ratio to fio bounds what
//! any of the guest rows can reach against fio on the machine at hand.
//!
//! The figures are ratios within one run (the machine is shared and noisy); the targets
//! of issue 11 are pass/fail columns here, never assertions in tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

#[path = "common/scratch.rs"]
mod scratch;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use splitvisor::devices::virtio::block::{CacheMode, DiskImage};
use splitvisor::devices::virtio::block_io::{self, EngineKind};
use splitvisor::isolation::sandbox::hypervisor::HypervisorSandbox;
use splitvisor::layout::{ConsoleOutput, DiskConfig, DriverProgram, Layout, VmBuilder, VmReport};

/// The workloads of `blk-bench`, in its order, with fio's names for them.
const WORKLOADS: [(&str, &str, &str, u32); 8] = [
    ("seq-read-1M-qd1", "read", "1M", 1),
    ("seq-write-1M-qd1", "write", "1M", 1),
    ("rand-read-4K-qd1", "randread", "4k", 1),
    ("rand-write-4K-qd1", "randwrite", "4k", 1),
    ("seq-read-1M-qd16", "read", "1M", 16),
    ("seq-write-1M-qd16", "write", "1M", 16),
    ("rand-read-4K-qd16", "randread", "4k", 16),
    ("rand-write-4K-qd16", "randwrite", "4k", 16),
];

/// One workload's result: (IOPS, MB/s).
type Figures = BTreeMap<String, (f64, f64)>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect()
}

/// Parses blk-bench's result lines; `tsc_khz` converts ticks when the guest had no kvm-clock.
fn parse(console: &str, tsc_khz: Option<f64>) -> Figures {
    let mut figures = Figures::new();
    for line in console.lines().filter(|l| l.starts_with("blk-bench: ") && l.contains(" ops=")) {
        let mut words = line["blk-bench: ".len()..].split(' ');
        let name = words.next().unwrap().to_string();
        let fields: BTreeMap<&str, f64> =
            words.filter_map(|w| w.split_once('=')).filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect();
        let ns = match (fields.get("ns"), tsc_khz) {
            (Some(ns), _) => *ns,
            (None, Some(khz)) => fields["ticks"] * 1e6 / khz,
            (None, None) => continue,
        };
        figures.insert(name, (fields["ops"] * 1e9 / ns, fields["bytes"] * 1e3 / ns));
    }
    figures
}

type Capture = splitvisor::layout::SharedBuffer;

/// Peak RSS (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()
}

/// Peak RSS of a partition: the process the hypervisor started plus the child that serves
/// from a PID namespace of its own.
fn partition_rss_kib(pid: &str) -> Option<u64> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let child: u64 = children.split_whitespace().filter_map(peak_rss_kib).sum();
    Some(peak_rss_kib(pid)? + child)
}

/// Runs blk-bench on `disk` with devices placed by `layout` and `vcpus` vCPUs; returns the
/// report, the console and the peak RSS of each driver partition (KiB), sampled while it
/// ran.
///
/// The hypervisor is sandboxed as the examples ship it (seccomp filters on its threads),
/// so that both placements pay what users' do: a partition always has its filter. The VM
/// runs on a thread of its own, which then takes the hypervisor main thread's filter, so
/// that this one can still start QEMU, fio and the rest.
fn splitvisor_run(
    layout: Layout,
    disk: DiskConfig,
    vcpus: u32,
    cmdline: &str,
) -> (VmReport, String, Vec<u64>) {
    let cmdline = cmdline.to_string();
    let vm_thread = std::thread::spawn(move || sandboxed_run(layout, disk, vcpus, &cmdline));
    vm_thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// [`splitvisor_run`], on the calling thread.
fn sandboxed_run(
    layout: Layout,
    disk: DiskConfig,
    vcpus: u32,
    cmdline: &str,
) -> (VmReport, String, Vec<u64>) {
    let console = Capture::default();
    let driver = DriverProgram {
        path: std::env::current_exe().unwrap(),
        prefix: vec![splitvisor::cli::DRIVER_SUBCOMMAND.to_string()],
    };
    let vm = VmBuilder::new(splitvisor::guests::find("blk-bench").unwrap().elf)
        .memory(256 << 20)
        .vcpus(vcpus)
        .layout(layout)
        .driver(driver)
        .cmdline(cmdline)
        .disk(disk)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(900)))
        .hypervisor_sandbox(HypervisorSandbox::seccomp())
        .build()
        .unwrap();
    let pids: Vec<String> = vm
        .placements()
        .iter()
        .filter_map(|p| p.partition.as_deref()?.strip_prefix("pid ").map(String::from))
        .collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peaks = vec![0u64; pids.len()];
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(partition_rss_kib(pid).unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peaks
        })
    };
    let report = vm.run().unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    let peaks = sampler.join().unwrap();
    let text = console.text();
    assert!(report.guest_result.as_ref().is_some_and(|r| r.passed()), "blk-bench failed:\n{text}");
    (report, text, peaks)
}

/// QEMU microvm with KVM on the same ELF (the command of `splitvisor::guests`, with the
/// cache mode, vCPUs and queues of the row), its guest RAM in a shared memfd as
/// splitvisor's is (see the module docs).
fn qemu_run(elf: &Path, image: &Path, cache: CacheMode, vcpus: u32, cmdline: &str) -> Option<String> {
    let direct = if cache == CacheMode::None { "on" } else { "off" };
    let output = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,memory-backend=ram", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-object", "memory-backend-memfd,id=ram,size=256M,share=on"])
        .args(["-m", "256M", "-smp", &vcpus.to_string()])
        .args(["-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", cmdline])
        .arg("-drive")
        .arg(format!(
            "id=disk0,format=raw,if=none,aio=threads,cache.direct={direct},file={}",
            image.display()
        ))
        .args(["-device", &format!("virtio-blk-device,drive=disk0,num-queues={vcpus}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if text.contains("SPLITVISOR-RESULT: PASS") {
        Some(text)
    } else {
        eprintln!("QEMU run failed:\n{text}");
        None
    }
}

fn json_number(json: &str, after: &str, key: &str) -> Option<f64> {
    let section = &json[json.find(after)?..];
    let at = section.find(&format!("\"{key}\" : "))? + key.len() + 5;
    section[at..].split([',', '\n']).next()?.trim().parse().ok()
}

/// Writes back whatever the last row left dirty in the page cache, so that the kernel's
/// writeback of one row's writes does not run during the next row (the first splitvisor
/// row after fio's buffered writes ran up to 10x slow before this).
fn settle(image: &Path) {
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(image) {
        let _ = file.sync_all();
    }
}

/// fio on the image at the same cache mode and queue depth, each workload for two seconds
/// (short runs would time fio's start-up).
fn fio_run(image: &Path, image_bytes: u64, cache: CacheMode) -> Option<Figures> {
    let mut figures = Figures::new();
    let direct = if cache == CacheMode::None { 1 } else { 0 };
    for (name, rw, bs, depth) in WORKLOADS {
        settle(image);
        let engine = if depth == 1 { "psync" } else { "io_uring" };
        let output = Command::new("fio")
            // fio drops the file's page cache before a job by default: with writeback its
            // reads would come from the disk while every VMM's come from the page cache,
            // and the next row would start cold.
            .args(["--name=bench", "--output-format=json", "--randrepeat=1", "--invalidate=0"])
            .arg(format!("--direct={direct}"))
            .arg(format!("--filename={}", image.display()))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={bs}"))
            .arg(format!("--iodepth={depth}"))
            .arg(format!("--ioengine={engine}"))
            .arg(format!("--size={image_bytes}"))
            .args(["--time_based", "--runtime=2"])
            .output()
            .ok()?;
        let json = String::from_utf8_lossy(&output.stdout);
        let direction = if rw.contains("read") { "\"read\" : {" } else { "\"write\" : {" };
        let iops = json_number(&json, direction, "iops")?;
        let bytes_per_second = json_number(&json, direction, "bw_bytes")?;
        figures.insert(name.to_string(), (iops, bytes_per_second / 1e6));
    }
    Some(figures)
}

/// The 4 KiB QD1 workloads that [`handoff_floor`] measures.
const FLOOR_WORKLOADS: [&str; 2] = ["rand-read-4K-qd1", "rand-write-4K-qd1"];

/// The floor of a guest's 4 KiB request at queue depth 1 under any VMM whose device serves
/// it on another CPU than the one the guest waits on, as every row here does (a vCPU that
/// polls the used ring holds its CPU; one that waits for an interrupt pays an emulated one
/// too): two threads of this process, one handing each random offset to the other through
/// one shared word and spinning until it is handed back, the other spinning on that word
/// and running the same system call fio's psync runs (`pread`/`pwrite`, O_DIRECT for
/// cache=none). No queue, no descriptor, no guest: what is left is the system call and
/// the two cache-line transfers between the cores. Its ratio to fio bounds what the guest
/// rows can reach against fio on this machine.
fn handoff_floor(image: &Path, image_bytes: u64, cache: CacheMode) -> Figures {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};

    const BLOCK: usize = 4096;
    /// Posted by the waiting side: the request's number (from 1) above the block it names
    /// (`u64::MAX` ends the run).
    static POSTED: AtomicU64 = AtomicU64::new(0);
    /// Written by the serving side: how many requests it finished.
    static FINISHED: AtomicU64 = AtomicU64::new(0);

    let mut figures = Figures::new();
    for (name, write) in [(FLOOR_WORKLOADS[0], false), (FLOOR_WORKLOADS[1], true)] {
        settle(image);
        let flags = if cache == CacheMode::None { libc::O_DIRECT } else { 0 };
        let file =
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(flags).open(image).unwrap();
        POSTED.store(0, Ordering::Relaxed);
        FINISHED.store(0, Ordering::Relaxed);
        let server = std::thread::spawn(move || {
            // An aligned buffer, as O_DIRECT needs.
            let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).unwrap();
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            // SAFETY: `raw` is a fresh allocation of BLOCK bytes, freed below after its last use.
            let buffer = unsafe { std::slice::from_raw_parts_mut(raw, BLOCK) };
            let mut done = 0;
            loop {
                let posted = POSTED.load(Ordering::Acquire);
                if posted == u64::MAX {
                    break;
                }
                if posted >> 32 == done {
                    std::hint::spin_loop();
                    continue;
                }
                let offset = (posted & 0xffff_ffff) * BLOCK as u64;
                let moved = if write { file.write_at(buffer, offset) } else { file.read_at(buffer, offset) };
                assert_eq!(moved.unwrap(), BLOCK, "{name}: a short transfer");
                done = posted >> 32;
                FINISHED.store(done, Ordering::Release);
            }
            // SAFETY: allocated above with this layout; `buffer` is not used after this.
            unsafe { std::alloc::dealloc(raw, layout) };
        });
        let blocks = (image_bytes / BLOCK as u64).min(1 << 32);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let (start, mut requests) = (std::time::Instant::now(), 0u64);
        while start.elapsed() < Duration::from_secs(1) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            requests += 1;
            POSTED.store((requests << 32) | (seed % blocks), Ordering::Release);
            while FINISHED.load(Ordering::Acquire) < requests {
                // A serving side that failed (its assertion) never hands the request back.
                assert!(!server.is_finished(), "{name}: the serving thread ended");
                std::hint::spin_loop();
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        POSTED.store(u64::MAX, Ordering::Release);
        server.join().unwrap();
        let iops = requests as f64 / seconds;
        figures.insert(name.to_string(), (iops, iops * BLOCK as f64 / 1e6));
    }
    figures
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on a socket.
struct StorageDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl StorageDaemon {
    fn start(image: &Path, dir: &Path, cache: CacheMode, queues: u32) -> Option<Self> {
        let socket = dir.join("qsd.sock");
        let _ = std::fs::remove_file(&socket);
        let direct = if cache == CacheMode::None { "on" } else { "off" };
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=f,cache.direct={direct}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        socket.exists().then_some(Self { child, socket })
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rows of one round: every row run once, back to back.
#[derive(Default)]
struct Round {
    monolithic: Figures,
    microkernel: Figures,
    qsd: Option<Figures>,
    qemu: Option<Figures>,
    fio: Option<Figures>,
    /// [`handoff_floor`]'s figures (4 KiB QD1 rows only).
    floor: Figures,
}

/// Which row of a round.
#[derive(Clone, Copy)]
enum Row {
    Monolithic,
    Microkernel,
    Qsd,
    Qemu,
    Fio,
    Floor,
}

impl Round {
    fn row(&self, row: Row) -> Option<&Figures> {
        match row {
            Row::Monolithic => Some(&self.monolithic),
            Row::Microkernel => Some(&self.microkernel),
            Row::Qsd => self.qsd.as_ref(),
            Row::Qemu => self.qemu.as_ref(),
            Row::Fio => self.fio.as_ref(),
            Row::Floor => Some(&self.floor),
        }
    }
}

/// The median over the rounds of one row's figures of `workload`: (IOPS, MB/s) of the
/// round with the median IOPS.
fn median_cell(rounds: &[Round], row: Row, workload: &str) -> Option<(f64, f64)> {
    let mut cells: Vec<(f64, f64)> =
        rounds.iter().filter_map(|round| round.row(row)?.get(workload).copied()).collect();
    cells.sort_by(|a, b| a.0.total_cmp(&b.0));
    cells.get(cells.len() / 2).copied()
}

/// `a`'s IOPS over `b`'s on `workload` in each round (each taken within its round), sorted.
fn round_ratios(rounds: &[Round], a: Row, b: Row, workload: &str) -> Vec<f64> {
    let mut ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|round| Some(round.row(a)?.get(workload)?.0 / round.row(b)?.get(workload)?.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios
}

/// The median of [`round_ratios`].
fn median_ratio(rounds: &[Round], a: Row, b: Row, workload: &str) -> Option<f64> {
    let ratios = round_ratios(rounds, a, b, workload);
    ratios.get(ratios.len() / 2).copied()
}

/// A ratio cell: the median of the rounds' ratios and, with more than one round, their
/// range, which shows how far this shared machine moved the ratio between rounds (a verdict
/// whose range straddles its target is within the noise).
fn ratio_cell(rounds: &[Round], a: Row, b: Row, workload: &str) -> String {
    let ratios = round_ratios(rounds, a, b, workload);
    match (ratios.first(), ratios.get(ratios.len() / 2), ratios.last()) {
        (Some(low), Some(median), Some(high)) if ratios.len() > 1 => {
            format!("{median:.3} ({low:.2}–{high:.2})")
        }
        (_, Some(median), _) => format!("{median:.3}"),
        _ => "n/a".to_string(),
    }
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "n/a",
    }
}

fn print_rows(rounds: &[Round], cache: CacheMode, vcpus: u32) {
    println!("\n## cache={cache}, {vcpus} vCPU(s): IOPS / MB/s, medians of {} rounds\n", rounds.len());
    println!(
        "| workload | monolithic | microkernel, splitvisor-driver | microkernel, qemu-storage-daemon | QEMU microvm | fio (host) | cross-core floor (host) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let cell = |row: Row, name: &str| {
        median_cell(rounds, row, name)
            .map_or("n/a".to_string(), |(iops, mbps)| format!("{iops:.0} / {mbps:.1}"))
    };
    for (name, ..) in WORKLOADS {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            cell(Row::Monolithic, name),
            cell(Row::Microkernel, name),
            cell(Row::Qsd, name),
            cell(Row::Qemu, name),
            cell(Row::Fio, name),
            if FLOOR_WORKLOADS.contains(&name) { cell(Row::Floor, name) } else { "-".to_string() }
        );
    }
    println!(
        "\n## cache={cache}, {vcpus} vCPU(s): ratios of IOPS (medians of the rounds' ratios, their range in brackets) and the targets\n"
    );
    println!(
        "| workload | mono / fio | micro / fio | guest ≥ 0.85x (QD1) / 0.90x (QD16) fio, 4K | floor / fio | micro / mono | ≥ 0.97x | mono / QEMU | micro / QEMU | ahead of QEMU | micro / qsd | ahead of qsd |"
    );
    println!("|---|---:|---:|:---:|---:|---:|:---:|---:|---:|:---:|---:|:---:|");
    for (name, _, bs, depth) in WORKLOADS {
        let ratio = |a: Row, b: Row| median_ratio(rounds, a, b, name);
        let show = |a: Row, b: Row| ratio_cell(rounds, a, b, name);
        let mono_fio = ratio(Row::Monolithic, Row::Fio);
        let micro_fio = ratio(Row::Microkernel, Row::Fio);
        let micro_mono = ratio(Row::Microkernel, Row::Monolithic);
        let mono_qemu = ratio(Row::Monolithic, Row::Qemu);
        let micro_qemu = ratio(Row::Microkernel, Row::Qemu);
        let micro_qsd = ratio(Row::Microkernel, Row::Qsd);
        let fio_target = if depth == 1 { 0.85 } else { 0.90 };
        let guest_vs_fio = (|| Some(mono_fio? >= fio_target && micro_fio? >= fio_target))();
        let fio_cell = if bs == "4k" { verdict(guest_vs_fio) } else { "-" };
        let isolation = micro_mono.map(|r| r >= 0.97);
        let ahead_of_qemu = (|| Some(mono_qemu? > 1.0 && micro_qemu? > 1.0))();
        let ahead_of_qsd = micro_qsd.map(|r| r > 1.0);
        println!(
            "| {name} | {} | {} | {fio_cell} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(Row::Monolithic, Row::Fio),
            show(Row::Microkernel, Row::Fio),
            if FLOOR_WORKLOADS.contains(&name) { show(Row::Floor, Row::Fio) } else { "-".to_string() },
            show(Row::Microkernel, Row::Monolithic),
            verdict(isolation),
            show(Row::Monolithic, Row::Qemu),
            show(Row::Microkernel, Row::Qemu),
            verdict(ahead_of_qemu),
            show(Row::Microkernel, Row::Qsd),
            verdict(ahead_of_qsd),
        );
    }
    println!(
        "\nfloor: fio's system call handed to another thread and back (`handoff_floor`), no guest; \
         a guest row on its own CPU cannot beat it"
    );
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> ExitCode {
    // This bench binary doubles as the driver partition program.
    if let Some(status) = splitvisor::cli::driver_subcommand("bench") {
        return status;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("blk bench: /dev/kvm is not available; nothing to measure");
        return ExitCode::FAILURE;
    }
    let mib = env_u64("BLK_BENCH_MIB", 128);
    let ops = env_u64("BLK_BENCH_OPS", 50_000);
    let image_mib = env_u64("BLK_BENCH_IMAGE_MIB", 256);
    let caches: Vec<CacheMode> = env_list("BLK_BENCH_CACHE", "writeback,none")
        .iter()
        .map(|c| c.parse().expect("BLK_BENCH_CACHE"))
        .collect();
    let vcpu_counts: Vec<u32> =
        env_list("BLK_BENCH_VCPUS", "1,2").iter().map(|v| v.parse().expect("BLK_BENCH_VCPUS")).collect();
    let scratch = scratch::ScratchDir::new("blk-bench");
    let dir = scratch.path();
    let image = dir.join("disk.img");
    {
        // Allocated, not sparse: every row reads real blocks.
        let mut file = std::fs::File::create(&image).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        for _ in 0..image_mib {
            file.write_all(&chunk).unwrap();
        }
        file.sync_all().unwrap();
    }
    let elf = dir.join("blk-bench.elf");
    std::fs::write(&elf, splitvisor::guests::find("blk-bench").unwrap().elf).unwrap();
    let cmdline = format!("blk_bench.mib={mib} blk_bench.ops={ops}");
    let engine = {
        let disk = Arc::new(DiskImage::open(&image, true).unwrap());
        block_io::open(&disk, EngineKind::Auto).map(|e| e.name()).unwrap_or("none")
    };
    println!("blk bench: {cmdline}, image {image_mib} MiB, I/O engine {engine}, load before: {}", load());

    let repeats = env_u64("BLK_BENCH_REPEAT", 3).max(1);
    let mut partition_rss = Vec::new();
    let mut exits = None;
    for &cache in &caches {
        for &vcpus in &vcpu_counts {
            let mut rounds = Vec::new();
            for index in 0..repeats {
                let mut round = Round::default();
                let disk = DiskConfig::image(&image).cache(cache);
                // The placements take turns going first: what a run leaves behind (the
                // writeback of its writes) then weighs on each alike.
                let mut tsc_khz = None;
                for microkernel in [index % 2 == 1, index % 2 == 0] {
                    settle(&image);
                    let layout = if microkernel { Layout::microkernel() } else { Layout::monolithic() };
                    let (report, console, rss) = splitvisor_run(layout, disk.clone(), vcpus, &cmdline);
                    tsc_khz = report.tsc_khz.map(f64::from);
                    let figures = parse(&console, tsc_khz);
                    if microkernel {
                        partition_rss.extend(rss);
                        round.microkernel = figures;
                        continue;
                    }
                    round.monolithic = figures;
                    if exits.is_none() {
                        let (baseline, ..) = splitvisor_run(
                            Layout::monolithic(),
                            disk.clone(),
                            vcpus,
                            "blk_bench.mib=1 blk_bench.ops=1",
                        );
                        exits = Some((report, baseline));
                    }
                }
                settle(&image);
                let daemon_run = StorageDaemon::start(&image, dir, cache, vcpus).map(|daemon| {
                    let socket = DiskConfig::VhostUser { socket: daemon.socket.clone() };
                    let (_, text, _) = splitvisor_run(Layout::microkernel(), socket, vcpus, &cmdline);
                    parse(&text, tsc_khz)
                });
                round.qsd = daemon_run;
                if round.qsd.is_none() {
                    eprintln!(
                        "blk bench: qemu-storage-daemon row missing (is qemu-system-common installed?)"
                    );
                }
                settle(&image);
                round.qemu = qemu_run(&elf, &image, cache, vcpus, &cmdline).map(|text| parse(&text, tsc_khz));
                if round.qemu.is_none() {
                    eprintln!("blk bench: QEMU row missing (is qemu-system-x86 installed?)");
                }
                round.fio = fio_run(&image, image_mib << 20, cache);
                if round.fio.is_none() {
                    eprintln!("blk bench: fio row missing (is fio installed?)");
                }
                round.floor = handoff_floor(&image, image_mib << 20, cache);
                rounds.push(round);
            }
            print_rows(&rounds, cache, vcpus);
        }
    }

    let own_rss = peak_rss_kib("self").unwrap_or(0);
    println!(
        "\npeak RSS: this process (the hypervisor, bench included) {:.1} MiB; driver partitions {:?} MiB",
        own_rss as f64 / 1024.0,
        partition_rss.iter().map(|kib| format!("{:.1}", *kib as f64 / 1024.0)).collect::<Vec<_>>()
    );
    if let Some((report, baseline)) = exits {
        let requests = (4 * mib + 4 * ops) as f64;
        let baseline_requests = 8.0;
        let per_request =
            |full: u64, base: u64| (full.saturating_sub(base)) as f64 / (requests - baseline_requests);
        println!(
            "\n## splitvisor exits per request, first configuration (boot subtracted with a one-request run)\n"
        );
        println!("| exits | per request |");
        println!("|---|---:|");
        println!(
            "| to the VMM process (PIO + MMIO) | {:.3} |",
            per_request(report.pio_exits + report.mmio_exits, baseline.pio_exits + baseline.mmio_exits)
        );
        for (name, value) in &report.kvm_exits {
            let base = baseline.kvm_exits.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v);
            println!("| KVM `{name}` | {:.3} |", per_request(*value, base));
        }
    }
    println!("\nload after: {}", load());
    ExitCode::SUCCESS
}
