//! A real Linux guest as a client of splitvisor's driver partition: QEMU (TCG: the build
//! machines' KVM cannot run Linux) boots Debian's cloud kernel with a busybox initramfs
//! (`.ci/build-linux-guest`), its own virtio_blk driver talks vhost-user to
//! `splitvisor-driver blk`, and the host checks what reached the image.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::images::Image;
use support::linux_guest::base64;

fn linux_guest() -> Option<PathBuf> {
    support::linux_guest::directory(None)
}

#[test]
fn linux_writes_and_reads_dev_vda_through_splitvisor_driver() {
    let Some(guest) = linux_guest() else {
        return;
    };
    let image = Image::new("linux", 8 << 20);
    let driver = support::HandStartedDriver::start("linux", &image.0);
    // Linux's virtio_blk writes 1 MiB, syncs, reads it back and compares.
    let script = "yes splitvisor-linux | head -c 1048576 > /p\n\
                  dd if=/p of=/dev/vda bs=64k conv=fsync\n\
                  dd if=/dev/vda bs=64k count=16 | cmp - /p\n";
    let output = Command::new("qemu-system-x86_64")
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
        .arg(format!("socket,id=disk,path={}", driver.socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=disk"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(driver);
    let console = String::from_utf8_lossy(&output.stdout);
    assert!(console.contains("16384 sectors on /dev/vda"), "{console}");
    assert!(console.contains("LINUX-GUEST-RESULT: PASS"), "{console}");
    let expected: Vec<u8> = b"splitvisor-linux\n".iter().copied().cycle().take(1 << 20).collect();
    assert!(image.bytes()[..1 << 20] == expected[..], "the image holds what Linux wrote");
}

/// QEMU booting the Linux guest with `/dev/vda` on the vhost-user socket `socket`, running
/// `script` (QEMU reconnects to the socket when the backend goes away).
fn qemu_linux(guest: &std::path::Path, socket: &std::path::Path, script: &str) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "pc", "-accel", "tcg", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"])
        .args(["-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.cpio.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 splitvisor.script={}", base64(script.as_bytes())))
        .arg("-chardev")
        .arg(format!("socket,id=disk,path={},reconnect=1", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=disk"])
        .stdin(Stdio::null());
    qemu
}

#[test]
fn linux_sees_no_io_error_while_its_splitvisor_driver_is_killed_and_restarted() {
    let Some(guest) = linux_guest() else {
        return;
    };
    let image = Image::new("linux-restart", 8 << 20);
    let mut driver = support::HandStartedDriver::start("linux-restart", &image.0);
    // Rounds of 4 MiB written with fsync and read back, each round a different pattern,
    // while the host kills the driver during most rounds' I/O and starts it again on the
    // same socket; then the kernel log must be clean. (The driver is killed only once the
    // previous round completed: QEMU 7.2's own reconnect fails if its backend dies while
    // QEMU is still setting the device up again, "vhost_backend_init failed".)
    let script = "i=0\n\
                  echo linux-io-start\n\
                  while [ $i -lt 24 ]; do\n\
                    yes splitvisor-round-$i | head -c 4194304 > /p\n\
                    dd if=/p of=/dev/vda bs=64k conv=fsync 2>/dev/null\n\
                    dd if=/dev/vda bs=64k count=64 2>/dev/null | cmp - /p\n\
                    echo linux-round-$i-ok\n\
                    i=$((i+1))\n\
                  done\n\
                  if dmesg | grep -i -E 'I/O error|blk_update_request|critical medium'; then exit 1; fi\n";
    let mut qemu = support::KillOnDrop(
        qemu_linux(&guest, &driver.socket, script).stdout(Stdio::piped()).spawn().unwrap(),
    );
    let stdout = qemu.0.stdout.take().unwrap();
    let (lines, console) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut seen = String::new();
    let mut kills = 0;
    let mut rounds = 0;
    let mut kill_at: Option<std::time::Instant> = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no result from Linux within 10 minutes: {seen}");
        match console.recv_timeout(left.min(std::time::Duration::from_millis(20))) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("LINUX-GUEST-RESULT") {
                    break;
                }
                // A round done since the last kill: QEMU has reconnected and I/O flows
                // again. Kill again during the next round's I/O, a little later each time.
                if line.contains("-ok") && line.starts_with("linux-round-") && rounds < 18 {
                    rounds += 1;
                    kill_at =
                        Some(std::time::Instant::now() + std::time::Duration::from_millis(40 * (rounds % 8)));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if kill_at.is_some_and(|at| std::time::Instant::now() >= at) {
            kill_at = None;
            driver.kill();
            driver.restart();
            kills += 1;
        }
    }
    let _ = qemu.0.wait();
    reader.join().unwrap();
    drop(driver);
    assert!(seen.contains("LINUX-GUEST-RESULT: PASS"), "{seen}");
    assert!(kills >= 5, "only {kills} kills during Linux's I/O: {seen}");
    let expected: Vec<u8> = b"splitvisor-round-23\n".iter().copied().cycle().take(4 << 20).collect();
    assert!(image.bytes()[..4 << 20] == expected[..], "the image holds the last round Linux wrote");
}

#[test]
fn base64_matches_the_reference() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}
