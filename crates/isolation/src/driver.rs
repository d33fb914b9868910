//! The driver partition program: `splitvisor-driver`.
//!
//! Started by hand, it is a vhost-user-blk backend for any frontend (splitvisor, QEMU):
//!
//! ```text
//! splitvisor-driver blk --socket PATH --disk IMAGE [--read-only] [--serial ID] [--queues N]
//!                       [--cache writeback|none] [--io-engine auto|io-uring|threads] [--no-sandbox]
//! splitvisor-driver net --socket PATH --tap NAME [--mac MAC] [--mtu N] [--no-sandbox]
//! ```
//!
//! It opens (and locks) the image, listens on PATH (refusing to replace anything but a stale
//! socket nobody listens on), sandboxes itself, prints one line when it is ready, and then
//! serves one frontend at a time: another frontend that connects meanwhile is refused,
//! and once the frontend leaves (dropping every mapping of its memory) the next one is
//! served. It ends, with status 1 and the cause, if the host refuses what a frontend's
//! queue needs (a thread, a descriptor). The process started keeps PATH: it removes the
//! socket when the driver is stopped (SIGINT, SIGTERM, SIGHUP) or ends, if the file there
//! is still the socket it bound.
//!
//! Spawned by splitvisor, it gets its resources as inherited fds instead, sandboxes itself
//! before touching guest data, and serves the one connection it was given:
//!
//! ```text
//! splitvisor-driver blk --fd 3 --disk-fd 4 [--read-only] [--serial ID] [--queues N]
//! splitvisor-driver net --fd 3 --tap-fd 4 --mac MAC [--mtu N]
//! splitvisor-driver serial --fd 3 [--irq-fd 4]
//! splitvisor-driver i8042 --fd 3
//! splitvisor-driver acpi-power --fd 3
//! ```

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use splitvisor_devices::virtio::block::{self, DiskImage};
use splitvisor_devices::virtio::block_io::EngineKind;

use splitvisor_devices::virtio::net::{self as virtio_net, NetParams};
use splitvisor_devices::virtio::tap::{Tap, TapError};

use crate::backend::blk::BlockDevice;
use crate::backend::net::NetDevice;
use crate::backend::{self, FaultPlan, VhostUserDevice};
use crate::sandbox::{self, Profile, SandboxConfig};

mod keeper;

/// Errors of the driver program.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] splitvisor_devices::virtio::block::BlockError),
    /// The socket path cannot be used.
    #[error("{path}: {why}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] backend::BackendError),
    /// The proxy connection failed.
    #[error("proxy: {0}")]
    Proxy(String),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// A splitvisor device driver in a process of its own: a disk or a NIC over vhost-user (for
/// splitvisor, QEMU or any vhost-user frontend), or a console or an i8042 for a splitvisor
/// hypervisor.
#[derive(Debug, Parser)]
#[command(name = "splitvisor-driver", version)]
pub struct DriverArgs {
    /// The device to serve.
    #[command(subcommand)]
    pub device: DeviceArgs,
}

/// The devices a driver partition serves.
#[derive(Debug, Subcommand)]
pub enum DeviceArgs {
    /// A virtio-blk disk over vhost-user.
    Blk(BlkArgs),
    /// A virtio-net device over vhost-user, on a TAP interface.
    Net(NetArgs),
    /// The 8250 UART behind the proxy protocol (started by splitvisor).
    Serial(ProxyArgs),
    /// The i8042 behind the proxy protocol (started by splitvisor).
    I8042(ProxyArgs),
    /// The ACPI power registers behind the proxy protocol (started by splitvisor).
    AcpiPower(ProxyArgs),
}

