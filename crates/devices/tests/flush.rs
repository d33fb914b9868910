//! FLUSH reaches `fdatasync`, and a failing `fdatasync` answers IOERR, for the in-process
//! device's request engine, on real block devices: loop devices whose writeback succeeds
//! (the backing file then holds the data) or fails (a backing file on a full tmpfs, whose
//! errors surface only when the page cache is written back, i.e. at `fdatasync`). And a
//! sync that io_uring cannot hand to a worker thread (no thread may be created) still runs.
//!
//! Needs root, `losetup`, `unshare` and `mount` (present on the project's machines; under
//! CI=true their absence fails the test).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use splitvisor_devices::virtio::block::{BlockWorker, DiskImage, id_bytes, request_status, request_type};
use splitvisor_devices::virtio::testing::{
    DESC_F_NEXT, DESC_F_WRITE, DriverQueue, counting_interrupt, guest_memory, write_blk_header,
};
use splitvisor_devices::virtio::{GuestMemoryMmap, features};
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Bytes each write request moves (the size_max of one segment).
const CHUNK: u32 = 1 << 20;

fn require(what: &str, available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI=true and {what} is not available: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {what} is not available: {why}");
            false
        }
    }
}

fn loop_devices() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["losetup", "unshare", "mount"].iter().try_for_each(|tool| {
        Command::new(tool).arg("--version").output().map(drop).map_err(|e| format!("{tool}: {e}"))
    });
    require("loop devices (root, losetup, unshare, mount)", if root { tools } else { Err("not root".into()) })
}

