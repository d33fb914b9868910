//! The driver partition program: `splitvisor-driver`.
//!
//! ```text
//! splitvisor-driver blk --socket PATH --disk IMG[,ro]
//! ```
//! serves one vhost-user-blk connection on PATH (any vhost-user frontend: splitvisor,
//! QEMU), and exits when the frontend hangs up. Spawned by splitvisor it gets its resources
//! as fds instead, and sandboxes itself before serving:
//!
//! ```text
//! splitvisor-driver blk --listen-fd 3 --disk-fd 4 [--read-only] [--sectors N]
//! ```

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::DiskImage;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::backend::BlockBackend;

/// Errors of the driver program.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The command line is wrong.
    #[error("{0} (usage: splitvisor-driver blk --socket PATH --disk IMG[,ro])")]
    Usage(String),
    /// The disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] splitvisor_devices::virtio::block::BlockError),
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Where the listening socket and the disk come from.
#[derive(Debug, PartialEq, Eq)]
pub enum BlkSource {
    /// Started by hand: a socket path to listen on, an image path to open.
    Paths {
        /// The vhost-user socket.
        socket: PathBuf,
        /// The image.
        disk: PathBuf,
    },
    /// Spawned by splitvisor: inherited fds, and the sandbox.
    Fds {
        /// A listening unix socket.
        listen: i32,
        /// The open image.
        disk: i32,
    },
}

/// What to serve.
#[derive(Debug, PartialEq, Eq)]
pub struct BlkArgs {
    /// Resources.
    pub source: BlkSource,
    /// Refuse writes.
    pub read_only: bool,
    /// Test hook: after the sandbox is up, try to open this path (the sandbox must kill
    /// the process).
    pub escape: Option<PathBuf>,
}

/// Parses `blk --socket PATH --disk IMG[,ro]`.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<BlkArgs, DriverError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        Some("blk") => {}
        Some(other) => return Err(DriverError::Usage(format!("unknown device '{other}'"))),
        None => return Err(DriverError::Usage("no device given".into())),
    }
    let (mut socket, mut disk, mut listen_fd, mut disk_fd) = (None, None, None, None);
    let (mut read_only, mut escape) = (false, None);
    let fd = |value: String| {
        value.parse::<i32>().map_err(|_| DriverError::Usage(format!("'{value}' is not an fd")))
    };
    while let Some(flag) = args.next() {
        if flag == "--read-only" {
            read_only = true;
            continue;
        }
        let value = args.next().ok_or_else(|| DriverError::Usage(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--disk" => disk = Some(value),
            "--listen-fd" => listen_fd = Some(fd(value)?),
            "--disk-fd" => disk_fd = Some(fd(value)?),
            "--test-escape" => escape = Some(PathBuf::from(value)),
            _ => return Err(DriverError::Usage(format!("unknown option '{flag}'"))),
        }
    }
    let source = match (socket, disk, listen_fd, disk_fd) {
        (Some(socket), Some(disk), None, None) => {
            let (disk, ro) = match disk.strip_suffix(",ro") {
                Some(path) => (path.to_string(), true),
                None => (disk, false),
            };
            read_only |= ro;
            BlkSource::Paths { socket, disk: PathBuf::from(disk) }
        }
        (None, None, Some(listen), Some(disk)) => BlkSource::Fds { listen, disk },
        _ => return Err(DriverError::Usage("give --socket and --disk, or --listen-fd and --disk-fd".into())),
    };
    Ok(BlkArgs { source, read_only, escape })
}

/// Serves one vhost-user-blk frontend on `listener` until it hangs up.
pub fn serve_blk(listener: &mut Listener, backend: BlockBackend) -> Result<(), DriverError> {
    let backend = backend.shared();
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("splitvisor-blk".into(), backend, memory)
        .map_err(|e| DriverError::Daemon(e.to_string()))?;
    daemon.start(listener).map_err(|e| DriverError::Daemon(e.to_string()))?;
    let result = daemon.wait().map_err(|e| DriverError::Daemon(e.to_string()));
    log::info!("vhost-user-blk: frontend disconnected");
    result
}

/// A plain bus device served over the proxy protocol.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyArgs {
    /// `serial` or `i8042`.
    pub device: String,
    /// The connected proxy socket.
    pub fd: i32,
    /// The interrupt's eventfd (an irqfd), if the device has one.
    pub irq_fd: Option<i32>,
}

