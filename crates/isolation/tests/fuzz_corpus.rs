//! Replays the committed corpora of the proxy protocol's fuzz targets on stable.

use std::path::PathBuf;

use splitvisor_isolation::proxy::wire;

fn replay(target: &str, harness: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut inputs = 0;
    for entry in entries {
        let path = entry.expect("read the corpus directory").path();
        harness(&std::fs::read(&path).expect("read a corpus file"));
        inputs += 1;
    }
    assert!(inputs >= 4, "{target}: only {inputs} corpus inputs");
}

#[test]
fn proxy_request_corpus() {
    replay("proxy_request", wire::fuzz_request);
}

#[test]
fn proxy_response_corpus() {
    replay("proxy_response", wire::fuzz_response);
}
