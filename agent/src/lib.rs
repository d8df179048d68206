//! runv's guest agent and its host-side helpers.
//!
//! `runv-agent` runs OCI containers on request ([`runtime`], [`spawn`], [`cgroup`], [`devices`]) for clients
//! speaking the [`protocol`] over a connection ([`server`], with stdio in [`stdio`] and bounds
//! in [`limits`] and [`stall`]); as PID 1 in a guest it also mounts the basic file systems and
//! serves the clone hooks ([`pid1`]). [`initramfs`] builds the guest's boot image. The
//! host-side client lives in `protocol::client`.
//!
//! Module dependencies run one way: `server` → `runtime` → `stdio` → `error`; all of them use
//! [`threads`] (thread starts that fail with an error, not an abort) and [`sync`].

pub mod cgroup;
pub mod devices;
pub mod error;
pub mod initramfs;
pub mod limits;
pub mod netconf;
pub mod pid1;
pub mod rootdev;
pub mod runtime;
pub mod server;
pub mod spawn;
pub mod stall;
pub mod stdio;
pub mod sync;
pub mod threads;
