//! virtio-blk over a raw image (virtio 1.x, 5.2).
//!
//! [`Block`] is the configuration part: features and configuration space. When the driver
//! is ready it starts a [`BlockWorker`] thread per queue, which needs only guest memory, the
//! queue, the kick eventfd, the interrupt and the image. The worker and the vhost-user
//! backend of a driver partition share the request engine, [`BlockRequests`].
//!
//! # The request engine
//!
//! * **Many requests in flight, bounded.** Every request available at a kick is taken off
//!   the ring, its chain walked into a bounded list of buffers (at most the queue size for
//!   a direct chain, [`SEG_MAX`] + 2 for an indirect table) and parsed; its transfer goes
//!   to an I/O engine ([`super::block_io`]: io_uring, or a thread pool where io_uring is
//!   missing), all of them start with one submission (with cache=none, each as it is
//!   pushed: see [`super::block_io::Uring`]), and each request goes in the used
//!   ring as soon as its own transfer completed, in whatever order. At most
//!   [`MAX_IN_FLIGHT`] requests are in flight per queue, and their data in at most
//!   [`MAX_IOVECS`] memory pieces in all (a request that does not fit waits for the others).
//!   The engine holds no memory proportional to anything the guest controls, and allocates
//!   nothing per request. One call takes at most the queue size of chains, and says so
//!   ([`Processed::pending`]) when more are waiting; it returns only once nothing is in
//!   flight. [`BlockRequests::stats`] counts the work of the last call.
//! * **Indirect descriptors** are followed only when VIRTIO_F_INDIRECT_DESC was negotiated
//!   ([`BlockRequests::set_features`]), only at the head of a chain, never nested, and only
//!   for tables of a multiple of 16 bytes and at most [`MAX_CHAIN_SEGMENTS`] entries.
//! * **Byte offsets, not descriptors** (virtio 1.x 2.6.4): the 16-byte header is the first
//!   16 device-readable bytes, wherever the descriptors split them; the status is the last
//!   device-writable byte; an IN request's data is every device-writable byte before it (so
//!   data and status may share a descriptor), an OUT request's every device-readable byte
//!   after the header. The used length is what the device wrote: data and status.
//! * **Looking before sleeping.** The workers of both placements
//!   ([`BlockRequests::set_poll_limit`]) look at the available ring for a while after a
//!   batch, with the driver's notifications still suppressed, and the I/O engine looks at
//!   its completion ring before it sleeps; both windows adapt (doubled when the look found
//!   something, halved when not) and are bounded ([`POLL_LIMIT`],
//!   [`super::block_io::COMPLETION_POLL_LIMIT`]). A driver that keeps one request in flight
//!   then costs no kick and the worker no wake-up per request.
//! * **No copy**: data moves between the image and guest memory with one read or write
//!   (readv/writev on io_uring, `preadv`/`pwritev` in the pool) per request on iovecs of
//!   the guest buffers.
//! * **Durability**: a request is put in the used ring only after its data reached the
//!   image file (the page cache for writes, the device with cache=none); FLUSH waits for
//!   every request taken before it, then `fdatasync`s before its status is written, and a
//!   failing `fdatasync` answers IOERR.
//! * **The journal** ([`RequestJournal`]) hears `fetched` when a request leaves the
//!   available ring and `completing`/`completed` around its own entry in the used ring,
//!   one request at a time whatever the order of completion: a vhost-user backend's
//!   inflight region stays exact.
//!
//! ## Malformed chains
//! * A chain that cannot be walked to its end (a loop, too long, a `next` or head beyond the
//!   table, a descriptor outside guest memory, indirect descriptors not allowed as used, a
//!   device-readable buffer after a device-writable one) has no status byte we could trust:
//!   it is returned with used length 0 and nothing written.
//! * So is a chain without device-writable bytes, or whose last device-writable byte is
//!   outside guest memory or inside the queue's rings.
//! * Otherwise the status byte is written: IOERR for a header that is short or outside
//!   memory, data that is not a whole number of sectors, beyond [`MAX_REQUEST_BYTES`] or
//!   beyond the disk, a buffer outside guest memory (or wrapping around the address
//!   space), a device-writable buffer overlapping
//!   the descriptor table, the available ring or the used ring (the device never writes the
//!   driver's rings, which also keeps a chain from feeding the ring it is served from),
//!   more than [`MAX_IOVECS`] memory pieces, a buffer off the alignment O_DIRECT needs
//!   (cache=none), or a failed file operation; UNSUPP for an
//!   unknown request type.
//! * The used ring overlapping the descriptor table or the available ring, an available
//!   index more than the queue size ahead, or a head beyond the queue break the queue
//!   ([`QueueError`]): the device needs a reset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use splitvisor_bus::threads::{self, ThreadKind};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::block_io::{self, Completion, EngineKind, IoEngine, IoOp, MAX_IN_FLIGHT, Transfer};
use super::chain::{self, ChainLimits, Segment};
use super::{
    ActivateError, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, device_type, features,
    image_lock, ram,
};

/// Bytes per sector: the unit of `sector` and `capacity`, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues of one device (VIRTIO_BLK_F_MQ): bounded so that the threads a
/// guest's device costs are bounded too.
pub const MAX_QUEUES: u16 = 16;
/// Bytes of the configuration space (virtio_blk_config up to num_queues).
pub const CONFIG_SIZE: usize = 36;
/// Largest data segment the driver is told to use (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (`seg_max`: the queue size less header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most buffers in one chain (data, header and status), direct or indirect.
pub const MAX_CHAIN_SEGMENTS: u32 = SEG_MAX + 2;
/// Most data bytes of one request (`seg_max` segments of `size_max`).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most pieces of guest memory one request's data may be in (IOV_MAX): a buffer that spans
/// several memory regions is several pieces.
pub const MAX_IOVECS: usize = 1024;
/// Bytes of the device ID returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// Longest a queue's worker looks at the available ring for the driver's next request
/// after serving a batch ([`BlockRequests::set_poll_limit`]).
pub const POLL_LIMIT: Duration = Duration::from_micros(50);

/// virtio-blk feature bits.
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// More than one request queue (`num_queues` is valid).
    pub const MQ: u64 = 1 << 12;
}

/// Request types.
pub mod request_type {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make earlier writes durable.
    pub const FLUSH: u32 = 4;
    /// Read the device ID string.
    pub const GET_ID: u32 = 8;
}

/// Request status bytes.
pub mod request_status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
const HEADER_SIZE: u64 = 16;

/// Errors opening a disk image. Each names the image (its path, or the name an open file
/// was given).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened or inspected.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image size is not a whole number of sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    Unaligned {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The image is empty.
    #[error("disk image {path} is empty (0 bytes)")]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// The path is not a regular file or a block device.
    #[error("disk image {path} is {kind}, not a regular file or a block device")]
    NotADisk {
        /// The image.
        path: PathBuf,
        /// What it is ("a FIFO", "a character device", ...).
        kind: &'static str,
    },
    /// A read-write image was handed over as a file opened without write access (or for
    /// no access at all, O_PATH).
    #[error("disk image {path} was opened {mode}, but it is used {wanted}")]
    AccessMode {
        /// The image.
        path: PathBuf,
        /// How the file was opened.
        mode: &'static str,
        /// How it was to be used.
        wanted: &'static str,
    },
    /// Another user (this process through another open, another splitvisor, QEMU) holds
    /// the image in a way that excludes this use.
    #[error(
        "disk image {path} is locked by another process{}: is it in use by another VM? ({permission} lock)",
        holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// QEMU's name of the permission in conflict ("write", ...).
        permission: &'static str,
        /// Who holds it, if known: "pid N, COMMAND".
        holder: Option<String>,
    },
    /// `cache=none` on a file whose file system or device cannot do O_DIRECT, or only with
    /// an alignment virtio-blk cannot offer (above 4096 bytes).
    #[error("disk image {path} cannot be used with cache=none (O_DIRECT): {why}")]
    DirectIo {
        /// The image.
        path: PathBuf,
        /// What the host said.
        why: String,
    },
    /// Taking the image lock failed for another reason.
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The GET_ID answer for `id`: its first 20 bytes, NUL-padded.
pub fn id_bytes(id: &str) -> [u8; ID_BYTES] {
    let mut bytes = [0u8; ID_BYTES];
    let len = id.len().min(ID_BYTES);
    bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
    bytes
}

/// A raw disk image: a regular file or a block device, of a non-zero whole number of
/// sectors, locked against conflicting users the way QEMU locks images.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    read_only: bool,
    sectors: u64,
    name: PathBuf,
    /// Opened with O_DIRECT (cache=none): the alignment the kernel wants.
    direct: Option<DirectAlignment>,
}

/// How data reaches a disk image on the host (the `cache=` option of a disk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host's page cache: a write is acknowledged once it is in the page
    /// cache, and FLUSH (fdatasync) makes it durable.
    #[default]
    Writeback,
    /// O_DIRECT: the page cache is bypassed; each request's guest buffers must be aligned
    /// as the host's file system or device wants (those that are not fail with IOERR: a
    /// Linux guest aligns them, as its block layer does for any O_DIRECT device). FLUSH
    /// still fdatasyncs (the device's own cache).
    None,
}

impl std::str::FromStr for CacheMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "writeback" => Ok(Self::Writeback),
            "none" => Ok(Self::None),
            other => Err(format!("cache={other}: use writeback or none")),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Writeback => "writeback",
            Self::None => "none",
        })
    }
}

/// What O_DIRECT asks of transfers on an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlignment {
    /// Buffers start at a multiple of this in memory.
    pub memory: usize,
    /// Offsets and every buffer's length are multiples of this.
    pub offset: usize,
}

