//! Locking that survives a poisoned mutex.
//!
//! A thread that panicked while holding a lock leaves it poisoned; the agent's shared state is
//! still consistent enough to serve other connections (every critical section is short and
//! panic-free by design), so callers take the data instead of propagating the panic.

use std::sync::{Mutex, MutexGuard};

/// `lock()` that recovers the guard of a poisoned mutex.
pub trait LockOrRecover<T> {
    /// Locks the mutex; a poisoned lock is taken as it is.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T> LockOrRecover<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_yields_its_data() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = m2.lock_or_recover();
            panic!("poison the lock");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        *m.lock_or_recover() += 1;
        assert_eq!(*m.lock_or_recover(), 8);
    }
}
