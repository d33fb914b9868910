//! Fuzz harness for [`ProxyDevice`] against a hostile partition: the hypervisor side of
//! the proxy protocol, driven by bus accesses, while fake partitions at the other end of
//! [`mailbox`](super::mailbox) connections answer as the fuzz input scripts (well-formed
//! answers, wrong sequence numbers, kinds, widths or versions, truncated or oversized
//! frames, lying area lengths, any bytes, slow answers, silence, hang-ups), possibly across
//! replacement partitions offered through a [`ProxyLink`].
//!
//! The oracle, per access:
//! * each answer is classified from the bytes the partition sent: one a correct proxy must
//!   accept (a frame that decodes, with the request's sequence number and the right kind
//!   and width), must refuse, or may do either (an answer dribbled out close to the
//!   deadline); which exchanges the proxy accepted follows from what happened next (a
//!   later exchange on the same partition, or the device still alive after the access; for
//!   a liveness probe, what the probe reported);
//! * an accepted read returns the answer's data (zeros past the protocol's widest access);
//!   a read that ends with a refused answer returns all ones and the device reports the
//!   failure ([`ProxyDevice::is_dead`], and `on_dead` hears it once);
//! * output, reset and power-off requests reach the machine from accepted answers only;
//! * a replacement partition is handed exactly the state the last accepted answer carried;
//! * a liveness probe sends at most one empty input, never waits for a replacement, reports
//!   `Answered` exactly when the partition's answer was taken, and a failed probe leaves the
//!   device alive (the next access moves on to a replacement, or ends the device);
//! * every access returns within [`PROXY_TIMEOUT`] per exchange (plus scheduling slack),
//!   whatever the partition does, and allocates at most [`ACCESS_HEAP_BOUND`] bytes.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use splitvisor_bus::{BusDevice, CountingInterrupt};
use splitvisor_devices::fuzzing::heap;

use super::mailbox::{AREA, PartitionEnd, ProxyConnection};
use super::wire::{self, MAX_ACCESS, MAX_INPUT, MAX_STATE, Request, Response};
use super::{PROXY_TIMEOUT, Probe, ProxyDevice, ProxyLink};

/// Most heap one access may allocate: a request, a frame, its decoding and the kept state,
/// with room to spare.
pub const ACCESS_HEAP_BOUND: usize = 4 * wire::MAX_FRAME + 4096;

/// Time an access may take beyond [`PROXY_TIMEOUT`] per exchange (scheduling on a busy
/// machine): more when the corpus is replayed by `cargo test`, beside the rest of the
/// suite, than under the fuzzer.
#[cfg(fuzzing)]
const SLACK: Duration = Duration::from_millis(300);
#[cfg(not(fuzzing))]
const SLACK: Duration = Duration::from_millis(600);

/// Most accesses, partitions and steps per input (a short input runs fast).
const MAX_ACCESSES: usize = 24;
const MAX_PARTITIONS: usize = 4;
const MAX_STEPS: usize = 16;

/// One guest or host action on the device.
#[derive(Arbitrary, Debug)]
enum Access {
    /// A bus read of `width % 17` bytes (0 is made 1; beyond [`MAX_ACCESS`] the proxy
    /// clamps).
    Read { offset: u8, width: u8 },
    /// A bus write.
    Write { offset: u8, data: Vec<u8> },
    /// Host input (the console's stdin).
    Input { bytes: Vec<u8> },
    /// The supervisor offers the next of the input's partitions as a replacement.
    Offer,
    /// The supervisor's liveness probe, for a partition silent for `idle_ms % 4 * 10` ms.
    Probe { idle_ms: u8 },
}

/// How a partition deviates from a well-formed answer.
#[derive(Arbitrary, Debug, Clone)]
enum Fault {
    None,
    /// Answers with another sequence number (`seq + delta`, delta made non-zero).
    Seq(u32),
    /// Answers a read with `Done` and anything else with `ReadDone`.
    Kind,
    /// Answers a read with this many bytes (`% 10`).
    Width(u8),
    /// Another protocol version.
    Version(u16),
    /// Publishes this many bytes of the frame, then hangs up.
    Truncate(u16),
    /// Replaces the length word, then hangs up.
    Length(u32),
    /// Publishes the frame with this length in the page's length field (whatever the
    /// page holds past the frame is read too).
    AreaLength(u32),
    /// Answers after `chunks % 6 + 2` pauses of `pause_ms % 150`.
    Dribble {
        chunks: u8,
        pause_ms: u8,
    },
    /// Publishes these bytes instead of an answer, then hangs up.
    Raw(Vec<u8>),
    /// Reads the request and never answers.
    Stall,
    /// Reads the request and hangs up.
    HangUp,
}

