//! virtio-net throughput, side by side in one run: the same `net-bench` guest ELF (smoltcp
//! over the kit's virtio-net driver) under splitvisor's monolithic layout (virtio-net in the
//! hypervisor on a TAP), its microkernel layout (`splitvisor-driver net` in a sandboxed
//! partition, vhost-user, on the same TAP), QEMU microvm with KVM and its own virtio-net on a
//! TAP (a peer), and a host veth pair between two namespaces (the kernel's own path, an upper
//! bound). Then the time a TCP transfer stalls when the network partition is killed.
//!
//! `cargo bench --bench net` (root: it makes network namespaces). Environment:
//! NET_BENCH_KIB (KiB per TCP direction, default 2048), NET_BENCH_PACKETS (UDP datagrams,
//! default 5000).
//!
//! The guest's ring-0 code is emulated instruction by instruction on the build machines
//! (`../shared/PLATFORM.md`), which bounds both VMMs alike: compare rows, not absolutes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitvisor::layout::{ConsoleOutput, DriverProgram, FaultPolicy, Layout, NetConfig, VmBuilder};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const TAP: &str = "svbtap0";
const PORT: u16 = 5201;

type Capture = splitvisor::layout::SharedBuffer;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A network namespace, removed on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Option<Self> {
        let name = format!("svbench-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]).then(|| {
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            Self(name)
        })
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = std::fs::File::open(&path).unwrap();
                    // SAFETY: moves this thread (only) into the namespace of an open nsfs fd.
                    assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                    f()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

/// What one row measured: TCP guest to host and host to guest (MB/s), UDP guest to host
/// (packets per second the host received).
#[derive(Clone, Copy, Debug, Default)]
struct Row {
    tcp_tx: f64,
    tcp_rx: f64,
    udp_pps: f64,
}

/// The host side of net-bench: a TCP sink on PORT, a TCP source on PORT + 1 (`bytes`), a
/// UDP counter on PORT + 2. Returns the UDP datagrams counted, once "end" arrived.
fn host_peer(bytes: u64) -> std::thread::JoinHandle<u64> {
    let sink = TcpListener::bind((HOST_IP, PORT)).unwrap();
    let source = TcpListener::bind((HOST_IP, PORT + 1)).unwrap();
    let udp = UdpSocket::bind((HOST_IP, PORT + 2)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    std::thread::spawn(move || {
        let (mut received, _) = sink.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        while received.read(&mut buf).unwrap_or(0) > 0 {}
        drop(received);
        let (mut stream, _) = source.accept().unwrap();
        let chunk = vec![0x5au8; 65536];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        drop(stream);
        let mut count = 0;
        while let Ok(n) = udp.recv(&mut buf) {
            if &buf[..n] == b"end" {
                break;
            }
            count += 1;
        }
        count
    })
}

/// Parses net-bench's lines into a row (the guest's own nanoseconds; the host's count).
fn parse(console: &str, udp_received: u64) -> Option<Row> {
    let field = |line: &str, key: &str| -> Option<f64> {
        line.split(' ').find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let line = |what: &str| console.lines().find(|l| l.starts_with(&format!("net-bench: {what} ")));
    let rate = |what: &str| {
        let l = line(what)?;
        Some(field(l, "bytes")? * 1e3 / field(l, "ns")?)
    };
    let udp = line("udp-tx")?;
    Some(Row {
        tcp_tx: rate("tcp-tx")?,
        tcp_rx: rate("tcp-rx")?,
        udp_pps: udp_received as f64 * 1e9 / field(udp, "ns")?,
    })
}

fn cmdline(bytes: u64, packets: u64) -> String {
    format!(
        "console=ttyS0 net.ip={GUEST_IP}/24 net.peer={HOST_IP} net.bench.kib={} net.bench.packets={packets}",
        bytes >> 10
    )
}

fn splitvisor_row(ns: &Ns, layout: Layout, bytes: u64, packets: u64) -> Option<Row> {
    let console = Capture::default();
    let report = ns.run(|| {
        let peer = host_peer(bytes);
        let vm = VmBuilder::new(splitvisor::guests::find("net-bench").unwrap().elf)
            .layout(layout)
            .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
            .memory(256 << 20)
            .cmdline(&cmdline(bytes, packets))
            .net(NetConfig::tap(TAP))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(900)))
            .build()
            .unwrap();
        let report = vm.run().unwrap();
        (report, peer.join().unwrap())
    });
    let text = console.text();
    eprint!("{text}");
    parse(&text, report.1)
}

