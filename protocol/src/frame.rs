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

    /// Appends the encoded frame to `out`. The payload length is not checked here (see
    /// [`write_frame`]); a payload over [`MAX_PAYLOAD`] makes a frame the peer rejects.
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

/// Appends `frame`, encoded, to `out` (same as [`Frame::encode`]).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    frame.encode(out);
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
///
/// A header is validated as soon as its 16 bytes are in, so an oversized or malformed frame is
/// rejected before its payload is waited for. After an error the decoder is poisoned: the
/// stream has lost sync, and the caller should reply with an error and close the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Received bytes; those before `start` were already returned as frames.
    buf: Vec<u8>,
    start: usize,
    poisoned: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes (ignored once the decoder is poisoned).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned {
            return;
        }
        if self.start > 0 {
            // Drop consumed frames once per push rather than once per frame.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame; `Ok(None)` when more bytes are needed. After an error every
    /// call fails with [`FrameError::Poisoned`]: the stream has lost sync.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let avail = self.buf.get(self.start..).unwrap_or_default();
        let Some(header) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (kind, id, len) = match parse_header(header) {
            Ok(v) => v,
            Err(e) => {
                self.poisoned = true;
                self.buf = Vec::new();
                self.start = 0;
                return Err(e);
            }
        };
        // `len` <= MAX_PAYLOAD, so this cannot overflow.
        let total = HEADER_LEN + len as usize;
        let Some(payload) = avail.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let payload = payload.to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(Frame { kind, id, payload }))
    }

    /// Bytes buffered but not yet part of a returned frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether an earlier error poisoned the decoder.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
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
///
/// A payload over [`MAX_PAYLOAD`] is refused with [`FrameError::Oversized`] before anything is
/// written, since the peer would reject it and lose sync.
pub fn write_frame<W: Write>(w: &mut W, f: &Frame) -> Result<(), FrameError> {
    if f.payload.len() > MAX_PAYLOAD as usize {
        return Err(FrameError::Oversized {
            len: u32::try_from(f.payload.len()).unwrap_or(u32::MAX),
            max: MAX_PAYLOAD,
        });
    }
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

    #[test]
    fn header_layout_is_big_endian_and_16_bytes() {
        let b = Frame::new(FrameKind::Event, 0x0102_0304, vec![9, 8, 7]).to_bytes();
        assert_eq!(
            &b[..HEADER_LEN],
            &[b'R', b'V', 0, 1, 6, 0, 1, 2, 3, 4, 0, 0, 0, 3, 0, 0]
        );
        assert_eq!(&b[HEADER_LEN..], &[9, 8, 7]);
        let mut v = Vec::new();
        encode(
            &Frame::new(FrameKind::Event, 0x0102_0304, vec![9, 8, 7]),
            &mut v,
        );
        assert_eq!(v, b);
    }

    #[test]
    fn several_frames_in_one_push_with_a_partial_tail() {
        let mut wire = Vec::new();
        for f in sample() {
            f.encode(&mut wire);
        }
        let tail = Frame::new(FrameKind::Data, 3, vec![5; 40]).to_bytes();
        wire.extend_from_slice(&tail[..20]);
        let mut d = FrameDecoder::new();
        d.push(&wire);
        for f in sample() {
            assert_eq!(d.next_frame().unwrap(), Some(f));
        }
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.pending(), 20);
        d.push(&tail[20..]);
        assert_eq!(
            d.next_frame().unwrap(),
            Some(Frame::new(FrameKind::Data, 3, vec![5; 40]))
        );
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.pending(), 0);
        // A maximal payload is accepted.
        let big = Frame::new(FrameKind::Data, 1, vec![1; MAX_PAYLOAD as usize]);
        d.push(&big.to_bytes());
        assert_eq!(d.next_frame().unwrap(), Some(big));
    }

    #[test]
    fn error_variants_and_poisoning() {
        let good = sample()[0].to_bytes();
        let with = |i: usize, v: &[u8]| {
            let mut b = good.clone();
            b[i..i + v.len()].copy_from_slice(v);
            b
        };
        let decode = |b: &[u8]| {
            let mut d = FrameDecoder::new();
            d.push(b);
            let e = d.next_frame().unwrap_err();
            assert!(d.is_poisoned());
            d.push(&good);
            assert!(matches!(d.next_frame(), Err(FrameError::Poisoned)));
            assert_eq!(d.pending(), 0);
            e
        };
        assert!(matches!(
            decode(&with(0, b"XV")),
            FrameError::BadMagic {
                found: [b'X', b'V']
            }
        ));
        let e = decode(&with(2, &[0, 7]));
        assert!(matches!(
            e,
            FrameError::UnsupportedVersion {
                found: 7,
                supported: PROTOCOL_VERSION
            }
        ));
        assert!(
            e.to_string()
                .starts_with("peer speaks protocol version 7, this side supports 1: upgrade"),
            "{e}"
        );
        assert!(matches!(decode(&with(4, &[0])), FrameError::UnknownKind(0)));
        assert!(matches!(decode(&with(4, &[7])), FrameError::UnknownKind(7)));
        assert!(matches!(
            decode(&with(5, &[0x80])),
            FrameError::ReservedFlags(0x80)
        ));
        assert!(matches!(
            decode(&with(14, &[0, 1])),
            FrameError::ReservedFlags(1)
        ));
        // u32::MAX announced with only the header present: rejected at once, nothing allocated
        // (no payload is waited for, and the buffer is dropped).
        let header = &with(10, &u32::MAX.to_be_bytes())[..HEADER_LEN];
        assert!(matches!(
            decode(header),
            FrameError::Oversized {
                len: u32::MAX,
                max: MAX_PAYLOAD
            }
        ));
        assert!(matches!(
            read_frame(&mut &header[..]),
            Err(FrameError::Oversized { len: u32::MAX, .. })
        ));
        let just_over = &with(10, &(MAX_PAYLOAD + 1).to_be_bytes())[..HEADER_LEN];
        assert!(matches!(decode(just_over), FrameError::Oversized { .. }));
        // Truncation through read_frame, inside the header and inside the payload.
        assert!(matches!(
            read_frame(&mut &good[..5]),
            Err(FrameError::Truncated {
                expected: HEADER_LEN,
                got: 5
            })
        ));
        let e = read_frame(&mut &good[..good.len() - 1]).unwrap_err();
        match e {
            FrameError::Truncated { expected, got } => {
                assert_eq!((expected, got), (good.len(), good.len() - 1))
            }
            e => panic!("{e}"),
        }
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn write_frame_refuses_oversized_payloads() {
        let mut out = Vec::new();
        let f = Frame::new(FrameKind::Data, 1, vec![0; MAX_PAYLOAD as usize + 1]);
        assert!(matches!(
            write_frame(&mut out, &f),
            Err(FrameError::Oversized { .. })
        ));
        assert!(out.is_empty());
        write_frame(&mut out, &sample()[0]).unwrap();
        assert_eq!(
            read_frame(&mut &out[..]).unwrap(),
            Some(sample()[0].clone())
        );
    }

    /// A reader that fails with `Interrupted` every other call and returns one byte at a time.
    struct Dribble<'a>(&'a [u8], bool);
    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = !self.1;
            if self.1 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = self.0.len().min(buf.len()).min(1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn read_frame_handles_short_reads_and_interrupts() {
        let mut wire = Vec::new();
        for f in sample() {
            f.encode(&mut wire);
        }
        let mut r = Dribble(&wire, false);
        for f in sample() {
            assert_eq!(read_frame(&mut r).unwrap(), Some(f));
        }
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }
}
