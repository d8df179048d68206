//! Why a VM ends, and the signal every thread uses to end it.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::sync::LockOrRecover;

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
        let mut r = self.reason.lock_or_recover();
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock_or_recover().clone()
    }

    /// The eventfd the device loop polls.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