/// One answer of a fake partition.
#[derive(Arbitrary, Debug, Clone)]
struct Step {
    data: u64,
    accepted: u16,
    output: Vec<u8>,
    reset: bool,
    power_off: bool,
    state: Vec<u8>,
    fault: Fault,
}

#[derive(Arbitrary, Debug)]
struct ProxyInput {
    /// Give the proxy a link (with replacements offered by [`Access::Offer`]).
    linked: bool,
    partitions: Vec<Vec<Step>>,
    accesses: Vec<Access>,
}

/// Whether a correct proxy takes an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Refuse,
    /// Close to the deadline: either is right.
    Either,
}

/// What a fake partition did with one request, logged before the proxy can see it.
#[derive(Debug)]
struct Exchange {
    partition: usize,
    request: Request,
    verdict: Verdict,
    /// The answer as the proxy would take it (when it decodes at all).
    answer: Option<Response>,
}

type Log = Arc<Mutex<Vec<Exchange>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The well-formed answer to `request` that `step` starts from.
fn answer(step: &Step, request: &Request) -> Response {
    let state = step.state[..step.state.len().min(MAX_STATE)].to_vec();
    match request {
        Request::Read { len, .. } => {
            let data = step.data.to_le_bytes()[..usize::from(*len).min(8)].to_vec();
            Response::ReadDone { data, state }
        }
        _ => Response::Done {
            accepted: step.accepted % (MAX_INPUT as u16 + 1),
            output: step.output[..step.output.len().min(MAX_INPUT)].to_vec(),
            reset: step.reset,
            power_off: step.power_off,
            state,
        },
    }
}

/// What a correct proxy makes of `bytes` as the answer to `request` numbered `seq`: the
/// first frame in them, if it decodes and answers this request.
fn judge(bytes: &[u8], request: &Request, seq: u32) -> (Verdict, Option<Response>) {
    let Ok(Ok(body)) = wire::read_frame(&mut &bytes[..]) else {
        return (Verdict::Refuse, None);
    };
    let Ok(frame) = Response::decode(&body) else {
        return (Verdict::Refuse, None);
    };
    let fits = match (request, &frame.message) {
        (Request::Read { len, .. }, Response::ReadDone { data, .. }) => data.len() == usize::from(*len),
        (Request::Read { .. }, _) | (_, Response::ReadDone { .. }) => false,
        _ => true,
    };
    let verdict = if fits && frame.seq == seq { Verdict::Accept } else { Verdict::Refuse };
    (verdict, Some(frame.message))
}

