//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the very harnesses
//! the fuzz targets call, on stable, as ordinary tests.

use std::path::PathBuf;

use splitvisor_devices::fuzzing;
use splitvisor_devices::fuzzing::heap::CountingAllocator;

// The virtio_blk harness bounds the heap one kick allocates when this allocator counts.
#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

fn replay(target: &str, harness: fn(&[u8])) {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let dir = fuzz.join("corpus").join(target);
    let inputs = replay_dir(&dir, harness);
    assert!(inputs >= 8, "{target}: only {inputs} corpus inputs in {}", dir.display());
    // Inputs that once found a bug, kept under names that say which.
    let regressions = fuzz.join("regressions").join(target);
    if regressions.is_dir() {
        replay_dir(&regressions, harness);
    }
    assert!(fuzzing::heap::installed(), "the counting allocator is not installed");
}

fn replay_dir(dir: &std::path::Path, harness: fn(&[u8])) -> usize {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut inputs = 0;
    for entry in entries {
        let path = entry.expect("read the corpus directory").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("read a corpus file");
            eprintln!("replaying {}", path.display());
            harness(&data);
            inputs += 1;
        }
    }
    inputs
}

#[test]
fn virtio_blk_corpus() {
    replay("virtio_blk", fuzzing::virtio_blk);
}

#[test]
fn virtio_mmio_corpus() {
    replay("virtio_mmio", fuzzing::virtio_mmio);
}

#[test]
fn serial_corpus() {
    replay("serial", fuzzing::serial);
}

#[test]
fn i8042_corpus() {
    replay("i8042", fuzzing::i8042);
}

#[test]
fn virtio_net_corpus() {
    replay("virtio_net", splitvisor_devices::virtio::net::fuzzing::virtio_net);
}
