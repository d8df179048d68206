//! A reader that gives up on a peer stalling inside a frame.
//!
//! The connection has a short receive timeout (SO_RCVTIMEO) so reads wake up regularly; between
//! frames a timeout is just retried (idle connections are fine), inside a frame the peer has
//! until the deadline to finish it, then the read fails with `TimedOut` and the connection is
//! dropped. Without this, a peer sending half a header would hold a thread forever.

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

/// How often a blocked read wakes up to check the deadline, for a frame timeout of `timeout`.
pub fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Wraps a reader whose reads time out every [`poll_interval`].
pub struct StallGuard<R> {
    inner: R,
    timeout: Duration,
    frame_started: Option<Instant>,
}

impl<R: Read> StallGuard<R> {
    /// Guards `inner`: a frame must be complete within `timeout` of its first byte.
    pub fn new(inner: R, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            frame_started: None,
        }
    }

    /// A frame was completely read: the next one starts with its first byte.
    pub fn frame_done(&mut self) {
        self.frame_started = None;
    }
}

impl<R: Read> Read for StallGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    if n > 0 && self.frame_started.is_none() {
                        self.frame_started = Some(Instant::now());
                    }
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if let Some(t) = self.frame_started {
                        if t.elapsed() >= self.timeout {
                            return Err(std::io::Error::new(
                                ErrorKind::TimedOut,
                                format!(
                                    "the peer sent part of a frame and nothing more for {} ms",
                                    self.timeout.as_millis()
                                ),
                            ));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn idle_is_fine_a_partial_frame_times_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(200);
        b.set_read_timeout(Some(poll_interval(timeout))).unwrap();
        let mut g = StallGuard::new(b, timeout);
        let writer = std::thread::spawn(move || {
            // Idle for longer than the timeout, then one byte, then a stall.
            std::thread::sleep(Duration::from_millis(500));
            a.write_all(b"R").unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(a);
        });
        let mut buf = [0u8; 4];
        assert_eq!(
            g.read(&mut buf).unwrap(),
            1,
            "idle time before a frame is fine"
        );
        let t = Instant::now();
        let e = g.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        writer.join().unwrap();
    }
}
