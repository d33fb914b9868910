//! virtio-blk throughput, side by side in one run: the same `blk-bench` guest ELF and the
//! same image under splitvisor's monolithic layout, its microkernel layout with
//! `splitvisor-driver` and with qemu-storage-daemon as the vhost-user backend, QEMU microvm
//! with KVM and its in-process virtio-blk (a peer), and fio on the host file (the limit).
//!
//! `cargo bench --bench blk`. Environment: BLK_BENCH_MIB (MiB per 1 MiB workload, default
//! 256), BLK_BENCH_OPS (requests per 4 KiB workload, default 4000), BLK_BENCH_IMAGE_MIB
//! (default 256).
//!
//! Every row does buffered I/O on the same file: splitvisor's worker uses pread/pwrite,
//! QEMU runs with its default cache=writeback and aio=threads, fio with psync at queue depth
//! 1 and io_uring at 16.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

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

/// Runs blk-bench on `disk` with devices placed by `layout`; returns the report, the
/// console and the peak RSS of each driver partition (KiB), sampled while it ran.
fn splitvisor_run_with(layout: Layout, disk: DiskConfig, cmdline: &str) -> (VmReport, String, Vec<u64>) {
    let console = Capture::default();
    let driver = DriverProgram {
        path: std::env::current_exe().unwrap(),
        prefix: vec![splitvisor::cli::DRIVER_SUBCOMMAND.to_string()],
    };
    let vm = VmBuilder::new(splitvisor::guests::find("blk-bench").unwrap().elf)
        .memory(256 << 20)
        .layout(layout)
        .driver(driver)
        .cmdline(cmdline)
        .disk(disk)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(600)))
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

fn splitvisor_run(image: &Path, cmdline: &str) -> (VmReport, String) {
    let disk = DiskConfig::image(image);
    let console = Capture::default();
    let report = VmBuilder::new(splitvisor::guests::find("blk-bench").unwrap().elf)
        .memory(256 << 20)
        .cmdline(cmdline)
        .disk(disk)
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(600)))
        .build()
        .unwrap()
        .run()
        .unwrap();
    let text = console.text();
    assert!(report.guest_result.as_ref().is_some_and(|r| r.passed()), "blk-bench failed:\n{text}");
    (report, text)
}