/// `splitvisor-driver blk`.
#[derive(Debug, Args)]
pub struct BlkArgs {
    /// Listen for vhost-user frontends on this unix socket. An existing path is replaced only
    /// if it is a socket nobody listens on.
    #[arg(long, value_name = "PATH", required_unless_present = "fd", conflicts_with = "fd")]
    pub socket: Option<PathBuf>,
    /// The raw disk image (locked: no second writer, here or in QEMU).
    #[arg(long, value_name = "IMAGE", required_unless_present = "disk_fd", conflicts_with = "disk_fd")]
    pub disk: Option<PathBuf>,
    /// Refuse the guest's writes (the image is opened read-only).
    #[arg(long)]
    pub read_only: bool,
    /// The ID the guest reads (virtio-blk GET_ID, up to 20 bytes); by default one derived
    /// from the image's identity, the same whichever splitvisor placement serves it.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,
    /// Request queues offered (VIRTIO_BLK_F_MQ above 1), each served on its own thread.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=block::MAX_QUEUES as i64))]
    pub queues: u16,
    /// How data reaches the image: `writeback` (the host's page cache) or `none`
    /// (O_DIRECT). An inherited image fd keeps the mode it was opened with.
    #[arg(long, value_name = "MODE", default_value = "writeback", conflicts_with = "disk_fd")]
    pub cache: block::CacheMode,
    /// The I/O engine: `auto` (io_uring where the kernel has it, else a thread pool),
    /// `io-uring` or `threads`.
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub io_engine: EngineKind,
    /// Do not sandbox this process (for debugging only).
    #[arg(long)]
    pub no_sandbox: bool,
    /// Inject a fault, for demonstrations and tests: `crash-after=N` or `hang-after=N`
    /// requests.
    #[arg(long, value_name = "FAULT", value_parser = parse_fault)]
    pub inject_fault: Option<String>,
    /// Serve the vhost-user connection on this inherited fd (splitvisor's spawned partitions).
    #[arg(long, value_name = "N", hide = true, requires = "disk_fd")]
    pub fd: Option<i32>,
    /// The inherited fd of the open image (splitvisor's spawned partitions).
    #[arg(long, value_name = "N", hide = true)]
    pub disk_fd: Option<i32>,
    /// The guest's RAM size in bytes: the partition maps all of it, and its address-space
    /// limit is sized from it (splitvisor's spawned partitions).
    #[arg(long, value_name = "BYTES", hide = true)]
    pub guest_ram: Option<u64>,
    /// Where to say that the sandbox is in place (splitvisor's spawned partitions).
    #[arg(long, value_name = "N", hide = true)]
    pub ready_fd: Option<i32>,
    /// Where to say why the partition ends, if it ends on an error (splitvisor's spawned
    /// partitions: the hypervisor reads it once the process has ended).
    #[arg(long, value_name = "N", hide = true)]
    pub report_fd: Option<i32>,
    /// Test hook: when the first request arrives, try this forbidden operation (the sandbox
    /// must kill the process). Only in builds with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "WHAT", hide = true)]
    pub test_attempt: Option<crate::sandbox::testing::Forbidden>,
    /// Test hook: move data on an engine that completes one transfer every MS
    /// milliseconds, the last pushed first. Only in builds with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "MS", hide = true)]
    pub test_slow_reversed_io: Option<u64>,
}

fn parse_engine(text: &str) -> Result<EngineKind, String> {
    match text {
        "auto" => Ok(EngineKind::Auto),
        "io-uring" => Ok(EngineKind::IoUring),
        "threads" => Ok(EngineKind::Threads),
        other => Err(format!("{other}: use auto, io-uring or threads")),
    }
}

/// `splitvisor-driver net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// Listen for vhost-user frontends on this unix socket. An existing path is replaced only
    /// if it is a socket nobody listens on.
    #[arg(long, value_name = "PATH", required_unless_present = "fd", conflicts_with = "fd")]
    pub socket: Option<PathBuf>,
    /// The TAP interface to open (created if this process may and it does not exist).
    #[arg(long, value_name = "NAME", required_unless_present = "tap_fd", conflicts_with = "tap_fd")]
    pub tap: Option<String>,
    /// An inherited fd of an open TAP (opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
    #[arg(long, value_name = "N")]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address (default: one derived from the interface name).
    #[arg(long, value_name = "MAC", value_parser = virtio_net::parse_mac)]
    pub mac: Option<[u8; 6]>,
    /// The guest's MTU.
    #[arg(long, value_name = "BYTES", default_value_t = virtio_net::DEFAULT_MTU,
          value_parser = clap::value_parser!(u16).range(68..=65_000))]
    pub mtu: u16,
    /// Do not sandbox this process (for debugging only).
    #[arg(long)]
    pub no_sandbox: bool,
    /// Inject a fault, for demonstrations and tests: `crash-after=N` or `hang-after=N`
    /// frames.
    #[arg(long, value_name = "FAULT", value_parser = parse_fault)]
    pub inject_fault: Option<String>,
    /// Serve the vhost-user connection on this inherited fd (splitvisor's spawned partitions).
    #[arg(long, value_name = "N", hide = true, requires = "tap_fd")]
    pub fd: Option<i32>,
    /// The guest's RAM size in bytes (splitvisor's spawned partitions).
    #[arg(long, value_name = "BYTES", hide = true)]
    pub guest_ram: Option<u64>,
    /// Where to say that the sandbox is in place (splitvisor's spawned partitions).
    #[arg(long, value_name = "N", hide = true)]
    pub ready_fd: Option<i32>,
    /// Where to say why the partition ends, if it ends on an error (splitvisor's spawned
    /// partitions: the hypervisor reads it once the process has ended).
    #[arg(long, value_name = "N", hide = true)]
    pub report_fd: Option<i32>,
}

/// The default MAC of a network device on the TAP `name`: stable for the name.
pub fn default_mac_for(name: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    virtio_net::default_mac(hash)
}

fn parse_fault(text: &str) -> Result<String, String> {
    FaultPlan::parse(text).map(|_| text.to_string())
}

