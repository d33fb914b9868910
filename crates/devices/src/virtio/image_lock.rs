//! Disk image locking compatible with QEMU's (block/file-posix.c), so that splitvisor and
//! QEMU tools exclude each other from an image.
//!
//! QEMU describes what a user of an image does and tolerates with "permissions" (bit 0
//! consistent read, 1 write, 2 write-unchanged, 3 resize) and takes a *shared* open file
//! description (OFD) lock on one byte per bit: byte `100 + bit` for each permission it
//! holds, byte `200 + bit` for each permission it refuses to share. Before it commits, it
//! asks the kernel whether anybody else holds the byte that would conflict (`F_OFD_GETLK`
//! with a write lock, which any other description's read lock blocks): for a permission it
//! wants, the "unshared" byte; for a permission it refuses to share, the "held" byte.
//!
//! We take the same bytes:
//! * read-write: holds consistent read, write and write-unchanged; refuses to share write
//!   and resize (as a QEMU virtio-blk device does);
//! * read-only: holds consistent read; refuses to share write (a reader wants a stable
//!   image), so read-only users share with each other and exclude every writer.
//!
//! The locks live on the open file description: a duplicated or inherited fd (a driver
//! partition's) holds them too, and they go when the last fd of that description closes.
//! Locks are taken before the check, so of two users racing for conflicting access at
//! least one sees the other (both may fail; neither wins wrongly).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Byte of the first "permission held" lock.
const PERM_BASE: i64 = 100;
/// Byte of the first "permission not shared" lock.
const SHARED_BASE: i64 = 200;

const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_RESIZE: u32 = 1 << 3;
/// Every permission QEMU knows.
const PERM_ALL: u32 = 0xf;

/// Names QEMU uses for the permissions, for messages.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What went wrong taking the lock.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another open file description holds a conflicting lock on `byte`.
    Conflict {
        /// QEMU's name of the permission in conflict.
        permission: &'static str,
        /// Who holds it, if /proc/locks says.
        holders: Vec<u32>,
    },
    /// fcntl failed for another reason.
    Os(io::Error),
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value (pid 0 as OFD locks need).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    lock
}

fn set_lock(file: &File, kind: i32, byte: i64) -> io::Result<()> {
    let lock = flock(kind, byte);
    // SAFETY: F_OFD_SETLK reads the `flock` we pass and touches no other memory.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut lock = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and writes the `flock` we pass and nothing else.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(lock.l_type) != libc::F_UNLCK)
}

/// (held, not shared) permissions of a user of the image.
fn permissions(read_only: bool) -> (u32, u32) {
    if read_only {
        (PERM_CONSISTENT_READ, PERM_WRITE)
    } else {
        (PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED, PERM_WRITE | PERM_RESIZE)
    }
}

/// How long a lock may linger with no holder before it counts as held.
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the image's locks on `file`'s open file description, or says who is in the way.
/// A filesystem without OFD locks (ENOLCK, EOPNOTSUPP, EINVAL) is used unlocked, with a
/// warning, as QEMU's `locking=auto` does.
pub(crate) fn lock(file: &File, read_only: bool) -> Result<(), LockError> {
    let deadline = std::time::Instant::now() + RELEASE_GRACE;
    let mut result = try_lock(file, read_only);
    // A lock that no open file holds is being released: the kernel tears down the io_uring
    // of a process that died (a driver killed while serving the image) after the process,
    // and its registered files with it. Wait for that, a bounded time.
    while matches!(&result, Err(LockError::Conflict { holders, .. }) if holders.is_empty())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
        result = try_lock(file, read_only);
    }
    match result {
        Err(LockError::Os(e))
            if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL)) =>
        {
            log::warn!("disk image: the filesystem does not support OFD locks ({e}); used unlocked");
            Ok(())
        }
        other => other,
    }
}

