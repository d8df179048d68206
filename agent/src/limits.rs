//! The agent's bounds (connections, pending waits, time for one frame) and the counting slots
//! that enforce them. Every thread and file descriptor the agent holds for a peer is bounded
//! here, so a misbehaving or crowded host cannot exhaust the agent (as PID 1, a panic is a
//! kernel panic).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; one beyond gets an error frame and is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Pending `wait` requests of one connection.
pub const MAX_WAITS_PER_CONNECTION: usize = 1024;
/// Pending `wait` requests of all connections together (waiters outlive their connection).
pub const MAX_WAITS: usize = 4096;
/// A started frame must be complete within this; a peer that stalls inside one is dropped.
/// Idle connections between frames are fine.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A bounded count of things in use.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    /// At most `max` slots.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes a slot, or `None` when all `max` are in use.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_beyond_max_and_free_on_drop() {
        let s = Slots::new(2);
        let a = s.try_take();
        let b = s.try_take();
        assert!(a.is_some() && b.is_some());
        assert!(s.try_take().is_none(), "a third slot beyond max 2");
        drop(a);
        assert!(s.try_take().is_some(), "a dropped slot is free again");
    }
}