/// `splitvisor-driver serial` / `i8042`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The connected proxy socket, inherited.
    #[arg(long, value_name = "N")]
    pub fd: i32,
    /// The shared page of the proxy connection (a memfd), inherited.
    #[arg(long, value_name = "N")]
    pub page_fd: i32,
    /// The eventfd that wakes this partition (the hypervisor published a request).
    #[arg(long, value_name = "N")]
    pub doorbell_fd: i32,
    /// The eventfd that wakes the hypervisor (the partition published an answer).
    #[arg(long, value_name = "N")]
    pub hypervisor_doorbell_fd: i32,
    /// The interrupt's eventfd (an irqfd), inherited.
    #[arg(long, value_name = "N")]
    pub irq_fd: Option<i32>,
    /// Where to say that the sandbox is in place.
    #[arg(long, value_name = "N")]
    pub ready_fd: Option<i32>,
    /// Where to say why the partition ends, if it ends on an error.
    #[arg(long, value_name = "N")]
    pub report_fd: Option<i32>,
    /// Test hook: once sandboxed, try this forbidden operation (the sandbox must kill the
    /// process). Only in builds with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "WHAT", hide = true)]
    pub test_attempt: Option<crate::sandbox::testing::Forbidden>,
}

/// The argument forms the spawner passes ([`crate::partition`]: inherited fds, and the
/// options it sets), parsed without clap: building clap's command tree touches much of its
/// code, and every code page a partition touches stays in its resident set. Returns `None`
/// for anything else (a flag the spawner never passes, a test hook, a value out of range,
/// `--help`), which clap then parses (and reports, if wrong): the result is the same as
/// clap's for every form this accepts (a test checks).
fn parse_spawned(args: &[std::ffi::OsString]) -> Option<DriverArgs> {
    let words: Vec<&str> = args.iter().skip(1).map(|a| a.to_str()).collect::<Option<_>>()?;
    let (device, rest) = words.split_first()?;
    let mut read_only = false;
    let mut values: Vec<(&str, &str)> = Vec::new();
    let mut rest = rest.iter();
    while let Some(&flag) = rest.next() {
        if flag == "--read-only" && *device == "blk" && !read_only {
            read_only = true;
            continue;
        }
        let value = *rest.next()?;
        if !flag.starts_with("--") || value.starts_with('-') || values.iter().any(|(f, _)| *f == flag) {
            return None;
        }
        values.push((flag, value));
    }
    let allowed: &[&str] = match *device {
        "serial" | "i8042" | "acpi-power" => &[
            "--fd",
            "--page-fd",
            "--doorbell-fd",
            "--hypervisor-doorbell-fd",
            "--irq-fd",
            "--ready-fd",
            "--report-fd",
        ],
        "blk" => &[
            "--fd",
            "--disk-fd",
            "--serial",
            "--inject-fault",
            "--guest-ram",
            "--queues",
            "--ready-fd",
            "--report-fd",
        ],
        "net" => &[
            "--fd",
            "--tap-fd",
            "--mac",
            "--mtu",
            "--inject-fault",
            "--guest-ram",
            "--ready-fd",
            "--report-fd",
        ],
        _ => return None,
    };
    if values.iter().any(|(flag, _)| !allowed.contains(flag)) {
        return None;
    }
    let text = |flag: &str| values.iter().find(|(f, _)| *f == flag).map(|(_, v)| *v);
    // Absent: Some(None); present and valid: Some(Some(n)); invalid: None.
    fn number<T: std::str::FromStr>(text: Option<&str>) -> Option<Option<T>> {
        match text {
            None => Some(None),
            Some(text) => text.parse().ok().map(Some),
        }
    }
    let fault = match text("--inject-fault") {
        Some(fault) => Some(parse_fault(fault).ok()?),
        None => None,
    };
    let device = match *device {
        "blk" => {
            let queues = number::<u16>(text("--queues"))?.unwrap_or(1);
            if !(1..=block::MAX_QUEUES).contains(&queues) {
                return None;
            }
            DeviceArgs::Blk(BlkArgs {
                socket: None,
                disk: None,
                read_only,
                serial: text("--serial").map(str::to_string),
                queues,
                cache: block::CacheMode::default(),
                io_engine: EngineKind::Auto,
                no_sandbox: false,
                inject_fault: fault,
                fd: Some(number(text("--fd"))??),
                disk_fd: Some(number(text("--disk-fd"))??),
                guest_ram: number(text("--guest-ram"))?,
                ready_fd: number(text("--ready-fd"))?,
                report_fd: number(text("--report-fd"))?,
                #[cfg(feature = "test-hooks")]
                test_attempt: None,
                #[cfg(feature = "test-hooks")]
                test_slow_reversed_io: None,
            })
        }
        "net" => {
            let mtu = number::<u16>(text("--mtu"))?.unwrap_or(virtio_net::DEFAULT_MTU);
            if !(68..=65_000).contains(&mtu) {
                return None;
            }
            let mac = match text("--mac") {
                Some(mac) => Some(virtio_net::parse_mac(mac).ok()?),
                None => None,
            };
            DeviceArgs::Net(NetArgs {
                socket: None,
                tap: None,
                tap_fd: Some(number(text("--tap-fd"))??),
                mac,
                mtu,
                no_sandbox: false,
                inject_fault: fault,
                fd: Some(number(text("--fd"))??),
                guest_ram: number(text("--guest-ram"))?,
                ready_fd: number(text("--ready-fd"))?,
                report_fd: number(text("--report-fd"))?,
            })
        }
        proxy => {
            let args = ProxyArgs {
                fd: number(text("--fd"))??,
                page_fd: number(text("--page-fd"))??,
                doorbell_fd: number(text("--doorbell-fd"))??,
                hypervisor_doorbell_fd: number(text("--hypervisor-doorbell-fd"))??,
                irq_fd: number(text("--irq-fd"))?,
                ready_fd: number(text("--ready-fd"))?,
                report_fd: number(text("--report-fd"))?,
                #[cfg(feature = "test-hooks")]
                test_attempt: None,
            };
            match proxy {
                "serial" => DeviceArgs::Serial(args),
                "i8042" => DeviceArgs::I8042(args),
                _ => DeviceArgs::AcpiPower(args),
            }
        }
    };
    Some(DriverArgs { device })
}