fn try_lock(file: &File, read_only: bool) -> Result<(), LockError> {
    let (held, unshared) = permissions(read_only);
    for bit in 0..PERM_NAMES.len() as i64 {
        let mask = 1u32 << bit;
        for (set, base) in [(held, PERM_BASE), (unshared, SHARED_BASE)] {
            if set & mask != 0 {
                set_lock(file, libc::F_RDLCK, base + bit).map_err(|e| conflict_or_os(file, e, bit))?;
            }
        }
    }
    for bit in 0..PERM_NAMES.len() as i64 {
        let mask = 1u32 << bit;
        // Something we hold that another user refuses to share, or something we refuse to
        // share that another user holds.
        let wanted_elsewhere =
            held & mask != 0 && held_by_others(file, SHARED_BASE + bit).map_err(LockError::Os)?;
        let held_elsewhere =
            unshared & mask != 0 && held_by_others(file, PERM_BASE + bit).map_err(LockError::Os)?;
        if wanted_elsewhere || held_elsewhere {
            let byte = if held_elsewhere { PERM_BASE + bit } else { SHARED_BASE + bit };
            return Err(LockError::Conflict {
                permission: PERM_NAMES[bit as usize],
                holders: holders(file, byte),
            });
        }
    }
    debug_assert_eq!((held | unshared) & !PERM_ALL, 0);
    Ok(())
}

fn conflict_or_os(file: &File, error: io::Error, bit: i64) -> LockError {
    // A read lock only fails against a write lock: someone locks QEMU's bytes exclusively.
    if matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        LockError::Conflict { permission: PERM_NAMES[bit as usize], holders: holders(file, PERM_BASE + bit) }
    } else {
        LockError::Os(error)
    }
}

/// PIDs of the processes whose open files hold a lock on `byte` of `file`'s inode, as
/// their /proc/PID/fdinfo "lock:" lines say (/proc/locks shows -1 for OFD locks). Empty
/// if /proc is not readable, as in a sandbox. `file` itself is not counted.
fn holders(file: &File, byte: i64) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dev = meta.dev();
    let wanted_file = format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), meta.ino());
    let me = (std::process::id(), file.as_raw_fd().to_string());
    let mut pids = Vec::new();
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            if pid == me.0 && fd.file_name().to_str() == Some(me.1.as_str()) {
                return false;
            }
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .filter_map(|line| line.strip_prefix("lock:"))
                    .any(|lock| locks_byte(lock, &wanted_file, byte))
            })
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Whether one lock description ("1: OFDLCK ADVISORY READ -1 08:01:5678 100 100", as in
/// /proc/locks and fdinfo) covers `byte` of the file `wanted_file` (MAJ:MIN:INODE).
fn locks_byte(lock: &str, wanted_file: &str, byte: i64) -> bool {
    let fields: Vec<&str> = lock.split_whitespace().collect();
    let [_, class, _mode, _kind, _pid, file, start, end] = fields[..] else {
        return false;
    };
    let start: Option<i64> = start.parse().ok();
    let end: Option<i64> = if end == "EOF" { Some(i64::MAX) } else { end.parse().ok() };
    matches!(class, "OFDLCK" | "POSIX")
        && file == wanted_file
        && start.zip(end).is_some_and(|(start, end)| start <= byte && byte <= end)
}

/// The command name of `pid`, if readable.
pub(crate) fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|name| name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines_are_parsed() {
        let line = "3: OFDLCK ADVISORY  READ  -1 fd:01:1234 100 100";
        assert!(locks_byte(line, "fd:01:1234", 100));
        assert!(!locks_byte(line, "fd:01:1234", 101));
        assert!(!locks_byte(line, "fd:01:999", 100));
        assert!(!locks_byte("4: FLOCK  ADVISORY  WRITE 1 fd:01:1234 0 EOF", "fd:01:1234", 100));
        assert!(locks_byte("5: POSIX  ADVISORY  WRITE 7 fd:01:1234 0 EOF", "fd:01:1234", 201));
        assert!(!locks_byte("garbage", "fd:01:1234", 100));
    }

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let dir = std::env::temp_dir().join(format!("splitvisor-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let open = |rw: bool| std::fs::OpenOptions::new().read(true).write(rw).open(&path).unwrap();
        let writer = open(true);
        lock(&writer, false).unwrap();
        assert!(matches!(lock(&open(true), false), Err(LockError::Conflict { permission: "write", .. })));
        assert!(matches!(lock(&open(false), true), Err(LockError::Conflict { .. })));
        // The same description may lock again (an fd handed to a partition).
        lock(&writer.try_clone().unwrap(), false).unwrap();
        drop(writer);
        let reader = open(false);
        lock(&reader, true).unwrap();
        let other_reader = open(false);
        lock(&other_reader, true).unwrap();
        match lock(&open(true), false) {
            Err(LockError::Conflict { holders, .. }) => assert_eq!(holders, [std::process::id()]),
            other => panic!("a writer got past two readers: {other:?}"),
        }
        drop((reader, other_reader));
        lock(&open(true), false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
