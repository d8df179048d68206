//! Frames: `magic "RV" | version u16 | kind u8 | flags u8 | id u32 | len u32 | reserved u16 |
//! payload`, big endian; flags and reserved bytes must be zero.

use std::io::{Read, Write};

/// Version of this protocol; a peer speaking another one gets an error reply.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest payload accepted (checked before anything is allocated).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Header length.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 2] = *b"RV";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A JSON request; `id` is the request id.
    Request = 1,
    /// The JSON response to request `id`.
    Response = 2,
    /// Stream bytes; `id` is the stream id.
    Data = 3,
    /// Credit for stream `id`: a u32 byte count.
    Window = 4,
    /// End of stream `id`.
    Close = 5,
    /// A JSON event (`id` 0).
    Event = 6,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Data,
            4 => Self::Window,
            5 => Self::Close,
            6 => Self::Event,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Kind.
    pub kind: FrameKind,
    /// Request or stream id.
    pub id: u32,
    /// Payload (at most [`MAX_PAYLOAD`] bytes).
    pub payload: Vec<u8>,
}

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not a runv frame.
    #[error(
        "bad frame magic {found:02x?} (expected \"RV\"): the peer is not speaking the runv agent \
         protocol; check that this socket or vsock port is the agent's"
    )]
    BadMagic {
        /// The bytes found.
        found: [u8; 2],
    },
    /// Another protocol version.
    #[error("peer speaks protocol version {found}, this side supports {supported}: upgrade the agent or the host so they match")]
    UnsupportedVersion {
        /// Version in the frame.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// Unknown kind.
    #[error(
        "unknown frame kind {0} (this side knows 1 to 6): the peer runs an incompatible build or \
         the stream is corrupt; close the connection"
    )]
    UnknownKind(u8),
    /// Reserved flags set.
    #[error(
        "reserved frame flags {0:#x} set: the peer uses an extension this side does not know or \
         the stream is corrupt; close the connection"
    )]
    ReservedFlags(u8),
    /// Payload too large.
    #[error(
        "frame payload of {len} bytes exceeds the {max}-byte limit: send large data as several \
         Data frames; a peer announcing this is broken, close the connection"
    )]
    Oversized {
        /// Announced length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error(
        "stream ended inside a frame: expected {expected} bytes, got {got}; the peer closed the \
         connection or died mid-frame, reconnect"
    )]
    Truncated {
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes there were.
        got: usize,
    },
    /// Reading or writing failed.
    #[error("frame I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// An earlier error lost frame synchronisation.
    #[error("frame stream is out of sync after an earlier error: reconnect")]
    Poisoned,
}

impl Frame {
    /// A frame of `kind` for `id`.
    pub fn new(kind: FrameKind, id: u32, payload: Vec<u8>) -> Self {
        Self { kind, id, payload }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.payload);
    }

    /// The encoded frame.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode(&mut v);
        v
    }
}

/// A parsed header: kind, id, payload length.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(FrameKind, u32, u32), FrameError> {
    if h[..2] != MAGIC {
        return Err(FrameError::BadMagic {
            found: [h[0], h[1]],
        });
    }
    let version = u16::from_be_bytes([h[2], h[3]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let kind = FrameKind::from_u8(h[4]).ok_or(FrameError::UnknownKind(h[4]))?;
    if h[5] != 0 {
        return Err(FrameError::ReservedFlags(h[5]));
    }
    let id = u32::from_be_bytes([h[6], h[7], h[8], h[9]]);
    let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]);
    if h[14] != 0 || h[15] != 0 {
        return Err(FrameError::ReservedFlags(h[14] | h[15]));
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((kind, id, len))
}

/// Incremental decoder for non-blocking readers: push bytes, take frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.poisoned {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame; `Ok(None)` when more bytes are needed. After an error every
    /// call fails: the stream has lost sync.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[..HEADER_LEN]);
        let (kind, id, len) = match parse_header(&h) {
            Ok(v) => v,
            Err(e) => {
                self.poisoned = true;
                self.buf = Vec::new();
                return Err(e);
            }
        };
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frame { kind, id, payload }))
    }

    /// Bytes buffered but not yet part of a returned frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame from a blocking reader; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN,
            got,
        });
    }
    let (kind, id, len) = parse_header(&h)?;
    let mut payload = vec![0u8; len as usize];
    let got = read_full(r, &mut payload)?;
    if got < payload.len() {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN + payload.len(),
            got: HEADER_LEN + got,
        });
    }
    Ok(Some(Frame { kind, id, payload }))
}

/// Writes one frame (one `write_all`, so frames from one writer never interleave).
pub fn write_frame<W: Write>(w: &mut W, f: &Frame) -> Result<(), FrameError> {
    w.write_all(&f.to_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::new(FrameKind::Request, 1, br#"{"op":"ping"}"#.to_vec()),
            Frame::new(FrameKind::Data, 7, vec![0u8; 1000]),
            Frame::new(FrameKind::Close, 7, vec![]),
            Frame::new(FrameKind::Window, 9, 4096u32.to_be_bytes().to_vec()),
        ]
    }

    #[test]
    fn byte_at_a_time_and_batched_decode_agree() {
        let mut wire = Vec::new();
        for f in sample() {
            f.encode(&mut wire);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, sample());
        let mut d = FrameDecoder::new();
        d.push(&wire);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        assert_eq!(got, sample());
        assert_eq!(d.pending(), 0);
        let mut r = &wire[..];
        for f in sample() {
            assert_eq!(read_frame(&mut r).unwrap().unwrap(), f);
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn bad_headers_are_errors_and_poison_the_decoder() {
        let good = sample()[0].to_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[3] = 7;
                    b
                },
                "version 7",
            ),
            (
                {
                    let mut b = good.clone();
                    b[4] = 99;
                    b
                },
                "kind 99",
            ),
            (
                {
                    let mut b = good.clone();
                    b[5] = 1;
                    b
                },
                "flags",
            ),
            (
                {
                    let mut b = good.clone();
                    b[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
                    b
                },
                "exceeds",
            ),
        ];
        for (bytes, expect) in cases {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            let e = d.next_frame().unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            assert!(matches!(d.next_frame(), Err(FrameError::Poisoned)));
            let e = read_frame(&mut &bytes[..]).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
        }
        let e = read_frame(&mut &good[..good.len() - 2]).unwrap_err();
        assert!(matches!(e, FrameError::Truncated { .. }), "{e}");
        let e = read_frame(&mut &good[..5]).unwrap_err();
        assert!(matches!(e, FrameError::Truncated { .. }), "{e}");
    }
}
