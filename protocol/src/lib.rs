//! The wire protocol between the host (shim, tests) and `runv-agent`, over any byte stream
//! (AF_VSOCK in a guest, a Unix socket on a host).
//!
//! Everything is a [`frame::Frame`]: a 16-byte header (magic, version, kind, flags, id, length)
//! and a bounded payload. Requests, responses and events carry JSON ([`message`]); stdio travels
//! as raw `Data` frames per stream, with per-stream credit ([`stream`]). Nothing read from the
//! peer is trusted: every length is bounded before allocation and every error is a value.
//! [`client`] is a blocking client for the host side.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod frame;
pub mod message;
pub mod stream;

pub use frame::{Frame, FrameDecoder, FrameError, FrameKind, MAX_PAYLOAD, PROTOCOL_VERSION};
pub use message::*;
