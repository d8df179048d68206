//! Accepting on a non-blocking Unix listener without spinning when file descriptors run out.
//!
//! A level-triggered epoll reports a listener as readable for as long as a connection waits in
//! its backlog. When `accept` fails with `EMFILE`/`ENFILE` the connection stays there, the
//! listener stays readable, and a naive "accept until error" loop wakes again at once: 100 % CPU
//! until some descriptor is closed.
//!
//! [`Acceptor`] uses the classic reserve-descriptor trick: it keeps one spare descriptor
//! (`/dev/null`) open; when `accept` reports descriptor exhaustion it closes the spare, accepts
//! the waiting connection into the freed slot, closes that connection at once (its client reads
//! EOF: it was refused, not left hanging) and reopens the spare. The backlog drains, so the
//! listener stops being readable and the loop sleeps. If even that fails (the system-wide table is
//! full and another process took the freed slot), [`Acceptor::accept_ready`] returns
//! [`Drained::Paused`]: the caller must stop watching the listener for a short back-off
//! ([`PAUSE`]; deregister it from epoll and re-add it from a timer) instead of polling it again.
//!
//! Usage in an epoll loop: on the listener's event call `accept_ready(&listener, |s| ...)`; on
//! `Drained::Paused` remove the listener from the epoll set and re-add it after [`PAUSE`].

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// How long a caller stops watching a listener after [`Drained::Paused`].
pub const PAUSE: Duration = Duration::from_millis(100);

/// How a call to [`Acceptor::accept_ready`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The backlog is empty (`accept` would block): keep watching the listener.
    Empty,
    /// Connections are still waiting but cannot be accepted now (descriptors exhausted even after
    /// freeing the spare, or an unexpected accept error): stop watching the listener for
    /// [`PAUSE`], then watch it again.
    Paused,
}

/// Accepts connections, refusing (accept-and-close) those that arrive while the process has no
/// descriptor left. See the module documentation.
#[derive(Debug)]
pub struct Acceptor {
    reserve: Option<File>,
    /// Connections closed right after accepting them because descriptors were exhausted.
    pub refused: u64,
}

fn spare() -> Option<File> {
    // std opens with O_CLOEXEC.
    File::open("/dev/null").ok()
}

fn exhausted(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl Default for Acceptor {
    fn default() -> Self {
        Self::new()
    }
}

impl Acceptor {
    /// An acceptor holding its spare descriptor (open it early, while descriptors are free).
    pub fn new() -> Self {
        Self {
            reserve: spare(),
            refused: 0,
        }
    }

    /// Whether the spare descriptor is held (false only while the process is out of them).
    pub fn has_reserve(&self) -> bool {
        self.reserve.is_some()
    }

    /// Accepts every waiting connection on the non-blocking `listener`, handing each to
    /// `on_conn` (still in the listener's blocking mode: set it yourself). Connections that
    /// cannot get a descriptor are accepted into the spare slot and closed.
    pub fn accept_ready(
        &mut self,
        listener: &UnixListener,
        mut on_conn: impl FnMut(UnixStream),
    ) -> Drained {
        loop {
            if self.reserve.is_none() {
                self.reserve = spare();
            }
            match listener.accept() {
                Ok((stream, _)) => on_conn(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Drained::Empty,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) if exhausted(&e) => {
                    // Free the spare, take the connection into its slot, refuse it.
                    if self.reserve.take().is_none() {
                        return Drained::Paused;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            drop(stream);
                            self.refused += 1;
                            if self.refused.is_power_of_two() {
                                tracing::warn!(
                                    refused = self.refused,
                                    "out of file descriptors: refusing connections"
                                );
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            self.reserve = spare();
                            return Drained::Empty;
                        }
                        Err(_) => {
                            self.reserve = spare();
                            return Drained::Paused;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}; pausing the listener");
                    return Drained::Paused;
                }
            }
        }
    }
}
