//! runv's snapshot format.
//!
//! A snapshot is a directory with a state file ([`state`]: header, host fingerprint, checksum,
//! serde-encoded VM state) and a sparse memory file ([`memory`]: holes for zero pages). Anything
//! wrong with either is refused with an error naming what is wrong; nothing is trusted before it
//! is checked, and no length is used before it is bounded. A third, optional file
//! ([`workingset`]) lists the pages clones touch first, for userfaultfd prefetch.

pub mod fingerprint;
pub mod memory;
pub mod state;
pub mod workingset;

pub use fingerprint::HostFingerprint;
pub use state::{read_state, write_state, SnapshotError, StateFile, FORMAT_VERSION};
