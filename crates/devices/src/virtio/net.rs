//! virtio-net (virtio 1.x, 5.1): one receive and one transmit queue over a [`NetBackend`].
//!
//! The device is split like virtio-blk:
//! * [`Net`] is the configuration part (features, MAC, link status, MTU) behind the
//!   transport. When the driver is ready it starts one worker thread that serves both queues,
//!   woken by either queue's kick eventfd and by the backend's fd becoming readable.
//! * [`NetTx`] and [`NetRx`] are the queue engines. They need only guest memory, a queue and
//!   the backend, so a driver partition runs the very same code behind vhost-user
//!   (`splitvisor_isolation::backend::net`).
//!
//! Every frame crosses the backend with its 12-byte `virtio_net_hdr_v1` in front, which is
//! what a TAP with `IFF_VNET_HDR` reads and writes: checksum offload costs nothing here.
//!
//! A guest's descriptors are never trusted: a chain is walked by hand (at most the queue
//! size of descriptors, no indirect table since none is offered, every buffer inside guest
//! memory), a frame is copied through one bounce buffer of bounded size, and one pass over a
//! queue handles at most [`BUDGET`] frames before the worker looks at its other events.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use splitvisor_bus::threads::{self, ThreadKind};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::block::{NoJournal, Processed, QueueError, RequestJournal};
use super::{
    ActivateError, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, device_type, features,
};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (the device writes frames for the driver).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (the driver's frames for the device).
pub const TX_QUEUE: u16 = 1;
/// Bytes of `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): the header of every frame once VERSION_1 or MRG_RXBUF is
/// negotiated.
pub const HEADER_SIZE: usize = 12;
/// Bytes of the legacy header without `num_buffers`.
pub const LEGACY_HEADER_SIZE: usize = 10;
/// Frames one pass over a queue handles at most; the worker then serves its other events
/// before it comes back.
pub const BUDGET: usize = 256;
/// The largest frame a backend may hand over (a TAP with a 64 KiB MTU, header included).
pub const MAX_BACKEND_FRAME: usize = 65_536 + HEADER_SIZE;
/// The default MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Bytes of the configuration space: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: usize = 12;
/// Ethernet header plus an 802.1Q tag: what a frame may add to the MTU.
const FRAME_OVERHEAD: usize = 18;
/// The shortest frame the device sends: an Ethernet header.
const MIN_FRAME: usize = 14;

/// virtio-net feature bits.
pub mod feature {
    /// The device takes frames with a partial checksum (`NEEDS_CSUM`).
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` is valid.
    pub const MAC: u64 = 1 << 5;
    /// The device takes TCPv4 segmentation offload.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TCPv6 segmentation offload.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device takes UDP fragmentation offload.
    pub const HOST_UFO: u64 = 1 << 14;
    /// A frame may span several receive buffers (`num_buffers`).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` is valid.
    pub const STATUS: u64 = 1 << 16;
}

/// `status` in the configuration space: the link is up.
pub const STATUS_LINK_UP: u16 = 1;
/// Header flag: the checksum from `csum_start` on is still to be computed.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header `gso_type`: not a segmentation-offload frame.
pub const HDR_GSO_NONE: u8 = 0;

/// Where frames come from and go to: a TAP device, a socket, a test. Every frame starts
/// with the virtio-net header the driver negotiated.
pub trait NetBackend: Send + Sync {
    /// Reads one frame into `frame`; [`io::ErrorKind::WouldBlock`] when none waits.
    fn recv(&self, frame: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame. Never blocks: a frame the backend cannot take now is dropped, as on
    /// a wire.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    /// The driver negotiated `guest_features`, with headers of `header_size` bytes: set up
    /// what the backend hands over (checksum offload, header size).
    fn configure(&self, guest_features: u64, header_size: usize) -> io::Result<()>;
    /// An fd that is readable when a frame waits.
    fn as_raw_fd(&self) -> RawFd;
}

/// What a virtio-net device is: its MAC and MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// The MAC address the guest uses.
    pub mac: [u8; 6],
    /// The largest IP packet the link carries.
    pub mtu: u16,
}

impl NetParams {
    /// `mac` with the default MTU.
    pub fn new(mac: [u8; 6]) -> Self {
        Self { mac, mtu: DEFAULT_MTU }
    }

    /// The largest frame a driver may send, header excluded.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + FRAME_OVERHEAD
    }
}