/// The program: parses `args` (argv\[0\] included), serves, and returns the exit status
/// (0 served until the frontend left, 2 bad arguments or setup, 1 a failure while serving).
/// `program` names it in messages.
pub fn main<I, T>(program: &str, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let parsed = match parse_spawned(&args) {
        Some(args) => Ok(args),
        None => DriverArgs::try_parse_from(args),
    };
    let args = match parsed {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Nothing given: what to give, not clap's whole help.
            eprintln!("{program}: nothing to do. {} (see --help)", DriverArgs::command().render_usage());
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line: clap's first paragraph (a list of missing arguments follows its
            // line), joined.
            let rendered = e.render().to_string();
            let first: Vec<&str> =
                rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
            eprintln!("{program}: {} (see --help)", first.join(" "));
            return ExitCode::from(2);
        }
    };
    let report = args.device.report_fd().map(|fd| {
        // SAFETY: the spawner handed this fd over to this process for this one use.
        unsafe { File::from_raw_fd(fd) }
    });
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e}");
            if let Some(mut report) = report {
                let _ = report.write_all(cause_report(&e.to_string()));
            }
            ExitCode::from(match e {
                DriverError::Serve(_) | DriverError::Proxy(_) => 1,
                _ => 2,
            })
        }
    }
}

/// The longest cause a partition reports (less than PIPE_BUF: written at once, and into a
/// pipe that holds at least a page, never blocking).
pub const MAX_CAUSE_BYTES: usize = 512;

/// `cause`, cut to at most [`MAX_CAUSE_BYTES`] on a character boundary.
fn cause_report(cause: &str) -> &[u8] {
    let mut end = cause.len().min(MAX_CAUSE_BYTES);
    while !cause.is_char_boundary(end) {
        end -= 1;
    }
    &cause.as_bytes()[..end]
}

impl DeviceArgs {
    /// Where a spawned partition (one serving an inherited connection) says why it ends
    /// (`--report-fd`); nowhere for a driver started by hand.
    pub fn report_fd(&self) -> Option<i32> {
        match self {
            Self::Blk(blk) => blk.report_fd.filter(|_| blk.fd.is_some()),
            Self::Net(net) => net.report_fd.filter(|_| net.fd.is_some()),
            Self::Serial(proxy) | Self::I8042(proxy) | Self::AcpiPower(proxy) => proxy.report_fd,
        }
    }
}

/// Serves what `args` say.
pub fn run(args: DriverArgs) -> Result<(), DriverError> {
    match args.device {
        DeviceArgs::Blk(blk) => run_blk(blk),
        DeviceArgs::Net(net) => run_net(net),
        DeviceArgs::Serial(proxy) => run_proxy("serial", proxy),
        DeviceArgs::I8042(proxy) => run_proxy("i8042", proxy),
        DeviceArgs::AcpiPower(proxy) => run_proxy("acpi-power", proxy),
    }
}

/// The default GET_ID of a disk: derived from the image's identity (device and inode), so
/// that a disk keeps its ID whichever placement serves it, and two disks never share one.
pub fn default_serial(image: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = image.metadata().map(|m| (m.dev(), m.ino())).unwrap_or_default();
    // FNV-1a: a stable hash without a dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dev.to_le_bytes().iter().chain(ino.to_le_bytes().iter()) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("splitvisor-{:08x}", (hash >> 32) as u32 ^ hash as u32)
}

