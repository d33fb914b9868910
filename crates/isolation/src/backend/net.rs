//! virtio-net over vhost-user: the very queue engines ([`NetRx`], [`NetTx`]) the monolithic
//! layout runs in the hypervisor, served from a driver partition on a TAP fd it was handed.
//!
//! The receive queue's thread also wakes when the TAP has a frame ([`QueueServer::wake_fd`]);
//! the transmit queue's thread writes to the same fd. A frame in flight when a partition
//! dies is lost, as on a wire: TCP retransmits it.

use std::os::fd::RawFd;
use std::sync::Arc;

use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::{Processed, QueueError, RequestJournal};
use splitvisor_devices::virtio::net::{
    self, NetBackend, NetParams, NetRx, NetStats, NetTx, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use virtio_queue::{Queue, QueueT};

use super::{QueueServer, VhostUserDevice};

/// A virtio-net device on a backend (a TAP).
pub struct NetDevice {
    params: NetParams,
    backend: Arc<dyn NetBackend>,
    stats: Arc<NetStats>,
}

impl NetDevice {
    /// A device with `params` on `backend`.
    pub fn new(params: NetParams, backend: Arc<dyn NetBackend>) -> Self {
        Self { params, backend, stats: Arc::new(NetStats::default()) }
    }

    /// The backend's fd (kept open across the sandbox).
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// What the device did so far.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }
}

impl VhostUserDevice for NetDevice {
    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn multi_queue(&self) -> bool {
        false
    }

    fn features(&self) -> u64 {
        net::device_features()
    }

    fn config(&self) -> Vec<u8> {
        net::config_space(&self.params).to_vec()
    }

    fn queue_server(&self, index: u16, memory: GuestMemoryMmap, features: u64) -> Box<dyn QueueServer> {
        match index {
            RX_QUEUE => {
                // The driver's features decide what the TAP may hand over (partial checksums)
                // and the header size; set before the first frame is read.
                if let Err(e) = self.backend.configure(features, net::header_size(features)) {
                    log::warn!("vhost-user-net: cannot configure the backend: {e}");
                }
                Box::new(RxServer {
                    engine: NetRx::new(memory, self.backend.clone(), features, self.stats.clone()),
                    fd: self.backend.as_raw_fd(),
                })
            }
            TX_QUEUE => Box::new(TxServer {
                engine: NetTx::new(memory, self.backend.clone(), &self.params, features, self.stats.clone()),
            }),
            other => {
                log::warn!("vhost-user-net: no queue {other}");
                Box::new(NoQueue)
            }
        }
    }
}

/// Frames a predecessor took but never completed are taken again from the ring: the
/// engines complete chains in the order they take them, so everything after the used index
/// is owed or new. A transmit frame may then go out twice, a receive buffer is reused;
/// both are what a wire does.
fn resume_at_used(queue: &mut Queue) {
    queue.set_next_avail(queue.next_used());
}

struct RxServer {
    engine: NetRx,
    fd: RawFd,
}

impl QueueServer for RxServer {
    fn serve(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        self.engine.process_with(queue, journal)
    }

    fn resubmit(
        &mut self,
        queue: &mut Queue,
        _heads: &[u16],
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        resume_at_used(queue);
        self.engine.process_with(queue, journal)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.fd)
    }

    fn more(&self) -> bool {
        self.engine.more()
    }
}

struct TxServer {
    engine: NetTx,
}

impl QueueServer for TxServer {
    fn serve(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        self.engine.process_with(queue, journal)
    }

    fn resubmit(
        &mut self,
        queue: &mut Queue,
        _heads: &[u16],
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        resume_at_used(queue);
        self.engine.process_with(queue, journal)
    }

    fn more(&self) -> bool {
        self.engine.more()
    }
}

/// A queue the device does not have (a frontend asking for more).
struct NoQueue;

impl QueueServer for NoQueue {
    fn serve(
        &mut self,
        _queue: &mut Queue,
        _journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        Ok(Processed { completed: 0, notify: false, pending: false })
    }

    fn resubmit(
        &mut self,
        _queue: &mut Queue,
        _heads: &[u16],
        _journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        Ok(Processed { completed: 0, notify: false, pending: false })
    }
}