impl DiskImage {
    /// Opens `path`, read-only if `read_only`, and locks it (see [`DiskImage::from_file`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::open_with(path, read_only, CacheMode::Writeback)
    }

    /// Opens `path` as [`DiskImage::open`] does, with O_DIRECT for [`CacheMode::None`].
    pub fn open_with(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open { path: path.to_path_buf(), source };
        // Look before opening: opening a FIFO for reading blocks until a writer comes.
        let kind = std::fs::metadata(path).map_err(open_error)?.file_type();
        if let Some(what) = not_a_disk(kind) {
            return Err(BlockError::NotADisk { path: path.to_path_buf(), kind: what });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | if cache == CacheMode::None { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) if cache == CacheMode::None => {
                    BlockError::DirectIo { path: path.to_path_buf(), why: source.to_string() }
                }
                _ => open_error(source),
            })?;
        Self::from_file(file, read_only, path)
    }

    /// Wraps an already open image (a partition receives its image as an fd) after the
    /// checks [`DiskImage::open`] makes: a regular file or a block device, opened for the
    /// access `read_only` asks, of a non-zero whole number of sectors; then locks it. An fd
    /// that shares its open file description with a [`DiskImage`] elsewhere (a duplicate
    /// handed over) shares its lock. `name` names the image in errors.
    pub fn from_file(file: File, read_only: bool, name: impl Into<PathBuf>) -> Result<Self, BlockError> {
        let image = Self::from_locked_file(file, read_only, name)?;
        image.lock()?;
        Ok(image)
    }

    /// [`DiskImage::from_file`] for an fd whose open file description holds the image's
    /// lock already: one that the process which opened and locked the image handed over
    /// (a driver partition's disk). The checks are the same; the lock is not taken again.
    /// (Taking it again would add nothing, and could fail for a moment while a second VM
    /// tries the image and is refused.)
    pub fn from_locked_file(
        file: File,
        read_only: bool,
        name: impl Into<PathBuf>,
    ) -> Result<Self, BlockError> {
        let path = name.into();
        let meta = file.metadata().map_err(|source| BlockError::Open { path: path.clone(), source })?;
        if let Some(kind) = not_a_disk(meta.file_type()) {
            return Err(BlockError::NotADisk { path, kind });
        }
        let direct = check_access_mode(&file, read_only, &path)?;
        let direct = if direct { Some(direct_alignment(&file, &path)?) } else { None };
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            block_device_size(&file).map_err(|source| BlockError::Open { path: path.clone(), source })?
        };
        if size == 0 {
            return Err(BlockError::Empty { path });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Unaligned { path, size });
        }
        Ok(Self { file, read_only, sectors: size / SECTOR_SIZE, name: path, direct })
    }

    /// Takes the image's lock (see [`DiskImage::from_file`]), or says who holds it.
    fn lock(&self) -> Result<(), BlockError> {
        let path = self.name.clone();
        match image_lock::lock(&self.file, self.read_only) {
            Ok(()) => Ok(()),
            Err(image_lock::LockError::Conflict { permission, holders }) => {
                let holder = (!holders.is_empty()).then(|| {
                    holders
                        .iter()
                        .map(|&pid| match image_lock::command_name(pid) {
                            Some(command) => format!("pid {pid}, {command}"),
                            None => format!("pid {pid}"),
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                });
                Err(BlockError::Locked { path, permission, holder })
            }
            Err(image_lock::LockError::Os(source)) => Err(BlockError::Lock { path, source }),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The open image, e.g. to hand its fd (and with it the lock) to a driver partition.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image's path, or the name it was given.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// How data reaches the image: [`CacheMode::None`] when its file was opened with
    /// O_DIRECT (a partition learns it from the fd it is handed).
    pub fn cache(&self) -> CacheMode {
        if self.direct.is_some() { CacheMode::None } else { CacheMode::Writeback }
    }

    /// What O_DIRECT asks of transfers, with cache=none.
    pub fn direct_io(&self) -> Option<DirectAlignment> {
        self.direct
    }

    /// The block size the guest is told (`blk_size`): 512, or O_DIRECT's offset alignment
    /// if that is larger, so that the guest's requests are aligned as the host needs.
    pub fn block_size(&self) -> u32 {
        self.direct.map_or(SECTOR_SIZE as u32, |d| (d.offset as u32).max(SECTOR_SIZE as u32))
    }
}

/// The alignment O_DIRECT needs on `file` (statx's STATX_DIOALIGN; for a block device
/// without it, its logical block size; otherwise 512).
fn direct_alignment(file: &File, path: &Path) -> Result<DirectAlignment, BlockError> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stat: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of the open fd itself (empty path, AT_EMPTY_PATH) into `stat`.
    let done = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stat)
    };
    let sector = SECTOR_SIZE as usize;
    let (memory, offset) = if done == 0 && stat.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stat.stx_dio_mem_align == 0 {
            return Err(BlockError::DirectIo { path: path.to_path_buf(), why: "not supported here".into() });
        }
        (stat.stx_dio_mem_align as usize, stat.stx_dio_offset_align as usize)
    } else if file.metadata().is_ok_and(|m| m.file_type().is_block_device()) {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes the logical sector size into the int.
        let ok = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) } == 0;
        let size = if ok { usize::try_from(size).unwrap_or(sector) } else { sector };
        (size, size)
    } else {
        (sector, sector)
    };
    let offset = offset.max(1);
    if offset > 4096 || !offset.is_power_of_two() || !memory.is_power_of_two() || memory > 4096 {
        return Err(BlockError::DirectIo {
            path: path.to_path_buf(),
            why: format!("alignment of {memory} bytes in memory and {offset} in the file"),
        });
    }
    Ok(DirectAlignment { memory, offset })
}

/// Why a file of this type cannot be a disk, or `None` if it can.
fn not_a_disk(kind: std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() || kind.is_block_device() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

/// Checks the file was opened for the access `read_only` asks; says whether it was opened
/// with O_DIRECT.
fn check_access_mode(file: &File, read_only: bool, path: &Path) -> Result<bool, BlockError> {
    // SAFETY: F_GETFL only reads the file's status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(BlockError::Open { path: path.to_path_buf(), source: io::Error::last_os_error() });
    }
    let wanted = if read_only { "read-only" } else { "read-write" };
    let direct = flags & libc::O_DIRECT != 0;
    let mode = if flags & libc::O_PATH != 0 {
        "O_PATH (for no I/O)"
    } else {
        match flags & libc::O_ACCMODE {
            libc::O_RDWR => return Ok(direct),
            libc::O_RDONLY if read_only => return Ok(direct),
            libc::O_RDONLY => "read-only",
            _ => "write-only",
        }
    };
    Err(BlockError::AccessMode { path: path.to_path_buf(), mode, wanted })
}

fn block_device_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek only moves the file offset, which the engine never uses (it reads and
    // writes at explicit offsets).
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    u64::try_from(end).map_err(|_| io::Error::last_os_error())
}

/// The features a virtio-blk device on `disk` with `queues` request queues offers.
pub fn device_features(disk: &DiskImage, queues: u16) -> u64 {
    let ro = if disk.read_only { feature::RO } else { 0 };
    let mq = if queues > 1 { feature::MQ } else { 0 };
    features::VERSION_1
        | features::RING_EVENT_IDX
        | features::RING_INDIRECT_DESC
        | feature::SIZE_MAX
        | feature::SEG_MAX
        | feature::BLK_SIZE
        | feature::FLUSH
        | ro
        | mq
}

/// The configuration space of a virtio-blk device on `disk` with `queues` request queues
/// (virtio_blk_config up to num_queues: capacity, size_max, seg_max, geometry (not
/// offered), blk_size, topology (not offered), writeback (not offered), num_queues).
pub fn config_space(disk: &DiskImage, queues: u16) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
    config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&disk.block_size().to_le_bytes());
    config[34..36].copy_from_slice(&queues.to_le_bytes());
    config
}

/// Longest the device waits for its worker to stop (a reset, the VM's end).
const WORKER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The virtio-blk device: configuration space and features; a worker thread serves each
/// request queue the driver set up.
pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    /// The size of each queue offered (their number is the device's `num_queues`).
    queue_sizes: Vec<u16>,
    engine: EngineKind,
    workers: Vec<WorkerHandle>,
    /// The first panic of a worker thread, kept for whoever checks (tests, fuzzers).
    worker_panic: Arc<Mutex<Option<String>>>,
    /// Written when a worker panics, for a supervisor to hear at once.
    panicked: Option<Arc<EventFd>>,
    /// Makes the journal each new worker tells about its requests.
    journal: Option<Box<dyn Fn() -> Box<dyn RequestJournal + Send> + Send>>,
}

struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Block {
    /// A block device on `disk` with one request queue, answering GET_ID with `id`
    /// (truncated to 20 bytes).
    pub fn new(disk: DiskImage, id: &str) -> Self {
        Self {
            disk: Arc::new(disk),
            id: id_bytes(id),
            queue_sizes: vec![QUEUE_SIZE],
            engine: EngineKind::Auto,
            workers: Vec::new(),
            worker_panic: Arc::default(),
            panicked: None,
            journal: None,
        }
    }

    /// The device offers `queues` request queues (1 to [`MAX_QUEUES`]; VIRTIO_BLK_F_MQ
    /// above 1), each served by its own worker thread.
    pub fn with_queues(mut self, queues: u16) -> Self {
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(queues.clamp(1, MAX_QUEUES))];
        self
    }

    /// The workers move data with the engine `kind` (by default io_uring where the kernel
    /// has it, a thread pool otherwise).
    pub fn with_engine(mut self, kind: EngineKind) -> Self {
        self.engine = kind;
        self
    }

    /// Each worker tells a journal from `journal` about every request it serves (fault
    /// injection, accounting).
    pub fn with_journal(mut self, journal: Box<dyn Fn() -> Box<dyn RequestJournal + Send> + Send>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// `panicked` is written when a worker thread panics (the device is then marked
    /// DEVICE_NEEDS_RESET, and whoever watches decides what the fault means).
    pub fn with_panic_signal(mut self, panicked: EventFd) -> Self {
        self.panicked = Some(Arc::new(panicked));
        self
    }

    fn queues(&self) -> u16 {
        self.queue_sizes.len() as u16
    }

    /// What a worker thread's panic said, if one panicked since the device was created. A
    /// panicking worker also marks the device DEVICE_NEEDS_RESET, so the guest sees a
    /// failed device rather than a silent one.
    pub fn worker_panic(&self) -> Option<String> {
        self.worker_panic.lock().map_or_else(|poisoned| poisoned.into_inner().clone(), |slot| slot.clone())
    }

    /// Stops the workers; waits (bounded) for them. A worker that does not stop (hung in
    /// the kernel, or by an injected fault) is left behind rather than hanging the caller.
    fn stop_workers(&mut self) {
        for worker in &self.workers {
            let _ = worker.stop.write(1);
        }
        let deadline = std::time::Instant::now() + WORKER_STOP_TIMEOUT;
        for worker in self.workers.drain(..) {
            while !worker.thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if !worker.thread.is_finished() {
                log::error!(
                    "virtio-blk: a queue worker did not stop within {WORKER_STOP_TIMEOUT:?}; left behind"
                );
                continue;
            }
            if worker.thread.join().is_err() {
                record_panic(&self.worker_panic, "the worker thread ended in a panic".into());
            }
        }
    }

    fn start_worker(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: &VirtioInterrupt,
        active: ActiveQueue,
        features: u64,
    ) -> Result<(), ActivateError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let journal = self.journal.as_ref().map(|journal| journal());
        let (disk, id, engine, queue) = (self.disk.clone(), self.id, self.engine, active.queue);
        let worker_interrupt = interrupt.clone();
        // The worker (and its I/O engine: an io_uring, or the pool's threads) is set up on
        // its own thread, whose seccomp filter allows that, not on the vCPU that activated
        // the device.
        let make_worker = move || {
            let worker = BlockWorker::with_engine(mem, queue, worker_interrupt, disk, id, engine)
                .with_features(features);
            match journal {
                Some(journal) => worker.with_journal(journal),
                None => worker,
            }
        };
        let panicked = self.panicked.clone();
        let kick = active.kick;
        let stop_worker = stop.try_clone().map_err(ActivateError::Worker)?;
        let panic_slot = self.worker_panic.clone();
        let interrupt = interrupt.clone();
        let name =
            if self.queues() > 1 { format!("virtio-blk-q{}", active.index) } else { "virtio-blk".into() };
        let thread = threads::spawn(ThreadKind::DeviceWorker, &name, move || {
            let run = std::panic::AssertUnwindSafe(|| make_worker().run(&kick, &stop_worker));
            if let Err(payload) = std::panic::catch_unwind(run) {
                record_panic(&panic_slot, panic_message(payload.as_ref()));
                if let Err(e) = interrupt.request_reset() {
                    log::warn!("virtio-blk: cannot signal the driver: {e}");
                }
                if let Some(panicked) = &panicked {
                    let _ = panicked.write(1);
                }
            }
        })
        .map_err(ActivateError::Worker)?;
        self.workers.push(WorkerHandle { stop, thread });
        Ok(())
    }
}