/// A partition that answers requests on `end` as `script` says, logging each.
fn fake_partition(partition: usize, mut end: PartitionEnd, script: Vec<Step>, log: Log) -> JoinHandle<()> {
    std::thread::spawn(move || {
        // What the page's answer area holds: what the proxy reads past a short frame.
        let mut area = vec![0u8; AREA];
        for step in script {
            let request = match end.next_request() {
                Ok(Some(request)) => request.to_vec(),
                Ok(None) | Err(_) => return, // the proxy hung up
            };
            let body = wire::frame_body(&request).expect("the proxy sent a malformed frame");
            let frame = Request::decode(body).expect("the proxy sent a malformed request");
            let (seq, request) = (frame.seq, frame.message);
            let good = answer(&step, &request);
            let mut bytes = good.encode(seq);
            let mut claimed = None;
            let mut hang_up = false;
            let mut dribble = None;
            match &step.fault {
                Fault::None => {}
                Fault::Seq(delta) => bytes = good.encode(seq.wrapping_add(delta | 1)),
                Fault::Kind => {
                    let wrong = match &request {
                        Request::Read { .. } => Response::Done {
                            accepted: 0,
                            output: Vec::new(),
                            reset: false,
                            power_off: false,
                            state: Vec::new(),
                        },
                        _ => Response::ReadDone { data: vec![0xa5], state: Vec::new() },
                    };
                    bytes = wrong.encode(seq);
                }
                Fault::Width(width) => {
                    let data = vec![0x5a; usize::from(width % 10)];
                    let state = Vec::new();
                    // Encoding clamps to 8: write the width byte by hand past that.
                    bytes =
                        Response::ReadDone { data: data[..data.len().min(8)].to_vec(), state }.encode(seq);
                    if data.len() > 8 {
                        bytes[12] = data.len() as u8;
                    }
                }
                Fault::Version(version) => bytes[4..6].copy_from_slice(&version.to_le_bytes()),
                Fault::Truncate(cut) => {
                    bytes.truncate(usize::from(*cut) % bytes.len());
                    hang_up = true;
                }
                Fault::Length(len) => {
                    bytes[0..4].copy_from_slice(&len.to_le_bytes());
                    hang_up = true;
                }
                Fault::AreaLength(len) => claimed = Some(*len),
                Fault::Dribble { chunks, pause_ms } => {
                    dribble =
                        Some((usize::from(chunks % 6) + 2, Duration::from_millis(u64::from(pause_ms % 150))));
                }
                Fault::Raw(raw) => {
                    bytes = raw[..raw.len().min(2 * wire::MAX_FRAME)].to_vec();
                    hang_up = true;
                }
                Fault::Stall | Fault::HangUp => bytes.clear(),
            }
            let stored = bytes.len().min(AREA);
            area[..stored].copy_from_slice(&bytes[..stored]);
            let claimed = claimed.unwrap_or(bytes.len() as u32);
            let seen = &area[..(claimed as usize).min(AREA)];
            let (mut verdict, decoded) = judge(seen, &request, seq);
            if dribble.is_some() && verdict == Verdict::Accept {
                verdict = Verdict::Either;
            }
            let answer = decoded.filter(|_| verdict != Verdict::Refuse);
            lock(&log).push(Exchange { partition, request, verdict, answer });
            match (&step.fault, dribble) {
                (Fault::Stall, _) => {
                    // Silent until the proxy gives up on us and hangs up.
                    end.wait_hang_up(Duration::from_secs(60));
                    return;
                }
                (Fault::HangUp, _) => return,
                (_, Some((chunks, pause))) => std::thread::sleep(pause * chunks as u32),
                _ => {}
            }
            if end.publish(&bytes, claimed).is_err() {
                return;
            }
            if hang_up {
                return;
            }
        }
        // Out of script: the next request meets a hang-up (logged as refused).
        if let Ok(Some(request)) = end.next_request()
            && let Ok(body) = wire::frame_body(request)
        {
            if let Ok(frame) = Request::decode(body) {
                lock(&log).push(Exchange {
                    partition,
                    request: frame.message,
                    verdict: Verdict::Refuse,
                    answer: None,
                });
            }
        }
    })
}

/// Collects what the device writes to its output.
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // A fuzz binary's main is libFuzzer's, which leaves SIGPIPE fatal; a write to a peer
    // that hung up must be an error here, as in the hypervisor.
    // SAFETY: sets a signal disposition to "ignore"; no handler runs.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Fuzz harness: see the module documentation.