/// A locally administered unicast MAC derived from `seed` (`52:54:00:..`, the prefix QEMU and
/// libvirt use).
pub fn default_mac(seed: u64) -> [u8; 6] {
    let bytes = seed.to_le_bytes();
    [0x52, 0x54, 0x00, bytes[0] ^ bytes[3], bytes[1] ^ bytes[4], bytes[2] ^ bytes[5]]
}

/// Parses `aa:bb:cc:dd:ee:ff` (a unicast address).
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part =
            parts.next().ok_or_else(|| format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
        if part.len() != 2 {
            return Err(format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("'{text}' is not a MAC address"))?;
    }
    if parts.next().is_some() {
        return Err(format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The features a virtio-net device offers.
pub fn device_features() -> u64 {
    features::VERSION_1
        | features::RING_EVENT_IDX
        | feature::CSUM
        | feature::GUEST_CSUM
        | feature::MTU
        | feature::MAC
        | feature::MRG_RXBUF
        | feature::STATUS
}

/// The configuration space: mac, status (link up), max_virtqueue_pairs (1), mtu.
pub fn config_space(params: &NetParams) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[0..6].copy_from_slice(&params.mac);
    config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config[10..12].copy_from_slice(&params.mtu.to_le_bytes());
    config
}

/// The header size for the negotiated `features`.
pub fn header_size(features: u64) -> usize {
    if features & (features::VERSION_1 | feature::MRG_RXBUF) != 0 { HEADER_SIZE } else { LEGACY_HEADER_SIZE }
}

/// What the device did with frames, for tests and statistics.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the backend, headers excluded.
    pub tx_bytes: AtomicU64,
    /// Driver frames dropped: malformed chains, bad headers, oversized frames, a backend
    /// that could not take them.
    pub tx_dropped: AtomicU64,
    /// Frames put in the driver's receive buffers.
    pub rx_frames: AtomicU64,
    /// Bytes put in the driver's receive buffers, headers excluded.
    pub rx_bytes: AtomicU64,
    /// Backend frames dropped: too large for the driver's buffers, shorter than a header.
    pub rx_dropped: AtomicU64,
    /// Receive chains the driver offered that cannot hold even a header (returned unused).
    pub rx_malformed: AtomicU64,
}

impl NetStats {
    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// One buffer of a chain: where, how long, whether the device writes it.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Why a chain is refused.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// More descriptors than the queue has, or a loop.
    TooLong,
    /// An indirect table (not offered).
    Indirect,
    /// A `next` beyond the table, or a descriptor outside guest memory.
    OutOfBounds,
    /// A buffer outside guest memory.
    Buffer,
}

/// Walks the chain at `head` into `segments`: at most `queue.size()` descriptors, each read
/// once, no indirect table, every buffer inside guest memory.
fn walk(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    segments: &mut Vec<Segment>,
) -> Result<(), Malformed> {
    segments.clear();
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(Malformed::OutOfBounds);
        }
        let at = table.checked_add(16 * u64::from(index)).ok_or(Malformed::OutOfBounds)?;
        let descriptor: Descriptor = mem.read_obj(at).map_err(|_| Malformed::OutOfBounds)?;
        if descriptor.refers_to_indirect_table() {
            return Err(Malformed::Indirect);
        }
        let access = if descriptor.is_write_only() { Permissions::Write } else { Permissions::Read };
        if descriptor.len() > 0 && !mem.check_range(descriptor.addr(), descriptor.len() as usize, access) {
            return Err(Malformed::Buffer);
        }
        segments.push(Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
            writable: descriptor.is_write_only(),
        });
        if !descriptor.has_next() {
            return Ok(());
        }
        index = descriptor.next();
    }
    Err(Malformed::TooLong)
}

