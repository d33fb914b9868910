//! The partition side: a spec-compliant vhost-user-blk backend around the same request
//! engine ([`BlockRequests`]) the monolithic layout runs in the hypervisor.

use std::sync::{Arc, RwLock};

use splitvisor_devices::virtio::GuestMemoryMmap;
use splitvisor_devices::virtio::block::{self, BlockRequests, DiskImage, Processed, QUEUE_SIZE};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

/// A virtio-blk device served over vhost-user.
pub struct BlockBackend {
    requests: BlockRequests,
    features: u64,
    config: [u8; 24],
    event_idx: bool,
    /// Set once the driver broke the queue: requests stop until the frontend resets us.
    broken: bool,
    /// Test hook: open this path when the first request arrives (the sandbox must kill us).
    escape: Option<std::path::PathBuf>,
    /// Exit the process when the driver breaks the queue (spawned partitions).
    exit_on_broken_queue: bool,
}

/// Exit status of a partition whose guest driver broke its queue.
pub const BROKEN_QUEUE_EXIT_CODE: i32 = 3;

impl BlockBackend {
    /// A backend for `disk`, answering GET_ID with `id`.
    pub fn new(disk: DiskImage, id: &str) -> Self {
        let features = block::device_features(&disk) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let config = block::config_space(&disk);
        let requests = BlockRequests::new(GuestMemoryMmap::new(), Arc::new(disk), block::id_bytes(id));
        Self {
            requests,
            features,
            config,
            event_idx: false,
            broken: false,
            escape: None,
            exit_on_broken_queue: false,
        }
    }

    /// A spawned partition exits when the driver breaks the queue, so that its supervisor
    /// marks the device as needing a reset at once.
    pub fn exit_on_broken_queue(mut self) -> Self {
        self.exit_on_broken_queue = true;
        self
    }

    /// Test hook: try to open `path` when the first request arrives, to show that the
    /// sandbox kills a partition that tries to escape while serving a guest.
    pub fn with_escape(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.escape = path;
        self
    }

    /// Wrapped as the vhost-user-backend crate wants it.
    pub fn shared(self) -> Arc<RwLock<Self>> {
        Arc::new(RwLock::new(self))
    }
}

impl VhostUserBackendMut for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&mut self) {
        self.broken = false;
    }

    fn acked_features(&mut self, features: u64) {
        // The engine follows indirect descriptors only if the driver negotiated them.
        self.requests.set_features(features);
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut bytes = vec![0; size as usize];
        splitvisor_devices::virtio::copy_config(&self.config, u64::from(offset), &mut bytes);
        bytes
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.requests.set_memory((*mem.memory()).clone());
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if self.broken {
            return Ok(());
        }
        if let Some(path) = self.escape.take() {
            let opened = std::fs::File::open(&path);
            log::error!("sandbox escape: open({}) returned {:?}", path.display(), opened.map(|_| ()));
        }
        let processed = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            queue.set_event_idx(self.event_idx);
            // The engine serves at most a queue's worth per call; nothing kicks for the
            // rest, so call again until it is done.
            let mut total = self.requests.process_queue(queue);
            while let Ok(done) = total {
                if !done.pending {
                    break;
                }
                total = self.requests.process_queue(queue).map(|more| Processed {
                    completed: done.completed + more.completed,
                    notify: done.notify || more.notify,
                    pending: more.pending,
                });
            }
            total
        };
        match processed {
            Ok(processed) if processed.notify => vring.signal_used_queue(),
            Ok(_) => Ok(()),
            Err(e) if self.exit_on_broken_queue => {
                // vhost-user gives a backend no portable way to say "needs reset" (the
                // vring error fd is not exposed by vhost-user-backend): a spawned partition
                // exits instead, and its supervisor marks the device DEVICE_NEEDS_RESET.
                log::error!("vhost-user-blk: {e}; the partition exits so the device is reset");
                std::process::exit(BROKEN_QUEUE_EXIT_CODE);
            }
            Err(e) => {
                // The queue stays stopped until the frontend resets the device.
                log::warn!("vhost-user-blk: {e}; queue stopped until the device is reset");
                self.broken = true;
                Ok(())
            }
        }
    }
}
