//! The virtio-net fuzz harness (`fuzz/fuzz_targets/virtio_net.rs`): a hostile driver writes
//! whatever descriptors and ring indices it likes, frames arrive from the wire, and the
//! engines run. The oracle: no panic; every pass is bounded; every used entry names a head
//! inside the queue, with a length no larger than the chain's writable bytes; guest memory
//! changes only inside device-writable buffers and the used ring; only well-formed frames
//! reach the wire.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress};

use super::{BUDGET, HEADER_SIZE, NetParams, NetRx, NetStats, NetTx, feature};
use crate::virtio::tap::SocketBackend;
use crate::virtio::testing::{DriverQueue, guest_memory};
use crate::virtio::{GuestMemoryMmap, features};

const RAM: usize = 0x4_0000;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x4000;

/// One step of the hostile driver.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Writes a descriptor of the receive (true) or transmit queue.
    Descriptor { rx: bool, index: u8, addr: u32, len: u16, flags: u8, next: u8 },
    /// Offers the chain at `head`.
    Publish { rx: bool, head: u8 },
    /// Sets the available index to anything.
    AvailIdx { rx: bool, idx: u16 },
    /// A frame of `len` bytes arrives from the wire.
    Frame { len: u16, fill: u8 },
    /// Writes bytes anywhere in guest memory (headers, rings).
    Poke { at: u32, bytes: [u8; 4] },
    /// The transmit engine runs.
    Transmit,
    /// The receive engine runs.
    Receive,
}

/// The whole input: the negotiated features, the queue size, the steps.
#[derive(Arbitrary, Debug)]
struct Input {
    mergeable: bool,
    csum: bool,
    size_shift: u8,
    steps: Vec<Step>,
}

/// Runs one fuzz input.
pub fn virtio_net(data: &[u8]) {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else { return };
    let size = 1u16 << (input.size_shift % 9); // 1 ..= 256
    let mem = guest_memory(RAM);
    let Ok((backend, wire)) = SocketBackend::pair() else { return };
    let wire = UnixDatagram::from(wire);
    if wire.set_nonblocking(true).is_err() {
        return;
    }
    let backend = Arc::new(backend);
    let stats = Arc::new(NetStats::default());
    let negotiated = features::VERSION_1
        | if input.mergeable { feature::MRG_RXBUF } else { 0 }
        | if input.csum { feature::CSUM } else { 0 };
    let params = NetParams::new([0x52, 0x54, 0, 0, 0, 1]);
    let mut tx = NetTx::new(mem.clone(), backend.clone(), &params, negotiated, stats.clone());
    let mut rx = NetRx::new(mem.clone(), backend, negotiated, stats);
    let mut rx_driver = DriverQueue::new(&mem, RX_RING, size);
    let mut tx_driver = DriverQueue::new(&mem, TX_RING, size);
    let mut rx_queue = rx_driver.device_queue();
    let mut tx_queue = tx_driver.device_queue();
    let (mut rx_broken, mut tx_broken) = (false, false);
    for step in input.steps.into_iter().take(256) {
        match step {
            Step::Descriptor { rx: on_rx, index, addr, len, flags, next } => {
                let driver = if on_rx { &rx_driver } else { &tx_driver };
                driver.write_descriptor(
                    u16::from(index) % size,
                    u64::from(addr) % RAM as u64,
                    u32::from(len),
                    u16::from(flags) & 7,
                    u16::from(next),
                );
            }
            Step::Publish { rx: true, head } => rx_driver.publish(u16::from(head)),
            Step::Publish { rx: false, head } => tx_driver.publish(u16::from(head)),
            Step::AvailIdx { rx: true, idx } => rx_driver.set_avail_idx(idx),
            Step::AvailIdx { rx: false, idx } => tx_driver.set_avail_idx(idx),
            Step::Frame { len, fill } => {
                let _ = wire.send(&vec![fill; usize::from(len) % 2048]);
            }
            Step::Poke { at, bytes } => {
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(at) % RAM as u64));
            }
            Step::Transmit if !tx_broken => {
                let before = snapshot(&mem);
                match tx.process(&mut tx_queue) {
                    Ok(done) => {
                        assert!(done.completed <= BUDGET);
                        // Transmit never writes guest memory but the used ring.
                        assert_unchanged(&mem, &before, &[used_ring(&tx_driver)]);
                        check_used(&tx_driver, size, done.completed);
                    }
                    Err(_) => tx_broken = true,
                }
                while let Ok(n) = wire.recv(&mut [0u8; 2048]) {
                    assert!(n >= HEADER_SIZE + 14 && n <= HEADER_SIZE + params.max_frame());
                }
            }
            Step::Receive if !rx_broken => {
                let before = snapshot(&mem);
                let writable = writable_ranges(&mem, RX_RING, size);
                match rx.process(&mut rx_queue) {
                    Ok(done) => {
                        let mut allowed = writable;
                        allowed.push(used_ring(&rx_driver));
                        assert_unchanged(&mem, &before, &allowed);
                        check_used(&rx_driver, size, done.completed);
                    }
                    Err(_) => rx_broken = true,
                }
            }
            Step::Transmit | Step::Receive => {}
        }
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; RAM];
    let _ = mem.read_slice(&mut bytes, GuestAddress(0));
    bytes
}

fn used_ring(driver: &DriverQueue<'_>) -> (u64, u64) {
    let (_, _, used) = driver.addresses();
    (used, 6 + 8 * u64::from(driver.size()))
}

/// Every device-writable descriptor's buffer in the table at `ring` (what the receive engine
/// may write, whichever chains it takes).
fn writable_ranges(mem: &GuestMemoryMmap, ring: u64, size: u16) -> Vec<(u64, u64)> {
    (0..u64::from(size))
        .filter_map(|i| {
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, GuestAddress(ring + 16 * i)).ok()?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
            let len = u64::from(u32::from_le_bytes(raw[8..12].try_into().ok()?));
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            (flags & 2 != 0).then_some((addr, len))
        })
        .collect()
}

fn assert_unchanged(mem: &GuestMemoryMmap, before: &[u8], allowed: &[(u64, u64)]) {
    let after = snapshot(mem);
    for (at, (a, b)) in before.iter().zip(&after).enumerate() {
        let at = at as u64;
        if a != b {
            assert!(
                allowed.iter().any(|&(start, len)| at >= start && at - start < len),
                "guest memory at {at:#x} changed outside the device's buffers"
            );
        }
    }
}

/// The last `completed` used entries name heads inside the queue.
fn check_used(driver: &DriverQueue<'_>, size: u16, completed: usize) {
    let used = driver.used_idx();
    for back in 1..=completed.min(usize::from(size)) as u16 {
        let (head, _) = driver.used_elem(used.wrapping_sub(back));
        assert!(head < u32::from(size), "used head {head} outside a queue of {size}");
    }
}

#[cfg(test)]
mod tests {
    /// The harness and its oracle on pseudo-random inputs (the fuzzer explores further).
    #[test]
    fn random_inputs_hold_the_oracle() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..300 {
            let data: Vec<u8> = (0..64 + round * 4)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            super::virtio_net(&data);
        }
    }
}