fn qemu_row(ns: &Ns, elf: &Path, bytes: u64, packets: u64) -> Option<Row> {
    ns.run(|| {
        let peer = host_peer(bytes);
        let output = Command::new("ip")
            .args(["netns", "exec", &ns.0, "qemu-system-x86_64"])
            .args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M"])
            .args(["-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no")])
            .args(["-device", "virtio-net-device,netdev=n0,mac=52:54:00:77:00:02"])
            .arg("-kernel")
            .arg(elf)
            .args(["-append", &cmdline(bytes, packets)])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        eprint!("{text}");
        if !text.contains("net-bench: udp-tx") {
            return None;
        }
        parse(&text, peer.join().ok()?)
    })
}

/// The kernel's own path: TCP and UDP between two namespaces over a veth pair.
fn veth_row(bytes: u64, packets: u64) -> Option<Row> {
    let (a, b) = (Ns::new("veth-a")?, Ns::new("veth-b")?);
    let ok = ip(&["-n", &a.0, "link", "add", "sva", "type", "veth", "peer", "name", "svb", "netns", &b.0])
        && ip(&["-n", &a.0, "addr", "add", "10.78.0.1/24", "dev", "sva"])
        && ip(&["-n", &b.0, "addr", "add", "10.78.0.2/24", "dev", "svb"])
        && ip(&["-n", &a.0, "link", "set", "sva", "up"])
        && ip(&["-n", &b.0, "link", "set", "svb", "up"]);
    if !ok {
        return None;
    }
    let (listener, udp) = a.run(|| {
        (TcpListener::bind(("10.78.0.1", PORT)).unwrap(), UdpSocket::bind(("10.78.0.1", PORT + 2)).unwrap())
    });
    let received = Arc::new(AtomicU64::new(0));
    let server = {
        let received = received.clone();
        std::thread::spawn(move || {
            let (mut sink, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 65536];
            while sink.read(&mut buf).unwrap_or(0) > 0 {}
            drop(sink);
            let chunk = vec![0x5au8; 65536];
            let (mut stream, _) = listener.accept().unwrap();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(65536) as usize;
                stream.write_all(&chunk[..n]).unwrap();
                left -= n as u64;
            }
            drop(stream);
            udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            while let Ok(n) = udp.recv(&mut buf) {
                if &buf[..n] == b"end" {
                    break;
                }
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let row = b.run(|| {
        let chunk = vec![0xa5u8; 16384];
        let mut stream = TcpStream::connect(("10.78.0.1", PORT)).unwrap();
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = stream.read(&mut [0u8; 1]);
        let tcp_tx = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
        let mut stream = TcpStream::connect(("10.78.0.1", PORT)).unwrap();
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        let mut got = 0u64;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        let tcp_rx = got as f64 / start.elapsed().as_secs_f64() / 1e6;
        let udp = UdpSocket::bind(("10.78.0.2", 0)).unwrap();
        let start = Instant::now();
        for _ in 0..packets {
            let _ = udp.send_to(&[0u8; 64], ("10.78.0.1", PORT + 2));
        }
        let elapsed = start.elapsed();
        let _ = udp.send_to(b"end", ("10.78.0.1", PORT + 2));
        (tcp_tx, tcp_rx, elapsed)
    });
    server.join().ok()?;
    let (tcp_tx, tcp_rx, udp_elapsed) = row;
    Some(Row { tcp_tx, tcp_rx, udp_pps: received.load(Ordering::Relaxed) as f64 / udp_elapsed.as_secs_f64() })
}

/// Kills the network partition under a TCP echo and measures the longest stall the host
/// saw and the driver's own takeover time. Returns (stall, takeover line).
fn recovery(ns: &Ns) -> Option<(Duration, String)> {
    let console = Capture::default();
    let layout = Layout::microkernel()
        .with_fault_policy("net0", "restart:max=100:backoff=0".parse::<FaultPolicy>().ok()?);
    ns.run(|| {
        let vm = VmBuilder::new(splitvisor::guests::find("net-echo").unwrap().elf)
            .layout(layout)
            .driver(DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver"))))
            .cmdline(&format!("console=ttyS0 net.ip={GUEST_IP}/24 net.peer={HOST_IP}"))
            .net(NetConfig::tap(TAP))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(300)))
            .build()
            .unwrap();
        let control = vm.driver_control();
        let running = std::thread::spawn(move || vm.run().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            if let Ok(s) = TcpStream::connect((GUEST_IP, 7)) {
                break s;
            }
            assert!(Instant::now() < deadline, "net-echo never listened");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut reader = stream.try_clone().unwrap();
        let gaps = Arc::new(Mutex::new((Instant::now(), Duration::ZERO, 0u64)));
        let receiving = {
            let gaps = gaps.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut g = gaps.lock().unwrap();
                    let now = Instant::now();
                    g.1 = g.1.max(now - g.0);
                    g.0 = now;
                    g.2 += n as u64;
                }
            })
        };
        let sender = std::thread::spawn(move || {
            let data = vec![0x33u8; 4 << 20];
            stream.write_all(&data).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        });
        // Kill once a steady stream flows, and measure only the stall around the kill.
        while gaps.lock().unwrap().2 < (1 << 20) {
            std::thread::sleep(Duration::from_millis(2));
        }
        gaps.lock().unwrap().1 = Duration::ZERO;
        let pid = control.driver("net0")?.pid?;
        let serving = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()))
            .unwrap_or(pid as i32);
        // SAFETY: kills the partition of this bench's VM.
        unsafe { libc::kill(serving, libc::SIGKILL) };
        sender.join().ok()?;
        receiving.join().ok()?;
        let report = running.join().ok()?;
        let stall = gaps.lock().unwrap().1;
        let takeover = report
            .device_events
            .iter()
            .map(|e| format!("{e:?}"))
            .find(|e| e.contains("took over"))
            .unwrap_or_default();
        Some((stall, takeover))
    })
}

