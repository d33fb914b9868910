//! The Debian Linux guest that QEMU runs as a vhost-user client (`.ci/build-linux-guest`),
//! and how a test hands it a script.

use std::path::PathBuf;
use std::process::Command;

/// The guest's directory (vmlinuz, initrd.cpio.gz), if it and QEMU are there; `with` names
/// a driver its `contents` must list (e.g. "virtio-net"). Skips outside CI, fails in it.
pub fn directory(with: Option<&str>) -> Option<PathBuf> {
    let dir = std::env::var_os("SPLITVISOR_LINUX_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/linux-guest"));
    let present = dir.join("vmlinuz").is_file() && dir.join("initrd.cpio.gz").is_file();
    let has = with.is_none_or(|driver| {
        std::fs::read_to_string(dir.join("contents")).is_ok_and(|contents| contents.contains(driver))
    });
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    let why = match (present && has, qemu) {
        (true, true) => Ok(()),
        (false, _) => Err(format!(
            "{} is missing{}: run bash .ci/build-linux-guest",
            dir.display(),
            with.map(|driver| format!(" or lacks {driver}")).unwrap_or_default()
        )),
        (_, false) => Err("qemu-system-x86_64 is not installed".to_string()),
    };
    let what = match with {
        Some(driver) => format!("the Linux guest (with {driver}) and QEMU"),
        None => "the Linux guest (Debian kernel + busybox initramfs) and QEMU".to_string(),
    };
    super::require(&what, why).then_some(dir)
}

/// Standard base64, for a script on the guest's command line (`splitvisor.script=`).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}
