//! virtio-blk over a raw image file (virtio 1.x, 5.2).
//!
//! [`Block`] is the configuration part: features and configuration space. When the driver
//! is ready it starts a [`BlockWorker`] thread per queue, which needs only guest memory, the
//! queue, the kick eventfd, the interrupt and the image. Requests are served synchronously
//! in the worker with `pread`/`pwrite`, and a request is put in the used ring only after its
//! data has reached the image file (the page cache for writes; the disk after a FLUSH,
//! which `fdatasync`s before its status is written).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, device_type, features,
};

/// Bytes per sector: the unit of `sector` and `capacity`, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment: bounds the worker's bounce buffer whatever the guest asks.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (the queue size less header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of the device ID returned by GET_ID.
pub const ID_BYTES: usize = 20;

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
const HEADER_SIZE: u32 = 16;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
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
}

/// The GET_ID answer for `id`: its first 20 bytes, NUL-padded.
pub fn id_bytes(id: &str) -> [u8; ID_BYTES] {
    let mut bytes = [0u8; ID_BYTES];
    let len = id.len().min(ID_BYTES);
    bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
    bytes
}

/// A raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    read_only: bool,
    sectors: u64,
}

impl DiskImage {
    /// Opens `path`, read-only if `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Unaligned { path: path.to_path_buf(), size });
        }
        Ok(Self::from_file(file, read_only, size / SECTOR_SIZE))
    }

    /// Wraps an open file of `sectors` sectors.
    pub fn from_file(file: File, read_only: bool, sectors: u64) -> Self {
        Self { file, read_only, sectors }
    }

    /// The open image (to hand to a driver partition, or to derive an ID from).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// The features a virtio-blk device on `disk` offers.
pub fn device_features(disk: &DiskImage) -> u64 {
    let ro = if disk.read_only { feature::RO } else { 0 };
    features::VERSION_1
        | features::RING_EVENT_IDX
        | features::RING_INDIRECT_DESC
        | feature::SIZE_MAX
        | feature::SEG_MAX
        | feature::BLK_SIZE
        | feature::FLUSH
        | ro
}

/// The configuration space of a virtio-blk device on `disk` (virtio_blk_config up to
/// blk_size: capacity, size_max, seg_max, geometry (not offered), blk_size).
pub fn config_space(disk: &DiskImage) -> [u8; 24] {
    let mut config = [0u8; 24];
    config[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
    config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    config
}

/// The virtio-blk device: configuration space and features; workers serve the queue.
pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    worker: Option<WorkerHandle>,
}

struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Block {
    /// A block device on `disk`, answering GET_ID with `id` (truncated to 20 bytes).
    pub fn new(disk: DiskImage, id: &str) -> Self {
        Self { disk: Arc::new(disk), id: id_bytes(id), worker: None }
    }

    fn config(&self) -> [u8; 24] {
        config_space(&self.disk)
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop.write(1);
            if worker.thread.join().is_err() {
                log::error!("virtio-blk: the queue worker panicked");
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        device_features(&self.disk)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::copy_config(&self.config(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<ActiveQueue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let active = queues.into_iter().next().ok_or(ActivateError::MissingQueue(0))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker = BlockWorker::new(mem, active.queue, interrupt, self.disk.clone(), self.id);
        let kick = active.kick;
        let stop_worker = stop.try_clone().map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run(&kick, &stop_worker))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Why the worker stopped serving its queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The driver broke the queue (an available index beyond the queue size, rings outside
    /// memory): the device needs a reset.
    #[error("the driver broke the queue: {0}")]
    Broken(#[source] virtio_queue::Error),
}

/// How one request ended, before its status is written.
struct Outcome {
    status: u8,
    /// Bytes written into the guest's buffers, data only.
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
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
}

/// The request engine of virtio-blk: takes requests off a queue, executes them on the
/// image and returns them. Shared by the in-process [`BlockWorker`] and the vhost-user
/// backend of a driver partition, which owns its queues differently.
pub struct BlockRequests {
    mem: GuestMemoryMmap,
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
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
pub struct NoJournal;

impl RequestJournal for NoJournal {}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processed {
    /// Requests completed (put in the used ring).
    pub completed: usize,
    /// The driver asked to be interrupted (EVENT_IDX, or no suppression).
    pub notify: bool,
}

impl BlockWorker {
    /// A worker for `queue` (already set up and valid) on `disk`.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: VirtioInterrupt,
        disk: Arc<DiskImage>,
        id: [u8; ID_BYTES],
    ) -> Self {
        Self { requests: BlockRequests::new(mem, disk, id), queue, interrupt, broken: false }
    }

    /// The queue state (indices included), e.g. to hand over to another worker.
    pub fn queue(&self) -> &Queue {
        &self.queue
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
            use std::os::fd::AsRawFd;
            if let Err(e) =
                epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
            {
                log::error!("virtio-blk: cannot watch an eventfd: {e}");
                return;
            }
        }
        // Requests may already be waiting (a worker restarted under a running guest).
        self.serve();
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
            for event in &events[..ready] {
                match event.data() {
                    STOP => return,
                    _ => {
                        let _ = kick.read();
                        self.serve();
                    }
                }
            }
        }
    }

    /// Processes the queue and reports a broken queue to the driver.
    fn serve(&mut self) {
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
        }
    }

    /// Handles every available request, then interrupts the driver if it wants to be.
    /// Returns how many requests were completed.
    pub fn process_queue(&mut self) -> Result<usize, QueueError> {
        let processed = self.requests.process_queue(&mut self.queue)?;
        if processed.notify {
            if let Err(e) = self.interrupt.signal_used_buffer() {
                log::warn!("virtio-blk: cannot interrupt the driver: {e}");
            }
        }
        Ok(processed.completed)
    }
}

impl BlockRequests {
    /// Requests on `disk` in guest memory `mem`, answering GET_ID with `id`.
    pub fn new(mem: GuestMemoryMmap, disk: Arc<DiskImage>, id: [u8; ID_BYTES]) -> Self {
        Self { mem, disk, id, bounce: Vec::new() }
    }

    /// Guest memory changed (a vhost-user frontend sent a new memory table).
    pub fn set_memory(&mut self, mem: GuestMemoryMmap) {
        self.mem = mem;
    }

    /// Handles every available request of `queue`; says whether the driver wants an
    /// interrupt for them.
    pub fn process_queue(&mut self, queue: &mut Queue) -> Result<Processed, QueueError> {
        self.process_queue_with(queue, &mut NoJournal)
    }

    /// [`process_queue`](Self::process_queue), telling `journal` about each request.
    pub fn process_queue_with(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        let mut completed = 0;
        loop {
            if queue.event_idx_enabled() {
                queue.disable_notification(&self.mem).map_err(QueueError::Broken)?;
            }
            // Take every available chain first (several requests per kick). A chain ends at
            // the queue size (loops) or at its first bad descriptor; either way the last
            // descriptor collected then still claims a successor, which `handle` refuses.
            let mem = self.mem.clone();
            let requests: Vec<(u16, Vec<Descriptor>)> = queue
                .iter(&mem)
                .map_err(QueueError::Broken)?
                .map(|chain| (chain.head_index(), chain.collect()))
                .collect();
            for (head, _) in &requests {
                journal.fetched(*head);
            }
            for (head, descriptors) in requests {
                let used = self.handle(&descriptors);
                journal.completing(head);
                queue.add_used(&self.mem, head, used).map_err(QueueError::Broken)?;
                journal.completed(head, queue.next_used());
                completed += 1;
            }
            if !queue.event_idx_enabled()
                || !queue.enable_notification(&self.mem).map_err(QueueError::Broken)?
            {
                break;
            }
        }
        let notify = completed > 0 && queue.needs_notification(&self.mem).map_err(QueueError::Broken)?;
        Ok(Processed { completed, notify })
    }

    /// Executes one request; returns the length for the used ring.
    fn handle(&mut self, descriptors: &[Descriptor]) -> u32 {
        let Some((status, rest)) = descriptors.split_last() else {
            return 0;
        };
        if status.has_next() || !status.is_write_only() || status.len() < 1 {
            // No place to put a status: the driver gets the buffer back unused.
            log::debug!("virtio-blk: malformed chain (no writable status descriptor at its end)");
            return 0;
        }
        let outcome = self.execute(rest);
        if self.mem.write_obj(outcome.status, status.addr()).is_err() {
            log::debug!("virtio-blk: status byte at {:#x} is outside guest memory", status.addr().0);
            return 0;
        }
        outcome.written.saturating_add(1)
    }

    fn execute(&mut self, descriptors: &[Descriptor]) -> Outcome {
        let Some((header, data)) = descriptors.split_first() else {
            return Outcome::status(request_status::IOERR);
        };
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Outcome::status(request_status::IOERR);
        }
        let Ok(kind) = self.mem.read_obj::<u32>(header.addr()) else {
            return Outcome::status(request_status::IOERR);
        };
        let Some(sector) =
            header.addr().0.checked_add(8).and_then(|addr| self.mem.read_obj::<u64>(GuestAddress(addr)).ok())
        else {
            return Outcome::status(request_status::IOERR);
        };
        let kind = u32::from_le(kind);
        let sector = u64::from_le(sector);
        match kind {
            request_type::IN => self.read(sector, data),
            request_type::OUT => self.write(sector, data),
            request_type::FLUSH => match self.disk.file.sync_data() {
                Ok(()) => Outcome::status(request_status::OK),
                Err(e) => {
                    log::warn!("virtio-blk: fdatasync failed: {e}");
                    Outcome::status(request_status::IOERR)
                }
            },
            request_type::GET_ID => self.get_id(data),
            _ => Outcome::status(request_status::UNSUPP),
        }
    }

    /// Checks that the data segments have the right direction and size and fit the disk
    /// from `sector` on; returns the byte offset into the image.
    fn check_data(&self, sector: u64, data: &[Descriptor], device_writes: bool) -> Option<u64> {
        let mut total: u64 = 0;
        for descriptor in data {
            if descriptor.is_write_only() != device_writes || descriptor.len() > SIZE_MAX {
                return None;
            }
            total += u64::from(descriptor.len());
        }
        if total % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(total / SECTOR_SIZE)?;
        (end <= self.disk.sectors).then(|| sector * SECTOR_SIZE)
    }

    fn read(&mut self, sector: u64, data: &[Descriptor]) -> Outcome {
        let Some(mut offset) = self.check_data(sector, data, true) else {
            return Outcome::status(request_status::IOERR);
        };
        let mut written = 0u32;
        for descriptor in data {
            let len = descriptor.len() as usize;
            self.bounce.resize(len, 0);
            if let Err(e) = self.disk.file.read_exact_at(&mut self.bounce[..len], offset) {
                log::warn!("virtio-blk: read at {offset} failed: {e}");
                return Outcome { status: request_status::IOERR, written };
            }
            if self.mem.write_slice(&self.bounce[..len], descriptor.addr()).is_err() {
                return Outcome { status: request_status::IOERR, written };
            }
            offset += len as u64;
            written += descriptor.len();
        }
        Outcome { status: request_status::OK, written }
    }

    fn write(&mut self, sector: u64, data: &[Descriptor]) -> Outcome {
        if self.disk.read_only {
            return Outcome::status(request_status::IOERR);
        }
        let Some(mut offset) = self.check_data(sector, data, false) else {
            return Outcome::status(request_status::IOERR);
        };
        for descriptor in data {
            let len = descriptor.len() as usize;
            self.bounce.resize(len, 0);
            if self.mem.read_slice(&mut self.bounce[..len], descriptor.addr()).is_err() {
                return Outcome::status(request_status::IOERR);
            }
            if let Err(e) = self.disk.file.write_all_at(&self.bounce[..len], offset) {
                log::warn!("virtio-blk: write at {offset} failed: {e}");
                return Outcome::status(request_status::IOERR);
            }
            offset += len as u64;
        }
        Outcome::status(request_status::OK)
    }

    fn get_id(&mut self, data: &[Descriptor]) -> Outcome {
        let Some(buffer) = data.first().filter(|d| d.is_write_only() && d.len() as usize >= ID_BYTES) else {
            return Outcome::status(request_status::IOERR);
        };
        match self.mem.write_slice(&self.id, buffer.addr()) {
            Ok(()) => Outcome { status: request_status::OK, written: ID_BYTES as u32 },
            Err(_) => Outcome::status(request_status::IOERR),
        }
    }
}

#[cfg(test)]
mod tests {
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
}