/// A table line: its name, how to read it from a row, its unit.
type Metric = (&'static str, fn(&Row) -> f64, &'static str);

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        eprintln!("net bench: needs root and iproute2 (network namespaces, TAPs)");
        return ExitCode::FAILURE;
    }
    let bytes = env_u64("NET_BENCH_KIB", 2048) << 10;
    let packets = env_u64("NET_BENCH_PACKETS", 5000);
    let ns = Ns::new("tap").expect("ip netns add");
    assert!(
        ip(&["-n", &ns.0, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
            && ip(&["-n", &ns.0, "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])
            && ip(&["-n", &ns.0, "link", "set", TAP, "up"]),
        "cannot set up the TAP"
    );
    let elf_path = std::env::temp_dir().join(format!("splitvisor-net-bench-{}.elf", std::process::id()));
    std::fs::write(&elf_path, splitvisor::guests::find("net-bench").unwrap().elf).unwrap();

    let monolithic = splitvisor_row(&ns, Layout::monolithic(), bytes, packets);
    let microkernel = splitvisor_row(&ns, Layout::microkernel(), bytes, packets);
    let qemu = qemu_row(&ns, &elf_path, bytes, packets);
    if qemu.is_none() {
        eprintln!("net bench: QEMU row missing (is qemu-system-x86 installed?)");
    }
    let veth = veth_row(bytes, packets);
    let recovered = recovery(&ns);
    let _ = std::fs::remove_file(&elf_path);

    let cell = |row: &Option<Row>, f: fn(&Row) -> f64, unit: &str| {
        row.as_ref().map_or("-".to_string(), |r| format!("{:.2} {unit}", f(r)))
    };
    let ratio = |a: &Option<Row>, b: &Option<Row>, f: fn(&Row) -> f64| match (a, b) {
        (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}x", f(a) / f(b)),
        _ => "-".into(),
    };
    let metrics: [Metric; 3] = [
        ("TCP guest -> host", |r| r.tcp_tx, "MB/s"),
        ("TCP host -> guest", |r| r.tcp_rx, "MB/s"),
        ("UDP guest -> host (64 B)", |r| r.udp_pps, "pkt/s"),
    ];
    let mut out = std::io::stdout();
    let _ = writeln!(out, "\nnet bench: {} KiB per TCP direction, {packets} UDP datagrams\n", bytes >> 10);
    let _ = writeln!(
        out,
        "| metric | monolithic | microkernel (splitvisor-driver) | QEMU microvm (TAP) | veth (host) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (name, f, unit) in metrics {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            cell(&monolithic, f, unit),
            cell(&microkernel, f, unit),
            cell(&qemu, f, unit),
            cell(&veth, f, unit)
        );
    }
    let _ = writeln!(out, "\n| metric | microkernel / monolithic | monolithic / QEMU | monolithic / veth |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (name, f, _) in metrics {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} |",
            ratio(&microkernel, &monolithic, f),
            ratio(&monolithic, &qemu, f),
            ratio(&monolithic, &veth, f)
        );
    }
    match recovered {
        Some((stall, takeover)) => {
            let _ = writeln!(
                out,
                "\nnetwork partition SIGKILLed under a 4 MiB TCP echo: longest stall seen by the host {:.1} ms; {takeover}",
                stall.as_secs_f64() * 1e3
            );
        }
        None => {
            let _ = writeln!(out, "\nrecovery: not measured");
        }
    }
    if monolithic.is_some() && microkernel.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
