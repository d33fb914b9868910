//! The control socket: a person (or a program) asks a running VM about its devices'
//! drivers, and restarts, upgrades or fails one.
//!
//! A unix stream socket; each request is one line of JSON, each answer one line of JSON:
//!
//! ```text
//! {"op":"list"}
//!   -> {"ok":true,"devices":[{"device":"disk0","kind":"virtio-blk","placement":"driver partition",
//!        "policy":"restart:max=10:window=60s:backoff=50ms","driver":"pid 4242","pid":4242,
//!        "health":"running","restarts":0,"last_fault":null}, ...]}
//! {"op":"restart","device":"disk0"}     -> {"ok":true,"result":{"driver":"pid 4250"}}
//! {"op":"upgrade","device":"disk0"}     -> {"ok":true,"result":{"driver":"pid 4260","paused_us":812}}
//! {"op":"upgrade","device":"disk0","driver":"/opt/splitvisor-driver-2"}
//! {"op":"fail","device":"disk0"}        -> {"ok":true,"result":"failed"}
//! anything else                         -> {"ok":false,"error":"..."}
//! ```
//!
//! `restart` replaces the driver as after a crash; `upgrade` starts the new driver
//! (optionally another `splitvisor-driver` binary) before the old one stops, and hands
//! the device over with its queues stopped only for the switch; `fail` fails the device
//! as its fault policy would. Devices whose driver runs in the hypervisor are listed with
//! `"driver":"in hypervisor"` and no pid; there is no partition to restart, upgrade or fail,
//! so those commands are refused for them (`"disk0 runs in the hypervisor: ..."`) and the
//! device goes on as it was.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use splitvisor_bus::threads::{self, ThreadKind};
use splitvisor_isolation::partition::DriverProgram;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::Error;
use crate::lifecycle::{Command, CommandOutcome, DriverControl};
use crate::placement::DevicePlacement;

/// Longest request line.
const MAX_LINE: u64 = 4096;
/// Longest a client may take to send each request line, from when the last answer went
/// out (or it connected): clients are served one at a time, so one that idles or trickles
/// its bytes holds the socket from everyone else for at most this long.
const REQUEST_TIME: Duration = Duration::from_secs(2);
/// Longest an answer may take to be taken by the client.
const ANSWER_TIME: Duration = Duration::from_secs(10);
/// Longest a command may take (an upgrade starts a partition).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket file this process created, found again through an fd of its directory and
/// known by its device and inode numbers: it is removed even from inside the jail, where
/// its path leads nowhere, and a file someone else put at that path since is left alone.
struct SocketFile {
    /// The directory (`O_PATH`), opened before the socket was bound.
    dir: File,
    /// Its name in `dir`.
    name: CString,
    /// Its `(st_dev, st_ino)` once bound.
    identity: (u64, u64),
    /// The path, for the log.
    path: PathBuf,
}

impl SocketFile {
    /// The directory of `path`, to bind a socket in.
    fn directory(path: &Path) -> Result<(File, CString), String> {
        let name = path.file_name().ok_or("not a path to a file")?;
        let name = CString::new(name.as_bytes()).map_err(|_| "contains a NUL byte")?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .map_err(|e| format!("cannot open its directory: {e}"))?;
        Ok((dir, name))
    }

    /// The `(st_dev, st_ino)` of `name` in `dir`, not following a symbolic link.
    fn identity(dir: &File, name: &CString) -> std::io::Result<(u64, u64)> {
        // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid directory fd, a NUL-terminated name and a `stat` to write into,
        // all outliving the call.
        let done =
            unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) };
        if done < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((stat.st_dev, stat.st_ino))
    }
}

impl Drop for SocketFile {
    /// Removes the socket if the file at its name is still the one this process bound.
    fn drop(&mut self) {
        match Self::identity(&self.dir, &self.name) {
            Ok(identity) if identity == self.identity => {
                // SAFETY: a valid directory fd and a NUL-terminated name.
                if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } < 0 {
                    let e = std::io::Error::last_os_error();
                    log::warn!("cannot remove the control socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::warn!(
                "the control socket {} was replaced by another file; leaving that in place",
                self.path.display()
            ),
            Err(e) => log::debug!("the control socket {} is gone already ({e})", self.path.display()),
        }
    }
}

/// The control socket, bound and listening but not served yet (it is bound while the VM
/// is set up, before a jailed hypervisor loses sight of the filesystem); dropping it
/// removes the socket.
pub(crate) struct ApiListener {
    listener: UnixListener,
    file: SocketFile,
}

impl ApiListener {
    /// Listens at `path`, replacing only a stale socket.
    pub(crate) fn bind(path: &Path) -> Result<Self, Error> {
        let error = |why: String| Error::ApiSocket { path: path.to_path_buf(), why };
        let (dir, name) = SocketFile::directory(path).map_err(error)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(error("exists and is not a socket; refusing to replace it".into()));
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(error("another process is listening on it".into())),
                Err(_) => std::fs::remove_file(path)
                    .map_err(|e| error(format!("cannot remove the stale socket: {e}")))?,
            },
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| error(e.to_string()))?;
        let identity = match SocketFile::identity(&dir, &name) {
            Ok(identity) => identity,
            Err(e) => {
                // Whatever is at the path now is not known to be ours: left alone.
                return Err(error(format!("cannot find the socket just bound: {e}")));
            }
        };
        let file = SocketFile { dir, name, identity, path: path.to_path_buf() };
        Ok(Self { listener, file })
    }

    /// Serves requests about `drivers` on a thread of its own.
    pub(crate) fn serve(
        self,
        control: DriverControl,
        placements: Vec<DevicePlacement>,
    ) -> Result<ApiServer, Error> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let stopped = stop.try_clone().map_err(Error::EventFd)?;
        let api = Api { control, placements };
        let Self { listener, file } = self;
        let thread = threads::spawn(ThreadKind::Control, "api", move || api.serve(&listener, &stopped))
            .map_err(|source| Error::Thread { name: "api", source })?;
        Ok(ApiServer { stop, thread: Some(thread), _file: file })
    }
}

