//! virtio-net end to end: the kit's network guests (smoltcp over the kit's virtio-net driver)
//! against the host's kernel on a TAP, in both placements, and the network partition
//! killed, stopped and upgraded under a TCP transfer. Each test makes its own network
//! namespace with a TAP inside and uses only addresses inside it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use splitvisor::guests::{self, GuestResult};
use splitvisor::layout::{
    Command, ConsoleOutput, DriverControl, DriverProgram, FaultPolicy, Layout, NetConfig, VmBuilder, VmReport,
};
use support::Capture;
use support::netns::{GUEST_IP, HOST_IP, NetNs};

const TAP: &str = "svtap0";

fn driver() -> DriverProgram {
    DriverProgram::at(Path::new(env!("CARGO_BIN_EXE_splitvisor-driver")))
}

fn cmdline(extra: &str) -> String {
    format!("console=ttyS0 net.ip={GUEST_IP}/24 net.peer={HOST_IP} {extra}")
}

/// A VM running `guest` with one NIC on the namespace's TAP.
fn vm(guest: &str, layout: Layout, extra: &str, console: &Capture) -> splitvisor::layout::Vm {
    VmBuilder::new(guests::find(guest).unwrap().elf)
        .layout(layout)
        .driver(driver())
        .cmdline(&cmdline(extra))
        .net(NetConfig::tap(TAP))
        .console(ConsoleOutput::Writer(Box::new(console.clone())))
        .timeout(Some(Duration::from_secs(600)))
        .build()
        .unwrap()
}

fn passed(report: &VmReport, console: &Capture) {
    assert_eq!(report.guest_result, Some(GuestResult::Pass), "console:\n{}", console.text());
}

/// Connects to the guest's echo server (it may not listen yet: retried, bounded).
fn connect_echo() -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match TcpStream::connect_timeout(&format!("{GUEST_IP}:7").parse().unwrap(), Duration::from_secs(10)) {
            Ok(stream) => {
                stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                stream.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                return stream;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to the guest's echo server: {e}"),
        }
    }
}

/// Sends `data` through the echo server on `stream` and returns what came back; `progress`
/// counts the bytes back so far.
fn echo(mut stream: TcpStream, data: &[u8], progress: &AtomicU64) -> Vec<u8> {
    let mut reader = stream.try_clone().unwrap();
    std::thread::scope(|scope| {
        let receiving = scope.spawn(move || {
            let mut back = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return back,
                    Ok(n) => {
                        back.extend_from_slice(&buf[..n]);
                        progress.fetch_add(n as u64, Ordering::AcqRel);
                    }
                    Err(e) => panic!("reading the echo: {e} after {} bytes", back.len()),
                }
            }
        });
        stream.write_all(data).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        receiving.join().unwrap()
    })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn layouts() -> [(&'static str, Layout); 2] {
    [("monolithic", Layout::monolithic()), ("microkernel", Layout::microkernel())]
}

#[test]
fn net_ping_reaches_the_host_in_both_placements() {
    if !support::kvm() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    for (name, layout) in layouts() {
        let console = Capture::default();
        let report = ns.run(|| vm("net-ping", layout, "net.count=4", &console).run().unwrap());
        eprintln!("{name}:\n{}", console.text());
        passed(&report, &console);
        assert!(console.text().contains("received=4"), "{name}");
    }
}

/// The examples as a user runs them, with the hypervisor's own sandbox (seccomp per thread)
/// on, as it is by default there: the TAP's set-up at activation (on a vCPU), the device's
/// worker thread, and the partition's check of its TAP before its sandbox are all allowed.
#[test]
fn the_examples_reach_the_host_over_a_tap_with_their_threads_sandboxed() {
    if !support::kvm() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    let net = format!("tap={TAP}");
    let extra = cmdline("net.count=2");
    let runs: [(&str, &[&str]); 3] =
        [("monolithic", &[]), ("microkernel", &[]), ("microkernel", &["--place", "net0=hypervisor"])];
    for (example, place) in runs {
        let program = support::example(example);
        let output = ns
            .command(program.to_str().unwrap())
            .args(["--guest", "net-ping", "--net", &net, "--cmdline", &extra, "--timeout", "120"])
            .args(place)
            .output()
            .unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(0), "{example} {place:?}:\n{stdout}\n{stderr}");
        assert!(stdout.contains("received=2"), "{example} {place:?}:\n{stdout}");
    }
}

