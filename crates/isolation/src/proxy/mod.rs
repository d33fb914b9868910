//! Plain bus devices (the 8250, the i8042) in a driver partition, behind a proxy.
//!
//! [`ProxyDevice`] is a [`BusDevice`] in the hypervisor that forwards each register access
//! to the partition over a unix socket ([`wire`]) and waits, for at most
//! [`PROXY_TIMEOUT`], for the answer. The partition runs the very same emulator
//! ([`serve`]). Interrupts bypass the proxy: the partition holds the irqfd.
//!
//! A partition that answers garbage, too much, out of order, late or never is dropped: the
//! proxy logs why, reports it once, and from then on answers reads with all ones and
//! ignores writes, so no vCPU ever waits on it again.

pub mod wire;

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use splitvisor_bus::{BusDevice, Interrupt};

use wire::{DecodeError, Frame, MAX_INPUT, Request, Response};

/// Longest a register access waits for a partition.
pub const PROXY_TIMEOUT: Duration = Duration::from_millis(200);

/// Why a partition was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The socket failed, hung up or timed out.
    #[error("partition connection: {0}")]
    Io(#[from] io::Error),
    /// The partition sent a malformed frame.
    #[error("partition sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// The partition answered another request than the one asked.
    #[error("partition answered request {got}, expected {expected}")]
    OutOfOrder {
        /// The sequence number expected.
        expected: u32,
        /// The one received.
        got: u32,
    },
    /// The partition answered with the wrong kind of response.
    #[error("partition answered a {request} with {response:?}")]
    WrongResponse {
        /// What was asked.
        request: &'static str,
        /// What came back.
        response: Response,
    },
}

/// The hypervisor's stand-in for a device that runs in a partition.
pub struct ProxyDevice {
    name: String,
    stream: UnixStream,
    seq: u32,
    dead: bool,
    output: Box<dyn Write + Send>,
    reset: Option<Arc<dyn Interrupt>>,
    on_dead: Option<Box<dyn FnOnce(String) + Send>>,
}

impl ProxyDevice {
    /// A proxy to the partition at the other end of `stream`. Output the device produces
    /// goes to `output`; a reset it asks for raises `reset`; `on_dead` hears once if the
    /// partition has to be dropped.
    pub fn new(
        name: &str,
        stream: UnixStream,
        output: Box<dyn Write + Send>,
        reset: Option<Arc<dyn Interrupt>>,
        on_dead: Option<Box<dyn FnOnce(String) + Send>>,
    ) -> io::Result<Self> {
        stream.set_read_timeout(Some(PROXY_TIMEOUT))?;
        stream.set_write_timeout(Some(PROXY_TIMEOUT))?;
        Ok(Self { name: name.to_string(), stream, seq: 0, dead: false, output, reset, on_dead })
    }

    /// Whether the partition was dropped.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Feeds host input to the device; returns how many bytes it took.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let bytes = &bytes[..bytes.len().min(MAX_INPUT)];
        match self.call(Request::Input { bytes: bytes.to_vec() }) {
            Some(Response::Done { accepted, output, reset }) => {
                self.apply(&output, reset);
                usize::from(accepted).min(bytes.len())
            }
            Some(other) => {
                self.drop_partition(ProxyError::WrongResponse { request: "input", response: other });
                0
            }
            None => 0,
        }
    }

    fn call(&mut self, request: Request) -> Option<Response> {
        if self.dead {
            return None;
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        match self.exchange(&request, seq) {
            Ok(response) => Some(response),
            Err(e) => {
                self.drop_partition(e);
                None
            }
        }
    }

    fn exchange(&mut self, request: &Request, seq: u32) -> Result<Response, ProxyError> {
        self.stream.write_all(&request.encode(seq))?;
        let body = wire::read_frame(&mut self.stream)??;
        let Frame { seq: got, message } = Response::decode(&body)?;
        if got != seq {
            return Err(ProxyError::OutOfOrder { expected: seq, got });
        }
        Ok(message)
    }

    fn apply(&mut self, output: &[u8], reset: bool) {
        if !output.is_empty() {
            let _ = self.output.write_all(output);
        }
        if reset {
            if let Some(line) = &self.reset {
                let _ = line.trigger();
            }
        }
    }

    fn drop_partition(&mut self, why: ProxyError) {
        log::warn!("{}: dropping its driver partition: {why}", self.name);
        self.dead = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(on_dead) = self.on_dead.take() {
            on_dead(why.to_string());
        }
    }
}

