//! runv's guest agent and its host-side helpers.
//!
//! `runv-agent` runs OCI containers on request ([`runtime`], [`spawn`], [`cgroup`], [`devices`]) for clients
//! speaking the [`protocol`] over a connection ([`server`]); as PID 1 in a guest it also mounts
//! the basic file systems and serves the clone hooks ([`pid1`]). [`client`] is the blocking
//! client the tests and benchmarks use; [`initramfs`] builds the guest's boot image.

pub mod cgroup;
pub mod client;
pub mod devices;
pub mod initramfs;
pub mod pid1;
pub mod runtime;
pub mod server;
pub mod spawn;