#[test]
fn net_echo_answers_the_hosts_ping_and_tcp_in_both_placements() {
    if !support::kvm() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    for (seed, (name, layout)) in layouts().into_iter().enumerate() {
        let console = Capture::default();
        let data = pattern(256 << 10, seed as u64 + 7);
        let (report, back, pinged) = ns.run(|| {
            let vm = vm("net-echo", layout, "", &console);
            let running = std::thread::spawn(move || vm.run().unwrap());
            let stream = connect_echo();
            // The guest is up (it accepted): the host's kernel pings it, smoltcp answers.
            let pinged = ns.ping(GUEST_IP, 3);
            let back = echo(stream, &data, &AtomicU64::new(0));
            (running.join().unwrap(), back, pinged)
        });
        eprintln!("{name}:\n{}", console.text());
        passed(&report, &console);
        assert!(pinged, "{name}: the guest did not answer every ping");
        assert!(
            back == data,
            "{name}: {} bytes back of {}, first difference at {:?}",
            back.len(),
            data.len(),
            back.iter().zip(&data).position(|(a, b)| a != b)
        );
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
fn wait_replaced(control: &DriverControl, old: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if control.driver("net0").and_then(|d| d.pid).is_some_and(|pid| pid != old) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Echoes `len` bytes through a microkernel net-echo while `chaos` acts on the network
/// partition each time another `every` bytes came back; the data must come back intact.
fn transfer_under(
    len: usize,
    every: u64,
    faults: u32,
    chaos: impl Fn(&DriverControl, u32) + Send + Sync,
) -> (VmReport, String) {
    let ns = NetNs::new().expect("checked by the caller");
    ns.tap(TAP);
    let console = Capture::default();
    let data = pattern(len, 99);
    let progress = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let layout = Layout::microkernel()
        .with_fault_policy("net0", "restart:max=1000:backoff=0".parse::<FaultPolicy>().unwrap());
    let (report, back, acted) = ns.run(|| {
        let vm = vm("net-echo", layout, "", &console);
        let control = vm.driver_control();
        let running = std::thread::spawn(move || vm.run().unwrap());
        let stream = connect_echo();
        std::thread::scope(|scope| {
            let chaos = scope.spawn(|| {
                let mut acted = 0;
                while acted < faults && !done.load(Ordering::Acquire) {
                    if progress.load(Ordering::Acquire) < every * u64::from(acted + 1) {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let old = control.driver("net0").and_then(|d| d.pid).unwrap();
                    chaos(&control, old);
                    assert!(wait_replaced(&control, old), "no new driver replaced pid {old}");
                    acted += 1;
                }
                acted
            });
            let back = echo(stream, &data, &progress);
            done.store(true, Ordering::Release);
            let acted = chaos.join().unwrap();
            (running.join().unwrap(), back, acted)
        })
    });
    let text = console.text();
    eprintln!("{text}");
    for event in &report.device_events {
        eprintln!("{event:?}");
    }
    passed(&report, &console);
    assert_eq!(acted, faults, "the transfer ended before every fault was injected");
    assert!(
        back == data,
        "{} bytes back of {}, first difference at {:?}",
        back.len(),
        data.len(),
        back.iter().zip(&data).position(|(a, b)| a != b)
    );
    (report, text)
}

#[test]
fn the_network_partition_killed_under_a_tcp_transfer_loses_no_data() {
    if !support::kvm() || NetNs::new().is_none() {
        return;
    }
    let (report, _) =
        transfer_under(1 << 20, 128 << 10, 3, |_, pid| signal(serving_process(pid), libc::SIGKILL));
    let restarts = report.drivers.iter().find(|d| d.device == "net0").unwrap().restarts;
    assert_eq!(restarts, 3, "each kill was answered by a restart");
}

#[test]
fn a_hung_network_partition_is_replaced_under_a_tcp_transfer() {
    if !support::kvm() || NetNs::new().is_none() {
        return;
    }
    let (report, _) =
        transfer_under(512 << 10, 128 << 10, 1, |_, pid| signal(serving_process(pid), libc::SIGSTOP));
    let net0 = report.drivers.iter().find(|d| d.device == "net0").unwrap();
    assert_eq!(net0.restarts, 1);
    assert!(net0.last_fault.as_deref().is_some_and(|f| f.contains("no request completed")), "{net0:?}");
}

#[test]
fn the_network_partition_upgraded_under_a_tcp_transfer_loses_no_data() {
    if !support::kvm() || NetNs::new().is_none() {
        return;
    }
    let (report, _) = transfer_under(1 << 20, 128 << 10, 3, |control, _| {
        let outcome = control.command("net0", Command::Upgrade(None), Duration::from_secs(30)).unwrap();
        eprintln!("upgrade: {outcome:?}");
    });
    assert!(report.device_events.iter().filter(|e| format!("{e:?}").contains("upgraded")).count() == 3);
}

#[test]
fn the_network_partition_is_sandboxed_and_holds_only_what_it_was_handed() {
    if !support::kvm() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    let console = Capture::default();
    ns.run(|| {
        let vm = VmBuilder::new(guests::find("idle").unwrap().elf)
            .layout(Layout::microkernel())
            .driver(driver())
            .net(NetConfig::tap(TAP))
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_millis(300)))
            .build()
            .unwrap();
        let pid = vm.driver_control().driver("net0").and_then(|d| d.pid).unwrap();
        let child = serving_process(pid);
        assert_eq!(child, pid, "the partition is one process");
        let nspid = support::status_field(child, "NSpid:");
        assert_eq!(nspid.split_whitespace().last(), Some("1"), "PID 1 of its own PID namespace");
        assert_eq!(support::status_field(child, "Seccomp:"), "2", "seccomp filter mode");
        assert_eq!(support::status_field(child, "NoNewPrivs:"), "1");
        assert_eq!(support::status_field(child, "CapEff:"), "0000000000000000");
        let theirs = std::fs::read_link(format!("/proc/{child}/ns/net")).unwrap();
        assert_ne!(theirs, std::fs::read_link("/proc/thread-self/ns/net").unwrap(), "own network namespace");
        let mut tun = 0;
        for entry in std::fs::read_dir(format!("/proc/{child}/fd")).unwrap() {
            let entry = entry.unwrap();
            let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
            let target = std::fs::read_link(entry.path()).unwrap();
            let target = target.to_string_lossy();
            // Stdin and stdout are /dev/null; stderr is the hypervisor's own (a terminal, a
            // pipe or the file the run is logged to), for the partition's log.
            match fd {
                0 | 1 => {
                    assert_eq!(target, "/dev/null", "the network partition's fd {fd}");
                    continue;
                }
                2 => continue,
                _ => {}
            }
            tun += usize::from(target == "/dev/net/tun");
            // The write end of its report pipe (why it ends, if it ends on an error).
            let info = std::fs::read_to_string(format!("/proc/{child}/fdinfo/{fd}")).unwrap_or_default();
            let flags = info.lines().find_map(|line| line.strip_prefix("flags:")).map(str::trim);
            let write_only = flags
                .and_then(|octal| i32::from_str_radix(octal, 8).ok())
                .is_some_and(|flags| flags & libc::O_ACCMODE == libc::O_WRONLY);
            assert!(
                target == "/dev/net/tun"
                    || target.starts_with("socket:")
                    || target.starts_with("anon_inode:")
                    || target.starts_with("/memfd:splitvisor-guest-ram")
                    || (target.starts_with("pipe:") && write_only),
                "the network partition holds {target}"
            );
        }
        assert_eq!(tun, 1, "exactly the TAP it was handed");
        vm.run().unwrap();
    });
}

/// `splitvisor-driver net --tap TAP --socket PATH`, started by hand in the namespace; waits
/// (bounded) for its "serving" line.
fn external_driver(ns: &NetNs, socket: &Path) -> support::KillOnDrop {
    use std::io::BufRead;
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_splitvisor-driver"))
        .args(["net", "--tap", TAP, "--socket"])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = ready.send(line);
    });
    let line = wait.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let child = support::KillOnDrop(child);
    assert!(line.contains("serving TAP"), "splitvisor-driver net did not get ready: {line}");
    child
}

