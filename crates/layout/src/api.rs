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
//!
//! Up to 16 clients are served side by side, each with 30 s to send each line and 10 s
//! to take each answer; a client beyond them takes the place of the one idle longest.
//! Commands are carried out one at a time, by the supervisor.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
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
/// out (or it connected). Clients are served side by side, so this bounds only how long
/// an idle one keeps its place (a person typing at `socat` has time for a line).
const REQUEST_TIME: Duration = Duration::from_secs(30);
/// Longest an answer may take to be taken by the client.
const ANSWER_TIME: Duration = Duration::from_secs(10);
/// How long the server stops accepting after the host refused it a new connection's fd
/// (EMFILE, ENFILE): the connection stays waiting, and polling for it again at once would
/// spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Most clients connected at once; a newcomer beyond them takes the place of the one that
/// has been idle longest, so each holds a bounded share of the thread and of memory
/// (a request line and an answer each).
const MAX_CLIENTS: usize = 16;
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
        // Clients are accepted only when one is waiting, but one may have hung up since:
        // the server never blocks on the socket.
        listener.set_nonblocking(true).map_err(|e| error(e.to_string()))?;
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

/// One connected client: the bytes of its request line so far, and its answer until the
/// client has taken all of it.
struct Client {
    stream: UnixStream,
    /// The request line being received (at most [`MAX_LINE`] bytes).
    request: Vec<u8>,
    /// The answer not yet taken by the client; no further request is read meanwhile, so
    /// a client that sends and never reads holds at most one answer.
    answer: Vec<u8>,
    /// When the client must have sent its next line (or taken its answer) by.
    deadline: Instant,
    /// Its last activity, to pick the longest idle when a newcomer needs the room.
    active: Instant,
    /// It hung up or was refused: dropped once its answer is out.
    closing: bool,
}

impl Client {
    fn new(stream: UnixStream, now: Instant) -> Self {
        Self {
            stream,
            request: Vec::new(),
            answer: Vec::new(),
            deadline: now + REQUEST_TIME,
            active: now,
            closing: false,
        }
    }

    /// Whether the client should be dropped now: done, or past its deadline.
    fn done(&self, now: Instant) -> bool {
        (self.closing && self.answer.is_empty()) || now >= self.deadline
    }

