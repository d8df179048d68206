//! Starting threads without aborting: `std::thread::spawn` panics when the kernel refuses a
//! thread (a pids limit, memory), and the release build aborts on panic; as PID 1 that panics
//! the guest kernel. Every agent thread starts here and a refusal is a value.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::sync::LockOrRecover;

/// Starts thread `name` running `f`.
pub fn spawn<F, R>(name: &str, f: F) -> std::io::Result<JoinHandle<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    std::thread::Builder::new().name(name.into()).spawn(f)
}

/// Starts thread `name` running `f(value)`; when no thread can be started, `value` comes back
/// with the error (e.g. to answer a connection before closing it). It is always there: a thread
/// that never started cannot have taken it.
pub fn spawn_with<T, F>(
    name: &str,
    value: T,
    f: F,
) -> Result<JoinHandle<()>, (std::io::Error, Option<T>)>
where
    T: Send + 'static,
    F: FnOnce(T) + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(value)));
    let theirs = slot.clone();
    let r = spawn(name, move || {
        let v = theirs.lock_or_recover().take();
        if let Some(v) = v {
            f(v);
        }
    });
    match r {
        Ok(h) => Ok(h),
        Err(e) => Err((e, slot.lock_or_recover().take())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_with_runs_f_on_the_value() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = spawn_with("t", 41, move |v| tx.send(v + 1).unwrap_or(())).unwrap();
        h.join().unwrap();
        assert_eq!(rx.recv().unwrap(), 42);
    }
}