/// A loop device, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `backing` (run by `sh -c`, so it can set up a private mount first).
    fn attach(script: &str) -> Self {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-ec", script])
            .output()
            .unwrap();
        assert!(out.status.success(), "setting up the loop device: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(device.starts_with("/dev/loop"), "losetup printed {device:?}");
        Self(PathBuf::from(device))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("splitvisor-flush-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// The in-process worker on `device`, and the driver's memory.
struct Rig {
    mem: GuestMemoryMmap,
    worker: BlockWorker,
}

impl Rig {
    fn new(device: &Path) -> Self {
        let mem = guest_memory(0x40_0000);
        let disk = DiskImage::open(device, false).unwrap();
        let queue = DriverQueue::new(&mem, 0x1000, 16).device_queue();
        let (interrupt, _) = counting_interrupt();
        let worker = BlockWorker::new(mem.clone(), queue, interrupt, Arc::new(disk), id_bytes("flush"))
            .with_features(features::VERSION_1);
        Self { mem, worker }
    }

    /// Runs one request (header, optional data, status) and returns its status byte.
    fn request(&mut self, avail: &mut u16, kind: u32, sector: u64, data: Option<&[u8]>) -> u8 {
        let mut driver = DriverQueue::new(&self.mem, 0x1000, 16);
        for _ in 0..*avail {
            driver.publish(0);
        }
        write_blk_header(&self.mem, HDR, kind, sector);
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        match data {
            Some(bytes) => {
                self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
                driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
                driver.write_descriptor(1, DATA, bytes.len() as u32, DESC_F_NEXT, 2);
                driver.write_descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
            }
            None => {
                driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
                driver.write_descriptor(1, STATUS, 1, DESC_F_WRITE, 0);
            }
        }
        driver.publish(0);
        *avail += 1;
        assert_eq!(self.worker.process_queue().unwrap(), 1);
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

#[test]
fn flush_reaches_fdatasync_and_the_data_reaches_the_backing_file() {
    if !loop_devices() {
        return;
    }
    let dir = scratch("good");
    let backing = dir.0.join("backing");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let device = LoopDevice::attach(&format!("losetup -f --show {}", backing.display()));
    let mut rig = Rig::new(&device.0);
    let mut avail = 0;
    let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 241) as u8 | 1).collect();
    assert_eq!(rig.request(&mut avail, request_type::OUT, 0, Some(&pattern)), request_status::OK);
    assert_eq!(rig.request(&mut avail, request_type::FLUSH, 0, None), request_status::OK);
    assert_eq!(rig.worker.requests().stats().syncs, 1);
    // The loop device writes back into the backing file only when its page cache is
    // flushed (the kernel's own writeback would wait some 30 s): the data is there now.
    let mut on_backing = vec![0u8; CHUNK as usize];
    std::fs::File::open(&backing).unwrap().read_exact_at(&mut on_backing, 0).unwrap();
    assert!(on_backing == pattern, "FLUSH returned before the data reached the backing file");
}

#[test]
fn a_failing_fdatasync_answers_ioerr() {
    if !loop_devices() {
        return;
    }
    let dir = scratch("failing");
    let mount = dir.0.join("tmpfs");
    std::fs::create_dir(&mount).unwrap();
    // An 8 MiB loop device on a sparse file in a 1 MiB tmpfs (mounted in a private mount
    // namespace that lives as long as the loop device holds the file): writes land in the
    // page cache, and writing them back fails once the tmpfs is full.
    let device = LoopDevice::attach(&format!(
        "mount -t tmpfs -o size=1m none {m} && truncate -s 8M {m}/backing && losetup -f --show {m}/backing",
        m = mount.display()
    ));
    let mut rig = Rig::new(&device.0);
    let mut avail = 0;
    assert_eq!(
        rig.request(&mut avail, request_type::FLUSH, 0, None),
        request_status::OK,
        "nothing to write back"
    );
    let pattern = vec![0x5au8; CHUNK as usize];
    for sector in [0, 2048, 4096] {
        assert_eq!(
            rig.request(&mut avail, request_type::OUT, sector, Some(&pattern)),
            request_status::OK,
            "a write reaches the page cache"
        );
    }
    assert_eq!(rig.request(&mut avail, request_type::FLUSH, 0, None), request_status::IOERR);
}

const NO_THREADS_ENV: &str = "SPLITVISOR_TEST_SYNC_WITHOUT_THREADS";

/// A FLUSH whose `fdatasync` io_uring hands to a kernel worker thread it then cannot
/// create (a pids limit, RLIMIT_NPROC: the kernel cancels the transfer) is run by the
/// engine itself: the guest's FLUSH must not fail for the host's lack of a thread.
#[test]
fn a_sync_the_kernel_cannot_start_a_thread_for_still_runs() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !require(
        "root, to run a process under another uid",
        if root { Ok(()) } else { Err("not root".into()) },
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("splitvisor-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)).unwrap();
    // A uid of its own, so that RLIMIT_NPROC counts only the helper's threads.
    use std::os::unix::process::CommandExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sync_without_threads_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(NO_THREADS_ENV, &image)
        .uid(64_999)
        .gid(64_999)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // (The harness may have printed the test's name on the same line.)
    let result = stdout.lines().find_map(|line| line.split_once("SYNC RESULT ").map(|(_, result)| result));
    if result == Some("no io_uring") {
        eprintln!("SKIPPED: io_uring is not available here");
        return;
    }
    assert_eq!(result, Some("0"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// Not a test: the process of `a_sync_the_kernel_cannot_start_a_thread_for_still_runs`.
#[test]
#[ignore = "helper process of a_sync_the_kernel_cannot_start_a_thread_for_still_runs"]
fn sync_without_threads_process() {
    use splitvisor_devices::virtio::block_io::{self, EngineKind, IoOp, Transfer};
    let Ok(path) = std::env::var(NO_THREADS_ENV) else {
        return;
    };
    let disk = Arc::new(DiskImage::open(Path::new(&path), false).unwrap());
    let Ok(mut engine) = block_io::open(&disk, EngineKind::IoUring) else {
        println!("SYNC RESULT no io_uring");
        return;
    };
    // No new thread from here on, the kernel's io_uring workers included.
    let none = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
    // SAFETY: sets a limit from a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &none) }, 0);
    let sync = Transfer { tag: 0, op: IoOp::Sync, offset: 0, iovecs: std::ptr::null(), count: 0 };
    // SAFETY: a sync carries no buffers.
    unsafe { engine.push(sync) }.unwrap();
    engine.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        engine.wait(&mut done).unwrap();
    }
    println!("SYNC RESULT {}", done[0].result);
}
