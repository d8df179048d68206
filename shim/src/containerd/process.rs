//! One process of a task (the container's init or an exec) as the shim tracks it.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use super::stdio::{Paths, StdinCloser};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created (init) or added (exec), not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Stopped,
}

/// How a process ended: runc's exit status and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The code, or 128 + signal.
    pub status: u32,
    /// When the shim learnt of it.
    pub at: SystemTime,
}

/// An exit that waiters can block on.
#[derive(Debug, Default)]
pub struct ExitCell {
    exit: Mutex<Option<Exit>>,
    cond: Condvar,
}

impl ExitCell {
    /// Records the exit (the first one wins) and wakes every waiter.
    pub fn set(&self, e: Exit) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.cond.notify_all();
    }

    /// The exit, if known.
    pub fn get(&self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the exit is known (`None` after `timeout`, if given).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Exit> {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while g.is_none() {
            match deadline {
                None => g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    g = self
                        .cond
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        *g
    }
}

/// A process of a task.
pub struct Proc {
    /// Agent-side pid (0 before it exists).
    pub pid: u32,
    /// Phase.
    pub phase: Phase,
    /// containerd's stdio.
    pub stdio: Paths,
    /// The exec's process spec (execs only, until started).
    pub spec: Option<oci_spec::runtime::Process>,
    /// Its exit.
    pub exit: Arc<ExitCell>,
    /// Ends its stdin.
    pub stdin: StdinCloser,
    /// The thread relaying its stdio and waiting for its exit.
    pub relay: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// A process not started yet.
    pub fn new(stdio: Paths, spec: Option<oci_spec::runtime::Process>) -> Self {
        Self {
            pid: 0,
            phase: Phase::Created,
            stdio,
            spec,
            exit: Arc::new(ExitCell::default()),
            stdin: StdinCloser::default(),
            relay: None,
        }
    }

    /// The phase, counting an exit the relay thread has recorded.
    pub fn phase(&self) -> Phase {
        if self.exit.get().is_some() {
            Phase::Stopped
        } else {
            self.phase
        }
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_cell_wakes_waiters_and_keeps_the_first_exit() {
        let cell = Arc::new(ExitCell::default());
        assert_eq!(cell.wait(Some(Duration::from_millis(1))), None);
        let c = cell.clone();
        let t = std::thread::spawn(move || c.wait(None));
        let first = Exit {
            status: 3,
            at: SystemTime::now(),
        };
        cell.set(first);
        cell.set(Exit {
            status: 9,
            at: SystemTime::now(),
        });
        assert_eq!(t.join().unwrap(), Some(first));
        assert_eq!(cell.get(), Some(first));
    }
}
