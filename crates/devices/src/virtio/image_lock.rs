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
//!
//! Locks are taken before the check, so of two users racing for conflicting access at
//! least one sees the other: neither wins wrongly. Both may see each other, though (two VMs
//! started in the same instant), and QEMU then refuses both. We let go of the bytes the
//! attempt took, wait a random moment and try again, a few times within a fraction of a
//! second, so that one of the two wins; an image somebody keeps is refused once the tries
//! are spent. The processes named in a refusal are looked up then, and only those that
//! still hold the lock are named.

use std::fs::File;
use std::hash::BuildHasher;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

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

/// How many times an attempt that found a conflict is tried again before the conflict
/// counts: enough that two users colliding again and again is out of the question.
const CONTENTION_RETRIES: u32 = 8;
/// The shortest pause before trying again.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(1);
/// The pauses are spread over this much past [`RETRY_PAUSE_MIN`]: far wider than an attempt
/// takes (a dozen fcntl calls), so that two users rarely try at the same moment again.
const RETRY_PAUSE_SPREAD: Duration = Duration::from_millis(19);
/// The longest time spent trying again because of a conflict, pauses included.
const CONTENTION_BUDGET: Duration = Duration::from_millis(300);

/// How long a lock may linger with no holder before it counts as held.
const RELEASE_GRACE: Duration = Duration::from_secs(2);
/// How often a lingering lock is looked at again.
const RELEASE_POLL: Duration = Duration::from_millis(10);

/// What went wrong taking the lock.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another open file description holds a conflicting lock.
    Conflict {
        /// QEMU's name of the permission in conflict.
        permission: &'static str,
        /// Who holds it, if /proc says: processes that held it when the tries were spent.
        holders: Vec<u32>,
    },
    /// fcntl failed for another reason.
    Os(io::Error),
}

/// Why one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// Another open file description holds `byte`, which conflicts with `permission`.
    Conflict { permission: &'static str, byte: i64 },
    /// fcntl failed for another reason.
    Os(io::Error),
}

/// Points in [`lock`]'s work where a test steps in to force an interleaving; `()` does
/// nothing.
trait Steps {
    /// An attempt holds its bytes and is about to look for conflicting users.
    fn bytes_taken(&mut self) {}
    /// /proc says the processes `pids` hold the byte in conflict; they are asked again
    /// before they are named.
    fn holders_read(&mut self, _pids: &[u32]) {}
}

impl Steps for () {}

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

/// The bytes a user locks, each with the permission bit it stands for, in QEMU's order.
fn lock_bytes(read_only: bool) -> impl Iterator<Item = (i64, i64)> {
    let (held, unshared) = permissions(read_only);
    debug_assert_eq!((held | unshared) & !PERM_ALL, 0);
    (0..PERM_NAMES.len() as i64).flat_map(move |bit| {
        [(held, PERM_BASE), (unshared, SHARED_BASE)]
            .into_iter()
            .filter(move |&(set, _)| set & (1 << bit) != 0)
            .map(move |(_, base)| (base + bit, bit))
    })
}

/// Takes the image's locks on `file`'s open file description, or says who is in the way.
/// A filesystem without OFD locks (ENOLCK, EOPNOTSUPP, EINVAL) is used unlocked, with a
/// warning, as QEMU's `locking=auto` does.
///
/// A conflict is tried again a few times at random moments (within [`CONTENTION_BUDGET`]),
/// letting go in between of what the try took, so that of two users colliding one wins;
/// then, if no running process holds the lock, until [`RELEASE_GRACE`] has passed. Without
/// /proc (a sandbox) it cannot tell which bytes the description held before the call,
/// keeps them all, and two users colliding may both be refused, as with QEMU.
pub(crate) fn lock(file: &File, read_only: bool) -> Result<(), LockError> {
    lock_with(file, read_only, &mut ())
}

