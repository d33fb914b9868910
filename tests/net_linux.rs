//! A real Linux guest as a client of splitvisor's network partition: QEMU (TCG: the build
//! machines' KVM cannot run Linux) boots Debian's cloud kernel (`.ci/build-linux-guest`),
//! whose own virtio_net driver talks vhost-user to `splitvisor-driver net` on a TAP in a
//! namespace of this test. The host pings Linux and exchanges data with it over TCP both
//! ways.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::KillOnDrop;
use support::linux_guest::base64;
use support::netns::{GUEST_IP, HOST_IP, NetNs};

const TAP: &str = "svtap0";

fn linux_guest() -> Option<PathBuf> {
    support::linux_guest::directory(Some("virtio-net"))
}

/// `splitvisor-driver net --socket ... --tap TAP`, started in the namespace; waits (bounded)
/// for its "serving" line.
fn start_driver(ns: &NetNs, socket: &std::path::Path) -> KillOnDrop {
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_splitvisor-driver"))
        .args(["net", "--tap", TAP, "--socket"])
        .arg(socket)
        .stdout(Stdio::piped())
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
    let child = KillOnDrop(child);
    assert!(line.contains("serving TAP"), "splitvisor-driver net did not get ready: {line}");
    child
}

fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn linux_over_splitvisor_driver_net_answers_ping_and_exchanges_tcp_data() {
    let Some(guest) = linux_guest() else { return };
    let Some(ns) = NetNs::new() else { return };
    ns.tap(TAP);
    let socket = std::env::temp_dir().join(format!("splitvisor-{}-linux-net.sock", std::process::id()));
    let _driver = start_driver(&ns, &socket);
    let data = pattern(512 << 10);
    // Linux: up, ping the host, take the host's data on port 5000, send it back to port 5001.
    let script = format!(
        "ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         ping -c 3 -W 10 {HOST_IP}\n\
         nc -l -p 5000 > /recv\n\
         echo linux-received $(wc -c < /recv)\n\
         nc {HOST_IP} 5001 < /recv\n\
         echo linux-sent-back\n"
    );
    let mut qemu = KillOnDrop(
        Command::new("qemu-system-x86_64")
            .args(["-M", "pc", "-accel", "tcg", "-m", "256M"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"])
            .args(["-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initrd.cpio.gz"))
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 splitvisor.script={}", base64(script.as_bytes())))
            .arg("-chardev")
            .arg(format!("socket,id=net0,path={}", socket.display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=net0"])
            // No MSI-X: QEMU 7.2 under TCG crashes setting up vhost's MSI-X vector notifiers
            // for virtio-net (msix_set_vector_notifiers in vhost_net_start); INTx works.
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02,romfile=,vectors=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = qemu.0.stdout.take().unwrap();
    let console = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::BufReader::new(stdout).read_to_string(&mut text);
        text
    });
    let (pinged, back) = ns.run(|| {
        let listener = TcpListener::bind((HOST_IP, 5001)).unwrap();
        // Linux listens once it has pinged us: connect, bounded retries.
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut to_linux = loop {
            match TcpStream::connect_timeout(
                &format!("{GUEST_IP}:5000").parse().unwrap(),
                Duration::from_secs(5),
            ) {
                Ok(stream) => break stream,
                Err(e) => {
                    assert!(Instant::now() < deadline, "Linux never listened: {e}");
                    assert!(qemu.0.try_wait().unwrap().is_none(), "QEMU ended before Linux listened");
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        };
        let pinged = ns.ping(GUEST_IP, 3);
        to_linux.write_all(&data).unwrap();
        to_linux.shutdown(Shutdown::Write).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (mut from_linux, _) = listener.accept().unwrap();
        from_linux.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut back = vec![0u8; data.len()];
        from_linux.read_exact(&mut back).unwrap();
        drop(from_linux);
        (pinged, back)
    });
    let status = qemu.0.wait().unwrap();
    let console = console.join().unwrap();
    eprintln!("{console}");
    assert!(status.success() || console.contains("LINUX-GUEST-RESULT"), "QEMU: {status}");
    assert!(
        console.contains("3 packets received") || console.contains("3 received"),
        "Linux's ping: {console}"
    );
    assert!(console.contains(&format!("linux-received {}", data.len())), "{console}");
    assert!(console.contains("LINUX-GUEST-RESULT: PASS"), "{console}");
    assert!(pinged, "the host's ping of Linux");
    assert!(back == data, "the data came back changed");
    let _ = std::fs::remove_file(&socket);
}