/// Where a block driver's resources come from.
#[derive(Debug, PartialEq, Eq)]
pub enum BlkSource {
    /// Started by hand: a socket to listen on and an image to open.
    Paths {
        /// The socket.
        socket: PathBuf,
        /// The image.
        disk: PathBuf,
    },
    /// Spawned by splitvisor: a connection and an open image.
    Fds {
        /// The connection.
        fd: i32,
        /// The image.
        disk_fd: i32,
    },
}

impl BlkArgs {
    /// The resources, if the arguments name one consistent set.
    pub fn source(&self) -> Result<BlkSource, DriverError> {
        match (&self.socket, &self.disk, self.fd, self.disk_fd) {
            (Some(socket), Some(disk), None, None) => {
                Ok(BlkSource::Paths { socket: socket.clone(), disk: disk.clone() })
            }
            (None, None, Some(fd), Some(disk_fd)) => Ok(BlkSource::Fds { fd, disk_fd }),
            _ => Err(DriverError::Usage("give --socket and --disk, or --fd and --disk-fd".into())),
        }
    }
}

fn run_blk(args: BlkArgs) -> Result<(), DriverError> {
    let faults = Arc::new(match &args.inject_fault {
        Some(fault) => FaultPlan::parse(fault).map_err(DriverError::Usage)?,
        None => FaultPlan::none(),
    });
    match args.source()? {
        BlkSource::Paths { socket, disk } => {
            let (socket, disk) = (&socket, &disk);
            let image = DiskImage::open_with(disk, args.read_only, args.cache)?;
            let serial = args.serial.clone().unwrap_or_else(|| default_serial(image.file()));
            let sectors = image.sectors();
            let (listener, bound, blocked) = listen_kept(socket)?;
            let device =
                BlockDevice::new(image, &serial).with_queues(args.queues).with_engine(args.io_engine);
            #[cfg(feature = "test-hooks")]
            let device = device
                .with_slow_reversed_engine(args.test_slow_reversed_io.map(std::time::Duration::from_millis));
            let device = Arc::new(device);
            keep_socket(socket, bound, blocked)?;
            let keep = [listener.as_raw_fd(), device.image_fd()];
            sandbox::apply(&SandboxConfig::new(Profile::VhostUserBlk, &keep).enabled(!args.no_sandbox))?;
            let _ = writeln!(
                std::io::stdout(),
                "splitvisor-driver: serving {} ({} MiB, {}, serial {serial}) on {}{}",
                disk.display(),
                (sectors * block::SECTOR_SIZE) >> 20,
                if args.read_only { "read-only" } else { "read-write" },
                socket.display(),
                if args.no_sandbox { ", not sandboxed" } else { "" },
            );
            serve_listener(&listener, device, faults)
        }
        BlkSource::Fds { fd, disk_fd } => {
            // SAFETY: the spawner handed these fds over to this process alone.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            // SAFETY: as above.
            let file = unsafe { File::from_raw_fd(disk_fd) };
            // The hypervisor locked the image on this open file description before it
            // handed it over: the lock is ours already.
            let image = DiskImage::from_locked_file(file, args.read_only, format!("disk fd {disk_fd}"))?;
            let serial = args.serial.clone().unwrap_or_else(|| default_serial(image.file()));
            let mut config =
                SandboxConfig::new(Profile::VhostUserBlk, &[fd, disk_fd]).enabled(!args.no_sandbox);
            if let Some(bytes) = args.guest_ram {
                config = config.guest_ram(bytes);
            }
            if let Some(ready) = args.ready_fd {
                config = config.ready_fd(ready);
            }
            if let Some(report) = args.report_fd {
                config = config.report_fd(report);
            }
            sandbox::apply(&config)?;
            let device =
                BlockDevice::new(image, &serial).with_queues(args.queues).with_engine(args.io_engine);
            #[cfg(feature = "test-hooks")]
            let device = device.with_attempt(args.test_attempt);
            backend::serve(stream, Arc::new(device), faults)?;
            Ok(())
        }
    }
}

