//! Driver partitions for splitvisor.
//!
//! In the microkernel layout the hypervisor holds no device emulator: each runs in its own
//! sandboxed process, a *driver partition*, sharing only guest memory and eventfds with the
//! hypervisor. Virtio devices speak vhost-user, so a partition is an ordinary vhost-user
//! backend (QEMU can use it too) and the hypervisor can use other backends
//! (qemu-storage-daemon):
//!
//! * [`frontend::VhostUserBlk`]: the hypervisor side, a `VirtioDevice` behind splitvisor's
//!   virtio-mmio transport, able to replace its backend under a running guest;
//! * [`backend`]: the partition side, a vhost-user backend around the very request engines
//!   the monolithic layout runs in-process, journaling every request in the inflight region;
//! * [`proxy`]: plain bus devices (8250, i8042) in a partition;
//! * [`partition`]: starting partitions that never outlive the hypervisor;
//! * [`liveness`]: telling a partition that is only slow from a hung one;
//! * [`sandbox`]: what a partition does to itself before touching guest data;
//! * [`driver`]: the partition program (`splitvisor-driver`).

pub mod backend;
pub mod deadline;
pub mod driver;
pub mod frontend;
pub mod liveness;
pub mod partition;
pub mod proxy;
pub mod sandbox;
pub mod supervisor;