/// Parses `serial --fd N [--irq-fd M]` or `i8042 --fd N`.
pub fn parse_proxy_args<I: IntoIterator<Item = String>>(args: I) -> Result<ProxyArgs, DriverError> {
    let mut args = args.into_iter();
    let device = args.next().ok_or_else(|| DriverError::Usage("no device given".into()))?;
    let (mut fd, mut irq_fd) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| DriverError::Usage(format!("{flag} needs a value")))?;
        let number =
            value.parse::<i32>().map_err(|_| DriverError::Usage(format!("'{value}' is not an fd")))?;
        match flag.as_str() {
            "--fd" => fd = Some(number),
            "--irq-fd" => irq_fd = Some(number),
            _ => return Err(DriverError::Usage(format!("unknown option '{flag}'"))),
        }
    }
    let fd = fd.ok_or_else(|| DriverError::Usage("--fd is required".into()))?;
    Ok(ProxyArgs { device, fd, irq_fd })
}

/// Serves a plain bus device over the proxy protocol, sandboxed.
fn run_proxy(args: ProxyArgs) -> Result<(), DriverError> {
    use std::sync::Arc;

    use splitvisor_bus::{CountingInterrupt, EventFdInterrupt, Interrupt};
    use splitvisor_devices::{i8042::I8042, serial::Serial};
    use vmm_sys_util::eventfd::EventFd;

    use crate::proxy::{self, Effects, NoInput};

    // SAFETY: the spawner handed these fds over to this process alone.
    let mut stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(args.fd) };
    let interrupt: Arc<dyn Interrupt> = match args.irq_fd {
        // SAFETY: as above.
        Some(fd) => Arc::new(EventFdInterrupt::from_eventfd(unsafe { EventFd::from_raw_fd(fd) })),
        None => Arc::new(CountingInterrupt::new()),
    };
    let keep: Vec<i32> = [Some(args.fd), args.irq_fd].into_iter().flatten().collect();
    crate::sandbox::apply(&keep)?;
    let effects = Effects::default();
    let result = match args.device.as_str() {
        "serial" => proxy::serve(&mut Serial::new(interrupt, effects.writer()), &effects, &mut stream),
        "i8042" => proxy::serve(&mut NoInput(I8042::new(effects.reset_line())), &effects, &mut stream),
        other => return Err(DriverError::Usage(format!("unknown device '{other}'"))),
    };
    result.map_err(|e| DriverError::Daemon(e.to_string()))
}

/// The program: parses `args` (without argv\[0\]) and serves.
pub fn run<I: IntoIterator<Item = String>>(args: I) -> Result<(), DriverError> {
    let args: Vec<String> = args.into_iter().collect();
    if matches!(args.first().map(String::as_str), Some("serial" | "i8042")) {
        return run_proxy(parse_proxy_args(args)?);
    }
    let args = parse_args(args)?;
    match args.source {
        BlkSource::Paths { socket, disk } => {
            let image = DiskImage::open(&disk, args.read_only)?;
            let mut listener =
                Listener::new(&socket, true).map_err(|e| DriverError::Daemon(e.to_string()))?;
            serve_blk(&mut listener, BlockBackend::new(image, &format!("splitvisor-{}", disk.display())))
        }
        BlkSource::Fds { listen, disk } => {
            // SAFETY: the spawner handed this fd over to this process alone.
            let listener = unsafe { UnixListener::from_raw_fd(listen) };
            // SAFETY: as above.
            let file = unsafe { std::fs::File::from_raw_fd(disk) };
            let image = DiskImage::from_file(file, args.read_only, format!("disk fd {disk}"))?;
            crate::sandbox::apply(&[listen, disk])?;
            let mut listener = Listener::from(listener);
            serve_blk(
                &mut listener,
                BlockBackend::new(image, "splitvisor-partition")
                    .with_escape(args.escape)
                    .exit_on_broken_queue(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn blk_arguments_parse() {
        let parsed = parse_args(args("blk --socket /tmp/s --disk a.img,ro")).unwrap();
        assert_eq!(parsed.source, BlkSource::Paths { socket: "/tmp/s".into(), disk: "a.img".into() });
        assert!(parsed.read_only);
        let parsed = parse_args(args("blk --listen-fd 3 --disk-fd 4")).unwrap();
        assert_eq!(parsed.source, BlkSource::Fds { listen: 3, disk: 4 });
        assert!(!parsed.read_only);
        assert!(parse_args(args("blk --listen-fd 3 --disk a.img")).is_err());
        assert!(parse_args(args("net --socket x")).is_err());
        assert!(parse_args(args("blk --disk a.img")).is_err());
        assert!(parse_args(args("blk --socket")).is_err());
        assert!(parse_args(Vec::new()).is_err());
    }
}
