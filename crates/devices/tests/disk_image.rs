//! Disk images: one validity rule (regular files and block devices of a non-zero whole
//! number of sectors), and locks that exclude conflicting users the way QEMU's do: within
//! one process, across processes, and against QEMU itself.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splitvisor_devices::virtio::block::{BlockError, DiskImage};

/// Outside CI a missing prerequisite skips the test with a reason; under CI=true it fails.
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

/// A fresh directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("splitvisor-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.0.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn only_regular_files_and_block_devices_of_whole_sectors_are_disks() {
    let scratch = Scratch::new("validity");
    let good = scratch.image("good.img", 4096);
    assert_eq!(DiskImage::open(&good, false).unwrap().sectors(), 8);

    let empty = scratch.image("empty.img", 0);
    assert!(matches!(DiskImage::open(&empty, false), Err(BlockError::Empty { .. })));
    let odd = scratch.image("odd.img", 1000);
    match DiskImage::open(&odd, false) {
        Err(e @ BlockError::Unaligned { size: 1000, .. }) => assert!(e.to_string().contains("odd.img")),
        other => panic!("a 1000-byte image: {other:?}"),
    }

    let fifo = scratch.0.join("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    // Refused before it is opened (opening a FIFO would wait for a writer).
    assert!(matches!(DiskImage::open(&fifo, true), Err(BlockError::NotADisk { kind: "a FIFO", .. })));

    let null = Path::new("/dev/null");
    match DiskImage::open(null, true) {
        Err(e @ BlockError::NotADisk { kind: "a character device", .. }) => {
            assert!(e.to_string().contains("/dev/null"), "{e}")
        }
        other => panic!("/dev/null as a disk: {other:?}"),
    }
    assert!(matches!(
        DiskImage::open(&scratch.0, true),
        Err(BlockError::NotADisk { kind: "a directory", .. })
    ));
    let socket = scratch.0.join("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    assert!(matches!(DiskImage::open(&socket, true), Err(BlockError::NotADisk { kind: "a socket", .. })));
    assert!(matches!(DiskImage::open(&scratch.0.join("missing"), true), Err(BlockError::Open { .. })));
}

#[test]
fn an_open_file_gets_the_same_checks() {
    let scratch = Scratch::new("from-file");
    let good = scratch.image("good.img", 1024);
    let read_only_fd = std::fs::File::open(&good).unwrap();
    match DiskImage::from_file(read_only_fd, false, "fd 4") {
        Err(e @ BlockError::AccessMode { .. }) => assert!(e.to_string().contains("fd 4"), "{e}"),
        other => panic!("a read-only fd used read-write: {other:?}"),
    }
    let read_only_fd = std::fs::File::open(&good).unwrap();
    let image = DiskImage::from_file(read_only_fd, true, "fd 4").unwrap();
    assert_eq!((image.sectors(), image.read_only()), (2, true));
    drop(image);

    let name = std::ffi::CString::new(good.to_str().unwrap()).unwrap();
    // SAFETY: open reads the NUL-terminated path and returns a new fd or -1.
    let fd = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let path_only = unsafe { std::fs::File::from_raw_fd(fd) };
    assert!(matches!(DiskImage::from_file(path_only, true, "fd 5"), Err(BlockError::AccessMode { .. })));

    let empty = scratch.image("empty.img", 0);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&empty).unwrap();
    assert!(matches!(DiskImage::from_file(file, false, "fd 6"), Err(BlockError::Empty { .. })));
}