fn record_panic(slot: &Mutex<Option<String>>, message: String) {
    log::error!("virtio-blk: the queue worker panicked: {message}");
    let mut slot = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    slot.get_or_insert(message);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        device_features(&self.disk, self.queues())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::copy_config(&config_space(&self.disk, self.queues()), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        self.stop_workers();
        if queues.is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        // The driver may use fewer queues than offered (Linux: at most one per CPU).
        for active in queues {
            if let Err(e) = self.start_worker(mem.clone(), &interrupt, active, features) {
                self.stop_workers();
                return Err(e);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Why a queue cannot be served until the device is reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The driver broke the queue (an available index more than the queue size ahead, a
    /// head beyond the queue, rings outside memory).
    #[error("the driver broke the queue: {0}")]
    Broken(#[source] virtio_queue::Error),
    /// The used ring overlaps the descriptor table or the available ring: the device would
    /// write the driver's structures.
    #[error("the used ring at {used:#x} overlaps the descriptor table or the available ring")]
    RingsOverlap {
        /// The used ring's address.
        used: u64,
    },
    /// The I/O engine failed (not a request's transfer: the engine itself).
    #[error("the I/O engine failed: {0}")]
    Engine(#[source] io::Error),
    /// More heads to resubmit than the queue holds, or one twice.
    #[error("cannot resubmit {count} requests on a queue of {size} (or a head twice)")]
    Resubmit {
        /// Heads given.
        count: usize,
        /// The queue size.
        size: u16,
    },
}

/// Observes each request's life, so a backend can record what is in flight in memory that
/// survives the process (vhost-user INFLIGHT_SHMFD).
pub trait RequestJournal {
    /// `head` was taken off the available ring.
    fn fetched(&mut self, head: u16) {
        let _ = head;
    }
    /// `head` is about to be put in the used ring.
    fn completing(&mut self, head: u16) {
        let _ = head;
    }
    /// `head` is in the used ring and the used index `used_idx` is published.
    fn completed(&mut self, head: u16, used_idx: u16) {
        let _ = (head, used_idx);
    }
}

/// A journal that records nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoJournal;

impl RequestJournal for NoJournal {}

/// What one call of the engine did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processed {
    /// Requests completed (put in the used ring).
    pub completed: usize,
    /// The driver asked to be interrupted (EVENT_IDX, or no suppression).
    pub notify: bool,
    /// The call stopped at its budget (the queue size of chains) with requests still
    /// available. Nothing will kick the queue for them: call again, after other work.
    pub pending: bool,
}

/// The work of the engine's last call, for tests and fuzzers that bound it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Chains handled (fetched or resubmitted).
    pub chains: usize,
    /// Descriptors read from guest memory, in the ring's table and indirect tables.
    pub descriptors: usize,
    /// Most descriptors read for one chain.
    pub max_chain_descriptors: usize,
    /// `preadv`/`pwritev` system calls.
    pub transfers: usize,
    /// `fdatasync` system calls.
    pub syncs: usize,
}

/// Serves the request queue of one virtio-blk device.
///
/// Needs only guest memory, the queue, the interrupt and the image, so that it can run
/// wherever guest memory is mapped.
pub struct BlockWorker {
    requests: BlockRequests,
    queue: Queue,
    interrupt: VirtioInterrupt,
    broken: bool,
    pending: bool,
    journal: Box<dyn RequestJournal + Send>,
}

impl BlockWorker {
    /// A worker for `queue` (already set up and valid) on `disk`; no optional feature
    /// negotiated until [`BlockWorker::with_features`].
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: VirtioInterrupt,
        disk: Arc<DiskImage>,
        id: [u8; ID_BYTES],
    ) -> Self {
        Self::with_engine(mem, queue, interrupt, disk, id, EngineKind::Auto)
    }

    /// As [`BlockWorker::new`], moving data with the engine `kind`.
    pub fn with_engine(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: VirtioInterrupt,
        disk: Arc<DiskImage>,
        id: [u8; ID_BYTES],
        kind: EngineKind,
    ) -> Self {
        let mut requests = BlockRequests::with_engine(mem, disk, id, kind);
        // Completions reach the driver as they happen, not only when a batch is done.
        let notifier = interrupt.clone();
        requests.set_notifier(Box::new(move || {
            if let Err(e) = notifier.signal_used_buffer() {
                log::warn!("virtio-blk: cannot interrupt the driver: {e}");
            }
        }));
        requests.set_poll_limit(POLL_LIMIT);
        Self { requests, queue, interrupt, broken: false, pending: false, journal: Box::new(NoJournal) }
    }

    /// Tells `journal` about every request (fault injection, say).
    pub fn with_journal(mut self, journal: Box<dyn RequestJournal + Send>) -> Self {
        self.journal = journal;
        self
    }

    /// The features the driver negotiated.
    pub fn with_features(mut self, negotiated: u64) -> Self {
        self.requests.set_features(negotiated);
        self
    }

    /// The queue state (indices included), e.g. to hand over to another worker.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The request engine (its statistics, say).
    pub fn requests(&self) -> &BlockRequests {
        &self.requests
    }

    /// Serves the queue whenever `kick` is written, until `stop` is.
    pub fn run(mut self, kick: &EventFd, stop: &EventFd) {
        const KICK: u64 = 0;
        const STOP: u64 = 1;
        let epoll = match Epoll::new() {
            Ok(epoll) => epoll,
            Err(e) => {
                log::error!("virtio-blk: cannot create the worker's epoll: {e}");
                return;
            }
        };
        for (fd, token) in [(kick, KICK), (stop, STOP)] {
            if let Err(e) =
                epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
            {
                log::error!("virtio-blk: cannot watch an eventfd: {e}");
                return;
            }
        }
        // Requests may already be waiting (a worker restarted under a running guest).
        self.serve(kick);
        let mut events = [EpollEvent::default(); 2];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: epoll_wait failed: {e}");
                    return;
                }
            };
            // A stop wins over a kick that arrived with it.
            if events[..ready].iter().any(|event| event.data() == STOP) {
                return;
            }
            let _ = kick.read();
            self.serve(kick);
        }
    }

    /// Processes the queue and reports a broken queue to the driver. When the engine
    /// stopped at its budget, kicks itself so the rest is served after a look at `stop`.
    fn serve(&mut self, kick: &EventFd) {
        if self.broken {
            return;
        }
        if let Err(e) = self.process_queue() {
            log::warn!("virtio-blk: {e}; device needs reset");
            // The queue stays stopped until the driver resets the device.
            self.broken = true;
            if let Err(e) = self.interrupt.request_reset() {
                log::warn!("virtio-blk: cannot signal the driver: {e}");
            }
            return;
        }
        if self.pending {
            if let Err(e) = kick.write(1) {
                log::warn!("virtio-blk: cannot re-kick the queue: {e}");
            }
        }
    }

    /// Handles available requests (at most the queue size), then interrupts the driver if
    /// it wants to be. Returns how many requests were completed.
    pub fn process_queue(&mut self) -> Result<usize, QueueError> {
        let processed = self.requests.process_queue_with(&mut self.queue, self.journal.as_mut())?;
        self.pending = processed.pending;
        if processed.notify {
            if let Err(e) = self.interrupt.signal_used_buffer() {
                log::warn!("virtio-blk: cannot interrupt the driver: {e}");
            }
        }
        Ok(processed.completed)
    }

    /// Whether the last [`BlockWorker::process_queue`] left requests for another call.
    pub fn pending(&self) -> bool {
        self.pending
    }
}

/// The iovecs of the requests in flight: one arena of [`MAX_IOVECS`] entries, filled from
/// the start while requests are in flight and emptied once none is. It is never
/// reallocated: the kernel holds pointers into it while transfers run.
struct IoVecs {
    entries: Vec<libc::iovec>,
    used: usize,
}

// SAFETY: the pointers are host addresses of guest memory mapped by the engine's
// `GuestMemoryMmap`; they are handed to the kernel only while the request that built them
// is in flight, never dereferenced by Rust code, so the arena may move to and be shared
// with other threads.
unsafe impl Send for IoVecs {}
// SAFETY: as above; `&IoVecs` gives no access to the pointed-to memory.
unsafe impl Sync for IoVecs {}

impl IoVecs {
    fn new() -> Self {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        Self { entries: vec![empty; MAX_IOVECS], used: 0 }
    }
}

/// The guest ranges the device must never write as request data: the descriptor table,
/// the available ring (with used_event) and the used ring (with avail_event).
#[derive(Clone, Copy, Debug)]
struct Rings([(u64, u64); 3]);

impl Rings {
    fn of(queue: &Queue) -> Result<Self, QueueError> {
        let size = u64::from(queue.size());
        let range = |start: u64, len: u64| (start, start.saturating_add(len));
        let desc = range(queue.desc_table(), 16 * size);
        let avail = range(queue.avail_ring(), 6 + 2 * size);
        let used = range(queue.used_ring(), 6 + 8 * size);
        let rings = Self([desc, avail, used]);
        if rings.overlaps_driver_rings(used.0, used.1 - used.0) {
            return Err(QueueError::RingsOverlap { used: used.0 });
        }
        Ok(rings)
    }

    fn overlaps(range: (u64, u64), addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        addr < range.1 && range.0 < end
    }

    fn overlaps_driver_rings(&self, addr: u64, len: u64) -> bool {
        Self::overlaps(self.0[0], addr, len) || Self::overlaps(self.0[1], addr, len)
    }

    fn overlaps_any(&self, addr: u64, len: u64) -> bool {
        self.0.iter().any(|&range| Self::overlaps(range, addr, len))
    }
}

/// How one request ended, before its status is written.
struct Outcome {
    status: u8,
    /// Bytes written into the guest's buffers, data only.
    written: u64,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

/// What a parsed request needs next.
enum Prepared {
    /// Finished without a transfer (refused, GET_ID, UNSUPP): the used length.
    Done(u32),
    /// Data to move between guest memory and the image.
    Transfer {
        op: IoOp,
        /// The status byte's address.
        status: u64,
        /// Byte offset in the image.
        offset: u64,
        /// Data bytes.
        len: u64,
        /// Where the data is in the chain: device-writable buffers (IN) or readable ones
        /// after the header (OUT).
        writable: bool,
        skip: u64,
    },
    /// FLUSH: after every earlier request, an fdatasync.
    Flush {
        /// The status byte's address.
        status: u64,
    },
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
struct Slot {
    head: u16,
    status: u64,
    op: IoOp,
    /// Where the rest of the transfer goes in the image.
    offset: u64,
    /// The rest of the transfer's iovecs in the arena.
    iov: usize,
    iov_end: usize,
    /// Bytes moved so far, of `len`.
    moved: u64,
    len: u64,
}

/// Why a request's data could not be pointed at.
enum MapError {
    /// Not in guest memory, over a ring, misaligned for O_DIRECT, or more than
    /// [`MAX_IOVECS`] pieces: the request fails.
    Refused,
    /// The arena is full of other requests' iovecs: retry once they completed.
    Full,
}

/// How long the engine keeps looking at the available ring after it served requests,
/// before it lets the driver's notifications wake it again.
///
/// A driver that keeps one request in flight offers the next one a few microseconds after
/// it saw the last one complete; finding it by looking costs the driver no notification
/// (no exit to the host: notifications stay suppressed while the engine looks) and the
/// worker no wake-up, which on a busy host costs more than the request itself. The window
/// adapts as the guest kit's polling does: a look that found a request doubles it (up to
/// [`Self::limit`]), one that found nothing halves it (down to [`Self::FLOOR`]), so a
/// driver that waits for interrupts, or is idle, costs little CPU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RingPoll {
    /// Longest window; zero: never look.
    limit: Duration,
    /// The window now.
    window: Duration,
}

impl RingPoll {
    /// The shortest window: long enough for a driver that polls the used ring to see a
    /// completion and offer its next request, so that a found request can grow it again.
    const FLOOR: Duration = Duration::from_micros(4);

    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, window: limit }
    }

    /// The window now.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// A look found what it looked for: look longer next time.
    pub(crate) fn found(&mut self) {
        self.window = (self.window * 2).min(self.limit);
    }

    /// A look found nothing: look shorter next time.
    pub(crate) fn missed(&mut self) {
        self.window = (self.window / 2).max(Self::FLOOR.min(self.limit));
    }
}

/// The request engine of virtio-blk: takes requests off a queue, executes them on the
/// image and returns them. Shared by the in-process [`BlockWorker`] and the vhost-user
/// backend of a driver partition, which owns its queues differently.
///
/// Up to [`BlockRequests::set_depth`] requests (at most [`MAX_IN_FLIGHT`]) are in flight
/// at once on an [`IoEngine`]: every request available at a kick is parsed and its
/// transfer pushed, all of them start with one submission (with cache=none, each as it
/// is pushed), and each is put in the used
/// ring as soon as its own transfer completed, in whatever order that happens. A call
/// returns once nothing is in flight, so the queue's state can be handed over between
/// calls.
pub struct BlockRequests {
    mem: GuestMemoryMmap,
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    features: u64,
    /// The chain being parsed; capacity at most MAX_CHAIN_SEGMENTS.
    segments: Vec<Segment>,
    /// The data of the requests in flight as memory pieces.
    iovecs: IoVecs,
    /// Requests in flight by tag, and the free tags.
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// Completions of one wait; capacity MAX_IN_FLIGHT.
    done: Vec<Completion>,
    engine: Option<Box<dyn IoEngine>>,
    depth: usize,
    notifier: Option<Box<dyn Fn() + Send>>,
    /// Requests put in the used ring since the last decision whether to interrupt the
    /// driver (virtio-queue's `num_added`: this engine keeps the used ring itself).
    unsignalled: u16,
    stats: EngineStats,
    poll: RingPoll,
}