/// The head of the next available chain, if any. A driver that publishes more chains than
/// the queue holds, or a head beyond the descriptor table, broke the queue (virtio-queue
/// checks the first, not the second: its used ring would refuse such a head later).
fn next_head(mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<Option<u16>, QueueError> {
    let size = queue.size();
    let mut iter = queue.iter(mem).map_err(QueueError::Broken)?;
    match iter.next().map(|chain| chain.head_index()) {
        Some(head) if head >= size => Err(QueueError::Broken(virtio_queue::Error::InvalidDescriptorIndex)),
        head => Ok(head),
    }
}

/// Puts `completions` (head, bytes written) in the used ring and publishes them with one
/// used-index update, so a driver never sees part of a frame that spans several buffers.
fn publish_used(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    completions: &[(u16, u32)],
) -> Result<(), QueueError> {
    let used = GuestAddress(queue.used_ring());
    let size = queue.size();
    let mut next = queue.next_used();
    for &(head, len) in completions {
        let slot = u64::from(next % size);
        let at =
            used.checked_add(4 + 8 * slot).ok_or(QueueError::Broken(virtio_queue::Error::AddressOverflow))?;
        let mut element = [0u8; 8];
        element[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&element, at).map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
        next = next.wrapping_add(1);
    }
    let idx = used.checked_add(2).ok_or(QueueError::Broken(virtio_queue::Error::AddressOverflow))?;
    mem.store(next.to_le(), idx, Ordering::Release)
        .map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
    queue.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries published since the used
/// index was `old` (EVENT_IDX's `used_event`, or always without it). The queue's own
/// bookkeeping counts only entries added one by one, not [`publish_used`]'s batches.
fn needs_interrupt(mem: &GuestMemoryMmap, queue: &Queue, old: u16) -> Result<bool, QueueError> {
    let new = queue.next_used();
    if new == old {
        return Ok(false);
    }
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    let at = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(QueueError::Broken(virtio_queue::Error::AddressOverflow))?;
    let used_event: u16 = mem
        .load(at, Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
    Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
}

/// Re-arms the driver's notifications once the queue looks empty; says whether work came in
/// meanwhile (then the caller goes on).
fn rearm(mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, QueueError> {
    if queue.event_idx_enabled() {
        queue.enable_notification(mem).map_err(QueueError::Broken)
    } else {
        Ok(false)
    }
}

/// The transmit engine: takes the driver's frames off the transmit queue and hands them to
/// the backend.
pub struct NetTx {
    mem: GuestMemoryMmap,
    backend: Arc<dyn NetBackend>,
    features: u64,
    header_size: usize,
    max_frame: usize,
    frame: Vec<u8>,
    segments: Vec<Segment>,
    stats: Arc<NetStats>,
    more: bool,
}

impl NetTx {
    /// An engine for a device with `params`, driven with the negotiated `features`.
    pub fn new(
        mem: GuestMemoryMmap,
        backend: Arc<dyn NetBackend>,
        params: &NetParams,
        features: u64,
        stats: Arc<NetStats>,
    ) -> Self {
        let header_size = header_size(features);
        let max_frame = params.max_frame();
        Self {
            mem,
            backend,
            features,
            header_size,
            max_frame,
            frame: vec![0; header_size + max_frame],
            segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            stats,
            more: false,
        }
    }

    /// Whether the last pass stopped at its budget with frames left.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Sends every waiting frame (at most [`BUDGET`]).
    pub fn process(&mut self, queue: &mut Queue) -> Result<Processed, QueueError> {
        self.process_with(queue, &mut NoJournal)
    }

    /// [`process`](Self::process), telling `journal` about each chain.
    pub fn process_with(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        let mem = self.mem.clone();
        let mut completed = 0;
        let start = queue.next_used();
        self.more = false;
        loop {
            if queue.event_idx_enabled() {
                queue.disable_notification(&mem).map_err(QueueError::Broken)?;
            }
            while completed < BUDGET {
                let Some(head) = next_head(&mem, queue)? else { break };
                journal.fetched(head);
                self.transmit(queue, head);
                journal.completing(head);
                publish_used(&mem, queue, &[(head, 0)])?;
                journal.completed(head, queue.next_used());
                completed += 1;
            }
            if completed >= BUDGET {
                self.more = true;
                break;
            }
            if !rearm(&mem, queue)? {
                break;
            }
        }
        let notify = needs_interrupt(&mem, queue, start)?;
        Ok(Processed { completed, notify, pending: false })
    }

    /// Sends the frame of the chain at `head`, or drops it.
    fn transmit(&mut self, queue: &Queue, head: u16) {
        let dropped = |stats: &NetStats, why: &str| {
            log::debug!("virtio-net: transmit chain {head} dropped: {why}");
            NetStats::add(&stats.tx_dropped, 1);
        };
        if let Err(e) = walk(&self.mem, queue, head, &mut self.segments) {
            return dropped(&self.stats, &format!("{e:?}"));
        }
        let limit = self.header_size + self.max_frame;
        let mut len = 0usize;
        for segment in &self.segments {
            if segment.writable {
                return dropped(&self.stats, "a device-writable buffer in a transmit chain");
            }
            let seg_len = segment.len as usize;
            if len + seg_len > limit {
                return dropped(&self.stats, "frame larger than the MTU allows");
            }
            if self.mem.read_slice(&mut self.frame[len..len + seg_len], segment.addr).is_err() {
                return dropped(&self.stats, "buffer outside guest memory");
            }
            len += seg_len;
        }
        if len < self.header_size + MIN_FRAME {
            return dropped(&self.stats, "shorter than a header and an Ethernet header");
        }
        let (flags, gso_type) = (self.frame[0], self.frame[1]);
        if gso_type != HDR_GSO_NONE {
            return dropped(&self.stats, "segmentation offload was not negotiated");
        }
        if flags & HDR_F_NEEDS_CSUM != 0 && self.features & feature::CSUM == 0 {
            return dropped(&self.stats, "checksum offload was not negotiated");
        }
        if self.header_size == HEADER_SIZE {
            // num_buffers is the device's field; the kernel ignores it, a peer may not.
            self.frame[10..12].copy_from_slice(&0u16.to_le_bytes());
        }
        match self.backend.send(&self.frame[..len]) {
            Ok(()) => {
                NetStats::add(&self.stats.tx_frames, 1);
                NetStats::add(&self.stats.tx_bytes, (len - self.header_size) as u64);
            }
            Err(e) => dropped(&self.stats, &format!("the backend refused it: {e}")),
        }
    }
}

/// How a frame found room in the receive queue.
enum Placement {
    /// Delivered.
    Delivered,
    /// Not enough buffers now: wait for the driver to add some.
    NoBuffers,
    /// It can never fit: dropped.
    Dropped,
}

/// The receive engine: takes frames from the backend and puts them in the driver's receive
/// buffers, one buffer per frame or, with MRG_RXBUF, as many as a frame needs.
pub struct NetRx {
    mem: GuestMemoryMmap,
    backend: Arc<dyn NetBackend>,
    header_size: usize,
    mergeable: bool,
    frame: Vec<u8>,
    /// A frame read from the backend that is waiting for buffers.
    pending: Option<usize>,
    segments: Vec<Segment>,
    /// The chains taken for the frame being placed: (head, its segments' range, capacity).
    chains: Vec<(u16, usize, usize, usize)>,
    all_segments: Vec<Segment>,
    completions: Vec<(u16, u32)>,
    stats: Arc<NetStats>,
    more: bool,
}

impl NetRx {
    /// An engine driven with the negotiated `features`.
    pub fn new(
        mem: GuestMemoryMmap,
        backend: Arc<dyn NetBackend>,
        features: u64,
        stats: Arc<NetStats>,
    ) -> Self {
        Self {
            mem,
            backend,
            header_size: header_size(features),
            mergeable: features & feature::MRG_RXBUF != 0,
            frame: vec![0; MAX_BACKEND_FRAME],
            pending: None,
            segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            all_segments: Vec::new(),
            completions: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            stats,
            more: false,
        }
    }

    /// Whether the last pass stopped at its budget with frames maybe left.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Whether a frame waits for receive buffers (the backend's fd need not be watched
    /// until the driver adds some).
    pub fn waiting_for_buffers(&self) -> bool {
        self.pending.is_some()
    }

    /// Delivers waiting frames (at most [`BUDGET`]) while there are buffers for them.
    pub fn process(&mut self, queue: &mut Queue) -> Result<Processed, QueueError> {
        self.process_with(queue, &mut NoJournal)
    }

    /// [`process`](Self::process), telling `journal` about each chain.
    pub fn process_with(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        let mut completed = 0;
        let mut frames = 0;
        let start = queue.next_used();
        self.more = false;
        while frames < BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.frame) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: the backend failed to deliver a frame: {e}");
                        break;
                    }
                },
            };
            frames += 1;
            if len < self.header_size + MIN_FRAME {
                NetStats::add(&self.stats.rx_dropped, 1);
                self.pending = None;
                continue;
            }
            self.pending = Some(len);
            match self.place(queue, len, journal, &mut completed)? {
                Placement::Delivered => {
                    NetStats::add(&self.stats.rx_frames, 1);
                    NetStats::add(&self.stats.rx_bytes, (len - self.header_size) as u64);
                    self.pending = None;
                }
                Placement::Dropped => {
                    NetStats::add(&self.stats.rx_dropped, 1);
                    self.pending = None;
                }
                Placement::NoBuffers => {
                    // Ask for a kick when buffers come; they may have come meanwhile.
                    if rearm(&self.mem, queue)? {
                        continue;
                    }
                    break;
                }
            }
        }
        if frames >= BUDGET {
            self.more = true;
        }
        let notify = needs_interrupt(&self.mem, queue, start)?;
        Ok(Processed { completed, notify, pending: false })
    }

    /// Finds buffers for the pending frame of `len` bytes and fills them.
    fn place(
        &mut self,
        queue: &mut Queue,
        len: usize,
        journal: &mut dyn RequestJournal,
        completed: &mut usize,
    ) -> Result<Placement, QueueError> {
        let mem = self.mem.clone();
        self.chains.clear();
        self.all_segments.clear();
        let mut capacity = 0usize;
        while capacity < len {
            if self.chains.len() >= usize::from(queue.size()) {
                // Every buffer the queue can hold would not do.
                self.rewind(queue);
                return Ok(Placement::Dropped);
            }
            let Some(head) = next_head(&mem, queue)? else {
                self.rewind(queue);
                return Ok(Placement::NoBuffers);
            };
            let usable = walk(&mem, queue, head, &mut self.segments)
                .ok()
                .filter(|()| self.segments.iter().all(|s| s.writable))
                .map(|()| self.segments.iter().map(|s| s.len as usize).sum::<usize>())
                .filter(|&room| room >= self.header_size);
            let Some(room) = usable else {
                // A receive chain that cannot take even a header. It goes back unused (so
                // the queue does not stall on it), with the chains taken before it for this
                // frame, which is lost: used entries stay in the order chains were taken.
                log::debug!("virtio-net: receive chain {head} is malformed; returned unused");
                NetStats::add(&self.stats.rx_malformed, 1);
                self.completions.clear();
                self.completions.extend(self.chains.iter().map(|&(taken, ..)| (taken, 0)));
                self.completions.push((head, 0));
                self.chains.clear();
                for &(taken, _) in &self.completions {
                    journal.fetched(taken);
                }
                journal.completing(head);
                publish_used(&mem, queue, &self.completions)?;
                for &(taken, _) in &self.completions {
                    journal.completed(taken, queue.next_used());
                }
                *completed += self.completions.len();
                return Ok(Placement::Dropped);
            };
            let first = self.all_segments.len();
            self.all_segments.extend_from_slice(&self.segments);
            self.chains.push((head, first, self.all_segments.len(), room));
            capacity += room;
            if !self.mergeable && capacity < len {
                // One buffer per frame, and this one is too small: the frame is lost, the
                // buffer stays for the next.
                self.rewind(queue);
                return Ok(Placement::Dropped);
            }
        }
        if self.header_size == HEADER_SIZE {
            let buffers = self.chains.len() as u16;
            self.frame[10..12].copy_from_slice(&buffers.to_le_bytes());
        }
        self.completions.clear();
        let mut offset = 0usize;
        for &(head, first, last, _) in &self.chains {
            journal.fetched(head);
            let mut written = 0usize;
            for segment in &self.all_segments[first..last] {
                if offset >= len {
                    break;
                }
                let take = (segment.len as usize).min(len - offset);
                if mem.write_slice(&self.frame[offset..offset + take], segment.addr).is_err() {
                    // Checked by the walk; memory does not shrink under a running device.
                    log::warn!("virtio-net: receive buffer at {:#x} vanished", segment.addr.0);
                }
                offset += take;
                written += take;
            }
            self.completions.push((head, written as u32));
        }
        if let Some(&(last, _)) = self.completions.last() {
            journal.completing(last);
        }
        publish_used(&mem, queue, &self.completions)?;
        for &(head, _) in &self.completions {
            journal.completed(head, queue.next_used());
        }
        *completed += self.completions.len();
        Ok(Placement::Delivered)
    }

    /// Gives back the chains taken for the frame being placed.
    fn rewind(&mut self, queue: &mut Queue) {
        for _ in 0..self.chains.len() {
            queue.go_to_previous_position();
        }
        self.chains.clear();
    }
}

