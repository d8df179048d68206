//! A pool of ready shells, refilled in the background.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::shell::{ShellError, ShellProcess, ShellSpec};

/// Keeps up to `size` shells ready; `workers` threads create replacements as shells are taken.
pub struct ShellPool {
    ready: Receiver<ShellProcess>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    failures: Arc<AtomicU64>,
}

impl ShellPool {
    /// Starts filling a pool of `size` shells with `workers` creator threads.
    pub fn new(spec: ShellSpec, size: usize, workers: usize) -> Self {
        let (tx, rx): (Sender<ShellProcess>, Receiver<ShellProcess>) =
            crossbeam_channel::bounded(size.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let workers = (0..workers.max(1))
            .map(|_| {
                let (spec, tx, stop, failures, counter) = (
                    spec.clone(),
                    tx.clone(),
                    stop.clone(),
                    failures.clone(),
                    counter.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        match ShellProcess::spawn(
                            &spec,
                            &format!("shell-{}-{n}", std::process::id()),
                        ) {
                            Ok(mut shell) => loop {
                                match tx.send_timeout(shell, Duration::from_millis(50)) {
                                    Ok(()) => break,
                                    Err(crossbeam_channel::SendTimeoutError::Timeout(s)) => {
                                        if stop.load(Ordering::Relaxed) {
                                            return;
                                        }
                                        shell = s;
                                    }
                                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                                        return
                                    }
                                }
                            },
                            Err(e) => {
                                tracing::warn!("creating a shell: {e}");
                                failures.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            ready: rx,
            stop,
            workers,
            failures,
        }
    }

    /// Takes a ready shell, waiting up to `timeout` for one.
    pub fn take(&self, timeout: Duration) -> Result<ShellProcess, ShellError> {
        self.ready
            .recv_timeout(timeout)
            .map_err(|_| ShellError::Io {
                what: "taking a shell from the pool".into(),
                source: std::io::Error::other(format!(
                    "none ready within {timeout:?} ({} creation failures)",
                    self.failures.load(Ordering::Relaxed)
                )),
            })
    }

    /// Shells that failed to start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Drain what is ready (each shell is terminated on drop) until the workers are gone.
        for w in self.workers.drain(..) {
            while !w.is_finished() {
                while self.ready.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = w.join();
        }
        while self.ready.try_recv().is_ok() {}
    }
}