impl BlockRequests {
    /// Requests on `disk` in guest memory `mem`, answering GET_ID with `id`, on io_uring
    /// where the kernel offers it and a thread pool otherwise. No optional feature is
    /// negotiated until [`BlockRequests::set_features`].
    pub fn new(mem: GuestMemoryMmap, disk: Arc<DiskImage>, id: [u8; ID_BYTES]) -> Self {
        Self::with_engine(mem, disk, id, EngineKind::Auto)
    }

    /// As [`BlockRequests::new`], on the engine `kind`. If that engine cannot be set up,
    /// every transfer fails with IOERR (and the reason is logged).
    pub fn with_engine(
        mem: GuestMemoryMmap,
        disk: Arc<DiskImage>,
        id: [u8; ID_BYTES],
        kind: EngineKind,
    ) -> Self {
        let engine = match block_io::open(&disk, kind) {
            Ok(engine) => Some(engine),
            Err(e) => {
                log::error!("virtio-blk: no I/O engine for {}: {e}", disk.name.display());
                None
            }
        };
        Self::with_io_engine(mem, disk, id, engine)
    }

    /// As [`BlockRequests::new`], on `engine` (which must move data to and from `disk`;
    /// `None`: every transfer fails with IOERR). Tests and fuzzers plug in engines that
    /// complete in an order they choose.
    pub fn with_io_engine(
        mem: GuestMemoryMmap,
        disk: Arc<DiskImage>,
        id: [u8; ID_BYTES],
        engine: Option<Box<dyn IoEngine>>,
    ) -> Self {
        Self {
            mem,
            disk,
            id,
            features: 0,
            segments: Vec::with_capacity(MAX_CHAIN_SEGMENTS as usize),
            iovecs: IoVecs::new(),
            slots: vec![None; MAX_IN_FLIGHT],
            free: (0..MAX_IN_FLIGHT as u16).rev().collect(),
            done: Vec::with_capacity(MAX_IN_FLIGHT),
            engine,
            depth: MAX_IN_FLIGHT,
            notifier: None,
            unsignalled: 0,
            stats: EngineStats::default(),
            poll: RingPoll::default(),
        }
    }

