//! The proxy wire protocol between the hypervisor and a partition serving a plain bus
//! device (the 8250, the i8042, the ACPI power registers).
//!
//! Every message is one frame:
//!
//! ```text
//! u32 le  length of what follows (8 ..= MAX_FRAME)
//! u16 le  protocol version (VERSION)
//! u16 le  message kind
//! u32 le  sequence number (a response carries its request's)
//! ...     payload, by kind (below)
//! ```
//!
//! Requests (hypervisor → partition): `Read { offset: u64, len: u8 }`,
//! `Write { offset: u64, data: u8-length-prefixed }`, `Input { bytes: u16-length-prefixed }`,
//! `Restore { state: u16-length-prefixed }`.
//! Responses (partition → hypervisor): `ReadDone { data, state }`,
//! `Done { accepted, output, effects: u8 flags (bit 0 reset, bit 1 power-off), state }`.
//!
//! Version 3 added the power-off flag (the ACPI power device asks for power-off as the
//! i8042 asks for a reset); version 2 had a reset byte of 0 or 1 there.
//!
//! Every response carries the device's state after the request (a few bytes: the UART's
//! registers and receive FIFO), which the hypervisor keeps and never interprets. A
//! partition that replaces a dead one first gets `Restore` with the last state, and the
//! request the dead one never answered is asked again: the guest sees each access served
//! exactly once, and no console byte is lost or doubled.
//! Interrupts do not travel here: the partition is handed the irqfd and raises it itself.
//! Every length and count is bounded before anything is allocated; any malformed frame is
//! a typed [`DecodeError`].

use arbitrary::Arbitrary;

/// The protocol version this code speaks.
pub const VERSION: u16 = 3;
/// Largest frame (after the length word): a `Done` with full output and state.
pub const MAX_FRAME: usize = 8 + 2 + 2 + MAX_INPUT + 1 + 2 + MAX_STATE;
/// Largest device state.
pub const MAX_STATE: usize = 128;
/// Widest register access.
pub const MAX_ACCESS: usize = 8;
/// Most host input bytes per message, and most output bytes per response.
pub const MAX_INPUT: usize = 256;

const KIND_READ: u16 = 1;
const KIND_WRITE: u16 = 2;
const KIND_INPUT: u16 = 3;
const KIND_RESTORE: u16 = 4;
const KIND_READ_DONE: u16 = 0x81;
const KIND_DONE: u16 = 0x82;

/// `Done` effect flag: the device asked for a machine reset.
const EFFECT_RESET: u8 = 1 << 0;
/// `Done` effect flag: the device asked for power-off.
const EFFECT_POWER_OFF: u8 = 1 << 1;

/// A request from the hypervisor.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset into the device's range.
        offset: u64,
        /// Access width, 1..=8.
        len: u8,
    },
    /// Write `data` at `offset`.
    Write {
        /// Offset into the device's range.
        offset: u64,
        /// 1..=8 bytes.
        data: Vec<u8>,
    },
    /// Host input for the device (the serial console's stdin).
    Input {
        /// Up to MAX_INPUT bytes.
        bytes: Vec<u8>,
    },
    /// Take up the state a previous partition left (its last response's `state`).
    Restore {
        /// Up to MAX_STATE bytes.
        state: Vec<u8>,
    },
}

/// A response from the partition.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The bytes a read returned.
    ReadDone {
        /// 1..=8 bytes.
        data: Vec<u8>,
        /// The device's state after the read, up to MAX_STATE bytes.
        state: Vec<u8>,
    },
    /// A write or input was applied.
    Done {
        /// Input bytes the device took (0 for a write).
        accepted: u16,
        /// What the device wrote to its output meanwhile (the console), up to MAX_INPUT.
        output: Vec<u8>,
        /// The device asked for a machine reset (the i8042's reset line, the ACPI reset
        /// register).
        reset: bool,
        /// The device asked for power-off (the ACPI sleep control register, S5).
        power_off: bool,
        /// The device's state after the request, up to MAX_STATE bytes.
        state: Vec<u8>,
    },
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the frame needs.
    #[error("truncated frame")]
    Truncated,
    /// A length beyond the protocol's bounds.
    #[error("frame length {0} out of bounds")]
    BadLength(usize),
    /// Another protocol version.
    #[error("protocol version {0}, expected {VERSION}")]
    BadVersion(u16),
    /// An unknown message kind.
    #[error("unknown message kind {0:#x}")]
    UnknownKind(u16),
    /// A field out of its bounds (a zero or too wide access, too much data).
    #[error("field out of bounds: {0}")]
    BadField(&'static str),
    /// Bytes left over after the payload.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// A decoded frame: its sequence number and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<M> {
    /// Sequence number.
    pub seq: u32,
    /// The message.
    pub message: M,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from(self.u32()?) | u64::from(self.u32()?) << 32)
    }
    fn bytes_u8(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len = usize::from(self.u8()?);
        if len == 0 || len > max {
            return Err(DecodeError::BadField(what));
        }
        Ok(self.take(len)?.to_vec())
    }
    fn bytes_u16(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::BadField(what));
        }
        Ok(self.take(len)?.to_vec())
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() { Ok(()) } else { Err(DecodeError::Trailing(self.0.len())) }
    }
}