/// OFD locks live as long as any copy of their open file description: a test that forks a
/// process (which holds copies of every fd until it execs) must not run while another test
/// counts on a lock being gone the moment its fd is dropped.
static FORKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_writer_excludes_everyone_and_readers_share_within_a_process() {
    let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("in-process");
    let path = scratch.image("disk.img", 1 << 20);
    let writer = DiskImage::open(&path, false).unwrap();
    match DiskImage::open(&path, false) {
        Err(e @ BlockError::Locked { .. }) => {
            let message = e.to_string();
            assert!(message.contains("disk.img"), "{message}");
            assert!(message.contains("is locked by another process"), "{message}");
            assert!(message.contains("is it in use by another VM?"), "{message}");
            assert!(
                message.contains(&format!("pid {}", std::process::id())),
                "the holder is named: {message}"
            );
        }
        other => panic!("a second writer: {other:?}"),
    }
    assert!(
        matches!(DiskImage::open(&path, true), Err(BlockError::Locked { .. })),
        "a reader beside a writer"
    );
    // The fd handed to a partition shares the open file description, and so the lock.
    let handed_over = writer.file().try_clone().unwrap();
    let partition_side = DiskImage::from_file(handed_over, false, "disk fd").unwrap();
    drop(writer);
    assert!(
        matches!(DiskImage::open(&path, true), Err(BlockError::Locked { .. })),
        "the partition's fd still holds the lock"
    );
    drop(partition_side);

    let reader = DiskImage::open(&path, true).unwrap();
    let other_reader = DiskImage::open(&path, true).unwrap();
    assert!(
        matches!(DiskImage::open(&path, false), Err(BlockError::Locked { .. })),
        "a writer beside readers"
    );
    drop((reader, other_reader));
    DiskImage::open(&path, false).unwrap();
}

const HOLDER_ENV: &str = "SPLITVISOR_TEST_HOLD_IMAGE";

/// A handed-over fd shares its description's lock: the partition that receives it does not
/// check the lock again, and so cannot trip over a second VM that tries the image at that
/// moment (a user between taking its lock bytes and finding the conflict).
#[test]
fn a_handed_over_image_is_not_locked_again() {
    use std::os::fd::AsRawFd;
    let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("handed-over");
    let path = scratch.image("disk.img", 1 << 20);
    let writer = DiskImage::open(&path, false).unwrap();
    // A reader caught in the middle of its attempt: it holds QEMU's byte 201 ("does not
    // share write") and has not yet seen the writer and let go.
    let reader = std::fs::File::open(&path).unwrap();
    // SAFETY: plain old data; all-zero is a valid value (pid 0, as OFD locks need).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_RDLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 201;
    lock.l_len = 1;
    // SAFETY: F_OFD_SETLK reads the flock above and nothing else.
    assert_eq!(unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_OFD_SETLK, &lock) }, 0);

    assert!(
        matches!(
            DiskImage::from_file(writer.file().try_clone().unwrap(), false, "fd"),
            Err(BlockError::Locked { .. })
        ),
        "locking again sees the passing reader"
    );
    let partition_side =
        DiskImage::from_locked_file(writer.file().try_clone().unwrap(), false, "disk fd").unwrap();
    assert_eq!(partition_side.sectors(), writer.sectors());
    // The checks are the same as from_file's.
    let read_only_fd = std::fs::File::open(&path).unwrap();
    assert!(matches!(
        DiskImage::from_locked_file(read_only_fd, false, "fd"),
        Err(BlockError::AccessMode { .. })
    ));
}

/// Not a test: the other process of `locks_exclude_other_processes`. It holds the image
/// named by the environment until its stdin closes.
#[test]
#[ignore = "helper process of locks_exclude_other_processes"]
fn lock_holder_process() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let (mode, path) = spec.split_once(':').unwrap();
    let image = DiskImage::open(Path::new(path), mode == "ro").unwrap();
    println!("HOLDING");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(image);
}

/// The helper process and its output, kept open until it exits.
type Holder = (Child, std::io::Lines<BufReader<std::process::ChildStdout>>);

/// Starts this test binary as a process holding `path` (`ro` or `rw`), and waits until it
/// says it holds the lock.
fn hold_in_another_process(path: &Path, mode: &str) -> Holder {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_holder_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, format!("{mode}:{}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Bounded: the child prints its line or dies, and either ends this loop.
    let held = lines.any(|line| line.is_ok_and(|line| line.contains("HOLDING")));
    assert!(held, "the helper process did not take the lock");
    (child, lines)
}

fn release((mut child, lines): Holder) {
    drop(child.stdin.take());
    // Read its output to the end, so it can report its result and exit.
    lines.for_each(drop);
    assert!(child.wait().unwrap().success(), "the helper process failed");
}

#[test]
fn locks_exclude_other_processes() {
    let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("processes");
    let path = scratch.image("disk.img", 1 << 20);
    let child = hold_in_another_process(&path, "rw");
    match DiskImage::open(&path, false) {
        Err(e @ BlockError::Locked { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("pid {}", child.0.id())), "names the holder: {message}");
        }
        other => panic!("a writer while another process writes: {other:?}"),
    }
    assert!(matches!(DiskImage::open(&path, true), Err(BlockError::Locked { .. })));
    release(child);
    // The lock went with the process.
    drop(DiskImage::open(&path, false).unwrap());

    let child = hold_in_another_process(&path, "ro");
    let reader = DiskImage::open(&path, true).unwrap();
    assert!(matches!(DiskImage::open(&path, false), Err(BlockError::Locked { .. })));
    drop(reader);
    release(child);
}