    /// The I/O engine's name ("io_uring", "threads"), or `None` if none could be set up.
    pub fn engine_name(&self) -> Option<&'static str> {
        self.engine.as_ref().map(|engine| engine.name())
    }

    /// At most `depth` requests in flight (1 to [`MAX_IN_FLIGHT`]); 1 executes requests
    /// one after the other, in ring order.
    pub fn set_depth(&mut self, depth: usize) {
        self.depth = depth.clamp(1, MAX_IN_FLIGHT);
    }

    /// `notify` interrupts the driver: called as soon as completions the driver wants to
    /// hear about are in the used ring while others are still in flight (without it, the
    /// caller interrupts once per call, from [`Processed::notify`]).
    pub fn set_notifier(&mut self, notify: Box<dyn Fn() + Send>) {
        self.notifier = Some(notify);
    }

    /// After serving requests, look at the available ring for up to `limit` (adapted to how
    /// soon the driver's requests follow each other; zero, the default, never looks)
    /// before returning, with the driver's notifications still suppressed. Needs a
    /// notifier ([`BlockRequests::set_notifier`]): completions are announced before the
    /// engine looks. The I/O engine then also looks for completions before it sleeps (up to
    /// [`block_io::COMPLETION_POLL_LIMIT`]).
    pub fn set_poll_limit(&mut self, limit: Duration) {
        self.poll = RingPoll::new(limit);
        // The engine looks for completions the same way, with its own bound.
        if let Some(engine) = self.engine.as_mut() {
            let engine_limit = if limit.is_zero() { limit } else { block_io::COMPLETION_POLL_LIMIT };
            engine.set_poll_limit(engine_limit);
        }
    }

    /// Guest memory changed (a vhost-user frontend sent a new memory table).
    pub fn set_memory(&mut self, mem: GuestMemoryMmap) {
        self.mem = mem;
    }

    /// The features the driver negotiated (VIRTIO_F_INDIRECT_DESC matters here).
    pub fn set_features(&mut self, negotiated: u64) {
        self.features = negotiated;
    }

    /// The work of the last call of [`BlockRequests::process_queue_with`] or
    /// [`BlockRequests::resubmit`].
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Bytes of heap the engine holds for its working lists: bounded, whatever the guest.
    pub fn heap_bytes(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<Segment>()
            + self.iovecs.entries.capacity() * std::mem::size_of::<libc::iovec>()
            + self.slots.capacity() * std::mem::size_of::<Option<Slot>>()
            + self.free.capacity() * std::mem::size_of::<u16>()
            + self.done.capacity() * std::mem::size_of::<Completion>()
    }

    /// Handles available requests of `queue` (at most its size); says whether the driver
    /// wants an interrupt for them.
    pub fn process_queue(&mut self, queue: &mut Queue) -> Result<Processed, QueueError> {
        self.process_queue_with(queue, &mut NoJournal)
    }

    /// As [`BlockRequests::process_queue`], telling `journal` about each request.
    pub fn process_queue_with(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        self.stats = EngineStats::default();
        self.unsignalled = 0;
        let rings = Rings::of(queue)?;
        let limits = self.limits(queue);
        let result = self.pump(queue, &rings, &limits, journal);
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn pump(
        &mut self,
        queue: &mut Queue,
        rings: &Rings,
        limits: &ChainLimits,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        let budget = usize::from(queue.size());
        let (mut fetched, mut completed) = (0, 0);
        let mut pending = false;
        loop {
            if queue.event_idx_enabled() {
                queue.disable_notification(&self.mem).map_err(QueueError::Broken)?;
            }
            loop {
                // Take what the driver offers while there is room ...
                while self.in_flight() < self.depth && fetched < budget {
                    let Some(head) = self.pop_head(queue)? else {
                        break;
                    };
                    journal.fetched(head);
                    fetched += 1;
                    completed += self.begin(queue, rings, limits, head, journal)?;
                }
                // ... start it all at once, and return each request as it completes.
                self.submit();
                if self.in_flight() == 0 {
                    break;
                }
                // While it waits, a request the driver offers that has room is taken at
                // once, not at the next completion: the queue's depth stays what the
                // driver keeps in flight.
                let room = self.in_flight() < self.depth && fetched < budget;
                completed += self.reap(queue, journal, room)?;
            }
            if fetched == budget {
                // Look for the driver's next request first, as below: stopping without a
                // look, when the driver keeps one request in flight, would make it kick
                // (an exit) and this worker wake up once every queue-size requests.
                self.look_for_more(queue)?;
                // Stop for now, but with notifications on again (with EVENT_IDX: avail_event
                // brought up to date), or the driver would not kick for its next request
                // and wait for ever; whatever is already waiting makes another call.
                pending = if queue.event_idx_enabled() {
                    queue.enable_notification(&self.mem).map_err(QueueError::Broken)?
                } else {
                    self.available(queue)? > 0
                };
                break;
            }
            // Notifications are still suppressed: the driver's next request, if it comes
            // soon, is found without a kick and without a wake-up.
            if fetched > 0 && self.look_for_more(queue)? {
                continue;
            }
            if !queue.event_idx_enabled()
                || !queue.enable_notification(&self.mem).map_err(QueueError::Broken)?
            {
                break;
            }
        }
        let notify = self.unsignalled > 0 && self.needs_notification(queue)?;
        Ok(Processed { completed, notify, pending })
    }

    /// Announces what is in the used ring, then looks at the available ring for the
    /// poll window ([`RingPoll`]); true if a request arrived.
    fn look_for_more(&mut self, queue: &mut Queue) -> Result<bool, QueueError> {
        let window = self.poll.window;
        if window.is_zero() || self.notifier.is_none() {
            return Ok(false);
        }
        // A driver waiting for an interrupt must not wait for the look as well.
        if self.unsignalled > 0 && self.needs_notification(queue)? {
            self.notify();
        }
        let start = Instant::now();
        loop {
            if self.available(queue)? > 0 {
                self.poll.found();
                return Ok(true);
            }
            if start.elapsed() >= window {
                self.poll.missed();
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Re-executes requests that were in flight when a previous backend died, in this
    /// order and one at a time, by the head index of their chain (they are no longer in the
    /// available ring window), and puts each in the used ring. `journal` hears `completing`
    /// and `completed` for each (not `fetched`: they were fetched before).
    pub fn resubmit(
        &mut self,
        queue: &mut Queue,
        heads: &[u16],
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        self.stats = EngineStats::default();
        self.unsignalled = 0;
        let size = queue.size();
        let mut seen = [0u64; 1024];
        for &head in heads {
            let (word, bit) = (usize::from(head / 64), head % 64);
            if heads.len() > usize::from(size) || seen[word] & (1 << bit) != 0 {
                return Err(QueueError::Resubmit { count: heads.len(), size });
            }
            seen[word] |= 1 << bit;
            if head >= size {
                return Err(QueueError::Broken(virtio_queue::Error::InvalidDescriptorIndex));
            }
        }
        let rings = Rings::of(queue)?;
        let limits = self.limits(queue);
        let result = heads.iter().try_for_each(|&head| {
            self.begin(queue, &rings, &limits, head, journal)?;
            self.submit();
            self.drain(queue, journal).map(drop)
        });
        if let Err(e) = result {
            self.abandon();
            return Err(e);
        }
        let completed = heads.len();
        let notify = self.unsignalled > 0 && self.needs_notification(queue)?;
        Ok(Processed { completed, notify, pending: false })
    }

    fn limits(&self, queue: &Queue) -> ChainLimits {
        ChainLimits {
            desc_table: queue.desc_table(),
            queue_size: queue.size(),
            max_segments: MAX_CHAIN_SEGMENTS,
            indirect: self.features & features::RING_INDIRECT_DESC != 0,
        }
    }

    fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    /// Parses the chain at `head` and finishes it or starts its transfer; returns how many
    /// requests it put in the used ring (it may have to wait for others first).
    fn begin(
        &mut self,
        queue: &mut Queue,
        rings: &Rings,
        limits: &ChainLimits,
        head: u16,
        journal: &mut dyn RequestJournal,
    ) -> Result<usize, QueueError> {
        match self.prepare(rings, limits, head) {
            Prepared::Done(used_len) => {
                self.publish(queue, head, used_len, journal)?;
                Ok(1)
            }
            Prepared::Flush { status } => {
                // Every request taken before it completes (and so reached the file) first.
                let mut completed = self.drain(queue, journal)?;
                self.stats.syncs += 1;
                let slot =
                    Slot { head, status, op: IoOp::Sync, offset: 0, iov: 0, iov_end: 0, moved: 0, len: 0 };
                completed += self.start(queue, slot, journal)?;
                self.submit();
                completed += self.drain(queue, journal)?;
                Ok(completed)
            }
            Prepared::Transfer { op, status, offset, len, writable, skip } => {
                let mut completed = 0;
                let range = loop {
                    match self.map_data(writable, skip, len, rings) {
                        Ok(range) => break Some(range),
                        Err(MapError::Full) if self.in_flight() > 0 => {
                            completed += self.drain(queue, journal)?
                        }
                        Err(_) => break None,
                    }
                };
                let Some((iov, iov_end)) = range else {
                    self.finish(queue, head, status, Outcome::status(request_status::IOERR), journal)?;
                    return Ok(completed + 1);
                };
                if len == 0 {
                    self.finish(queue, head, status, Outcome::status(request_status::OK), journal)?;
                    return Ok(completed + 1);
                }
                let slot = Slot { head, status, op, offset, iov, iov_end, moved: 0, len };
                Ok(completed + self.start(queue, slot, journal)?)
            }
        }
    }

    /// Hands `slot`'s transfer to the engine; if it cannot take it, the request fails at
    /// once (returns 1).
    fn start(
        &mut self,
        queue: &mut Queue,
        slot: Slot,
        journal: &mut dyn RequestJournal,
    ) -> Result<usize, QueueError> {
        let Some(tag) = self.free.pop() else {
            // `begin` is called only with a free slot.
            self.finish(queue, slot.head, slot.status, Outcome::status(request_status::IOERR), journal)?;
            return Ok(1);
        };
        self.slots[usize::from(tag)] = Some(slot);
        if self.push(tag).is_err() {
            self.slots[usize::from(tag)] = None;
            self.free.push(tag);
            self.finish(queue, slot.head, slot.status, Outcome::status(request_status::IOERR), journal)?;
            return Ok(1);
        }
        Ok(0)
    }

    /// Pushes the (rest of the) transfer of the request in `tag`.
    fn push(&mut self, tag: u16) -> io::Result<()> {
        let slot = self.slots[usize::from(tag)].ok_or_else(|| io::Error::other("no request in this slot"))?;
        let engine = self.engine.as_mut().ok_or_else(|| io::Error::other("no I/O engine"))?;
        let iovecs = &self.iovecs.entries[slot.iov..slot.iov_end];
        if slot.op != IoOp::Sync {
            self.stats.transfers += 1;
        }
        let transfer = Transfer {
            tag,
            op: slot.op,
            offset: slot.offset,
            iovecs: iovecs.as_ptr(),
            count: iovecs.len() as u32,
        };
        // SAFETY: the iovecs are in the arena, which is neither moved nor rewritten while
        // a request uses them (it is emptied only once nothing is in flight), and they
        // point into guest memory that `self.mem` keeps mapped; every call that starts a
        // transfer waits for all of them before it returns, and dropping the engine waits
        // too.
        let pushed = unsafe { engine.push(transfer) };
        if let Err(e) = &pushed {
            log::warn!("virtio-blk: cannot start a transfer: {e}");
        }
        pushed
    }

    fn submit(&mut self) {
        if let Some(engine) = self.engine.as_mut() {
            if let Err(e) = engine.submit() {
                // The transfers stay queued: the next wait submits them.
                log::warn!("virtio-blk: submitting transfers failed: {e}");
            }
        }
    }

    /// Waits for at least one transfer, and puts every request whose transfer is complete
    /// in the used ring; returns how many. With `room`, the wait may also end with none
    /// when the driver offers a request (see [`IoEngine::wait_or`]).
    fn reap(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
        room: bool,
    ) -> Result<usize, QueueError> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(0);
        };
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        let (mem, ring) = (&self.mem, &*queue);
        // The available index only (a broken ring is found when the request is taken).
        let mut offered = || {
            room && ram::load_u16(mem, ring.avail_ring() + 2, Ordering::Acquire)
                .is_ok_and(|avail| avail != ring.next_avail())
        };
        if let Err(e) = engine.wait_or(&mut done, &mut offered) {
            self.done = done;
            return Err(QueueError::Engine(e));
        }
        let mut completed = 0;
        let mut result = Ok(());
        for &completion in &done {
            match self.complete_transfer(queue, completion, journal) {
                Ok(n) => completed += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.done = done;
        result?;
        // Short transfers pushed their rest.
        self.submit();
        if completed > 0 && self.notifier.is_some() && self.needs_notification(queue)? {
            self.notify();
        }
        Ok(completed)
    }

    /// Waits until nothing is in flight; returns how many requests it put in the used ring.
    fn drain(&mut self, queue: &mut Queue, journal: &mut dyn RequestJournal) -> Result<usize, QueueError> {
        let mut completed = 0;
        while self.in_flight() > 0 {
            completed += self.reap(queue, journal, false)?;
        }
        Ok(completed)
    }

    /// The queue broke with requests in flight: waits for their transfers (the kernel may
    /// still write guest memory) and drops them; the device needs a reset anyway.
    fn abandon(&mut self) {
        if let Some(engine) = self.engine.as_mut() {
            let mut done = std::mem::take(&mut self.done);
            while engine.outstanding() > 0 {
                done.clear();
                if let Err(e) = engine.wait(&mut done) {
                    log::error!("virtio-blk: waiting for abandoned transfers failed: {e}");
                    break;
                }
            }
            self.done = done;
        }
        for (tag, slot) in self.slots.iter_mut().enumerate() {
            if slot.take().is_some() {
                self.free.push(tag as u16);
            }
        }
        self.iovecs.used = 0;
    }

    /// One transfer finished: the request completes, or pushes the rest of a short
    /// transfer. Returns how many requests it put in the used ring (0 or 1).
    fn complete_transfer(
        &mut self,
        queue: &mut Queue,
        completion: Completion,
        journal: &mut dyn RequestJournal,
    ) -> Result<usize, QueueError> {
        let tag = completion.tag;
        let Some(mut slot) = self.slots.get_mut(usize::from(tag)).and_then(Option::take) else {
            log::error!("virtio-blk: a completion for no request in flight (tag {tag})");
            return Ok(0);
        };
        let result = completion.result;
        let outcome = match slot.op {
            IoOp::Sync if result == 0 => Outcome::status(request_status::OK),
            IoOp::Sync => {
                log::warn!(
                    "virtio-blk: fdatasync of {} failed: {}",
                    self.disk.name.display(),
                    io::Error::from_raw_os_error(-result as i32)
                );
                Outcome::status(request_status::IOERR)
            }
            _ if result > 0 => {
                let moved = (result as u64).min(slot.len - slot.moved);
                slot.moved += moved;
                if slot.moved < slot.len {
                    // A short transfer: the rest goes on from where it stopped.
                    self.advance(&mut slot, moved);
                    self.slots[usize::from(tag)] = Some(slot);
                    return self.retry(queue, tag, journal);
                }
                let written = if slot.op == IoOp::Read { slot.moved } else { 0 };
                Outcome { status: request_status::OK, written }
            }
            _ if result == -i64::from(libc::EINTR) || result == -i64::from(libc::EAGAIN) => {
                self.slots[usize::from(tag)] = Some(slot);
                return self.retry(queue, tag, journal);
            }
            _ => {
                let error = if result == 0 {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                } else {
                    io::Error::from_raw_os_error(-result as i32)
                };
                let what = if slot.op == IoOp::Read { "read" } else { "write" };
                log::warn!(
                    "virtio-blk: {what} of {} bytes at {} failed: {error}",
                    slot.len,
                    slot.offset - slot.moved
                );
                let written = if slot.op == IoOp::Read { slot.moved } else { 0 };
                Outcome { status: request_status::IOERR, written }
            }
        };
        self.free.push(tag);
        if self.in_flight() == 0 {
            self.iovecs.used = 0;
        }
        self.finish(queue, slot.head, slot.status, outcome, journal)?;
        Ok(1)
    }

    /// Pushes the rest of the request in `tag` again; if the engine refuses, it fails.
    fn retry(
        &mut self,
        queue: &mut Queue,
        tag: u16,
        journal: &mut dyn RequestJournal,
    ) -> Result<usize, QueueError> {
        if self.push(tag).is_ok() {
            return Ok(0);
        }
        let Some(slot) = self.slots[usize::from(tag)].take() else {
            return Ok(0);
        };
        self.free.push(tag);
        let written = if slot.op == IoOp::Read { slot.moved } else { 0 };
        self.finish(
            queue,
            slot.head,
            slot.status,
            Outcome { status: request_status::IOERR, written },
            journal,
        )?;
        Ok(1)
    }

    /// Drops `moved` bytes from the front of `slot`'s iovecs.
    fn advance(&mut self, slot: &mut Slot, moved: u64) {
        slot.offset += moved;
        let mut left = moved;
        while slot.iov < slot.iov_end {
            let first = &mut self.iovecs.entries[slot.iov];
            let len = first.iov_len as u64;
            if left < len {
                first.iov_base = first.iov_base.cast::<u8>().wrapping_add(left as usize).cast();
                first.iov_len -= left as usize;
                break;
            }
            left -= len;
            slot.iov += 1;
        }
    }

    /// Writes the status byte and puts the request in the used ring.
    fn finish(
        &mut self,
        queue: &mut Queue,
        head: u16,
        status: u64,
        outcome: Outcome,
        journal: &mut dyn RequestJournal,
    ) -> Result<(), QueueError> {
        let used_len = if ram::write(&self.mem, status, &[outcome.status]).is_err() {
            // Checked when the request was parsed; memory does not shrink under a call.
            0
        } else {
            u32::try_from(outcome.written + 1).unwrap_or(u32::MAX)
        };
        self.publish(queue, head, used_len, journal)
    }

    /// Puts `head` in the used ring.
    fn publish(
        &mut self,
        queue: &mut Queue,
        head: u16,
        used_len: u32,
        journal: &mut dyn RequestJournal,
    ) -> Result<(), QueueError> {
        // The journal's order is the inflight region's: the head is marked as being
        // completed before the used ring changes, and as done once it has; a backend that
        // dies in between leaves a record the next one can finish from.
        journal.completing(head);
        self.add_used(queue, head, used_len).map_err(QueueError::Broken)?;
        journal.completed(head, queue.next_used());
        Ok(())
    }

    /// Puts `head` with `used_len` in the next used element and publishes the used index
    /// (virtio-queue's `add_used`, on the region's path). An element that already holds
    /// exactly that (the same request slot returned in the same place one lap of the ring
    /// ago, as at one request in flight) is not written again: a store, even of the same
    /// bytes, takes the line from the driver's CPU, whose next read of it then waits.
    fn add_used(&mut self, queue: &mut Queue, head: u16, used_len: u32) -> Result<(), virtio_queue::Error> {
        if head >= queue.size() {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let next = queue.next_used();
        // The ring's flags and index, then 8-byte elements (id: u32, len: u32).
        let element = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(next % queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        bytes[4..].copy_from_slice(&used_len.to_le_bytes());
        let mut current = [0u8; 8];
        let unchanged = ram::read(&self.mem, element, &mut current).is_ok() && current == bytes;
        if !unchanged {
            ram::write(&self.mem, element, &bytes).map_err(virtio_queue::Error::GuestMemory)?;
        }
        let next = next.wrapping_add(1);
        // Release: the element (and the status byte before it) is visible before the index.
        ram::store_u16(&self.mem, queue.used_ring().wrapping_add(2), next, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
        queue.set_next_used(next);
        self.unsignalled = self.unsignalled.saturating_add(1);
        Ok(())
    }

    /// Interrupts the driver, if this engine was given a way to ([`Self::set_notifier`]).
    fn notify(&self) {
        if let Some(notify) = &self.notifier {
            notify();
        }
    }

    /// Whether the driver wants an interrupt for the requests put in the used ring since
    /// the last time this was asked (virtio-queue's `needs_notification`, counting what
    /// [`Self::add_used`] added): with EVENT_IDX, if its `used_event` lies among them;
    /// without, always.
    fn needs_notification(&mut self, queue: &Queue) -> Result<bool, QueueError> {
        // The used index's store before the load of `used_event` (the driver orders its
        // store of `used_event` before its load of the index the same way).
        std::sync::atomic::fence(Ordering::SeqCst);
        let added = std::mem::take(&mut self.unsignalled);
        if !queue.event_idx_enabled() {
            return Ok(true);
        }
        // `used_event` follows the available ring's entries.
        let broken = |e| QueueError::Broken(virtio_queue::Error::GuestMemory(e));
        let at = queue.avail_ring().wrapping_add(4 + 2 * u64::from(queue.size()));
        let used_event = ram::load_u16(&self.mem, at, Ordering::Relaxed).map_err(broken)?;
        let used = queue.next_used();
        Ok(used.wrapping_sub(used_event).wrapping_sub(1) < added)
    }

    /// Requests the driver has made available and we have not taken.
    fn available(&self, queue: &Queue) -> Result<u16, QueueError> {
        if !queue.ready() || queue.size() == 0 {
            return Err(QueueError::Broken(virtio_queue::Error::QueueNotReady));
        }
        // The index sits after the ring's flags.
        let avail = ram::load_u16(&self.mem, queue.avail_ring() + 2, Ordering::Acquire)
            .map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
        let waiting = avail.wrapping_sub(queue.next_avail());
        if waiting > queue.size() {
            return Err(QueueError::Broken(virtio_queue::Error::InvalidAvailRingIndex));
        }
        Ok(waiting)
    }

    /// Takes the next head off the available ring.
    fn pop_head(&self, queue: &mut Queue) -> Result<Option<u16>, QueueError> {
        if self.available(queue)? == 0 {
            return Ok(None);
        }
        let next = queue.next_avail();
        // The available index was read with Acquire: the ring entry it covers is visible.
        let slot = queue.avail_ring() + 4 + 2 * u64::from(next % queue.size());
        let mut head = [0u8; 2];
        ram::read(&self.mem, slot, &mut head)
            .map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
        let head = u16::from_le_bytes(head);
        queue.set_next_avail(next.wrapping_add(1));
        if head >= queue.size() {
            return Err(QueueError::Broken(virtio_queue::Error::InvalidDescriptorIndex));
        }
        Ok(Some(head))
    }

    /// Parses one request: finishes what needs no transfer, says what the rest needs.
    fn prepare(&mut self, rings: &Rings, limits: &ChainLimits, head: u16) -> Prepared {
        self.stats.chains += 1;
        let mut walked = 0;
        let walk = chain::walk(&self.mem, limits, head, &mut self.segments, &mut walked);
        self.stats.descriptors += walked;
        self.stats.max_chain_descriptors = self.stats.max_chain_descriptors.max(walked);
        if let Err(e) = walk {
            log::debug!("virtio-blk: chain {head} refused: {e}");
            return Prepared::Done(0);
        }
        let Some(status) = self.status_byte(rings) else {
            log::debug!("virtio-blk: chain {head} has no usable status byte");
            return Prepared::Done(0);
        };
        let outcome = match self.parse(status, rings) {
            Ok(prepared) => return prepared,
            Err(outcome) => outcome,
        };
        if ram::write(&self.mem, status, &[outcome.status]).is_err() {
            // Checked by status_byte; memory does not shrink under a call.
            return Prepared::Done(0);
        }
        Prepared::Done(u32::try_from(outcome.written + 1).unwrap_or(u32::MAX))
    }

    /// Bytes the chain offers in one direction.
    fn bytes(&self, writable: bool) -> u64 {
        self.segments.iter().filter(|s| s.writable == writable).map(|s| u64::from(s.len)).sum()
    }

    /// The address of the last device-writable byte, if it is guest memory the device may
    /// write.
    fn status_byte(&self, rings: &Rings) -> Option<u64> {
        let last = self.segments.iter().rev().find(|s| s.writable && s.len > 0)?;
        let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
        let usable = self.mem.address_in_range(GuestAddress(addr)) && !rings.overlaps_any(addr, 1);
        usable.then_some(addr)
    }

    /// The pieces (address, length) of the `len` bytes after the first `skip` bytes of the
    /// chain's buffers in one direction.
    fn pieces(&self, writable: bool, skip: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut skip = skip;
        let mut left = len;
        self.segments.iter().filter(move |s| s.writable == writable).filter_map(move |s| {
            let seg_len = u64::from(s.len);
            let skipped = skip.min(seg_len);
            skip -= skipped;
            let take = (seg_len - skipped).min(left);
            left -= take;
            // `parse` refused buffers that wrap the address space.
            (take > 0).then(|| (s.addr + skipped, take))
        })
    }

    /// What the request is: a transfer to start, a flush, or (as the error) an outcome
    /// known without a transfer.
    fn parse(&mut self, status: u64, rings: &Rings) -> Result<Prepared, Outcome> {
        if self.segments.iter().any(|s| s.addr.checked_add(u64::from(s.len)).is_none()) {
            // A buffer past the end of the address space is not in guest memory.
            return Err(Outcome::status(request_status::IOERR));
        }
        let Some(header) = self.read_header() else {
            return Err(Outcome::status(request_status::IOERR));
        };
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        let ioerr = || Outcome::status(request_status::IOERR);
        match kind {
            request_type::IN => {
                // Every device-writable byte before the status byte.
                let len = self.bytes(true) - 1;
                let offset = self.disk_offset(sector, len).ok_or_else(ioerr)?;
                Ok(Prepared::Transfer { op: IoOp::Read, status, offset, len, writable: true, skip: 0 })
            }
            request_type::OUT => {
                if self.disk.read_only {
                    return Err(ioerr());
                }
                // Every device-readable byte after the header.
                let len = self.bytes(false) - HEADER_SIZE;
                let offset = self.disk_offset(sector, len).ok_or_else(ioerr)?;
                Ok(Prepared::Transfer {
                    op: IoOp::Write,
                    status,
                    offset,
                    len,
                    writable: false,
                    skip: HEADER_SIZE,
                })
            }
            request_type::FLUSH => Ok(Prepared::Flush { status }),
            request_type::GET_ID => Err(self.get_id(rings)),
            _ => Err(Outcome::status(request_status::UNSUPP)),
        }
    }

    /// The first 16 device-readable bytes, however the descriptors split them.
    fn read_header(&self) -> Option<[u8; HEADER_SIZE as usize]> {
        if self.bytes(false) < HEADER_SIZE {
            return None;
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        let mut at = 0usize;
        for (addr, len) in self.pieces(false, 0, HEADER_SIZE) {
            let end = at + len as usize;
            ram::read(&self.mem, addr, &mut header[at..end]).ok()?;
            at = end;
        }
        Some(header)
    }

    /// Byte offset into the image of `len` data bytes at `sector`, if they fit the disk.
    fn disk_offset(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.disk.sectors).then(|| sector * SECTOR_SIZE)
    }

    /// Appends to the arena the pieces of guest memory behind `len` bytes of the chain's
    /// buffers in one direction, after `skip`; returns their range in the arena.
    fn map_data(
        &mut self,
        writable: bool,
        skip: u64,
        len: u64,
        rings: &Rings,
    ) -> Result<(usize, usize), MapError> {
        let start = self.iovecs.used;
        let mut end = start;
        let align = self.disk.direct;
        let mut entries = std::mem::take(&mut self.iovecs.entries);
        let mapped = self.pieces(writable, skip, len).try_for_each(|(addr, len)| {
            if writable && rings.overlaps_any(addr, len) {
                return Err(MapError::Refused);
            }
            let len = usize::try_from(len).map_err(|_| MapError::Refused)?;
            // Most buffers lie in one region: one slice, without the general iterator.
            let whole = ram::slice(&self.mem, addr, len).map(Ok);
            let slices =
                whole.is_none().then(|| GuestMemoryBackend::get_slices(&self.mem, GuestAddress(addr), len));
            for slice in whole.into_iter().chain(slices.into_iter().flatten()) {
                let slice = slice.map_err(|_| MapError::Refused)?;
                if end == MAX_IOVECS {
                    return Err(if start == 0 { MapError::Refused } else { MapError::Full });
                }
                let base = slice.ptr_guard_mut().as_ptr();
                if let Some(align) = align {
                    // O_DIRECT: the kernel refuses buffers off the device's alignment.
                    if base as usize & (align.memory - 1) != 0 || slice.len() & (align.offset - 1) != 0 {
                        return Err(MapError::Refused);
                    }
                }
                entries[end] = libc::iovec { iov_base: base.cast(), iov_len: slice.len() };
                end += 1;
            }
            Ok(())
        });
        self.iovecs.entries = entries;
        mapped?;
        self.iovecs.used = end;
        Ok((start, end))
    }

    fn get_id(&mut self, rings: &Rings) -> Outcome {
        let len = ID_BYTES as u64;
        if self.bytes(true) - 1 < len {
            return Outcome::status(request_status::IOERR);
        }
        // The same checks as a read's data: in guest memory, not over a ring.
        let usable = self.pieces(true, 0, len).all(|(addr, piece)| {
            !rings.overlaps_any(addr, piece) && self.mem.check_range(GuestAddress(addr), piece as usize)
        });
        if !usable {
            return Outcome::status(request_status::IOERR);
        }
        let mut at = 0usize;
        for (addr, piece) in self.pieces(true, 0, len) {
            let end = at + piece as usize;
            if self.mem.write_slice(&self.id[at..end], GuestAddress(addr)).is_err() {
                return Outcome { status: request_status::IOERR, written: at as u64 };
            }
            at = end;
        }
        Outcome { status: request_status::OK, written: len }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::virtio::testing::{
        DESC_F_NEXT, DESC_F_WRITE, DriverQueue, counting_interrupt, guest_memory, memory_disk,
        write_blk_header,
    };

    const HDR: u64 = 0x4_0000;
    const DATA: u64 = 0x5_0000;
    const STATUS: u64 = 0x6_0000;

    struct Rig {
        mem: GuestMemoryMmap,
        inspect: File,
        interrupts: Arc<splitvisor_bus::CountingInterrupt>,
        worker: BlockWorker,
    }

    fn rig(read_only: bool) -> Rig {
        let mem = guest_memory(0x10_0000);
        let (disk, inspect) = memory_disk(64, read_only);
        let (interrupt, interrupts) = counting_interrupt();
        let queue = DriverQueue::new(&mem, 0x1000, 16).device_queue();
        let worker = BlockWorker::new(mem.clone(), queue, interrupt, Arc::new(disk), id_bytes("test-disk"));
        Rig { mem, inspect, interrupts, worker }
    }

    /// Offers header + one data segment + status as request `slot` and runs the worker.
    fn request(
        rig: &mut Rig,
        driver: &mut DriverQueue,
        kind: u32,
        sector: u64,
        len: u32,
        device_writes: bool,
    ) -> u8 {
        write_blk_header(&rig.mem, HDR, kind, sector);
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        let flags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
        driver.write_descriptor(1, DATA, len, flags, 2);
        driver.write_descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
        driver.publish(0);
        assert_eq!(rig.worker.process_queue().unwrap(), 1);
        rig.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn write_then_read_round_trips_through_the_image() {
        let mut rig = rig(false);
        let mem = rig.mem.clone();
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut rig, &mut driver, request_type::OUT, 3, 1024, false), request_status::OK);
        let mut on_disk = vec![0u8; 1024];
        rig.inspect.read_exact_at(&mut on_disk, 3 * 512).unwrap();
        assert_eq!(on_disk, pattern, "acknowledged data is in the image");

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut rig, &mut driver, request_type::IN, 3, 1024, true), request_status::OK);
        let mut read = vec![0u8; 1024];
        mem.read_slice(&mut read, GuestAddress(DATA)).unwrap();
        assert_eq!(read, pattern);
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used_elem(1), (0, 1025), "data plus status byte");
        assert_eq!(rig.interrupts.count(), 2);
    }

    #[test]
    fn flush_get_id_and_unknown_requests() {
        let mut rig = rig(false);
        let mem = rig.mem.clone();
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        assert_eq!(request(&mut rig, &mut driver, request_type::FLUSH, 0, 0, false), request_status::OK);
        assert_eq!(request(&mut rig, &mut driver, request_type::GET_ID, 0, 20, true), request_status::OK);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"test-disk");
        assert_eq!(request(&mut rig, &mut driver, 99, 0, 512, true), request_status::UNSUPP);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_keep_the_image() {
        let mut rig = rig(true);
        let mem = rig.mem.clone();
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut rig, &mut driver, request_type::OUT, 0, 512, false), request_status::IOERR);
        let mut sector = [0u8; 512];
        rig.inspect.read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [0u8; 512]);
        assert_eq!(request(&mut rig, &mut driver, request_type::IN, 0, 512, true), request_status::OK);
    }

    #[test]
    fn requests_beyond_the_disk_or_unaligned_fail() {
        let mut rig = rig(false);
        let mem = rig.mem.clone();
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        assert_eq!(request(&mut rig, &mut driver, request_type::IN, 63, 1024, true), request_status::IOERR);
        assert_eq!(
            request(&mut rig, &mut driver, request_type::IN, u64::MAX, 512, true),
            request_status::IOERR
        );
        assert_eq!(request(&mut rig, &mut driver, request_type::IN, 0, 100, true), request_status::IOERR);
        assert_eq!(request(&mut rig, &mut driver, request_type::IN, 63, 512, true), request_status::OK);
    }

    /// Records what the engine tells a journal.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl RequestJournal for Recorder {
        fn fetched(&mut self, head: u16) {
            self.0.push(format!("fetched {head}"));
        }
        fn completing(&mut self, head: u16) {
            self.0.push(format!("completing {head}"));
        }
        fn completed(&mut self, head: u16, used_idx: u16) {
            self.0.push(format!("completed {head} at {used_idx}"));
        }
    }

    /// Header at `HDR + 0x100 * head`, data at `DATA + 0x1000 * head`, status at
    /// `STATUS + head`, as chain `head` (descriptors 3 * head ..).
    fn chain(mem: &GuestMemoryMmap, driver: &DriverQueue<'_>, head: u16, kind: u32, sector: u64) {
        let hdr = HDR + 0x100 * u64::from(head);
        write_blk_header(mem, hdr, kind, sector);
        let first = 3 * head;
        let data_flags =
            if matches!(kind, request_type::IN | request_type::GET_ID) { DESC_F_WRITE } else { 0 };
        driver.write_descriptor(first, hdr, 16, DESC_F_NEXT, first + 1);
        driver.write_descriptor(
            first + 1,
            DATA + 0x1000 * u64::from(head),
            512,
            data_flags | DESC_F_NEXT,
            first + 2,
        );
        driver.write_descriptor(first + 2, STATUS + u64::from(head), 1, DESC_F_WRITE, 0);
    }

    fn engine(mem: &GuestMemoryMmap) -> (BlockRequests, File) {
        let (disk, inspect) = memory_disk(64, false);
        (BlockRequests::new(mem.clone(), Arc::new(disk), id_bytes("j")), inspect)
    }

    #[test]
    fn the_journal_hears_each_request_fetched_completing_and_completed() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, _) = engine(&mem);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        driver.start_at(0xfffe);
        let mut queue = driver.device_queue();
        // Heads are chain starts: 3 and 6 (descriptors 3 * n).
        chain(&mem, &driver, 1, request_type::FLUSH, 0);
        chain(&mem, &driver, 2, request_type::IN, 0);
        driver.publish(3);
        driver.publish(6);
        let mut journal = Recorder::default();
        let processed = requests.process_queue_with(&mut queue, &mut journal).unwrap();
        assert_eq!(processed.completed, 2);
        // The used index wraps at 2^16.
        assert_eq!(
            journal.0,
            [
                "fetched 3",
                "completing 3",
                "completed 3 at 65535",
                "fetched 6",
                "completing 6",
                "completed 6 at 0"
            ]
        );
        assert_eq!(driver.used_idx(), 0);
        assert_eq!(driver.used_elem(0xffff), (6, 513));
    }

    /// A driver that keeps one request in flight offers the next only once it saw the last
    /// complete. With a poll limit the engine looks for it before it returns: one call
    /// serves the whole budget (the queue size) of such requests, without a kick between
    /// them. Without the look the call would end after the first. At the budget it looks
    /// too, and returns with the request it found pending: without that look, the driver
    /// would kick (an exit) once every queue-size requests.
    #[test]
    fn requests_offered_one_after_the_other_are_found_by_looking_at_the_ring() {
        const SIZE: u16 = 8;
        let mem = guest_memory(0x10_0000);
        let (mut requests, _) = engine(&mem);
        let mut driver = DriverQueue::new(&mem, 0x1000, SIZE);
        let mut queue = driver.device_queue();
        // Two chains, used in turn: a request's chain is free again once it completed.
        chain(&mem, &driver, 1, request_type::IN, 0);
        chain(&mem, &driver, 2, request_type::OUT, 8);
        let (_, avail, used) = driver.addresses();
        let announced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = announced.clone();
        requests.set_notifier(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        // Far longer than the driver thread can take to answer: the test does not depend on
        // how fast this machine schedules it.
        requests.set_poll_limit(Duration::from_secs(30));
        driver.publish(3);
        let driver_mem = mem.clone();
        let heard = announced.clone();
        let offering = std::thread::spawn(move || {
            let give_up = Instant::now() + Duration::from_secs(60);
            // One request more than the budget of a call.
            for k in 1..=SIZE {
                // Wait for the k-th completion and its announcement ... (Offered as soon as
                // the used index moved, a request could be found before the engine looked
                // for it, and its completion rightly announced together with a later one:
                // a driver thread that ran just then made this test fail under load.) An
                // engine that looked without announcing first waits out its poll limit
                // for a request that never comes, and serves fewer than SIZE.
                while driver_mem.read_obj::<u16>(GuestAddress(used + 2)).map(u16::from_le).ok() != Some(k)
                    || heard.load(Ordering::SeqCst) < usize::from(k)
                {
                    assert!(Instant::now() < give_up, "request {k} never completed and announced");
                    std::thread::yield_now();
                }
                // ... then offer the next request, with no kick.
                let head: u16 = if k % 2 == 0 { 3 } else { 6 };
                let slot = avail + 4 + 2 * u64::from(k % SIZE);
                driver_mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
                driver_mem.write_obj((k + 1).to_le(), GuestAddress(avail + 2)).unwrap();
            }
        });
        let processed = requests.process_queue(&mut queue).unwrap();
        assert_eq!(processed.completed, usize::from(SIZE));
        assert_eq!(driver.used_idx(), SIZE);
        // Each completion was announced before the engine looked for the next request,
        // the last one's at the budget too; the request found there waits for the next
        // call, which the caller makes at once.
        assert!(announced.load(Ordering::SeqCst) >= usize::from(SIZE));
        assert!(processed.pending, "the request offered after the budget was not looked for");
        offering.join().unwrap();
        // (No look after it: nothing more comes.)
        requests.set_poll_limit(Duration::ZERO);
        let processed = requests.process_queue(&mut queue).unwrap();
        assert_eq!(processed.completed, 1);
        assert_eq!(driver.used_idx(), SIZE + 1);
    }

    #[test]
    fn the_poll_window_grows_on_a_find_and_shrinks_on_a_miss_within_its_bounds() {
        let mut poll = RingPoll::new(Duration::from_micros(64));
        assert_eq!(poll.window, Duration::from_micros(64));
        for _ in 0..10 {
            poll.missed();
        }
        assert_eq!(poll.window, RingPoll::FLOOR);
        poll.found();
        assert_eq!(poll.window, 2 * RingPoll::FLOOR);
        for _ in 0..10 {
            poll.found();
        }
        assert_eq!(poll.window, Duration::from_micros(64));
        // No limit: never looks.
        let mut off = RingPoll::default();
        off.missed();
        off.found();
        assert!(off.window.is_zero());
    }

    #[test]
    fn resubmitted_requests_run_again_in_the_given_order() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, inspect) = engine(&mem);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        chain(&mem, &driver, 1, request_type::OUT, 7);
        chain(&mem, &driver, 2, request_type::FLUSH, 0);
        mem.write_slice(&[0x77; 512], GuestAddress(DATA + 0x1000)).unwrap();
        driver.publish(3);
        driver.publish(6);
        // A previous backend took both off the ring and died before completing them.
        queue.set_next_avail(2);
        let mut journal = Recorder::default();
        let processed = requests.resubmit(&mut queue, &[6, 3], &mut journal).unwrap();
        assert_eq!(processed.completed, 2);
        assert_eq!(journal.0, ["completing 6", "completed 6 at 1", "completing 3", "completed 3 at 2"]);
        assert_eq!((driver.used_elem(0), driver.used_elem(1)), ((6, 1), (3, 1)));
        let mut sector = [0u8; 512];
        inspect.read_exact_at(&mut sector, 7 * 512).unwrap();
        assert_eq!(sector, [0x77; 512], "the write ran again");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), request_status::OK);
        // Nothing else is available: the ring window was theirs.
        assert_eq!(requests.process_queue(&mut queue).unwrap().completed, 0);

        // Heads beyond the queue, repeated, or more than it holds are refused untouched.
        let mut journal = Recorder::default();
        assert!(matches!(requests.resubmit(&mut queue, &[16], &mut journal), Err(QueueError::Broken(_))));
        assert!(matches!(
            requests.resubmit(&mut queue, &[3, 3], &mut journal),
            Err(QueueError::Resubmit { .. })
        ));
        let many: Vec<u16> = (0..17).collect();
        assert!(matches!(
            requests.resubmit(&mut queue, &many, &mut journal),
            Err(QueueError::Resubmit { .. })
        ));
        assert!(journal.0.is_empty());
        assert_eq!(driver.used_idx(), 2);
    }

    #[test]
    fn buffers_split_across_memory_regions_are_one_request() {
        use crate::virtio::testing::guest_memory_regions;
        // Two adjacent regions meeting at DATA + 0x100, and a hole after the second.
        let mem = guest_memory_regions(&[(0, (DATA + 0x100) as usize), (DATA + 0x100, 0x1_0000)]);
        let (disk, inspect) = memory_disk(64, false);
        inspect.write_all_at(&[0x42; 1024], 0).unwrap();
        let queue = DriverQueue::new(&mem, 0x1000, 16).device_queue();
        let (interrupt, _) = counting_interrupt();
        let mut worker = BlockWorker::new(mem.clone(), queue, interrupt, Arc::new(disk), id_bytes("r"));
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        write_blk_header(&mem, HDR, request_type::IN, 0);
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        driver.write_descriptor(1, DATA, 1025, DESC_F_WRITE, 0);
        driver.publish(0);
        assert_eq!(worker.process_queue().unwrap(), 1);
        let mut data = vec![0u8; 1025];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..1024].iter().all(|&b| b == 0x42));
        assert_eq!(data[1024], request_status::OK);
        assert_eq!(worker.requests().stats().transfers, 1, "one preadv over both regions");
        // The same read running into the hole is refused.
        driver.write_descriptor(1, DATA + 0x1_0000 - 512, 1025, DESC_F_WRITE, 0);
        driver.publish(0);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(driver.used_elem(1), (0, 0), "no status byte in memory: returned empty");
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let (disk, _) = memory_disk(64, false);
        let block = Block::new(disk, "x");
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 64);
        let mut blk_size = [0u8; 4];
        block.read_config(20, &mut blk_size);
        assert_eq!(u32::from_le_bytes(blk_size), 512);
        let mut beyond = [0xffu8; 4];
        block.read_config(1000, &mut beyond);
        assert_eq!(beyond, [0xff; 4], "reads past the config leave the (zeroed by the transport) buffer");
        assert_ne!(block.device_features() & features::RING_EVENT_IDX, 0);
        assert_ne!(block.device_features() & features::RING_INDIRECT_DESC, 0);
        assert_eq!(block.device_features() & feature::RO, 0);
    }

    /// An engine that runs the transfers pushed since the last wait when waited for, the
    /// last pushed first, moving at most `chunk` bytes each; it logs what it did.
    struct Reversing {
        disk: Arc<DiskImage>,
        queued: Vec<Transfer>,
        chunk: Option<usize>,
        log: Arc<Mutex<Vec<String>>>,
        outstanding: usize,
    }

    impl Reversing {
        fn boxed(
            disk: &Arc<DiskImage>,
            chunk: Option<usize>,
            log: &Arc<Mutex<Vec<String>>>,
        ) -> Box<dyn IoEngine> {
            Box::new(Self { disk: disk.clone(), queued: Vec::new(), chunk, log: log.clone(), outstanding: 0 })
        }
    }

    impl IoEngine for Reversing {
        fn name(&self) -> &'static str {
            "reversing"
        }

        unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()> {
            self.log.lock().unwrap().push(format!("push {:?} {}", transfer.op, transfer.tag));
            self.queued.push(transfer);
            self.outstanding += 1;
            Ok(())
        }

        fn submit(&mut self) -> io::Result<()> {
            Ok(())
        }

        fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
            while let Some(mut transfer) = self.queued.pop() {
                let mut short = Vec::new();
                if let (Some(chunk), true) = (self.chunk, transfer.op != IoOp::Sync) {
                    // SAFETY: the engine's caller keeps the iovecs valid until completion.
                    let iovecs =
                        unsafe { std::slice::from_raw_parts(transfer.iovecs, transfer.count as usize) };
                    let mut left = chunk;
                    for iov in iovecs {
                        if left == 0 {
                            break;
                        }
                        let len = iov.iov_len.min(left);
                        short.push(libc::iovec { iov_base: iov.iov_base, iov_len: len });
                        left -= len;
                    }
                    transfer.iovecs = short.as_ptr();
                    transfer.count = short.len() as u32;
                }
                // SAFETY: as above; `short` lives until after the call.
                let result = unsafe { block_io::execute(self.disk.file().as_raw_fd(), &transfer) };
                self.log.lock().unwrap().push(format!("done {:?} {}", transfer.op, transfer.tag));
                done.push(Completion { tag: transfer.tag, result });
                self.outstanding -= 1;
            }
            Ok(())
        }

        fn outstanding(&self) -> usize {
            self.outstanding
        }
    }

    fn reversing_engine(
        mem: &GuestMemoryMmap,
        chunk: Option<usize>,
    ) -> (BlockRequests, File, Arc<Mutex<Vec<String>>>) {
        let (disk, inspect) = memory_disk(64, false);
        let disk = Arc::new(disk);
        let log = Arc::default();
        let engine = Reversing::boxed(&disk, chunk, &log);
        (BlockRequests::with_io_engine(mem.clone(), disk, id_bytes("o"), Some(engine)), inspect, log)
    }

    #[test]
    fn requests_of_one_kick_complete_out_of_order_and_the_journal_follows_each() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, inspect, log) = reversing_engine(&mem, None);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        for head in 1..=3u16 {
            chain(&mem, &driver, head, request_type::OUT, 2 * u64::from(head));
            mem.write_slice(&[0x10 * head as u8; 512], GuestAddress(DATA + 0x1000 * u64::from(head)))
                .unwrap();
            driver.publish(3 * head);
        }
        let mut journal = Recorder::default();
        let processed = requests.process_queue_with(&mut queue, &mut journal).unwrap();
        assert_eq!(processed.completed, 3);
        assert_eq!(
            journal.0,
            [
                "fetched 3",
                "fetched 6",
                "fetched 9",
                "completing 9",
                "completed 9 at 1",
                "completing 6",
                "completed 6 at 2",
                "completing 3",
                "completed 3 at 3"
            ],
            "all three in flight at once, each returned on its own as it completes"
        );
        assert_eq!(log.lock().unwrap()[..3], ["push Write 0", "push Write 1", "push Write 2"]);
        assert_eq!([driver.used_elem(0), driver.used_elem(1), driver.used_elem(2)], [(9, 1), (6, 1), (3, 1)]);
        for head in 1..=3u16 {
            let mut sector = [0u8; 512];
            inspect.read_exact_at(&mut sector, 2 * u64::from(head) * 512).unwrap();
            assert_eq!(sector, [0x10 * head as u8; 512]);
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS + u64::from(head))).unwrap(),
                request_status::OK
            );
        }
        assert_eq!(requests.stats().transfers, 3);
    }

    #[test]
    fn requests_one_at_a_time_with_depth_one() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, _, _) = reversing_engine(&mem, None);
        requests.set_depth(1);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        for head in 1..=2u16 {
            chain(&mem, &driver, head, request_type::IN, 0);
            driver.publish(3 * head);
        }
        let mut journal = Recorder::default();
        requests.process_queue_with(&mut queue, &mut journal).unwrap();
        assert_eq!(
            journal.0,
            [
                "fetched 3",
                "completing 3",
                "completed 3 at 1",
                "fetched 6",
                "completing 6",
                "completed 6 at 2"
            ]
        );
    }

    #[test]
    fn a_short_transfer_goes_on_where_it_stopped() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, inspect, _) = reversing_engine(&mem, Some(512));
        let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 13 % 251) as u8).collect();
        inspect.write_all_at(&pattern, 5 * 512).unwrap();
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        write_blk_header(&mem, HDR, request_type::IN, 5);
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        driver.write_descriptor(1, DATA, 1024, DESC_F_WRITE | DESC_F_NEXT, 2);
        driver.write_descriptor(2, DATA + 0x1000, 1024, DESC_F_WRITE | DESC_F_NEXT, 3);
        driver.write_descriptor(3, STATUS, 1, DESC_F_WRITE, 0);
        driver.publish(0);
        assert_eq!(requests.process_queue(&mut queue).unwrap().completed, 1);
        assert_eq!(requests.stats().transfers, 4, "four transfers of 512 bytes");
        assert_eq!(driver.used_elem(0), (0, 2049));
        let mut read = vec![0u8; 2048];
        mem.read_slice(&mut read[..1024], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut read[1024..], GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(read, pattern);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), request_status::OK);
    }

    #[test]
    fn flush_waits_for_every_earlier_request() {
        let mem = guest_memory(0x10_0000);
        let (mut requests, _, log) = reversing_engine(&mem, None);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        chain(&mem, &driver, 1, request_type::OUT, 0);
        chain(&mem, &driver, 2, request_type::OUT, 1);
        chain(&mem, &driver, 3, request_type::FLUSH, 0);
        for head in [3, 6, 9] {
            driver.publish(head);
        }
        let mut journal = Recorder::default();
        assert_eq!(requests.process_queue_with(&mut queue, &mut journal).unwrap().completed, 3);
        assert_eq!(
            *log.lock().unwrap(),
            ["push Write 0", "push Write 1", "done Write 1", "done Write 0", "push Sync 0", "done Sync 0"],
            "the sync starts once both writes reached the file"
        );
        assert_eq!(journal.0[7..], ["completing 9", "completed 9 at 3"]);
        assert_eq!(requests.stats().syncs, 1);
    }

    /// 15 writes in one kick, then 15 reads of them in another, on the engine `kind`.
    fn batch_through(kind: EngineKind) {
        let mem = guest_memory(0x10_0000);
        let (disk, inspect) = memory_disk(64, false);
        let mut requests = BlockRequests::with_engine(mem.clone(), Arc::new(disk), id_bytes("b"), kind);
        let name = if kind == EngineKind::Threads { "threads" } else { "io_uring" };
        assert_eq!(requests.engine_name(), Some(name));
        let mut driver = DriverQueue::new(&mem, 0x1000, 64);
        let mut queue = driver.device_queue();
        for head in 1..=15u16 {
            chain(&mem, &driver, head, request_type::OUT, u64::from(head));
            mem.write_slice(&[head as u8; 512], GuestAddress(DATA + 0x1000 * u64::from(head))).unwrap();
            driver.publish(3 * head);
        }
        let processed = requests.process_queue(&mut queue).unwrap();
        assert_eq!((processed.completed, requests.stats().transfers), (15, 15));
        for head in 1..=15u16 {
            let mut sector = [0u8; 512];
            inspect.read_exact_at(&mut sector, u64::from(head) * 512).unwrap();
            assert_eq!(sector, [head as u8; 512], "{name}: sector {head}");
            mem.write_slice(&[0u8; 512], GuestAddress(DATA + 0x1000 * u64::from(head))).unwrap();
            chain(&mem, &driver, head, request_type::IN, u64::from(head));
            driver.publish(3 * head);
        }
        assert_eq!(requests.process_queue(&mut queue).unwrap().completed, 15);
        for head in 1..=15u16 {
            let mut data = [0u8; 512];
            mem.read_slice(&mut data, GuestAddress(DATA + 0x1000 * u64::from(head))).unwrap();
            assert_eq!(data, [head as u8; 512], "{name}: read back {head}");
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS + u64::from(head))).unwrap(),
                request_status::OK
            );
        }
        assert_eq!(driver.used_idx(), 30);
    }

    #[test]
    fn a_batch_goes_through_io_uring() {
        batch_through(EngineKind::IoUring);
    }

    #[test]
    fn a_batch_goes_through_the_thread_pool_fallback() {
        batch_through(EngineKind::Threads);
    }

    #[test]
    fn without_an_engine_transfers_fail_and_the_queue_goes_on() {
        let mem = guest_memory(0x10_0000);
        let (disk, _) = memory_disk(64, false);
        let mut requests = BlockRequests::with_io_engine(mem.clone(), Arc::new(disk), id_bytes("n"), None);
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        chain(&mem, &driver, 1, request_type::IN, 0);
        chain(&mem, &driver, 2, request_type::GET_ID, 0);
        driver.publish(3);
        driver.publish(6);
        assert_eq!(requests.process_queue(&mut queue).unwrap().completed, 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), request_status::IOERR);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap(), request_status::OK);
    }

    #[test]
    fn several_queues_are_offered_with_mq() {
        let (disk, _) = memory_disk(64, false);
        let block = Block::new(disk, "x").with_queues(4);
        assert_eq!(block.queue_max_sizes(), [QUEUE_SIZE; 4]);
        assert_ne!(block.device_features() & feature::MQ, 0);
        let mut num_queues = [0u8; 2];
        block.read_config(34, &mut num_queues);
        assert_eq!(u16::from_le_bytes(num_queues), 4);
        let (disk, _) = memory_disk(64, false);
        let single = Block::new(disk, "x");
        assert_eq!(single.queue_max_sizes(), [QUEUE_SIZE]);
        assert_eq!(single.device_features() & feature::MQ, 0);
        let (disk, _) = memory_disk(64, false);
        assert_eq!(Block::new(disk, "x").with_queues(1000).queue_max_sizes().len(), usize::from(MAX_QUEUES));
    }

    /// A 64-sector image file in the temporary directory (O_DIRECT needs a real file
    /// system), removed on drop.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("splitvisor-blk-{}-{name}.img", std::process::id()));
            File::create(&path).unwrap().set_len(64 * 512).unwrap();
            Self(path)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn cache_none_moves_aligned_buffers_and_refuses_the_others() {
        let image = TempImage::new("direct");
        let disk = DiskImage::open_with(&image.0, false, CacheMode::None).unwrap();
        assert_eq!(disk.cache(), CacheMode::None);
        let align = disk.direct_io().unwrap();
        assert!(align.memory.is_power_of_two() && align.offset.is_power_of_two(), "{align:?}");
        assert_eq!(disk.block_size(), (align.offset as u32).max(512));
        let mem = guest_memory(0x10_0000);
        let mut requests = BlockRequests::new(mem.clone(), Arc::new(disk), id_bytes("d"));
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        assert_eq!(direct_write(&mem, &mut requests, &mut driver, &mut queue, DATA, 8), request_status::OK);
        let mut on_disk = vec![0u8; 4096];
        File::open(&image.0).unwrap().read_exact_at(&mut on_disk, 8 * 512).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x5a), "the write reached the file");
        // Guest memory is page-aligned on the host: a buffer one byte in is not aligned.
        assert_eq!(
            direct_write(&mem, &mut requests, &mut driver, &mut queue, DATA + 1, 16),
            request_status::IOERR
        );

        // The same request through the page cache is fine.
        let image = TempImage::new("cached");
        let disk = DiskImage::open_with(&image.0, false, CacheMode::Writeback).unwrap();
        assert_eq!((disk.cache(), disk.direct_io(), disk.block_size()), (CacheMode::Writeback, None, 512));
        let mut requests = BlockRequests::new(mem.clone(), Arc::new(disk), id_bytes("c"));
        let mut driver = DriverQueue::new(&mem, 0x1000, 16);
        let mut queue = driver.device_queue();
        assert_eq!(
            direct_write(&mem, &mut requests, &mut driver, &mut queue, DATA + 1, 16),
            request_status::OK
        );
    }

    /// A 4 KiB write of 0x5a bytes from `data` to `sector`; its status.
    fn direct_write(
        mem: &GuestMemoryMmap,
        requests: &mut BlockRequests,
        driver: &mut DriverQueue<'_>,
        queue: &mut Queue,
        data: u64,
        sector: u64,
    ) -> u8 {
        write_blk_header(mem, HDR, request_type::OUT, sector);
        mem.write_slice(&[0x5a; 4096], GuestAddress(data)).unwrap();
        driver.write_descriptor(0, HDR, 16, DESC_F_NEXT, 1);
        driver.write_descriptor(1, data, 4096, DESC_F_NEXT, 2);
        driver.write_descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
        driver.publish(0);
        assert_eq!(requests.process_queue(queue).unwrap().completed, 1);
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn a_cache_none_image_handed_over_as_an_fd_keeps_o_direct() {
        let image = TempImage::new("handed");
        let disk = DiskImage::open_with(&image.0, false, CacheMode::None).unwrap();
        let fd = disk.file().try_clone().unwrap();
        drop(disk);
        let received = DiskImage::from_file(fd, false, "fd").unwrap();
        assert_eq!(received.cache(), CacheMode::None);
    }
}