fn run_net(args: NetArgs) -> Result<(), DriverError> {
    let faults = Arc::new(match &args.inject_fault {
        Some(fault) => FaultPlan::parse(fault).map_err(DriverError::Usage)?,
        None => FaultPlan::none(),
    });
    let tap = match (&args.tap, args.tap_fd) {
        (Some(name), None) => Tap::open(name)?,
        // SAFETY: the fd was handed to this process for this purpose alone.
        (None, Some(fd)) => Tap::from_fd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })?,
        _ => return Err(DriverError::Usage("give --tap or --tap-fd".into())),
    };
    let mac = args.mac.unwrap_or_else(|| default_mac_for(tap.name()));
    let params = NetParams { mac, mtu: args.mtu };
    let tap_name = tap.name().to_string();
    let device = Arc::new(NetDevice::new(params, Arc::new(tap)));
    match (&args.socket, args.fd) {
        (Some(socket), None) => {
            let (listener, bound, blocked) = listen_kept(socket)?;
            keep_socket(socket, bound, blocked)?;
            let keep = [listener.as_raw_fd(), device.backend_fd()];
            sandbox::apply(&SandboxConfig::new(Profile::VhostUserNet, &keep).enabled(!args.no_sandbox))?;
            let _ = writeln!(
                std::io::stdout(),
                "splitvisor-driver: serving TAP {tap_name} (mac {}, mtu {}) on {}{}",
                virtio_net::format_mac(&mac),
                args.mtu,
                socket.display(),
                if args.no_sandbox { ", not sandboxed" } else { "" },
            );
            serve_listener(&listener, device, faults)
        }
        (None, Some(fd)) => {
            // SAFETY: the spawner handed this fd over to this process alone.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            let mut config = SandboxConfig::new(Profile::VhostUserNet, &[fd, device.backend_fd()])
                .enabled(!args.no_sandbox);
            if let Some(bytes) = args.guest_ram {
                config = config.guest_ram(bytes);
            }
            if let Some(ready) = args.ready_fd {
                config = config.ready_fd(ready);
            }
            if let Some(report) = args.report_fd {
                config = config.report_fd(report);
            }
            sandbox::apply(&config)?;
            backend::serve(stream, device, faults)?;
            Ok(())
        }
        _ => Err(DriverError::Usage("give --socket or --fd".into())),
    }
}

/// Binds `path`, replacing only a stale socket (one nobody listens on).
fn listen(path: &Path) -> Result<UnixListener, DriverError> {
    let error = |why: String| DriverError::Socket { path: path.to_path_buf(), why };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(error("exists and is not a socket; refusing to replace it".into()));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(error("another backend is listening on this socket".into())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                log::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| error(format!("cannot remove the stale socket: {e}")))?;
            }
            Err(e) => return Err(error(format!("cannot tell whether the socket is in use: {e}"))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e.to_string())),
    }
    UnixListener::bind(path).map_err(|e| error(format!("cannot listen: {e}")))
}

/// [`listen`], with the stop signals blocked first (a driver started by hand removes its
/// socket when it stops: [`keeper`]); returns the listener, what identifies the socket and
/// the signal mask to restore in the process that serves.
fn listen_kept(
    path: &Path,
) -> Result<(UnixListener, keeper::BoundSocket, keeper::StopSignalsBlocked), DriverError> {
    let error = |why: String| DriverError::Socket { path: path.to_path_buf(), why };
    let blocked =
        keeper::block_stop_signals().map_err(|e| error(format!("cannot block stop signals: {e}")))?;
    let listener = listen(path)?;
    match keeper::BoundSocket::at(path) {
        Ok(bound) => Ok((listener, bound, blocked)),
        Err(e) => {
            drop(listener);
            let _ = std::fs::remove_file(path);
            Err(error(format!("cannot tell the socket just bound: {e}")))
        }
    }
}

/// Forks the keeper of the socket `path` ([`keeper::keep_socket`]); returns in the process
/// that goes on to serve.
fn keep_socket(
    path: &Path,
    bound: keeper::BoundSocket,
    blocked: keeper::StopSignalsBlocked,
) -> Result<(), DriverError> {
    keeper::keep_socket(bound, blocked).map_err(|e| DriverError::Socket {
        path: path.to_path_buf(),
        why: format!("cannot start the process that keeps it: {e}"),
    })
}

/// Serves one frontend at a time until the host refuses what a frontend's queue needs
/// (the next frontend would meet the same refusal: the driver ends with that cause, and
/// whoever runs it decides whether to start it again).
fn serve_listener<D: VhostUserDevice>(
    listener: &UnixListener,
    device: Arc<D>,
    faults: Arc<FaultPlan>,
) -> Result<(), DriverError> {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DriverError::Serve(backend::BackendError::Socket(e))),
        };
        log::info!("vhost-user: frontend connected");
        match backend::serve_refusing_others(stream, device.clone(), faults.clone(), Some(listener)) {
            Ok(()) => log::info!("vhost-user: frontend left; waiting for the next one"),
            Err(e @ backend::BackendError::QueueStart { .. }) => return Err(DriverError::Serve(e)),
            Err(e) => log::warn!("vhost-user: frontend dropped: {e}; waiting for the next one"),
        }
    }
}

