//! Replays the committed corpora of the isolation crate's fuzz targets on stable, through
//! the very harnesses the fuzz targets call.

use std::path::{Path, PathBuf};

use splitvisor_devices::fuzzing::heap::{self, CountingAllocator};
use splitvisor_isolation::backend::blk::fuzzing as backend;
use splitvisor_isolation::proxy::{fuzzing as proxy, wire};

// The proxy and backend harnesses bound the heap an access or a serve allocates when this
// allocator counts.
#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

fn replay(target: &str, harness: fn(&[u8]), at_least: usize) {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let dir = fuzz.join("corpus").join(target);
    let inputs = replay_dir(&dir, harness);
    assert!(inputs >= at_least, "{target}: only {inputs} corpus inputs in {}", dir.display());
    // Inputs that once found a bug, kept under names that say which.
    let regressions = fuzz.join("regressions").join(target);
    if regressions.is_dir() {
        replay_dir(&regressions, harness);
    }
    assert!(heap::installed(), "the counting allocator is not installed");
}

fn replay_dir(dir: &Path, harness: fn(&[u8])) -> usize {
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
fn proxy_request_corpus() {
    replay("proxy_request", wire::fuzz_request, 4);
}

#[test]
fn proxy_response_corpus() {
    replay("proxy_response", wire::fuzz_response, 4);
}

#[test]
fn proxy_device_corpus() {
    replay("proxy_device", proxy::proxy_device, 8);
}

#[test]
fn vhost_user_backend_corpus() {
    replay("vhost_user_backend", backend::vhost_user_backend, 8);
}