/// The virtio-net device: configuration part; a worker thread serves the queues.
pub struct Net {
    params: NetParams,
    backend: Arc<dyn NetBackend>,
    stats: Arc<NetStats>,
    worker: Option<WorkerHandle>,
}

struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Net {
    /// A device with `params` over `backend`.
    pub fn new(params: NetParams, backend: Arc<dyn NetBackend>) -> Self {
        Self { params, backend, stats: Arc::new(NetStats::default()), worker: None }
    }

    /// What the device did so far.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop.write(1);
            if worker.thread.join().is_err() {
                log::error!("virtio-net: the queue worker panicked");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::copy_config(&config_space(&self.params), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let mut queues = queues.into_iter();
        let rx =
            queues.next().filter(|q| q.index == RX_QUEUE).ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let tx =
            queues.next().filter(|q| q.index == TX_QUEUE).ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        self.backend.configure(features, header_size(features)).map_err(ActivateError::Worker)?;
        let worker = NetWorker {
            rx: NetRx::new(mem.clone(), self.backend.clone(), features, self.stats.clone()),
            tx: NetTx::new(mem, self.backend.clone(), &self.params, features, self.stats.clone()),
            rx_queue: rx.queue,
            tx_queue: tx.queue,
            interrupt,
            broken: false,
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let stop_worker = stop.try_clone().map_err(ActivateError::Worker)?;
        let backend_fd = self.backend.as_raw_fd();
        let (rx_kick, tx_kick) = (rx.kick, tx.kick);
        // Through the thread seam, as the disks' workers: in a sandboxed hypervisor the
        // worker gets its kind's filter (and a vCPU, which activates the device, may not
        // create threads itself).
        let thread = threads::spawn(ThreadKind::DeviceWorker, "virtio-net", move || {
            worker.run(&rx_kick, &tx_kick, backend_fd, &stop_worker)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Serves both queues of an in-process virtio-net device.
struct NetWorker {
    rx: NetRx,
    tx: NetTx,
    rx_queue: Queue,
    tx_queue: Queue,
    interrupt: VirtioInterrupt,
    broken: bool,
}

impl NetWorker {
    /// Serves until `stop` is written: a kick on either queue, or a frame at the backend.
    fn run(mut self, rx_kick: &EventFd, tx_kick: &EventFd, backend: RawFd, stop: &EventFd) {
        use std::os::fd::AsRawFd;
        const RX_KICK: u64 = 0;
        const TX_KICK: u64 = 1;
        const BACKEND: u64 = 2;
        const STOP: u64 = 3;
        let epoll = match Epoll::new() {
            Ok(epoll) => epoll,
            Err(e) => {
                log::error!("virtio-net: cannot create the worker's epoll: {e}");
                return;
            }
        };
        // The backend is edge-triggered: a frame left waiting for buffers must not wake the
        // worker over and over; the driver's kick on the receive queue brings it back.
        let watches = [
            (rx_kick.as_raw_fd(), RX_KICK, EventSet::IN),
            (tx_kick.as_raw_fd(), TX_KICK, EventSet::IN),
            (backend, BACKEND, EventSet::IN | EventSet::EDGE_TRIGGERED),
            (stop.as_raw_fd(), STOP, EventSet::IN),
        ];
        for (fd, token, events) in watches {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
                log::error!("virtio-net: cannot watch fd {fd}: {e}");
                return;
            }
        }
        // Frames may be waiting already (a worker restarted under a running guest).
        self.serve(true, true);
        let mut events = [EpollEvent::default(); 4];
        loop {
            let busy = self.rx.more() || self.tx.more();
            let ready = match epoll.wait(if busy { 0 } else { -1 }, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll_wait failed: {e}");
                    return;
                }
            };
            let (mut rx, mut tx) = (self.rx.more(), self.tx.more());
            for event in &events[..ready] {
                match event.data() {
                    STOP => return,
                    RX_KICK => {
                        let _ = rx_kick.read();
                        rx = true;
                    }
                    TX_KICK => {
                        let _ = tx_kick.read();
                        tx = true;
                    }
                    _ => rx = true,
                }
            }
            self.serve(rx, tx);
        }
    }

    fn serve(&mut self, rx: bool, tx: bool) {
        if self.broken {
            return;
        }
        let mut notify = false;
        let mut result = Ok(());
        if tx {
            match self.tx.process(&mut self.tx_queue) {
                Ok(done) => notify |= done.notify,
                Err(e) => result = Err(e),
            }
        }
        if rx && result.is_ok() {
            match self.rx.process(&mut self.rx_queue) {
                Ok(done) => notify |= done.notify,
                Err(e) => result = Err(e),
            }
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_buffer() {
                log::warn!("virtio-net: cannot interrupt the driver: {e}");
            }
        }
        if let Err(e) = result {
            log::warn!("virtio-net: {e}; device needs reset");
            self.broken = true;
            if let Err(e) = self.interrupt.request_reset() {
                log::warn!("virtio-net: cannot signal the driver: {e}");
            }
        }
    }
}

pub mod fuzzing;
