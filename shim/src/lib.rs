//! The runv sandbox library: what the `runv` OCI runtime (and later the containerd shim) share.
//!
//! Modules, one job each: [`id`] (container id rules), [`bundle`] (loading and checking an OCI
//! bundle), [`state`] (the per-container state directory under `--root`), [`sandbox`] (where
//! containers run: the `host` backend now, the `vm` one later), [`relay`] (stdio between the
//! host's file descriptors and the agent's streams), [`pty`] (console sockets),
//! [`monitor`] (the per-container host process that `create` leaves behind), [`image`] (EROFS
//! root filesystem images with a content cache), [`containerd`] (the containerd runtime v2 shim).

pub mod bundle;
pub mod containerd;
pub mod id;
pub mod image;
pub mod monitor;
pub mod pty;
pub mod relay;
pub mod sandbox;
pub mod state;
