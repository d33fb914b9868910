//! virtio-blk over vhost-user: the very request engine ([`BlockRequests`]) the monolithic
//! layout runs in the hypervisor, served from a driver partition. With more than one
//! queue the device offers VIRTIO_BLK_F_MQ (and vhost-user's MQ protocol feature), and
//! each queue is served on its own thread with its own I/O engine.

use std::sync::Arc;

use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::{
    self, BlockRequests, DiskImage, MAX_QUEUES, Processed, QUEUE_SIZE, QueueError, RequestJournal,
};
use splitvisor_devices::virtio::block_io::EngineKind;
use virtio_queue::Queue;

use super::{QueueServer, VhostUserDevice};

pub mod fuzzing;

/// A virtio-blk device on a disk image.
pub struct BlockDevice {
    disk: Arc<DiskImage>,
    id: [u8; block::ID_BYTES],
    queues: u16,
    engine: EngineKind,
    /// Test hook: each queue runs on [`testing::SlowReversed`] with this delay.
    #[cfg(feature = "test-hooks")]
    slow_reversed: Option<std::time::Duration>,
    /// Test hook: tried when the first request arrives (the sandbox must kill us).
    #[cfg(feature = "test-hooks")]
    attempt: std::sync::Mutex<Option<crate::sandbox::testing::Forbidden>>,
}

impl BlockDevice {
    /// A device on `disk`, answering GET_ID with `id` (its first 20 bytes).
    pub fn new(disk: DiskImage, id: &str) -> Self {
        Self {
            disk: Arc::new(disk),
            id: block::id_bytes(id),
            queues: 1,
            engine: EngineKind::Auto,
            #[cfg(feature = "test-hooks")]
            slow_reversed: None,
            #[cfg(feature = "test-hooks")]
            attempt: std::sync::Mutex::new(None),
        }
    }

    /// The device offers `queues` request queues (1 to [`MAX_QUEUES`]).
    pub fn with_queues(mut self, queues: u16) -> Self {
        self.queues = queues.clamp(1, MAX_QUEUES);
        self
    }

    /// Each queue moves data with the engine `kind`.
    pub fn with_engine(mut self, kind: EngineKind) -> Self {
        self.engine = kind;
        self
    }

    /// Test hook: every queue moves data on an engine that holds each batch, completes
    /// one transfer per `delay`, the last pushed first: many requests are in flight, and
    /// complete out of order, whenever a test kills the process.
    #[cfg(feature = "test-hooks")]
    pub fn with_slow_reversed_engine(mut self, delay: Option<std::time::Duration>) -> Self {
        self.slow_reversed = delay;
        self
    }

    /// The image's fd (kept open across the sandbox).
    pub fn image_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.disk.file().as_raw_fd()
    }

    /// Test hook: try `what` when the first request arrives, to show that the sandbox
    /// kills a partition that tries to escape while serving a guest.
    #[cfg(feature = "test-hooks")]
    pub fn with_attempt(self, what: Option<crate::sandbox::testing::Forbidden>) -> Self {
        *self.attempt.lock().unwrap_or_else(|e| e.into_inner()) = what;
        self
    }
}

impl VhostUserDevice for BlockDevice {
    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        block::device_features(&self.disk, self.queues)
    }

    fn config(&self) -> Vec<u8> {
        block::config_space(&self.disk, self.queues).to_vec()
    }

    fn queue_server(&self, _index: u16, memory: GuestMemoryMmap, features: u64) -> Box<dyn QueueServer> {
        #[cfg(feature = "test-hooks")]
        let mut requests = match self.slow_reversed {
            Some(delay) => BlockRequests::with_io_engine(
                memory,
                self.disk.clone(),
                self.id,
                Some(Box::new(testing::SlowReversed::new(&self.disk, delay))),
            ),
            None => BlockRequests::with_engine(memory, self.disk.clone(), self.id, self.engine),
        };
        #[cfg(not(feature = "test-hooks"))]
        let mut requests = BlockRequests::with_engine(memory, self.disk.clone(), self.id, self.engine);
        requests.set_features(features);
        Box::new(BlockQueue {
            requests,
            pending: false,
            #[cfg(feature = "test-hooks")]
            attempt: self.attempt.lock().unwrap_or_else(|e| e.into_inner()).take(),
        })
    }
}

struct BlockQueue {
    requests: BlockRequests,
    /// The last pass stopped at its budget with requests left.
    pending: bool,
    #[cfg(feature = "test-hooks")]
    attempt: Option<crate::sandbox::testing::Forbidden>,
}

impl QueueServer for BlockQueue {
    fn serve(
        &mut self,
        queue: &mut Queue,
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        #[cfg(feature = "test-hooks")]
        if let Some(what) = self.attempt.take() {
            crate::sandbox::testing::attempt_and_exit(&what);
        }
        let processed = self.requests.process_queue_with(queue, journal)?;
        self.pending = processed.pending;
        Ok(processed)
    }

    fn more(&self) -> bool {
        self.pending
    }

    fn resubmit(
        &mut self,
        queue: &mut Queue,
        heads: &[u16],
        journal: &mut dyn RequestJournal,
    ) -> Result<Processed, QueueError> {
        self.requests.resubmit(queue, heads, journal)
    }

    fn set_notifier(&mut self, notify: Box<dyn Fn() + Send>) {
        self.requests.set_notifier(notify);
        // Completions are announced as they happen: the queue may look for the driver's
        // next request after a batch (the very behaviour of the in-hypervisor worker).
        self.requests.set_poll_limit(block::POLL_LIMIT);
    }
}

/// Test engines (only in builds with the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
pub mod testing {
    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use splitvisor_devices::virtio::block::DiskImage;
    use splitvisor_devices::virtio::block_io::{self, Completion, IoEngine, Transfer};

    /// Holds the transfers pushed to it and, at each wait, sleeps `delay` and then runs
    /// the one pushed last: requests stay in flight long and complete in reverse order.
    pub struct SlowReversed {
        disk: Arc<DiskImage>,
        queued: Vec<Transfer>,
        delay: Duration,
    }

    impl SlowReversed {
        /// An engine on `disk` completing one transfer per `delay`.
        pub fn new(disk: &Arc<DiskImage>, delay: Duration) -> Self {
            Self { disk: disk.clone(), queued: Vec::with_capacity(block_io::MAX_IN_FLIGHT), delay }
        }
    }

    impl IoEngine for SlowReversed {
        fn name(&self) -> &'static str {
            "slow-reversed"
        }

        unsafe fn push(&mut self, transfer: Transfer) -> io::Result<()> {
            self.queued.push(transfer);
            Ok(())
        }

        fn submit(&mut self) -> io::Result<()> {
            Ok(())
        }

        fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
            let Some(transfer) = self.queued.pop() else { return Ok(()) };
            std::thread::sleep(self.delay);
            // SAFETY: the engine's caller keeps the transfer's buffers valid until its
            // completion, which is returned here.
            let result = unsafe { block_io::execute(self.disk.file().as_raw_fd(), &transfer) };
            done.push(Completion { tag: transfer.tag, result });
            Ok(())
        }

        fn outstanding(&self) -> usize {
            self.queued.len()
        }
    }
}