/// Serves a plain bus device over the proxy protocol, sandboxed.
fn run_proxy(device: &str, args: ProxyArgs) -> Result<(), DriverError> {
    use splitvisor_bus::{CountingInterrupt, EventFdInterrupt, Interrupt};
    use splitvisor_devices::i8042::I8042;
    use vmm_sys_util::eventfd::EventFd;

    use crate::proxy::{self, Effects, NoInput, ProxiedPower, ProxiedSerial};

    // SAFETY: the spawner handed these fds over to this process alone.
    let stream = unsafe { UnixStream::from_raw_fd(args.fd) };
    // SAFETY: as above.
    let page = unsafe { std::os::fd::OwnedFd::from_raw_fd(args.page_fd) };
    // SAFETY: as above.
    let doorbell = unsafe { EventFd::from_raw_fd(args.doorbell_fd) };
    // SAFETY: as above.
    let hypervisor_doorbell = unsafe { EventFd::from_raw_fd(args.hypervisor_doorbell_fd) };
    // Mapped before the sandbox; the page's fd itself is not kept.
    let mut end =
        proxy::PartitionEnd::new(stream, std::os::fd::AsFd::as_fd(&page), doorbell, hypervisor_doorbell)
            .map_err(|e| DriverError::Proxy(format!("cannot map the proxy page: {e}")))?;
    drop(page);
    let interrupt: Arc<dyn Interrupt> = match args.irq_fd {
        // SAFETY: as above.
        Some(fd) => Arc::new(EventFdInterrupt::from_eventfd(unsafe { EventFd::from_raw_fd(fd) })),
        None => Arc::new(CountingInterrupt::new()),
    };
    let keep: Vec<i32> =
        [Some(args.fd), Some(args.doorbell_fd), Some(args.hypervisor_doorbell_fd), args.irq_fd]
            .into_iter()
            .flatten()
            .collect();
    let mut config = SandboxConfig::new(Profile::BusProxy, &keep);
    if let Some(ready) = args.ready_fd {
        config = config.ready_fd(ready);
    }
    if let Some(report) = args.report_fd {
        config = config.report_fd(report);
    }
    #[cfg(feature = "test-hooks")]
    sandbox::testing::delay_before_sandbox();
    sandbox::apply(&config)?;
    #[cfg(feature = "test-hooks")]
    if let Some(what) = &args.test_attempt {
        sandbox::testing::attempt_and_exit(what);
    }
    let effects = Effects::default();
    let result = match device {
        "serial" => proxy::serve(&mut ProxiedSerial::new(interrupt, &effects), &effects, &mut end),
        "acpi-power" => proxy::serve(&mut ProxiedPower::new(&effects), &effects, &mut end),
        _ => proxy::serve(&mut NoInput(I8042::new(effects.reset_line())), &effects, &mut end),
    };
    result.map_err(|e| DriverError::Proxy(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DriverArgs, clap::Error> {
        DriverArgs::try_parse_from(std::iter::once("splitvisor-driver").chain(text.split_whitespace()))
    }

    #[test]
    fn blk_arguments_parse() {
        let DeviceArgs::Blk(blk) = parse("blk --socket /tmp/s --disk a.img --read-only").unwrap().device
        else {
            panic!("not blk");
        };
        assert_eq!((blk.socket.unwrap(), blk.disk.unwrap()), ("/tmp/s".into(), "a.img".into()));
        assert!(blk.read_only);
        let DeviceArgs::Blk(blk) = parse("blk --fd 3 --disk-fd 4").unwrap().device else { panic!("not blk") };
        assert_eq!((blk.fd, blk.disk_fd), (Some(3), Some(4)));
        let DeviceArgs::Blk(mixed) = parse("blk --fd 3 --disk a.img").unwrap().device else {
            panic!("not blk")
        };
        assert!(mixed.source().is_err());
        assert!(parse("net --socket x").is_err(), "no TAP");
        assert!(parse("net --socket x --tap t0 --tap-fd 4").is_err());
        assert!(parse("net --socket x --tap t0 --mac 01:00:00:00:00:01").is_err(), "multicast MAC");
        assert!(parse("net --socket x --tap t0 --mtu 20").is_err());
        let DeviceArgs::Net(net) = parse("net --socket x --tap t0 --mac 52:54:00:aa:bb:cc").unwrap().device
        else {
            panic!("not net")
        };
        assert_eq!(
            (net.tap.as_deref(), net.mac, net.mtu),
            (Some("t0"), Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]), 1500)
        );
        let DeviceArgs::Net(net) = parse("net --fd 3 --tap-fd 4").unwrap().device else { panic!("not net") };
        assert_eq!((net.fd, net.tap_fd), (Some(3), Some(4)));
        assert!(matches!(
            parse("acpi-power --fd 3 --page-fd 4 --doorbell-fd 5 --hypervisor-doorbell-fd 6").unwrap().device,
            DeviceArgs::AcpiPower(_)
        ));
        assert!(parse("serial --fd 3").is_err(), "a proxy partition needs its page");
        assert!(parse("blk --disk a.img").is_err());
        assert!(parse("blk --socket").is_err());
        assert!(parse("blk --socket s --disk a.img --inject-fault explode=3").is_err());
        assert!(parse("").is_err());
    }

    fn words(args: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("splitvisor-driver").chain(args.iter().copied()).map(Into::into).collect()
    }

    #[test]
    fn the_spawners_forms_parse_without_clap_as_clap_parses_them() {
        let proxy = ["--fd", "3", "--page-fd", "4", "--doorbell-fd", "5", "--hypervisor-doorbell-fd", "6"];
        let mut forms: Vec<Vec<&str>> = Vec::new();
        for device in ["serial", "i8042", "acpi-power"] {
            forms.push([&[device][..], &proxy, &["--ready-fd", "7"]].concat());
            forms.push(
                [&[device][..], &proxy, &["--irq-fd", "7", "--ready-fd", "8", "--report-fd", "9"]].concat(),
            );
        }
        forms.push(vec!["blk", "--fd", "3", "--disk-fd", "4", "--serial", "", "--ready-fd", "5"]);
        forms.push(vec![
            "blk",
            "--fd",
            "3",
            "--disk-fd",
            "4",
            "--serial",
            "splitvisor-0123abcd",
            "--read-only",
            "--inject-fault",
            "crash-after=3",
            "--guest-ram",
            "134217728",
            "--queues",
            "2",
            "--ready-fd",
            "5",
            "--report-fd",
            "6",
        ]);
        forms.push(vec![
            "net",
            "--fd",
            "3",
            "--tap-fd",
            "4",
            "--mac",
            "52:54:00:12:34:56",
            "--mtu",
            "1500",
            "--inject-fault",
            "hang-after=2",
            "--guest-ram",
            "1048576",
            "--ready-fd",
            "5",
            "--report-fd",
            "6",
        ]);
        for form in forms {
            let args = words(&form);
            let fast = parse_spawned(&args).unwrap_or_else(|| panic!("not parsed without clap: {form:?}"));
            let clap = DriverArgs::try_parse_from(&args).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{clap:?}"), "{form:?}");
        }
        // Everything else is left to clap, which parses or reports it.
        for other in [
            "blk --socket s --disk d.img",
            "serial --fd 3",
            "serial --fd 3 --page-fd 4 --doorbell-fd 5 --hypervisor-doorbell-fd 6 --read-only",
            "serial --fd 3 --fd 4 --page-fd 4 --doorbell-fd 5 --hypervisor-doorbell-fd 6",
            "serial --fd x --page-fd 4 --doorbell-fd 5 --hypervisor-doorbell-fd 6",
            "blk --fd 3 --disk-fd 4 --queues 0",
            "blk --fd 3 --disk-fd 4 --serial -x",
            "blk --fd 3 --disk-fd 4 --inject-fault explode=3",
            "blk --fd 3 --disk-fd 4 --cache none",
            "blk --fd 3 --disk-fd 4 --test-attempt socket",
            "net --fd 3 --tap-fd 4 --mtu 20",
            "net --fd 3 --tap-fd 4 --mac 01:00:00:00:00:01",
            "blk --help",
            "--version",
            "",
        ] {
            let args = words(&other.split_whitespace().collect::<Vec<_>>());
            assert!(parse_spawned(&args).is_none(), "{other}");
        }
    }

    #[test]
    fn a_cause_is_cut_on_a_character_boundary() {
        assert_eq!(cause_report("no thread"), b"no thread");
        let long = "é".repeat(MAX_CAUSE_BYTES);
        let cut = cause_report(&long);
        assert_eq!(cut.len(), MAX_CAUSE_BYTES);
        assert!(std::str::from_utf8(cut).is_ok());
        let odd = format!("x{long}");
        assert_eq!(cause_report(&odd).len(), MAX_CAUSE_BYTES - 1);
        // Only a spawned partition reports (a hand-started driver's fd would be closed by
        // its sandbox, and its number taken by another).
        assert_eq!(parse("blk --socket s --disk d.img --report-fd 3").unwrap().device.report_fd(), None);
        assert_eq!(parse("blk --fd 3 --disk-fd 4 --report-fd 5").unwrap().device.report_fd(), Some(5));
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for flags in ["--help", "-h", "--version", "blk --help"] {
            let error = parse(flags).unwrap_err();
            assert!(!error.use_stderr(), "{flags}");
        }
    }

    #[test]
    fn a_socket_path_that_is_not_a_socket_is_never_replaced() {
        let dir = std::env::temp_dir().join(format!("splitvisor-driver-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious.img");
        std::fs::write(&file, b"data").unwrap();
        assert!(listen(&file).unwrap_err().to_string().contains("not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        let socket = dir.join("live.sock");
        let live = UnixListener::bind(&socket).unwrap();
        assert!(listen(&socket).unwrap_err().to_string().contains("another backend"));
        drop(live); // now stale: replaced
        let _fresh = listen(&socket).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
