//! runv's KVM microVM monitor.
//!
//! [`Vmm::build`] turns a [`config::VmConfig`] into a booted-but-not-running VM (memory, KVM VM
//! and vCPUs, boot state, devices); [`Vmm::run`] starts the vCPU threads and serves the device
//! loop (exit events, signals, the control socket) until the VM ends. See docs/ARCHITECTURE.md.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

pub mod boot;
pub mod config;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod shell;
pub mod uffd;
pub mod vcpu;
mod vmm;

pub use shell::{Shell, ShellOutcome};
pub use vmm::{
    read_snapshot, BlockOverride, MachineSnapshot, MemoryMode, RestoreOptions, Vmm, VmmError,
};

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, triple fault, reboot): a clean end.
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// A vCPU halted with interrupts off and no in-kernel wake-up source.
    GuestHalt,
    /// The control socket asked for shutdown.
    Shutdown,
    /// SIGTERM/SIGINT.
    Signal,
    /// Something failed; the message says what.
    Error(String),
}

impl ExitReason {
    /// Whether this is a clean end (process exit status 0).
    pub fn is_clean(&self) -> bool {
        !matches!(self, ExitReason::Error(_))
    }
}

/// The first reason a VM must end, plus an eventfd that wakes the device loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh, unsignalled exit.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` (the first one wins) and wakes the device loop.
    pub fn exit(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the device loop polls.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