fn lock_with(file: &File, read_only: bool, steps: &mut impl Steps) -> Result<(), LockError> {
    let start = Instant::now();
    // What the description holds already (an fd handed over and locked again) is never let
    // go: another user's failed attempt must not cost it the image.
    let held_before = own_lock_bytes(file, read_only);
    let mut backoff = Backoff::new(start);
    loop {
        let (permission, byte) = match attempt(file, read_only, held_before.as_deref(), steps) {
            Ok(()) => return Ok(()),
            Err(AttemptError::Os(e))
                if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL)) =>
            {
                log::warn!("disk image: the filesystem does not support OFD locks ({e}); used unlocked");
                return Ok(());
            }
            Err(AttemptError::Os(e)) => return Err(LockError::Os(e)),
            Err(AttemptError::Conflict { permission, byte }) => (permission, byte),
        };
        // Perhaps another user trying at the same moment, who has let go too: try again
        // at a random moment, so that one of us finds the way clear.
        if let Some(pause) = backoff.next_pause() {
            log::debug!("disk image: {permission} lock in conflict; trying again in {pause:?}");
            std::thread::sleep(pause);
            continue;
        }
        let byte = LockedByte::new(file, byte);
        let found = byte.as_ref().map_or_else(Vec::new, LockedByte::holders);
        steps.holders_read(&found);
        // A racing user may have let go or gone since /proc was read: name only those that
        // still hold the lock.
        let holders: Vec<u32> =
            found.into_iter().filter(|&pid| byte.as_ref().is_some_and(|byte| byte.held_by(pid))).collect();
        // A lock that no open file holds is being released: the kernel tears down the
        // io_uring of a process that died (a driver killed while serving the image) after
        // the process, and its registered files with it. Wait for that, a bounded time.
        if holders.is_empty() && start.elapsed() < RELEASE_GRACE {
            std::thread::sleep(RELEASE_POLL);
            continue;
        }
        return Err(LockError::Conflict { permission, holders });
    }
}

/// One try: takes the bytes, then looks for a user in conflict. On failure it lets go of
/// the bytes it took, but not of those in `held_before`; `None` (unknown) keeps them all.
fn attempt(
    file: &File,
    read_only: bool,
    held_before: Option<&[i64]>,
    steps: &mut impl Steps,
) -> Result<(), AttemptError> {
    let mut taken = Vec::new();
    let result = take_and_check(file, read_only, &mut taken, steps);
    if result.is_err() {
        let new = taken.into_iter().filter(|byte| held_before.is_some_and(|held| !held.contains(byte)));
        for byte in new {
            if let Err(e) = set_lock(file, libc::F_UNLCK, byte) {
                log::warn!("disk image: cannot let go of lock byte {byte}: {e}");
            }
        }
    }
    result
}

fn take_and_check(
    file: &File,
    read_only: bool,
    taken: &mut Vec<i64>,
    steps: &mut impl Steps,
) -> Result<(), AttemptError> {
    for (byte, bit) in lock_bytes(read_only) {
        match set_lock(file, libc::F_RDLCK, byte) {
            Ok(()) => taken.push(byte),
            // A read lock only fails against a write lock: someone locks QEMU's bytes
            // exclusively.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Err(AttemptError::Conflict { permission: PERM_NAMES[bit as usize], byte });
            }
            Err(e) => return Err(AttemptError::Os(e)),
        }
    }
    steps.bytes_taken();
    let (held, unshared) = permissions(read_only);
    for bit in 0..PERM_NAMES.len() as i64 {
        let mask = 1u32 << bit;
        // Something we hold that another user refuses to share, or something we refuse to
        // share that another user holds.
        let wanted_elsewhere =
            held & mask != 0 && held_by_others(file, SHARED_BASE + bit).map_err(AttemptError::Os)?;
        let held_elsewhere =
            unshared & mask != 0 && held_by_others(file, PERM_BASE + bit).map_err(AttemptError::Os)?;
        if wanted_elsewhere || held_elsewhere {
            let byte = if held_elsewhere { PERM_BASE + bit } else { SHARED_BASE + bit };
            return Err(AttemptError::Conflict { permission: PERM_NAMES[bit as usize], byte });
        }
    }
    Ok(())
}

