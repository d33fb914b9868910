//! A malicious driver partition against the hypervisor's side of the seams: garbage,
//! oversized, truncated, out-of-order, late and absent answers, and a flood of wake-ups. Each time the
//! hypervisor drops the partition with a logged reason, within a bounded wait, and the
//! device then reads as an empty bus instead of blocking a vCPU again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use splitvisor_bus::BusDevice;
use splitvisor_isolation::frontend::{REPLY_TIMEOUT, VhostUserBlk};
use splitvisor_isolation::proxy::wire::{self, Request, Response};
use splitvisor_isolation::proxy::{PROXY_TIMEOUT, PartitionEnd, ProxyConnection, ProxyDevice};

/// A proxy whose partition end is played by `partition`, which also gets its raw socket
/// (the doorbell); returns the proxy, the reason it was dropped (once), and the partition
/// thread.
fn proxy_against(
    partition: impl FnOnce(PartitionEnd, UnixStream) + Send + 'static,
) -> (ProxyDevice, Arc<Mutex<Option<String>>>, JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let ours = ProxyConnection::new(ours).unwrap();
    let raw = theirs.try_clone().unwrap();
    let end = ours.partition_end(theirs).unwrap();
    let thread = std::thread::spawn(move || partition(end, raw));
    let reason = Arc::new(Mutex::new(None));
    let seen = reason.clone();
    let on_dead = Box::new(move |why: String| *seen.lock().unwrap() = Some(why));
    let proxy = ProxyDevice::new("evil", ours, Box::new(std::io::sink()), None, Some(on_dead));
    (proxy, reason, thread)
}

/// Reads a register; checks that it came back as an empty bus, in bounded time, and that
/// the partition was dropped for `expected`.
fn assert_dropped(proxy: &mut ProxyDevice, reason: &Arc<Mutex<Option<String>>>, expected: &str) {
    let start = Instant::now();
    let mut data = [0u8; 1];
    proxy.read(5, &mut data);
    // Bounded by the proxy's own timeout (a generous multiple: this is a busy machine).
    assert!(start.elapsed() < PROXY_TIMEOUT * 10, "a read waited {:?}", start.elapsed());
    assert_eq!(data, [0xff]);
    assert!(proxy.is_dead());
    let why = reason.lock().unwrap().clone().expect("the drop was reported");
    assert!(why.contains(expected), "dropped for: {why}");
    // From now on the partition is never asked anything again: reads are an empty bus.
    proxy.read(5, &mut data);
    proxy.write(0, &[0x41]);
    assert_eq!(data, [0xff]);
    assert!(proxy.is_dead());
}

fn read_request(end: &mut PartitionEnd) -> Option<u32> {
    let request = end.next_request().ok()??;
    let body = wire::frame_body(request).ok()?;
    Request::decode(body).ok().map(|frame| frame.seq)
}

#[test]
fn an_honest_partition_answers() {
    let (mut proxy, reason, thread) = proxy_against(|mut end, _| {
        while let Some(seq) = read_request(&mut end) {
            end.answer(&Response::ReadDone { data: vec![0x60], state: vec![] }.encode(seq)).unwrap();
        }
    });
    let mut data = [0u8; 1];
    proxy.read(5, &mut data);
    assert_eq!(data, [0x60]);
    assert!(!proxy.is_dead());
    assert!(reason.lock().unwrap().is_none());
    drop(proxy);
    thread.join().unwrap();
}

#[test]
fn garbage_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        read_request(&mut end);
        let _ = end.answer(&[12, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8]);
    });
    assert_dropped(&mut proxy, &reason, "protocol version");
}

#[test]
fn an_oversized_frame_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        read_request(&mut end);
        let _ = end.answer(&u32::MAX.to_le_bytes());
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_dropped(&mut proxy, &reason, "out of bounds");
}

#[test]
fn a_truncated_frame_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        let seq = read_request(&mut end).unwrap();
        let frame = Response::ReadDone { data: vec![1], state: vec![] }.encode(seq);
        let _ = end.answer(&frame[..frame.len() - 1]);
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_dropped(&mut proxy, &reason, "truncated frame");
}

#[test]
fn an_out_of_order_answer_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        let seq = read_request(&mut end).unwrap();
        let _ = end.answer(&Response::ReadDone { data: vec![1], state: vec![] }.encode(seq + 7));
    });
    assert_dropped(&mut proxy, &reason, "answered request");
}

#[test]
fn the_wrong_kind_of_answer_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        let seq = read_request(&mut end).unwrap();
        let _ = end.answer(
            &Response::Done { accepted: 0, output: vec![], reset: false, power_off: false, state: vec![] }
                .encode(seq),
        );
    });
    assert_dropped(&mut proxy, &reason, "answered a read");
}

#[test]
fn a_late_answer_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        let seq = read_request(&mut end).unwrap();
        std::thread::sleep(PROXY_TIMEOUT * 2);
        let _ = end.answer(&Response::ReadDone { data: vec![1], state: vec![] }.encode(seq));
    });
    assert_dropped(&mut proxy, &reason, "connection");
}

#[test]
fn no_answer_at_all_is_dropped() {
    let (mut proxy, reason, _t) = proxy_against(|mut end, _| {
        read_request(&mut end);
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_dropped(&mut proxy, &reason, "connection");
}

#[test]
fn a_flood_of_wake_ups_without_an_answer_is_dropped_in_time() {
    let (mut proxy, reason, _t) = proxy_against(|_end, mut raw| {
        // Tokens on the doorbell, never an answer in the page.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) && raw.write_all(&[1; 512]).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_dropped(&mut proxy, &reason, "in time");
}

#[test]
fn a_dead_partition_is_dropped() {
    let (mut proxy, reason, thread) = proxy_against(|end, raw| drop((end, raw)));
    thread.join().unwrap();
    assert_dropped(&mut proxy, &reason, "connection");
}

/// A vhost-user "backend" that reads whatever comes and answers `reply` (or nothing).
fn vhost_user_against(reply: Option<Vec<u8>>) -> (Result<VhostUserBlk, String>, Duration) {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mut header = [0u8; 12];
        if theirs.read_exact(&mut header).is_ok() {
            if let Some(reply) = reply {
                let _ = theirs.write_all(&reply);
            }
        }
        std::thread::sleep(REPLY_TIMEOUT + Duration::from_millis(500));
    });
    let start = Instant::now();
    let result = VhostUserBlk::from_stream(ours).map_err(|e| e.to_string());
    let elapsed = start.elapsed();
    drop(thread);
    (result, elapsed)
}

#[test]
fn a_silent_vhost_user_backend_fails_in_bounded_time() {
    let (result, elapsed) = vhost_user_against(None);
    assert!(result.is_err());
    assert!(elapsed < REPLY_TIMEOUT * 2, "waited {elapsed:?}");
}

#[test]
fn a_garbage_vhost_user_reply_is_an_error() {
    // SET_OWNER needs no reply; GET_FEATURES gets a header with a nonsense size.
    let mut garbage = vec![1, 0, 0, 0, 5, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
    garbage.extend_from_slice(&[0xaa; 64]);
    let (result, elapsed) = vhost_user_against(Some(garbage));
    assert!(result.is_err(), "{result:?}", result = result.as_ref().map(|_| ()));
    assert!(elapsed < REPLY_TIMEOUT * 2, "waited {elapsed:?}");
}