/// Splits the body of a frame (after the length word) into (seq, kind, payload cursor).
fn header(body: &[u8]) -> Result<(u32, u16, Cursor<'_>), DecodeError> {
    if body.len() > MAX_FRAME {
        return Err(DecodeError::BadLength(body.len()));
    }
    let mut cursor = Cursor(body);
    let version = cursor.u16()?;
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let kind = cursor.u16()?;
    let seq = cursor.u32()?;
    Ok((seq, kind, cursor))
}

fn frame(seq: u32, kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn push_u16_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn truncated(data: &[u8], max: usize) -> &[u8] {
    &data[..data.len().min(max)]
}

impl Request {
    /// Encodes as a frame (lengths clamped to the protocol's bounds).
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        match self {
            Request::Read { offset, len } => {
                let mut payload = offset.to_le_bytes().to_vec();
                payload.push(*len);
                frame(seq, KIND_READ, &payload)
            }
            Request::Write { offset, data } => {
                let data = truncated(data, MAX_ACCESS);
                let mut payload = offset.to_le_bytes().to_vec();
                payload.push(data.len() as u8);
                payload.extend_from_slice(data);
                frame(seq, KIND_WRITE, &payload)
            }
            Request::Input { bytes } => {
                let bytes = truncated(bytes, MAX_INPUT);
                let mut payload = (bytes.len() as u16).to_le_bytes().to_vec();
                payload.extend_from_slice(bytes);
                frame(seq, KIND_INPUT, &payload)
            }
            Request::Restore { state } => {
                let mut payload = Vec::new();
                push_u16_bytes(&mut payload, truncated(state, MAX_STATE));
                frame(seq, KIND_RESTORE, &payload)
            }
        }
    }

    /// Decodes a frame body (after the length word).
    pub fn decode(body: &[u8]) -> Result<Frame<Self>, DecodeError> {
        let (seq, kind, mut c) = header(body)?;
        let message = match kind {
            KIND_READ => {
                let offset = c.u64()?;
                let len = c.u8()?;
                if len == 0 || usize::from(len) > MAX_ACCESS {
                    return Err(DecodeError::BadField("read width"));
                }
                Request::Read { offset, len }
            }
            KIND_WRITE => Request::Write { offset: c.u64()?, data: c.bytes_u8(MAX_ACCESS, "write width")? },
            KIND_INPUT => Request::Input { bytes: c.bytes_u16(MAX_INPUT, "input length")? },
            KIND_RESTORE => Request::Restore { state: c.bytes_u16(MAX_STATE, "state length")? },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        c.finish()?;
        Ok(Frame { seq, message })
    }
}

impl Response {
    /// Encodes as a frame (lengths clamped to the protocol's bounds).
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        match self {
            Response::ReadDone { data, state } => {
                let data = truncated(data, MAX_ACCESS);
                let mut payload = vec![data.len() as u8];
                payload.extend_from_slice(data);
                push_u16_bytes(&mut payload, truncated(state, MAX_STATE));
                frame(seq, KIND_READ_DONE, &payload)
            }
            Response::Done { accepted, output, reset, power_off, state } => {
                let output = truncated(output, MAX_INPUT);
                let mut payload = accepted.to_le_bytes().to_vec();
                push_u16_bytes(&mut payload, output);
                let mut effects = 0;
                if *reset {
                    effects |= EFFECT_RESET;
                }
                if *power_off {
                    effects |= EFFECT_POWER_OFF;
                }
                payload.push(effects);
                push_u16_bytes(&mut payload, truncated(state, MAX_STATE));
                frame(seq, KIND_DONE, &payload)
            }
        }
    }

    /// Decodes a frame body (after the length word).
    pub fn decode(body: &[u8]) -> Result<Frame<Self>, DecodeError> {
        let (seq, kind, mut c) = header(body)?;
        let message = match kind {
            KIND_READ_DONE => Response::ReadDone {
                data: c.bytes_u8(MAX_ACCESS, "read data")?,
                state: c.bytes_u16(MAX_STATE, "state length")?,
            },
            KIND_DONE => {
                let accepted = c.u16()?;
                if usize::from(accepted) > MAX_INPUT {
                    return Err(DecodeError::BadField("accepted input"));
                }
                let output = c.bytes_u16(MAX_INPUT, "output length")?;
                let effects = c.u8()?;
                if effects & !(EFFECT_RESET | EFFECT_POWER_OFF) != 0 {
                    return Err(DecodeError::BadField("effect flags"));
                }
                let (reset, power_off) = (effects & EFFECT_RESET != 0, effects & EFFECT_POWER_OFF != 0);
                let state = c.bytes_u16(MAX_STATE, "state length")?;
                Response::Done { accepted, output, reset, power_off, state }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        c.finish()?;
        Ok(Frame { seq, message })
    }
}

/// The body of the one frame at the start of `bytes` (what [`read_frame`] reads from a
/// stream), without copying it.
pub fn frame_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let (len, rest) = bytes.split_first_chunk::<4>().ok_or(DecodeError::Truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    if !(8..=MAX_FRAME).contains(&len) {
        return Err(DecodeError::BadLength(len));
    }
    rest.get(..len).ok_or(DecodeError::Truncated)
}

/// Reads one frame body from `stream`: the length word, bounded, then the body.
pub fn read_frame(stream: &mut impl std::io::Read) -> std::io::Result<Result<Vec<u8>, DecodeError>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if !(8..=MAX_FRAME).contains(&len) {
        return Ok(Err(DecodeError::BadLength(len)));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(Ok(body))
}

impl Request {
    /// Whether the message is within the protocol's bounds (what `decode` accepts).
    fn in_bounds(&self) -> bool {
        match self {
            Request::Read { len, .. } => (1..=MAX_ACCESS).contains(&usize::from(*len)),
            Request::Write { data, .. } => (1..=MAX_ACCESS).contains(&data.len()),
            Request::Input { bytes } => bytes.len() <= MAX_INPUT,
            Request::Restore { state } => state.len() <= MAX_STATE,
        }
    }
}

impl Response {
    /// Whether the message is within the protocol's bounds (what `decode` accepts).
    fn in_bounds(&self) -> bool {
        match self {
            Response::ReadDone { data, state } => {
                (1..=MAX_ACCESS).contains(&data.len()) && state.len() <= MAX_STATE
            }
            Response::Done { accepted, output, state, .. } => {
                usize::from(*accepted) <= MAX_INPUT && output.len() <= MAX_INPUT && state.len() <= MAX_STATE
            }
        }
    }
}

/// Heap a decoder may allocate for one frame: its payload, at most, and some slack.
const DECODE_HEAP_BOUND: usize = MAX_FRAME + 64;

/// The checks both fuzz harnesses make, for a message type `M`.
fn fuzz_codec<M: PartialEq + std::fmt::Debug + for<'a> Arbitrary<'a>>(
    data: &[u8],
    decode: fn(&[u8]) -> Result<Frame<M>, DecodeError>,
    encode: fn(&M, u32) -> Vec<u8>,
    in_bounds: fn(&M) -> bool,
) {
    use splitvisor_devices::fuzzing::heap::measure;
    // Any bytes: decoding never panics and allocates at most a frame; what decodes is
    // canonical (encoding it again gives the very same bytes).
    let (decoded, heap) = measure(|| decode(data));
    assert!(heap.is_none_or(|heap| heap <= DECODE_HEAP_BOUND), "decoding allocated {heap:?} bytes");
    if let Ok(frame) = decoded {
        let again = encode(&frame.message, frame.seq);
        assert_eq!(&again[4..], data, "a decoded frame re-encodes to other bytes");
        assert_eq!(u32::from_le_bytes([again[0], again[1], again[2], again[3]]) as usize, data.len());
    }
    // Any stream: a frame is read with a bounded allocation, whatever its length word says.
    let (_, heap) = measure(|| read_frame(&mut &data[..]));
    assert!(heap.is_none_or(|heap| heap <= DECODE_HEAP_BOUND), "reading a frame allocated {heap:?} bytes");
    // Any message: within bounds it survives encoding and decoding unchanged; beyond them
    // it is refused or clamped, never mistaken for another message of the same kind.
    let mut u = arbitrary::Unstructured::new(data);
    let (Ok(seq), Ok(message)) = (u32::arbitrary(&mut u), M::arbitrary(&mut u)) else {
        return;
    };
    let bytes = encode(&message, seq);
    assert!(bytes.len() - 4 <= MAX_FRAME, "an encoded frame exceeds MAX_FRAME");
    match decode(&bytes[4..]) {
        Ok(frame) => {
            assert_eq!(frame.seq, seq);
            if in_bounds(&message) {
                assert_eq!(frame.message, message, "a message changed on the wire");
            }
            assert!(in_bounds(&frame.message));
        }
        Err(e) => assert!(!in_bounds(&message), "a message within bounds was refused: {e}"),
    }
}

/// Fuzz harness: any bytes decode as a request without panicking, within a bounded
/// allocation, and canonically; any request within bounds round-trips unchanged.
pub fn fuzz_request(data: &[u8]) {
    fuzz_codec(data, Request::decode, Request::encode, Request::in_bounds);
}

/// Fuzz harness: as [`fuzz_request`], for responses.
pub fn fuzz_response(data: &[u8]) {
    fuzz_codec(data, Response::decode, Response::encode, Response::in_bounds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let requests = [
            Request::Read { offset: 5, len: 1 },
            Request::Write { offset: 0, data: vec![0x41] },
            Request::Input { bytes: b"hello".to_vec() },
            Request::Input { bytes: Vec::new() },
            Request::Restore { state: vec![1, 2, 3] },
            Request::Restore { state: Vec::new() },
        ];
        for (seq, request) in requests.into_iter().enumerate() {
            let bytes = request.encode(seq as u32);
            assert_eq!(Request::decode(&bytes[4..]), Ok(Frame { seq: seq as u32, message: request }));
        }
        let responses = [
            Response::ReadDone { data: vec![0x60], state: vec![7; MAX_STATE] },
            Response::Done {
                accepted: 3,
                output: b"ok\n".to_vec(),
                reset: true,
                power_off: false,
                state: vec![],
            },
            Response::Done { accepted: 0, output: vec![], reset: false, power_off: true, state: vec![1] },
            Response::Done { accepted: 0, output: vec![], reset: true, power_off: true, state: vec![] },
        ];
        for response in responses {
            let bytes = response.encode(9);
            assert_eq!(Response::decode(&bytes[4..]), Ok(Frame { seq: 9, message: response }));
        }
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        let good = Request::Read { offset: 1, len: 1 }.encode(1);
        for cut in 0..good.len() - 4 {
            assert!(Request::decode(&good[4..4 + cut]).is_err());
        }
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(Request::decode(&bad_version[4..]), Err(DecodeError::BadVersion(9)));
        let mut bad_kind = good.clone();
        bad_kind[6] = 0x7f;
        assert_eq!(Request::decode(&bad_kind[4..]), Err(DecodeError::UnknownKind(0x7f)));
        let mut wide = good.clone();
        *wide.last_mut().unwrap() = 9;
        assert_eq!(Request::decode(&wide[4..]), Err(DecodeError::BadField("read width")));
        let mut trailing = good[4..].to_vec();
        trailing.push(0);
        assert_eq!(Request::decode(&trailing), Err(DecodeError::Trailing(1)));
        assert!(matches!(Response::decode(&[0u8; MAX_FRAME + 1]), Err(DecodeError::BadLength(_))));
        let mut stream: &[u8] = &u32::MAX.to_le_bytes();
        assert!(matches!(read_frame(&mut stream), Ok(Err(DecodeError::BadLength(_)))));
    }

    #[test]
    fn effect_flags_are_two_bits_and_nothing_else() {
        let done = |reset, power_off| Response::Done {
            accepted: 0,
            output: vec![],
            reset,
            power_off,
            state: vec![],
        };
        // accepted (2), output length (2), then the flags byte.
        let flags_at = 4 + 8 + 2 + 2;
        for (reset, power_off, flags) in
            [(false, false, 0u8), (true, false, 1), (false, true, 2), (true, true, 3)]
        {
            let bytes = done(reset, power_off).encode(1);
            assert_eq!(bytes[flags_at], flags);
        }
        let mut unknown = done(true, false).encode(1);
        unknown[flags_at] = 4;
        assert_eq!(Response::decode(&unknown[4..]), Err(DecodeError::BadField("effect flags")));
        // A version-2 peer is refused, not misread.
        let mut old = done(false, true).encode(1);
        old[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(Response::decode(&old[4..]), Err(DecodeError::BadVersion(2)));
    }
}
