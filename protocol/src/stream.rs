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
    #[error("window frame for stream {stream} has a {len}-byte payload, expected 4")]
    BadWindow {
        /// Stream.
        stream: u32,
        /// Payload length.
        len: usize,
    },
    /// Credit beyond the limit.
    #[error("peer granted {total} bytes of credit, more than the {max} allowed")]
    Overflow {
        /// Resulting credit.
        total: u64,
        /// Limit.
        max: u64,
    },
    /// Not a window frame.
    #[error("expected a Window frame")]
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
    /// Records `n` bytes sent (saturating).
    pub fn consume(&mut self, n: usize) {
        self.available = self.available.saturating_sub(n as u64);
    }
    /// Adds credit from a Window frame.
    pub fn grant(&mut self, n: u32) -> Result<(), StreamError> {
        let total = self.available + u64::from(n);
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
        w.consume(INITIAL_WINDOW as usize + 5);
        assert_eq!(w.can_send(), 0);
        w.grant(100).unwrap();
        assert_eq!(w.can_send(), 100);
        let mut big = SendWindow::default();
        let mut err = None;
        for _ in 0..300 {
            if let Err(e) = big.grant(u32::MAX / 2) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(StreamError::Overflow { .. })));
        assert_eq!(parse_window(&window_frame(3, 77)).unwrap(), 77);
        let bad = Frame::new(FrameKind::Window, 3, vec![1, 2]);
        assert_eq!(
            parse_window(&bad),
            Err(StreamError::BadWindow { stream: 3, len: 2 })
        );
        let frames: Vec<_> = data_frames(5, &vec![1u8; MAX_DATA_CHUNK * 2 + 1]).collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2].payload.len(), 1);
    }
}