    /// Sends as much of the answer as the socket takes without waiting.
    fn send(&mut self) -> std::io::Result<()> {
        while !self.answer.is_empty() {
            // MSG_NOSIGNAL: a client that hung up is an error here, not a SIGPIPE for a
            // program embedding the VM that left that signal's default (to end it).
            // SAFETY: a valid socket and the answer's bytes, which outlive the call.
            let sent = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.answer.as_ptr().cast(),
                    self.answer.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            let sent = if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(sent as usize) };
            match sent {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(sent) => {
                    self.answer.drain(..sent);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the client sent, without waiting, up to a whole line.
    fn receive(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 512];
        loop {
            let room = (MAX_LINE as usize).saturating_sub(self.request.len()).min(buf.len());
            if room == 0 || self.request.contains(&b'\n') {
                return Ok(());
            }
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.closing = true;
                    return Ok(());
                }
                Ok(read) => self.request.extend_from_slice(&buf[..read]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a request line (or a line too long) has come and waits for its turn.
    fn has_line(&self) -> bool {
        self.answer.is_empty()
            && (self.request.contains(&b'\n')
                || self.request.len() >= MAX_LINE as usize
                || (self.closing && !self.request.is_empty()))
    }

    /// The next whole request line, if one has come: ended by a newline, or by the
    /// client hanging up after it. A line over [`MAX_LINE`] bytes is refused, and the
    /// client dropped once it has the refusal.
    fn next_line(&mut self) -> Option<Result<Vec<u8>, String>> {
        if let Some(end) = self.request.iter().position(|&byte| byte == b'\n') {
            let mut line: Vec<u8> = self.request.drain(..=end).collect();
            line.pop();
            return Some(Ok(line));
        }
        if self.request.len() >= MAX_LINE as usize {
            self.request.clear();
            self.closing = true;
            return Some(Err(format!("request longer than {MAX_LINE} bytes")));
        }
        if self.closing && !self.request.is_empty() {
            return Some(Ok(std::mem::take(&mut self.request)));
        }
        None
    }
}

/// Accepts a connection waiting on `listener` (non-blocking) as a non-blocking stream.
fn accept(listener: &UnixListener) -> std::io::Result<UnixStream> {
    // SAFETY: a valid listening socket; no address is asked for. The flags make the new
    // socket non-blocking from the start (the control thread may not `ioctl` it so).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

struct Api {
    control: DriverControl,
    placements: Vec<DevicePlacement>,
}

impl Api {
    /// Serves up to [`MAX_CLIENTS`] clients side by side, until `stop` is signalled.
    ///
    /// Requests are answered one at a time in this thread (a command is carried out by the
    /// supervisor, which does one at a time anyway), but a client is waited for only when
    /// it has something to say: one that idles or trickles its bytes holds nobody up.
    fn serve(&self, listener: &UnixListener, stop: &EventFd) {
        let mut clients: Vec<Client> = Vec::new();
        let mut accept_paused: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let accepting = accept_paused.is_none_or(|until| now >= until);
            let mut fds = vec![
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: if accepting { libc::POLLIN } else { 0 },
                    revents: 0,
                },
            ];
            fds.extend(clients.iter().map(|client| libc::pollfd {
                fd: client.stream.as_raw_fd(),
                events: if client.answer.is_empty() { libc::POLLIN } else { libc::POLLOUT },
                revents: 0,
            }));
            // A client with a request line already read is served without waiting.
            let timeout = clients
                .iter()
                .map(|client| if client.has_line() { now } else { client.deadline })
                .chain(accept_paused.filter(|_| !accepting))
                .map(|deadline| deadline.saturating_duration_since(now))
                .min()
                // Rounded up, so the wait does not end just short of the deadline.
                .map_or(-1, |left| left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
            // SAFETY: `fds` holds `fds.len()` valid pollfds and outlives the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if ready < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                return;
            }
            for (client, fd) in clients.iter_mut().zip(&fds[2..]) {
                if fd.revents != 0 || client.has_line() {
                    if let Err(e) = self.serve_client(client) {
                        log::debug!("api: client dropped: {e}");
                        client.closing = true;
                        client.answer.clear();
                    }
                }
            }
            let now = Instant::now();
            clients.retain(|client| !client.done(now));
            if fds[1].revents != 0 {
                if clients.len() >= MAX_CLIENTS {
                    // Room for the newcomer: the client that has been idle longest goes
                    // (its own connection, too, is the socket owner's).
                    if let Some(idlest) = (0..clients.len()).min_by_key(|&i| clients[i].active) {
                        log::debug!("api: {MAX_CLIENTS} clients connected; dropping the longest idle");
                        clients.swap_remove(idlest);
                    }
                }
                match accept(listener) {
                    Ok(stream) => {
                        clients.push(Client::new(stream, now));
                        accept_paused = None;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        // Out of fds: the longest idle client makes room, as when the
                        // table is full; with none left, the server waits a little.
                        match (0..clients.len()).min_by_key(|&i| clients[i].active) {
                            Some(idlest) => {
                                log::debug!("api: cannot accept a client ({e}); dropping the longest idle");
                                clients.swap_remove(idlest);
                            }
                            None => {
                                if accept_paused.is_none() {
                                    log::warn!(
                                        "api: cannot accept a client ({e}); trying again every {ACCEPT_PAUSE:?}"
                                    );
                                }
                                accept_paused = Some(now + ACCEPT_PAUSE);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Moves one client on: sends what is left of its answer, or reads its request and
    /// answers each whole line that has come.
    fn serve_client(&self, client: &mut Client) -> std::io::Result<()> {
        client.send()?;
        if !client.answer.is_empty() {
            return Ok(());
        }
        client.receive()?;
        // One request per client per turn: a client that pipelines many commands
        // takes its turns with the others (its next line is served at the next turn).
        if client.answer.is_empty() {
            let Some(line) = client.next_line() else { return Ok(()) };
            let answer = match line {
                Ok(line) => match std::str::from_utf8(&line) {
                    Ok(line) => self.answer(line.trim()),
                    Err(_) => json!({"ok": false, "error": "not UTF-8"}),
                },
                Err(error) => json!({"ok": false, "error": error}),
            };
            client.answer = format!("{answer}\n").into_bytes();
            client.send()?;
            let now = Instant::now();
            client.active = now;
            client.deadline = now + if client.answer.is_empty() { REQUEST_TIME } else { ANSWER_TIME };
        }
        Ok(())
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
    use std::io::Write;

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

    /// A server for a VM with no devices, at a fresh path.
    fn server(test: &str) -> (ApiServer, PathBuf) {
        let path = directory(test).join("api.sock");
        let listener = ApiListener::bind(&path).unwrap();
        (listener.serve(DriverControl::new(Vec::new(), Vec::new()), Vec::new()).unwrap(), path)
    }

    /// Sends `request` on `client` and reads one answer line.
    fn ask(client: &mut UnixStream, request: &[u8]) -> Value {
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.write_all(request).unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8];
        while client.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            answer.push(byte[0]);
        }
        serde_json::from_slice(&answer).unwrap()
    }

    /// Whether the server has let `client` go (end of file, or a reset when the client's
    /// last bytes were left unread).
    fn hung_up(client: &mut UnixStream) -> bool {
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match client.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    #[test]
    fn clients_that_idle_or_trickle_hold_up_nobody() {
        let (server, path) = server("side-by-side");
        // More idle clients than there is room for, and one trickling a request.
        let idle: Vec<_> = (0..MAX_CLIENTS + 4).map(|_| UnixStream::connect(&path).unwrap()).collect();
        let mut trickler = UnixStream::connect(&path).unwrap();
        trickler.write_all(b"{\"op\":").unwrap();
        let asked = Instant::now();
        let mut client = UnixStream::connect(&path).unwrap();
        assert_eq!(ask(&mut client, b"{\"op\":\"list\"}\n"), json!({"ok": true, "devices": []}));
        // One at a time, as before, each idle client ahead would have held it for seconds.
        assert!(asked.elapsed() < Duration::from_secs(1), "answered after {:?}", asked.elapsed());
        // The newcomers took the places of the clients idle longest: the first is gone,
        // the newest is served.
        let mut first = idle.into_iter().next().unwrap();
        assert!(hung_up(&mut first));
        let mut newest = UnixStream::connect(&path).unwrap();
        assert_eq!(ask(&mut newest, b"{\"op\":\"list\"}\n")["ok"], true);
        // The client served first goes on being served.
        assert_eq!(ask(&mut client, b"{\"op\":\"list\"}\n")["ok"], true);
        drop(server);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn bad_requests_get_an_answer_and_the_client_goes_on() {
        let (server, path) = server("bad-requests");
        let mut client = UnixStream::connect(&path).unwrap();
        let error = |answer: Value| answer["error"].as_str().unwrap().to_string();
        assert_eq!(error(ask(&mut client, b"\xff\xfe\n")), "not UTF-8");
        assert!(error(ask(&mut client, b"{\n")).starts_with("not JSON"));
        assert_eq!(error(ask(&mut client, b"{\"op\":\"restart\"}\n")), "no \"device\"");
        assert!(error(ask(&mut client, b"{\"op\":\"fail\",\"device\":\"disk9\"}\n")).contains("disk9"));
        // Two requests in one write are answered in turn.
        client.write_all(b"{\"op\":\"list\"}\n").unwrap();
        assert_eq!(ask(&mut client, b"{\"op\":\"list\"}\n")["ok"], true);
        assert_eq!(ask(&mut client, b"")["ok"], true);
        // A line too long is refused, and then the client is let go.
        let long = vec![b' '; MAX_LINE as usize + 10];
        assert_eq!(error(ask(&mut client, &long)), format!("request longer than {MAX_LINE} bytes"));
        assert!(hung_up(&mut client));
        // A last request ended by hanging up rather than a newline is answered.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"{\"op\":\"list\"}").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(ask(&mut client, b"")["ok"], true);
        drop(server);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_path_with_no_file_name_is_refused() {
        let error = ApiListener::bind(Path::new("/")).err().unwrap();
        assert!(error.to_string().contains("not a path to a file"), "{error}");
    }
}
