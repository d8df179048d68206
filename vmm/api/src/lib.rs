//! The control API of `runv-vmm`, free of KVM: what the pool, the shim, tests and benches need to
//! drive a VMM process.
//!
//! The wire format is JSON lines over a Unix stream socket: one [`Request`] per line, answered by
//! one reply line, in order. A reply is `{"ok": true, ...fields of the typed reply}` or
//! `{"ok": false, "kind": ..., "error": ...}` ([`ApiError`]). Lines longer than [`MAX_LINE`] are
//! refused and the connection is closed. [`PROTOCOL_VERSION`] is reported by `status`; requests
//! with unknown fields are refused. See `docs/ARCHITECTURE.md` ("Control socket").

mod client;
mod fdpass;
pub mod jail;
mod net;
mod types;
mod wire;

pub use client::DEFAULT_TIMEOUT;
pub use client::{ClientError, ControlClient};
pub use fdpass::{recv_with_fds, MAX_FDS_PER_MESSAGE};
pub use net::{BadMac, BadNet, MacAddr, NetConfig, MAX_TAP_NAME};
pub use types::*;
pub use wire::{decode_reply, encode_error, encode_ok, encode_request, parse_request, MAX_LINE};

/// Version of the control protocol; bumped on every incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