pub fn proxy_device(data: &[u8]) {
    let Ok(input) = ProxyInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    ignore_sigpipe();
    let mut scripts: VecDeque<Vec<Step>> = input
        .partitions
        .into_iter()
        .take(MAX_PARTITIONS)
        .map(|script| script.into_iter().take(MAX_STEPS).collect())
        .collect();
    let log: Log = Arc::default();
    let mut partitions = Vec::new();
    let (ours, theirs) = ProxyConnection::pair().expect("a proxy connection");
    partitions.push(fake_partition(0, theirs, scripts.pop_front().unwrap_or_default(), log.clone()));

    let output = Arc::new(Mutex::new(Vec::new()));
    let (reset, power_off) = (Arc::new(CountingInterrupt::new()), Arc::new(CountingInterrupt::new()));
    let deaths = Arc::new(AtomicUsize::new(0));
    let on_dead = {
        let deaths = deaths.clone();
        Box::new(move |_why: String| {
            deaths.fetch_add(1, Ordering::SeqCst);
        })
    };
    let mut proxy =
        ProxyDevice::new("fuzz", ours, Box::new(Output(output.clone())), Some(reset.clone()), Some(on_dead))
            .with_power_off(power_off.clone());
    let link = input.linked.then(|| ProxyLink::new().expect("a link"));
    if let Some(link) = &link {
        // Replacements come only from the script's offers: a failure with none pending
        // ends the device at once instead of waiting for a supervisor.
        link.give_up();
        proxy = proxy.with_link(link.clone());
    }

    let mut model = Model::default();
    for access in input.accesses.into_iter().take(MAX_ACCESSES) {
        if let Access::Offer = access {
            let (Some(link), Some(script)) = (&link, scripts.pop_front()) else { continue };
            let (ours, theirs) = ProxyConnection::pair().expect("a proxy connection");
            let partition = partitions.len();
            partitions.push(fake_partition(partition, theirs, script, log.clone()));
            link.offer(ours);
            continue;
        }
        let was_dead = proxy.is_dead();
        let logged = lock(&log).len();
        let started = Instant::now();
        let (outcome, heap) = heap::measure(|| model.access(&mut proxy, &access));
        let took = started.elapsed();
        let exchanges: Vec<Exchange> = lock(&log).drain(logged..).collect();

        if let Some(heap) = heap {
            assert!(heap <= ACCESS_HEAP_BOUND, "one access allocated {heap} bytes");
        }
        let bound = PROXY_TIMEOUT * exchanges.len().max(1) as u32 + SLACK;
        assert!(
            took <= bound,
            "{access:?} took {took:?} over {} exchanges (bound {bound:?})",
            exchanges.len()
        );
        let alive = !proxy.is_dead();
        if was_dead {
            assert!(exchanges.is_empty(), "a dead device still talks to a partition");
        }
        if let Outcome::Probe(_) = outcome {
            assert!(exchanges.len() <= 1, "a probe sent {} requests", exchanges.len());
            assert!(alive || was_dead, "a failed probe ended the device itself");
        }
        model.check(&access, &exchanges, alive, took, &outcome, &output, &reset, &power_off);
        assert_eq!(deaths.load(Ordering::SeqCst), usize::from(!alive), "on_dead heard the failure once");
    }
    drop(proxy);
    drop(link);
    for partition in partitions {
        if let Err(panic) = partition.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// What one access returned.
#[derive(Debug)]
enum Outcome {
    Read(Vec<u8>),
    Done,
    Input(usize),
    Probe(Probe),
}

/// What the device should have done so far.
#[derive(Default)]
struct Model {
    /// The state of the last accepted answer: what a replacement must be handed.
    state: Vec<u8>,
    output: Vec<u8>,
    resets: usize,
    power_offs: usize,
}

impl Model {
    fn access(&mut self, proxy: &mut ProxyDevice, access: &Access) -> Outcome {
        match access {
            Access::Read { offset, width } => {
                let mut data = vec![0x33; usize::from(width % 17).max(1)];
                proxy.read(u64::from(*offset), &mut data);
                Outcome::Read(data)
            }
            Access::Write { offset, data } => {
                let data = if data.is_empty() { &[0u8][..] } else { &data[..data.len().min(16)] };
                proxy.write(u64::from(*offset), data);
                Outcome::Done
            }
            Access::Input { bytes } => Outcome::Input(proxy.input(&bytes[..bytes.len().min(2 * MAX_INPUT)])),
            Access::Probe { idle_ms } => {
                Outcome::Probe(proxy.probe(Duration::from_millis(u64::from(idle_ms % 4) * 10)))
            }
            Access::Offer => Outcome::Done,
        }
    }

    /// Checks one access against what the partitions answered during it.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        access: &Access,
        exchanges: &[Exchange],
        alive: bool,
        took: Duration,
        outcome: &Outcome,
        output: &Mutex<Vec<u8>>,
        reset: &CountingInterrupt,
        power_off: &CountingInterrupt,
    ) {
        // The requests are what the access asks, each on a partition newer than the last.
        for pair in exchanges.windows(2) {
            assert!(pair[0].partition <= pair[1].partition, "the proxy went back to an older partition");
        }
        let mut served = None;
        for (i, exchange) in exchanges.iter().enumerate() {
            // An exchange was accepted if another followed it, or if it was the last and
            // the device is alive; a probe says itself whether it took the answer (a
            // failed one leaves the device alive, the replacement to the next access).
            let accepted = match outcome {
                Outcome::Probe(probe) => matches!(probe, Probe::Answered),
                _ => i + 1 < exchanges.len() || alive,
            };
            match exchange.verdict {
                // A partition thread the scheduler kept off the CPU past the deadline
                // is rightly given up on.
                Verdict::Accept => {
                    assert!(
                        accepted || took >= PROXY_TIMEOUT,
                        "a well-formed answer was refused: {exchange:?}"
                    )
                }
                Verdict::Refuse => assert!(!accepted, "a malformed answer was taken: {exchange:?}"),
                Verdict::Either => {}
            }
            if let Request::Restore { state } = &exchange.request {
                assert_eq!(
                    state, &self.state,
                    "a replacement was handed another state than the last answer's"
                );
            } else {
                assert!(request_matches(&exchange.request, access), "{:?} for {access:?}", exchange.request);
            }
            if accepted {
                let answer = exchange.answer.as_ref().expect("an accepted answer decodes");
                let (Response::ReadDone { state, .. } | Response::Done { state, .. }) = answer;
                self.state.clone_from(state);
                if !matches!(exchange.request, Request::Restore { .. }) {
                    served = Some(answer);
                }
            }
        }
        if let Outcome::Probe(probe) = outcome {
            let sent = !exchanges.is_empty();
            match probe {
                Probe::Recent | Probe::NoPartition => assert!(!sent, "{probe:?} after sending a request"),
                Probe::Answered | Probe::Failed(_) => assert!(sent, "{probe:?} without sending a request"),
            }
        } else if alive {
            assert!(served.is_some(), "{access:?} returned without an accepted answer");
        }
        match (outcome, served) {
            (Outcome::Read(data), Some(Response::ReadDone { data: got, .. })) => {
                let mut expected = got.clone();
                expected.resize(data.len(), 0);
                assert_eq!(data, &expected, "a read returned other data than the partition's answer");
            }
            (Outcome::Read(data), None) => {
                assert!(data.iter().all(|&b| b == 0xff), "a failed read returned {data:x?}, not all ones");
            }
            (Outcome::Done, Some(Response::Done { output, reset, power_off, .. })) => {
                self.effects(output, *reset, *power_off);
            }
            (Outcome::Input(taken), Some(Response::Done { accepted, output, reset, power_off, .. })) => {
                let Access::Input { bytes } = access else { unreachable!() };
                let offered = bytes.len().min(2 * MAX_INPUT).min(MAX_INPUT);
                assert_eq!(*taken, usize::from(*accepted).min(offered), "input taken");
                self.effects(output, *reset, *power_off);
            }
            (Outcome::Input(taken), None) => assert_eq!(*taken, 0, "a failed input was taken"),
            (Outcome::Probe(_), Some(Response::Done { output, reset, power_off, .. })) => {
                self.effects(output, *reset, *power_off);
            }
            (Outcome::Probe(_), None) => {}
            (Outcome::Done, None) => {}
            (outcome, served) => panic!("{outcome:?} served by {served:?}"),
        }
        assert!(
            lock(output).as_slice() == self.output.as_slice(),
            "output differs from the accepted answers'"
        );
        assert_eq!(reset.count() as usize, self.resets, "resets");
        assert_eq!(power_off.count() as usize, self.power_offs, "power-offs");
    }

    fn effects(&mut self, output: &[u8], reset: bool, power_off: bool) {
        self.output.extend_from_slice(output);
        self.resets += usize::from(reset);
        self.power_offs += usize::from(power_off);
    }
}

/// Whether `request` is what a proxy sends for `access` (widths clamped to the protocol's).
fn request_matches(request: &Request, access: &Access) -> bool {
    match (request, access) {
        (Request::Read { offset, len }, Access::Read { offset: o, width }) => {
            *offset == u64::from(*o) && usize::from(*len) == usize::from(width % 17).clamp(1, MAX_ACCESS)
        }
        (Request::Write { offset, data }, Access::Write { offset: o, data: d }) => {
            let d = if d.is_empty() { &[0u8][..] } else { &d[..d.len().min(MAX_ACCESS)] };
            *offset == u64::from(*o) && data == d
        }
        (Request::Input { bytes }, Access::Input { bytes: b }) => bytes == &b[..b.len().min(MAX_INPUT)],
        (Request::Input { bytes }, Access::Probe { .. }) => bytes.is_empty(),
        _ => false,
    }
}
