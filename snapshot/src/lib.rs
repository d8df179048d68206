//! runv's snapshot format.
//!
//! A snapshot is a directory with a state file ([`state`]: header with the snapshot id and RAM
//! size, host fingerprint, checksum, serde-encoded VM state) and a sparse memory file
//! ([`memory`]: holes for zero pages, then a trailer page carrying the same snapshot id).
//! [`SnapshotWriter`] publishes one atomically (write aside, fsync, rename); [`SnapshotDir`] opens
//! one and refuses anything wrong with an error naming what is wrong; nothing is trusted before
//! it is checked, no length is used before it is bounded, and no symlink or FIFO is followed or
//! opened. A third, optional file ([`workingset`]) lists the pages clones touch first, for
//! userfaultfd prefetch; it belongs to one snapshot id.

mod dir;
pub mod fingerprint;
mod fsutil;
pub mod memory;
pub mod state;
pub mod workingset;

pub use dir::{SnapshotDir, SnapshotId, SnapshotWriter};
pub use fingerprint::HostFingerprint;
pub use state::{SnapshotError, StateFile, FORMAT_VERSION};