fn qemu_run(elf: &Path, image: &Path, cmdline: &str) -> Option<String> {
    let output = splitvisor::guests::qemu_microvm_command(elf, 256, Some(cmdline), &[(image, false)])
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

/// fio on the image, each workload for two seconds (short runs would time fio's start-up).
fn fio_run(image: &Path, image_bytes: u64) -> Option<Figures> {
    let mut figures = Figures::new();
    for (name, rw, bs, depth) in WORKLOADS {
        let engine = if depth == 1 { "psync" } else { "io_uring" };
        let output = Command::new("fio")
            .args(["--name=bench", "--output-format=json", "--direct=0", "--randrepeat=1"])
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

/// qemu-storage-daemon exporting `image` as vhost-user-blk on a socket.
struct StorageDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl StorageDaemon {
    fn start(image: &Path, dir: &Path) -> Option<Self> {
        let socket = dir.join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=f,cache.direct=off", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
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

fn main() -> ExitCode {
    // This bench binary doubles as the driver partition program.
    if let Some(status) = splitvisor::cli::driver_subcommand("bench") {
        return status;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("blk bench: /dev/kvm is not available; nothing to measure");
        return ExitCode::FAILURE;
    }
    let mib = env_u64("BLK_BENCH_MIB", 256);
    let ops = env_u64("BLK_BENCH_OPS", 4000);
    let image_mib = env_u64("BLK_BENCH_IMAGE_MIB", 256);
    let dir = std::env::temp_dir().join(format!("splitvisor-blk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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

    // splitvisor: the full run, and a one-request-per-workload run to take boot out of the
    // exit counts.
    let (report, console) = splitvisor_run(&image, &cmdline);
    let (baseline, _) = splitvisor_run(&image, "blk_bench.mib=1 blk_bench.ops=1");
    let tsc_khz = report.tsc_khz.map(f64::from);
    let ours = parse(&console, tsc_khz);
    let image_disk = DiskConfig::image(&image);
    let (_, mk_console, partition_rss) = splitvisor_run_with(Layout::microkernel(), image_disk, &cmdline);
    let microkernel = parse(&mk_console, tsc_khz);
    let qsd = StorageDaemon::start(&image, &dir).map(|daemon| {
        let (_, text, _) = splitvisor_run_with(
            Layout::microkernel(),
            DiskConfig::VhostUser { socket: daemon.socket.clone() },
            &cmdline,
        );
        parse(&text, tsc_khz)
    });
    if qsd.is_none() {
        eprintln!("blk bench: qemu-storage-daemon row missing (is qemu-system-common installed?)");
    }
    let qemu = qemu_run(&elf, &image, &cmdline).map(|text| parse(&text, tsc_khz));
    let fio = fio_run(&image, image_mib << 20);
    if qemu.is_none() {
        eprintln!("blk bench: QEMU row missing (is qemu-system-x86 installed?)");
    }
    if fio.is_none() {
        eprintln!("blk bench: fio row missing (is fio installed?)");
    }

    println!("\n## blk-bench: the same guest ELF and {image_mib} MiB image (IOPS / MB/s)\n");
    println!(
        "| workload | monolithic | microkernel, splitvisor-driver | microkernel, qemu-storage-daemon | QEMU microvm | fio (host) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let cell =
        |f: Option<&(f64, f64)>| f.map_or("n/a".to_string(), |(iops, mbps)| format!("{iops:.0} / {mbps:.1}"));
    for (name, ..) in WORKLOADS {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            cell(ours.get(name)),
            cell(microkernel.get(name)),
            cell(qsd.as_ref().and_then(|q| q.get(name))),
            cell(qemu.as_ref().and_then(|q| q.get(name))),
            cell(fio.as_ref().and_then(|f| f.get(name)))
        );
    }
    println!("\n## ratios of IOPS\n");
    println!(
        "| workload | microkernel / monolithic | qemu-storage-daemon / monolithic | monolithic / QEMU | monolithic / fio |"
    );
    println!("|---|---:|---:|---:|---:|");
    let ratio = |a: Option<&(f64, f64)>, b: Option<&(f64, f64)>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.3}", a.0 / b.0),
        _ => "n/a".to_string(),
    };
    let (mut sum, mut count) = (0.0, 0);
    for (name, ..) in WORKLOADS {
        if let (Some(a), Some(b)) = (microkernel.get(name), ours.get(name)) {
            sum += a.0 / b.0;
            count += 1;
        }
        println!(
            "| {name} | {} | {} | {} | {} |",
            ratio(microkernel.get(name), ours.get(name)),
            ratio(qsd.as_ref().and_then(|q| q.get(name)), ours.get(name)),
            ratio(ours.get(name), qemu.as_ref().and_then(|q| q.get(name))),
            ratio(ours.get(name), fio.as_ref().and_then(|f| f.get(name)))
        );
    }
    if count > 0 {
        println!("\nmicrokernel / monolithic, mean over the workloads: {:.3}", sum / f64::from(count));
    }
    let own_rss = peak_rss_kib("self").unwrap_or(0);
    println!(
        "\npeak RSS: this process (the hypervisor, bench included) {:.1} MiB; driver partition(s) {:?} MiB",
        own_rss as f64 / 1024.0,
        partition_rss.iter().map(|kib| format!("{:.1}", *kib as f64 / 1024.0)).collect::<Vec<_>>()
    );

    let requests = (4 * mib + 4 * ops) as f64;
    let baseline_requests = 8.0;
    let per_request =
        |full: u64, base: u64| (full.saturating_sub(base)) as f64 / (requests - baseline_requests);
    println!("\n## splitvisor exits per request (boot subtracted with a one-request run)\n");
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
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::SUCCESS
}