fn qemu_storage_daemon() -> bool {
    require(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .map_err(|e| e.to_string())
            .and_then(|out| if out.status.success() { Ok(()) } else { Err("--version failed".into()) }),
    )
}

/// qemu-storage-daemon exporting `path` over vhost-user-blk (writable or not).
fn storage_daemon(path: &Path, socket: &Path, writable: bool) -> Command {
    let mut command = Command::new("qemu-storage-daemon");
    let read_only = if writable { "off" } else { "on" };
    let writable = if writable { "on" } else { "off" };
    command
        .arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=disk,read-only={read_only}", path.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable={writable}",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Kills a child on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `socket` exists: the daemon opened and locked the image first.
fn wait_for_socket(daemon: &mut Daemon, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(daemon.0.stderr.as_mut().unwrap(), &mut stderr);
            panic!("qemu-storage-daemon exited ({status}): {stderr}");
        }
        assert!(Instant::now() < deadline, "qemu-storage-daemon did not create its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) for the daemon to exit by itself; returns its status and stderr.
fn wait_for_exit(mut daemon: Daemon) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(daemon.0.stderr.as_mut().unwrap(), &mut stderr);
            return (status, stderr);
        }
        assert!(Instant::now() < deadline, "qemu-storage-daemon neither started nor failed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn splitvisor_and_qemu_exclude_each_other() {
    let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    if !qemu_storage_daemon() {
        return;
    }
    let scratch = Scratch::new("qemu");
    let path = scratch.image("disk.img", 1 << 20);
    let socket = scratch.0.join("vhost.sock");

    // QEMU writes the image: we may neither write nor read it.
    let mut daemon = Daemon(storage_daemon(&path, &socket, true).spawn().unwrap());
    wait_for_socket(&mut daemon, &socket);
    match DiskImage::open(&path, false) {
        Err(e @ BlockError::Locked { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("pid {}", daemon.0.id())), "names QEMU: {message}");
            assert!(message.contains("qemu-storage-d"), "names QEMU's command: {message}");
        }
        other => panic!("splitvisor beside a writing QEMU: {other:?}"),
    }
    assert!(matches!(DiskImage::open(&path, true), Err(BlockError::Locked { .. })));
    drop(daemon);
    let _ = std::fs::remove_file(&socket);

    // We write it: QEMU refuses to write it too. (A read-only QEMU export shares writes by
    // QEMU's own rules, and may start.)
    let writer = DiskImage::open(&path, false).unwrap();
    let daemon = Daemon(storage_daemon(&path, &socket, true).spawn().unwrap());
    let (status, stderr) = wait_for_exit(daemon);
    assert!(!status.success(), "a writing QEMU started beside a splitvisor writer");
    assert!(stderr.contains("Failed to get \"write\" lock"), "QEMU says why: {stderr}");
    let _ = std::fs::remove_file(&socket);
    drop(writer);

    // Readers share: splitvisor read-only beside a read-only QEMU export.
    let reader = DiskImage::open(&path, true).unwrap();
    let mut daemon = Daemon(storage_daemon(&path, &socket, false).spawn().unwrap());
    wait_for_socket(&mut daemon, &socket);
    let second_reader = DiskImage::open(&path, true).unwrap();
    assert!(matches!(DiskImage::open(&path, false), Err(BlockError::Locked { .. })));
    drop((reader, second_reader, daemon));
    assert!(path.exists());
}
