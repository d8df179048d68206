//! Lock helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, taking the data over from a thread that panicked while holding it: the
/// VMM's shared state stays consistent between statements, so a poisoned lock is still usable.
pub trait LockOrRecover<T: ?Sized> {
    /// The guard, poisoned or not.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockOrRecover<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}