/// Spaces out the tries of a user that found a conflict, so that two users that collided
/// do not collide again: pauses drawn at random, a bounded number, within a bounded time.
struct Backoff {
    random: std::collections::hash_map::RandomState,
    retries: u32,
    deadline: Instant,
}

impl Backoff {
    fn new(start: Instant) -> Self {
        // Keyed from the OS's randomness once per thread, then stepped: two threads or two
        // processes draw different pauses. The pid and the clock go into each draw as well.
        Self { random: Default::default(), retries: 0, deadline: start + CONTENTION_BUDGET }
    }

    /// The pause before the next try, or `None` once the tries or the time are spent.
    fn next_pause(&mut self) -> Option<Duration> {
        if self.retries == CONTENTION_RETRIES {
            return None;
        }
        self.retries += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        let draw = self.random.hash_one((std::process::id(), nanos, self.retries));
        let spread = RETRY_PAUSE_SPREAD.as_micros() as u64;
        let pause = RETRY_PAUSE_MIN + Duration::from_micros(draw % spread);
        (Instant::now() + pause <= self.deadline).then_some(pause)
    }
}

/// The image's identity as /proc writes it in lock lines (MAJ:MIN:INODE, hexadecimal
/// device numbers).
fn file_id(file: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    Some(format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), meta.ino()))
}

/// The bytes of a `read_only` user that `file`'s open file description holds already, as
/// its /proc/self/fdinfo "lock:" lines say; `None` if /proc does not say.
fn own_lock_bytes(file: &File, read_only: bool) -> Option<Vec<i64>> {
    let id = file_id(file)?;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    let locks: Vec<&str> = info.lines().filter_map(|line| line.strip_prefix("lock:")).collect();
    Some(
        lock_bytes(read_only)
            .map(|(byte, _)| byte)
            .filter(|&byte| locks.iter().any(|lock| locks_byte(lock, &id, byte)))
            .collect(),
    )
}

/// A lock byte of the image behind an open file, to look up in /proc who holds it.
struct LockedByte {
    /// The image as /proc names it.
    image: String,
    /// The fd we look from: its lock lines are not counted.
    own_fd: String,
    byte: i64,
}

impl LockedByte {
    fn new(file: &File, byte: i64) -> Option<Self> {
        Some(Self { image: file_id(file)?, own_fd: file.as_raw_fd().to_string(), byte })
    }

