//! Network namespaces for the network tests: each test makes its own, with a TAP inside,
//! and uses only addresses inside it. The namespace is removed when the value is dropped,
//! a failing test included.

use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The host side's address in every test namespace, and the guest's.
pub const HOST_IP: &str = "10.77.0.1";
/// The guest's address.
pub const GUEST_IP: &str = "10.77.0.2";

/// A network namespace of this test process.
pub struct NetNs {
    /// Its name (`ip netns` list).
    pub name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn check(output: Output, what: &str) {
    assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
}

impl NetNs {
    /// A fresh namespace with its loopback up, or None (the test is skipped outside CI) if
    /// this process cannot make one (not root, no iproute2).
    pub fn new() -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let available = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map_err(|e| format!("iproute2: {e}"))
            .and_then(|o| if o.status.success() { Ok(()) } else { Err("ip netns fails".into()) })
            // SAFETY: geteuid has no preconditions.
            .and_then(|()| if unsafe { libc::geteuid() } == 0 { Ok(()) } else { Err("not root".into()) });
        if !super::require("network namespaces (root, iproute2)", available) {
            return None;
        }
        let name = format!("svtest-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::AcqRel));
        check(ip(&["netns", "add", &name]), "ip netns add");
        let ns = Self { name };
        check(ip(&["-n", &ns.name, "link", "set", "lo", "up"]), "loopback up");
        Some(ns)
    }

    /// Adds the TAP `tap` (virtio-net headers) with the host address, up.
    pub fn tap(&self, tap: &str) {
        check(ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]), "tuntap add");
        check(ip(&["-n", &self.name, "addr", "add", &format!("{HOST_IP}/24"), "dev", tap]), "addr add");
        check(ip(&["-n", &self.name, "link", "set", tap, "up"]), "link up");
    }

    /// Runs `f` on a thread inside the namespace (sockets and TAPs it opens are there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = std::fs::File::open(&path).expect("open the namespace");
                    // SAFETY: moves this thread (only) into the namespace of an open nsfs fd.
                    let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// `ping -c count` from the host side to `address`: whether every reply came.
    pub fn ping(&self, address: &str, count: u32) -> bool {
        let output = self
            .command("ping")
            .args(["-c", &count.to_string(), "-W", "10", "-i", "0.2", address])
            .output()
            .expect("run ping");
        let text = String::from_utf8_lossy(&output.stdout);
        eprintln!("{text}");
        output.status.success() && text.contains(&format!("{count} received"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let output = ip(&["netns", "del", &self.name]);
        if !output.status.success() {
            eprintln!("cannot remove netns {}: {}", self.name, String::from_utf8_lossy(&output.stderr));
        }
    }
}