impl BusDevice for ProxyDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len().min(wire::MAX_ACCESS) as u8;
        match self.call(Request::Read { offset, len }) {
            Some(Response::ReadDone { data: got }) if got.len() == usize::from(len) => {
                data.fill(0);
                data[..got.len()].copy_from_slice(&got);
            }
            Some(other) => {
                data.fill(0xff);
                self.drop_partition(ProxyError::WrongResponse { request: "read", response: other });
            }
            // A dead partition reads as an empty bus.
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let data = data[..data.len().min(wire::MAX_ACCESS)].to_vec();
        match self.call(Request::Write { offset, data }) {
            Some(Response::Done { output, reset, .. }) => self.apply(&output, reset),
            Some(other) => {
                self.drop_partition(ProxyError::WrongResponse { request: "write", response: other })
            }
            None => {}
        }
    }
}

/// Output a device produces between two responses, and its reset line.
#[derive(Clone, Default)]
pub struct Effects {
    output: Arc<std::sync::Mutex<Vec<u8>>>,
    reset: Arc<AtomicBool>,
}

impl Effects {
    /// A writer for the device's output.
    pub fn writer(&self) -> EffectsWriter {
        EffectsWriter(self.output.clone())
    }

    /// An interrupt line that records a reset request.
    pub fn reset_line(&self) -> Arc<dyn Interrupt> {
        Arc::new(ResetFlag(self.reset.clone()))
    }

    fn take(&self) -> (Vec<u8>, bool) {
        let mut output = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let taken = if output.len() > MAX_INPUT {
            output.drain(..MAX_INPUT).collect()
        } else {
            std::mem::take(&mut *output)
        };
        (taken, self.reset.swap(false, Ordering::AcqRel))
    }
}

/// Collects a device's output for the next response.
pub struct EffectsWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for EffectsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ResetFlag(Arc<AtomicBool>);

impl Interrupt for ResetFlag {
    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// Something a partition can feed host input to.
pub trait InputSink: Send {
    /// Takes what fits of `bytes`; returns how many.
    fn input(&mut self, bytes: &[u8]) -> usize;
}

impl<W: Write + Send> InputSink for splitvisor_devices::serial::Serial<W> {
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.enqueue_input(bytes).unwrap_or(0)
    }
}

/// A device without input.
pub struct NoInput<D>(pub D);

impl<D: BusDevice> BusDevice for NoInput<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data)
    }
}

impl<D: Send> InputSink for NoInput<D> {
    fn input(&mut self, _bytes: &[u8]) -> usize {
        0
    }
}

/// The partition side: serves `device` on `stream` until the hypervisor hangs up or sends
/// a malformed frame.
pub fn serve<D: BusDevice + InputSink>(
    device: &mut D,
    effects: &Effects,
    stream: &mut UnixStream,
) -> Result<(), ProxyError> {
    loop {
        let body = match wire::read_frame(stream) {
            Ok(body) => body?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Frame { seq, message } = Request::decode(&body)?;
        let response = match message {
            Request::Read { offset, len } => {
                let mut data = vec![0u8; usize::from(len)];
                device.read(offset, &mut data);
                Response::ReadDone { data }
            }
            Request::Write { offset, data } => {
                device.write(offset, &data);
                let (output, reset) = effects.take();
                Response::Done { accepted: 0, output, reset }
            }
            Request::Input { bytes } => {
                let accepted = device.input(&bytes) as u16;
                let (output, reset) = effects.take();
                Response::Done { accepted, output, reset }
            }
        };
        stream.write_all(&response.encode(seq))?;
    }
}

impl InputSink for ProxyDevice {
    fn input(&mut self, bytes: &[u8]) -> usize {
        ProxyDevice::input(self, bytes)
    }
}