    /// PIDs of the processes whose open files hold the byte, as their /proc/PID/fdinfo
    /// "lock:" lines say (/proc/locks shows -1 for OFD locks). Empty if /proc is not
    /// readable, as in a sandbox.
    fn holders(&self) -> Vec<u32> {
        let Ok(processes) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        processes
            .flatten()
            .filter_map(|process| process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
            .filter(|&pid| self.held_by(pid))
            .collect()
    }

    /// Whether process `pid` holds the byte now (one that has exited holds nothing).
    fn held_by(&self, pid: u32) -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            return false;
        };
        let me = std::process::id();
        fds.flatten().any(|fd| {
            if pid == me && fd.file_name().to_str() == Some(self.own_fd.as_str()) {
                return false;
            }
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .filter_map(|line| line.strip_prefix("lock:"))
                    .any(|lock| locks_byte(lock, &self.image, self.byte))
            })
        })
    }
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
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Condvar, Mutex};

    /// A process started by a test holds copies of every fd until it execs, and with them
    /// their locks: tests that count on a dropped fd letting go at once do not run then.
    static FORKS: Mutex<()> = Mutex::new(());

    /// How long a test thread waits for another at most (far beyond what the waits need).
    const MEETING_BOUND: Duration = Duration::from_secs(30);

    /// A directory of images, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("splitvisor-lock-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// A new one-sector image: each round of a race has its own, so that no lock of an
        /// earlier round can be in the way.
        fn image(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, [0u8; 512]).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A new open file description of `path`.
    fn open(path: &Path, writable: bool) -> File {
        std::fs::OpenOptions::new().read(true).write(writable).open(path).unwrap()
    }

    /// Lets `parties` threads go on together, once all of them are there (bounded).
    struct Meeting {
        arrived: Mutex<usize>,
        all_there: Condvar,
        parties: usize,
    }

    impl Meeting {
        fn new(parties: usize) -> Arc<Self> {
            Arc::new(Self { arrived: Mutex::new(0), all_there: Condvar::new(), parties })
        }

        fn wait(&self) {
            let mut arrived = self.arrived.lock().unwrap();
            *arrived += 1;
            self.all_there.notify_all();
            let (arrived, timeout) = self
                .all_there
                .wait_timeout_while(arrived, MEETING_BOUND, |arrived| *arrived < self.parties)
                .unwrap();
            assert!(!timeout.timed_out(), "{} of {} threads came", *arrived, self.parties);
        }
    }

    /// Makes two users collide: in its first try each holds its bytes until the other holds
    /// its own, so that both find a conflict.
    struct Collide {
        meeting: Arc<Meeting>,
        first: bool,
    }

    impl Steps for Collide {
        fn bytes_taken(&mut self) {
            if std::mem::take(&mut self.first) {
                self.meeting.wait();
            }
        }
    }

    /// Two users of `path`, read-only or not as `read_only` says, started together, each on
    /// its own open file description; forced to collide on their first try if `collide`.
    /// Says who got the image.
    fn race(path: &Path, read_only: [bool; 2], collide: bool) -> [bool; 2] {
        let start = Meeting::new(2);
        let collision = Meeting::new(2);
        let racers = read_only.map(|read_only| {
            let file = open(path, !read_only);
            let (start, meeting) = (start.clone(), collision.clone());
            std::thread::spawn(move || {
                start.wait();
                let won = if collide {
                    lock_with(&file, read_only, &mut Collide { meeting, first: true }).is_ok()
                } else {
                    lock(&file, read_only).is_ok()
                };
                // The loser's file stays open until both are done: its attempt is over.
                (won, file)
            })
        });
        let results = racers.map(|racer| racer.join().unwrap());
        results.map(|(won, _file)| won)
    }

    #[test]
    fn users_that_collide_end_with_one_winner() {
        let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = Scratch::new("collide");
        // (read-only of each user, how many may have the image)
        let pairings = [([false, false], 1), ([false, true], 1), ([true, false], 1), ([true, true], 2)];
        for round in 0..24 {
            let (read_only, winners) = pairings[round % pairings.len()];
            let path = scratch.image(&format!("round-{round}"));
            let won = race(&path, read_only, true);
            assert_eq!(
                won.iter().filter(|&&won| won).count(),
                winners,
                "round {round}: users {read_only:?} (read-only) got {won:?}"
            );
        }
    }

    #[test]
    fn users_started_together_end_with_one_winner() {
        let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = Scratch::new("race");
        let pairings = [[false, false], [false, true], [true, false]];
        for round in 0..64 {
            let read_only = pairings[round % pairings.len()];
            let path = scratch.image(&format!("round-{round}"));
            let won = race(&path, read_only, false);
            assert_eq!(
                won.iter().filter(|&&won| won).count(),
                1,
                "round {round}: users {read_only:?} (read-only) got {won:?}"
            );
        }
    }

    #[test]
    fn an_image_kept_by_its_holder_is_refused() {
        let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = Scratch::new("kept");
        let path = scratch.image("image");
        let writer = open(&path, true);
        lock(&writer, false).unwrap();
        for read_only in [false, true] {
            match lock(&open(&path, !read_only), read_only) {
                Err(LockError::Conflict { holders, .. }) => assert_eq!(holders, [std::process::id()]),
                other => panic!("read-only {read_only} beside a writer: {other:?}"),
            }
        }

        // The writer's description is locked again (an fd handed over) while a reader is
        // caught in the middle of its try: it holds byte 201 ("does not share write") and
        // never lets go. Locking again is refused, and keeps the writer's lock.
        let reader = open(&path, false);
        set_lock(&reader, libc::F_RDLCK, SHARED_BASE + 1).unwrap();
        assert!(matches!(lock(&writer.try_clone().unwrap(), false), Err(LockError::Conflict { .. })));
        drop(reader);
        match lock(&open(&path, false), true) {
            Err(LockError::Conflict { holders, .. }) => assert_eq!(holders, [std::process::id()]),
            other => panic!("a reader beside a writer that locked again: {other:?}"),
        }
    }

    /// Ends the process `child` (which holds the lock) once /proc has named it, and leaves
    /// it a zombie (killed on drop if it is still running, reaped on drop).
    struct EndHolder {
        child: std::process::Child,
        seen: bool,
    }

    impl Steps for EndHolder {
        fn holders_read(&mut self, pids: &[u32]) {
            assert!(pids.contains(&self.child.id()), "/proc names the holder process: {pids:?}");
            self.seen = true;
            self.child.kill().unwrap();
            // SAFETY: plain old data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes the siginfo_t we pass and nothing else; WNOWAIT leaves
            // the child unreaped (a zombie), as a parent that has not waited yet would.
            let ret = unsafe {
                libc::waitid(libc::P_PID, self.child.id(), &mut info, libc::WEXITED | libc::WNOWAIT)
            };
            assert_eq!(ret, 0, "waitid: {}", io::Error::last_os_error());
        }
    }

    impl Drop for EndHolder {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_holder_gone_by_the_refusal_is_not_named() {
        let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = Scratch::new("gone");
        let path = scratch.image("image");
        let writer = open(&path, true);
        lock(&writer, false).unwrap();
        // Another process shares the writer's description (as its stdin), and so holds the
        // lock until it ends.
        let child = std::process::Command::new("sleep")
            .arg("600")
            .stdin(writer.try_clone().unwrap())
            .spawn()
            .unwrap();
        let mut steps = EndHolder { child, seen: false };
        match lock_with(&open(&path, true), false, &mut steps) {
            Err(LockError::Conflict { holders, .. }) => {
                assert!(steps.seen);
                assert_eq!(holders, [std::process::id()], "only the holder still there is named");
            }
            other => panic!("a writer beside a writer: {other:?}"),
        }
    }

    #[test]
    fn tries_again_a_few_times_briefly_at_random() {
        let mut backoff = Backoff::new(Instant::now());
        let pauses: Vec<Duration> = std::iter::from_fn(|| backoff.next_pause()).collect();
        assert!((1..=CONTENTION_RETRIES as usize).contains(&pauses.len()), "{pauses:?}");
        assert!(
            pauses
                .iter()
                .all(|pause| (RETRY_PAUSE_MIN..RETRY_PAUSE_MIN + RETRY_PAUSE_SPREAD).contains(pause))
        );
        assert!(pauses.iter().sum::<Duration>() <= CONTENTION_BUDGET);
        let mut other = Backoff::new(Instant::now());
        let others: Vec<Duration> = std::iter::from_fn(|| other.next_pause()).collect();
        assert_ne!(pauses, others, "two users draw different pauses");
        assert!(backoff.next_pause().is_none(), "the tries end");
    }

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
        let _serial = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = Scratch::new("share");
        let path = scratch.image("image");
        let writer = open(&path, true);
        lock(&writer, false).unwrap();
        assert!(matches!(
            lock(&open(&path, true), false),
            Err(LockError::Conflict { permission: "write", .. })
        ));
        assert!(matches!(lock(&open(&path, false), true), Err(LockError::Conflict { .. })));
        // The same description may lock again (an fd handed to a partition).
        lock(&writer.try_clone().unwrap(), false).unwrap();
        drop(writer);
        let reader = open(&path, false);
        lock(&reader, true).unwrap();
        let other_reader = open(&path, false);
        lock(&other_reader, true).unwrap();
        match lock(&open(&path, true), false) {
            Err(LockError::Conflict { holders, .. }) => assert_eq!(holders, [std::process::id()]),
            other => panic!("a writer got past two readers: {other:?}"),
        }
        drop((reader, other_reader));
        lock(&open(&path, true), false).unwrap();
    }
}
