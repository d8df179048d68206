//! stdio streams: `Data` frames of at most [`MAX_DATA_CHUNK`] bytes, `Close` for end of stream,
//! and `Window` frames granting the sender more credit (per stream, [`INITIAL_WINDOW`] at start).

use crate::frame::{Frame, FrameKind};

/// Credit each side starts with, per stream.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest `Data` payload.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Largest credit a sender may hold (a peer granting more is misbehaving).
pub const MAX_WINDOW: u64 = 64 << 20;

/// Why a window frame or grant is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// Payload is not a 4-byte credit.
    #[error(
        "window frame for stream {stream} has a {len}-byte payload, expected a 4-byte big-endian \
         credit: the peer is broken, close the connection"
    )]
    BadWindow {
        /// Stream.
        stream: u32,
        /// Payload length.
        len: usize,
    },
    /// Credit beyond the limit.
    #[error(
        "peer granted {total} bytes of credit, more than the {max} allowed: it grants credit it \
         was never owed, close the connection"
    )]
    Overflow {
        /// Resulting credit.
        total: u64,
        /// Limit.
        max: u64,
    },
    /// Not a window frame.
    #[error("expected a Window frame: pass only Window frames to parse_window")]
    NotWindow,
}

/// Credit for sending on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    available: u64,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self {
            available: u64::from(INITIAL_WINDOW),
        }
    }
}

impl SendWindow {
    /// Bytes that may be sent now.
    pub fn can_send(&self) -> usize {
        self.available.min(usize::MAX as u64) as usize
    }
    /// Records `n` bytes sent (saturating at zero; callers send at most [`Self::can_send`]).
    pub fn consume(&mut self, n: usize) {
        self.available = self.available.saturating_sub(n as u64);
    }
    /// Adds credit from a Window frame; credit beyond [`MAX_WINDOW`] is an error and leaves the
    /// window unchanged.
    pub fn grant(&mut self, n: u32) -> Result<(), StreamError> {
        let total = self.available.saturating_add(u64::from(n));
        if total > MAX_WINDOW {
            return Err(StreamError::Overflow {
                total,
                max: MAX_WINDOW,
            });
        }
        self.available = total;
        Ok(())
    }
}

/// A Window frame granting `credit` bytes on `stream`.
pub fn window_frame(stream: u32, credit: u32) -> Frame {
    Frame::new(FrameKind::Window, stream, credit.to_be_bytes().to_vec())
}

/// The credit of a Window frame.
pub fn parse_window(f: &Frame) -> Result<u32, StreamError> {
    if f.kind != FrameKind::Window {
        return Err(StreamError::NotWindow);
    }
    let b: [u8; 4] = f
        .payload
        .as_slice()
        .try_into()
        .map_err(|_| StreamError::BadWindow {
            stream: f.id,
            len: f.payload.len(),
        })?;
    Ok(u32::from_be_bytes(b))
}

/// `data` as Data frames of at most [`MAX_DATA_CHUNK`] bytes.
pub fn data_frames(stream: u32, data: &[u8]) -> impl Iterator<Item = Frame> + '_ {
    data.chunks(MAX_DATA_CHUNK)
        .map(move |c| Frame::new(FrameKind::Data, stream, c.to_vec()))
}

/// The end-of-stream frame.
pub fn close_frame(stream: u32) -> Frame {
    Frame::new(FrameKind::Close, stream, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_accounting() {
        let mut w = SendWindow::default();
        assert_eq!(w.can_send(), INITIAL_WINDOW as usize);
        w.consume(1000);
        assert_eq!(w.can_send(), INITIAL_WINDOW as usize - 1000);
        w.consume(INITIAL_WINDOW as usize + 5);
        assert_eq!(w.can_send(), 0);
        w.consume(usize::MAX);
        assert_eq!(w.can_send(), 0);
        w.grant(100).unwrap();
        assert_eq!(w.can_send(), 100);
        w.grant(0).unwrap();
        assert_eq!(w.can_send(), 100);
    }

    #[test]
    fn excessive_credit_is_an_error_not_a_panic() {
        let mut w = SendWindow::default();
        w.consume(INITIAL_WINDOW as usize);
        w.grant((MAX_WINDOW) as u32).unwrap();
        assert_eq!(w.can_send() as u64, MAX_WINDOW);
        let before = w.clone();
        assert_eq!(
            w.grant(1),
            Err(StreamError::Overflow {
                total: MAX_WINDOW + 1,
                max: MAX_WINDOW
            })
        );
        assert_eq!(w, before, "a refused grant changes nothing");
        let mut big = SendWindow::default();
        for _ in 0..1000 {
            if let Err(e) = big.grant(u32::MAX) {
                assert!(matches!(e, StreamError::Overflow { .. }));
                assert!(e.to_string().contains("close the connection"), "{e}");
                break;
            }
        }
        assert_eq!(big, SendWindow::default());
    }

    #[test]
    fn window_frames() {
        let f = window_frame(3, 0x0102_0304);
        assert_eq!((f.kind, f.id), (FrameKind::Window, 3));
        assert_eq!(f.payload, vec![1, 2, 3, 4]);
        assert_eq!(parse_window(&f), Ok(0x0102_0304));
        for len in [0, 2, 3, 5, 8] {
            let bad = Frame::new(FrameKind::Window, 3, vec![1; len]);
            assert_eq!(
                parse_window(&bad),
                Err(StreamError::BadWindow { stream: 3, len })
            );
        }
        let data = Frame::new(FrameKind::Data, 3, vec![0; 4]);
        assert_eq!(parse_window(&data), Err(StreamError::NotWindow));
        let c = close_frame(9);
        assert_eq!((c.kind, c.id, c.payload.len()), (FrameKind::Close, 9, 0));
    }

    #[test]
    fn data_is_split_into_bounded_chunks() {
        assert_eq!(data_frames(5, &[]).count(), 0);
        assert_eq!(data_frames(5, &[0; MAX_DATA_CHUNK]).count(), 1);
        let data: Vec<u8> = (0..MAX_DATA_CHUNK * 2 + 1).map(|i| i as u8).collect();
        let frames: Vec<_> = data_frames(5, &data).collect();
        assert_eq!(frames.len(), 3);
        assert!(frames
            .iter()
            .all(|f| f.kind == FrameKind::Data && f.id == 5 && f.payload.len() <= MAX_DATA_CHUNK));
        assert_eq!(frames[2].payload.len(), 1);
        let joined: Vec<u8> = frames.into_iter().flat_map(|f| f.payload).collect();
        assert_eq!(joined, data);
        assert!(MAX_DATA_CHUNK <= crate::frame::MAX_PAYLOAD as usize);
        assert!(MAX_DATA_CHUNK <= INITIAL_WINDOW as usize);
    }
}
