//! runv's KVM microVM monitor.
//!
//! [`Vmm::build`] turns a [`config::VmConfig`] into a booted-but-not-running VM (memory, KVM VM
//! and vCPUs, boot state, devices); [`Vmm::restore_into`] turns a pre-created [`Shell`] into a
//! clone of a snapshot; [`Vmm::run`] starts the vCPU threads and serves the device loop (exit
//! events, signals, the control plane) until the VM ends. The control protocol is the
//! `vmm-api` crate. Module map and boundaries: docs/ARCHITECTURE.md.

pub mod accept;
mod assemble;
pub mod boot;
pub mod config;
pub mod control;
pub mod cpu;
pub mod devices;
mod error;
mod exit;
pub mod jail;
pub mod layout;
mod machine;
pub mod memory;
pub mod persist;
mod restore;
mod save;
pub mod seccomp;
pub mod serve;
pub mod shell;
mod sync;
pub mod uffd;
pub mod vcpu;
mod vmm;

pub use error::VmmError;
pub use exit::{ExitReason, ExitSignal};
pub use machine::{read_snapshot, MachineSnapshot};
pub use serve::shell_loop::ShellOutcome;
pub use serve::ControlPlane;
pub use shell::Shell;
pub use vmm::Vmm;
pub use vmm_api::{BlockOverride, MemoryMode, RestoreOptions};
