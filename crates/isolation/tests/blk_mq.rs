//! Multi-queue virtio-blk in both placements, driven from the host side: the in-process
//! device (`Block`, a worker thread per queue) and the vhost-user frontend talking to
//! splitvisor's backend (`BlockDevice`, a thread per queue), each with two queues set up
//! and requests on both at once. No guest needed: the test is the driver.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splitvisor_bus::EventFdInterrupt;
use splitvisor_devices::virtio::block::{Block, CONFIG_SIZE, feature, request_status, request_type};
use splitvisor_devices::virtio::testing::{
    DESC_F_NEXT, DESC_F_WRITE, DriverQueue, memory_disk, write_blk_header,
};
use splitvisor_devices::virtio::{ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, features};
use splitvisor_isolation::backend::blk::BlockDevice;
use splitvisor_isolation::backend::{self, FaultPlan};
use splitvisor_isolation::frontend::VhostUserBlk;
use splitvisor_memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const QUEUES: u16 = 2;
const REQUESTS: u16 = 5;
/// Each queue's rings, and its requests' headers, data and status bytes.
const RINGS: [u64; 2] = [0x1000, 0x8000];
const AREAS: [u64; 2] = [0x10_0000, 0x20_0000];

fn header(queue: usize, request: u16) -> u64 {
    AREAS[queue] + 0x100 * u64::from(request)
}
fn data(queue: usize, request: u16) -> u64 {
    AREAS[queue] + 0x1_0000 + 0x1000 * u64::from(request)
}
fn status(queue: usize, request: u16) -> u64 {
    AREAS[queue] + 0x8_0000 + u64::from(request)
}
fn sector(queue: usize, request: u16) -> u64 {
    8 * (queue as u64 * 16 + u64::from(request))
}
fn pattern(queue: usize, request: u16) -> u8 {
    0x40 + 0x10 * queue as u8 + request as u8
}

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Activates `device` with two queues, puts `REQUESTS` 4 KiB writes on each, kicks both,
/// waits (bounded) for every completion, then checks the image and that `threads` (one
/// name per queue) serve them.
fn two_queues_at_once(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    image: &File,
    threads: [&str; 2],
) {
    assert_eq!(device.queue_max_sizes().len(), usize::from(QUEUES), "the device offers two queues");
    assert_ne!(device.device_features() & feature::MQ, 0);
    let mut config = [0u8; CONFIG_SIZE];
    device.read_config(0, &mut config);
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), QUEUES, "num_queues");

    let mut drivers: Vec<DriverQueue<'_>> =
        RINGS.iter().map(|&base| DriverQueue::new(mem, base, 16)).collect();
    let kicks: Vec<EventFd> = (0..QUEUES).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let active = drivers
        .iter()
        .zip(&kicks)
        .enumerate()
        .map(|(index, (driver, kick))| ActiveQueue {
            index: index as u16,
            queue: driver.device_queue(),
            kick: kick.try_clone().unwrap(),
        })
        .collect();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = VirtioInterrupt::new(Arc::new(EventFdInterrupt::from_eventfd(call.try_clone().unwrap())));
    let negotiated = features::VERSION_1 | feature::MQ | feature::FLUSH;
    device.activate(mem.clone(), interrupt, active, negotiated).unwrap();

    for (queue, driver) in drivers.iter_mut().enumerate() {
        for request in 0..REQUESTS {
            let first = 3 * request;
            write_blk_header(mem, header(queue, request), request_type::OUT, sector(queue, request));
            mem.write_slice(&[pattern(queue, request); 4096], GuestAddress(data(queue, request))).unwrap();
            mem.write_obj(0xffu8, GuestAddress(status(queue, request))).unwrap();
            driver.write_descriptor(first, header(queue, request), 16, DESC_F_NEXT, first + 1);
            driver.write_descriptor(first + 1, data(queue, request), 4096, DESC_F_NEXT, first + 2);
            driver.write_descriptor(first + 2, status(queue, request), 1, DESC_F_WRITE, 0);
            driver.publish(first);
        }
    }
    for kick in &kicks {
        kick.write(1).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while drivers.iter().any(|driver| driver.used_idx() != REQUESTS) {
        assert!(
            Instant::now() < deadline,
            "requests not completed: used {:?}",
            drivers.iter().map(|d| d.used_idx()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let names = thread_names();
    for name in threads {
        assert!(names.iter().any(|n| n == name), "no thread {name} among {names:?}");
    }
    for queue in 0..usize::from(QUEUES) {
        for request in 0..REQUESTS {
            assert_eq!(mem.read_obj::<u8>(GuestAddress(status(queue, request))).unwrap(), request_status::OK);
            let mut on_disk = vec![0u8; 4096];
            image.read_exact_at(&mut on_disk, sector(queue, request) * 512).unwrap();
            assert!(on_disk.iter().all(|&b| b == pattern(queue, request)), "queue {queue} request {request}");
        }
    }
    assert!(call.read().is_ok(), "the driver was interrupted");
    device.reset();
}

#[test]
fn the_in_process_device_serves_each_queue_on_its_own_worker() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let (disk, image) = memory_disk(512, false);
    let mut block = Block::new(disk, "mq").with_queues(QUEUES);
    two_queues_at_once(&mut block, ram.memory(), &image, ["virtio-blk-q0", "virtio-blk-q1"]);
}

#[test]
fn the_vhost_user_backend_serves_each_queue_on_its_own_thread() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let (disk, image) = memory_disk(512, false);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let device = Arc::new(BlockDevice::new(disk, "mq").with_queues(QUEUES));
    let backend = std::thread::spawn(move || backend::serve(theirs, device, Arc::new(FaultPlan::none())));
    let mut frontend = VhostUserBlk::from_stream(ours).unwrap();
    two_queues_at_once(&mut frontend, ram.memory(), &image, ["vhost-queue0", "vhost-queue1"]);
    drop(frontend);
    backend.join().unwrap().unwrap();
}