/// The control socket's server thread; dropping it stops it and removes the socket.
pub(crate) struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Removed once the thread has ended (fields drop after `drop`).
    _file: SocketFile,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A stream whose reads fail once `deadline` has passed: each read waits at most until
/// then, however the bytes trickle in.
struct ByDeadline {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for ByDeadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the request took too long"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

struct Api {
    control: DriverControl,
    placements: Vec<DevicePlacement>,
}

impl Api {
    fn serve(&self, listener: &UnixListener, stop: &EventFd) {
        loop {
            let mut fds = [
                libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfds; no timeout (the stop eventfd ends it).
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if fds[1].revents != 0 {
                return;
            }
            if ready <= 0 || fds[0].revents == 0 {
                continue;
            }
            if let Ok((client, _)) = listener.accept() {
                if let Err(e) = self.client(client) {
                    log::debug!("api: client dropped: {e}");
                }
            }
        }
    }

    /// Answers one client's requests, a line each, until it hangs up or takes longer than
    /// [`REQUEST_TIME`] to send one.
    fn client(&self, client: UnixStream) -> std::io::Result<()> {
        client.set_write_timeout(Some(ANSWER_TIME))?;
        let mut writer = client.try_clone()?;
        let mut reader = BufReader::new(ByDeadline { stream: client, deadline: Instant::now() });
        loop {
            reader.get_mut().deadline = Instant::now() + REQUEST_TIME;
            let mut line = String::new();
            if (&mut reader).take(MAX_LINE).read_line(&mut line)? == 0 {
                return Ok(());
            }
            if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
                let answer = json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")});
                writeln!(writer, "{answer}")?;
                return Ok(());
            }
            writeln!(writer, "{}", self.answer(line.trim()))?;
        }
    }

    fn answer(&self, line: &str) -> Value {
        match self.request(line) {
            Ok(Value::Null) => json!({"ok": true}),
            Ok(result) => result,
            Err(error) => json!({"ok": false, "error": error}),
        }
    }

    fn request(&self, line: &str) -> Result<Value, String> {
        let request: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let op = request.get("op").and_then(Value::as_str).ok_or("no \"op\"")?;
        if op == "list" {
            return Ok(json!({"ok": true, "devices": self.list()}));
        }
        let device = request.get("device").and_then(Value::as_str).ok_or("no \"device\"")?;
        let command = match op {
            "restart" => Command::Restart,
            "fail" => Command::Fail,
            "upgrade" => Command::Upgrade(
                request.get("driver").and_then(Value::as_str).map(|path| DriverProgram::at(Path::new(path))),
            ),
            other => return Err(format!("unknown op '{other}' (use list, restart, upgrade or fail)")),
        };
        let result =
            match self.control.command(device, command, COMMAND_TIMEOUT).map_err(|e| e.to_string())? {
                CommandOutcome::Restarted(driver) => json!({"driver": driver}),
                CommandOutcome::Upgraded { driver, paused } => {
                    json!({"driver": driver, "paused_us": paused.as_micros() as u64})
                }
                CommandOutcome::Failed => json!("failed"),
            };
        Ok(json!({"ok": true, "result": result}))
    }

    fn list(&self) -> Vec<Value> {
        self.placements
            .iter()
            .map(|placed| match self.control.driver(&placed.device) {
                Some(status) => {
                    json!({
                        "device": status.device,
                        "kind": status.kind,
                        "placement": status.placement.to_string(),
                        "policy": status.policy.to_string(),
                        "driver": status.driver,
                        "pid": status.pid,
                        "health": status.health.to_string(),
                        "restarts": status.restarts,
                        "last_fault": status.last_fault,
                    })
                }
                None => json!({
                    "device": placed.device,
                    "kind": placed.kind,
                    "placement": placed.placement.to_string(),
                    "policy": placed.policy.to_string(),
                    "driver": "in hypervisor",
                    "pid": null,
                    "health": "running",
                    "restarts": 0,
                    "last_fault": null,
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own under the temporary directory.
    fn directory(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("splitvisor-api-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn the_socket_is_removed_even_once_its_path_leads_elsewhere() {
        // What the jail does to the path (it no longer leads to the directory), done here
        // by moving the directory.
        for served in [false, true] {
            let dir = directory(&format!("moved-{served}"));
            let listener = ApiListener::bind(&dir.join("api.sock")).unwrap();
            let moved = dir.with_extension("moved");
            let _ = std::fs::remove_dir_all(&moved);
            std::fs::rename(&dir, &moved).unwrap();
            assert!(moved.join("api.sock").exists());
            if served {
                drop(listener.serve(DriverControl::new(Vec::new(), Vec::new()), Vec::new()).unwrap());
            } else {
                drop(listener);
            }
            assert!(!moved.join("api.sock").exists(), "served: {served}");
            std::fs::remove_dir(&moved).unwrap();
        }
    }

    #[test]
    fn a_file_put_at_the_path_since_is_left_alone() {
        let dir = directory("replaced");
        let path = dir.join("api.sock");
        let listener = ApiListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(listener);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_with_no_file_name_is_refused() {
        let error = ApiListener::bind(Path::new("/")).err().unwrap();
        assert!(error.to_string().contains("not a path to a file"), "{error}");
    }
}