#[test]
fn an_external_splitvisor_driver_net_killed_and_started_again_is_reconnected() {
    if !support::kvm() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-external-net.sock", std::process::id()));
    let mut driver = Some(external_driver(&ns, &socket));
    let console = Capture::default();
    let data = pattern(1 << 20, 5);
    let progress = AtomicU64::new(0);
    let (report, back) = ns.run(|| {
        let vm = VmBuilder::new(guests::find("net-echo").unwrap().elf)
            .cmdline(&cmdline(""))
            .net(NetConfig::VhostUser { socket: socket.clone(), mac: None })
            .layout(
                Layout::monolithic().with_fault_policy("net0", "restart:max=100:backoff=0".parse().unwrap()),
            )
            .console(ConsoleOutput::Writer(Box::new(console.clone())))
            .timeout(Some(Duration::from_secs(600)))
            .build()
            .unwrap();
        let control = vm.driver_control();
        let running = std::thread::spawn(move || vm.run().unwrap());
        let stream = connect_echo();
        std::thread::scope(|scope| {
            let chaos = scope.spawn(|| {
                while progress.load(Ordering::Acquire) < 256 << 10 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                // The backend dies (its serving process too); a new one comes up on the same
                // socket.
                let old = driver.take().unwrap();
                let serving = support::descendants(old.0.id());
                drop(old);
                support::wait_gone(&serving);
                driver = Some(external_driver(&ns, &socket));
                let deadline = Instant::now() + Duration::from_secs(30);
                while control.driver("net0").is_none_or(|d| d.restarts == 0) {
                    assert!(Instant::now() < deadline, "splitvisor never reconnected");
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            let back = echo(stream, &data, &progress);
            chaos.join().unwrap();
            (running.join().unwrap(), back)
        })
    });
    eprintln!("{}", console.text());
    passed(&report, &console);
    assert!(back == data, "the echo came back changed ({} of {} bytes)", back.len(), data.len());
    let net0 = report.drivers.iter().find(|d| d.device == "net0").unwrap();
    assert_eq!(net0.restarts, 1, "{net0:?}");
    drop(driver);
    let _ = std::fs::remove_file(&socket);
}
