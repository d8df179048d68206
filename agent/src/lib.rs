//! runv's guest agent and its host-side helpers.
//!
//! `runv-agent` runs OCI containers on request ([`runtime`], [`spawn`], [`cgroup`]) for clients
//! speaking the [`protocol`] over a connection ([`server`]); as PID 1 in a guest it also mounts
//! the basic file systems and serves the clone hooks ([`pid1`]). [`initramfs`] builds the guest's boot image.
//! The host-side client lives in `protocol::client`.

pub mod cgroup;
pub mod initramfs;
pub mod pid1;
pub mod runtime;
pub mod server;
pub mod spawn;
