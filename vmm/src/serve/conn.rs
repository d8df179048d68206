//! One control connection: bounded input framed into lines, bounded output written without
//! blocking. The same rules hold for an idle shell and a running VM.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_api::{ApiError, ErrorKind as ApiErrorKind, MAX_LINE};

/// Most reply bytes kept for a client that does not read them; past it the client is dropped.
pub(crate) const MAX_OUTPUT: usize = 256 * 1024;
/// Most bytes read from one connection per readiness event, so one client cannot starve the
/// device loop (epoll is level-triggered: the rest is read on the next turn).
const READ_BUDGET: usize = 64 * 1024;
/// Most reads from one connection per readiness event.
const MAX_READS: usize = 64;
/// Most received file descriptors a connection holds before a request claims them; more are
/// closed at once (a well-behaved client sends one per `attach_disk`).
const MAX_PENDING_FDS: usize = 8;

/// A control connection.
pub(crate) struct ControlConn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Descriptors received with the input (`SCM_RIGHTS`), oldest first, until a request line
    /// that carries one claims it; closed once every line they came with was served.
    fds: VecDeque<OwnedFd>,
    /// Set when the peer closed its side: buffered lines are still served.
    eof: bool,
    /// Set once the connection is to be closed: no more input is read or served; pending output
    /// is still written.
    closing: bool,
    /// Set when the connection is unusable (peer gone, output over its bound).
    dead: bool,
}

impl ControlConn {
    /// Wraps a connected stream, made non-blocking.
    pub(crate) fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            fds: VecDeque::new(),
            eof: false,
            closing: false,
            dead: false,
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Reads what is available, up to the per-event budget and never more than one line's worth
    /// of unframed input. Notes when the peer closed its side (buffered lines are still served).
    pub(crate) fn fill(&mut self) {
        if self.eof || self.closing || self.dead {
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        let mut fds = Vec::new();
        // A read ends at each message that carries descriptors: bound the calls too.
        let mut reads = 0;
        while budget > 0 && self.input.len() <= MAX_LINE && reads < MAX_READS {
            reads += 1;
            let read = vmm_api::recv_with_fds(self.stream.as_raw_fd(), &mut chunk, &mut fds);
            if matches!(read, Ok((_, true))) {
                tracing::warn!(
                    "a control client sent more than {} descriptors at once: the rest were closed",
                    vmm_api::MAX_FDS_PER_MESSAGE
                );
            }
            for fd in fds.drain(..) {
                if self.fds.len() < MAX_PENDING_FDS {
                    self.fds.push_back(fd);
                }
            }
            match read.map(|(n, _)| n) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }

    /// The next complete request line (without its newline), or the framing error to answer
    /// before closing (a line longer than [`MAX_LINE`], terminated or not).
    pub(crate) fn next_line(&mut self) -> Option<Result<Vec<u8>, ApiError>> {
        if self.closing || self.dead {
            return None;
        }
        match self.input.iter().position(|&b| b == b'\n') {
            Some(pos) if pos <= MAX_LINE => {
                let mut line: Vec<u8> = self.input.drain(..=pos).collect();
                line.pop();
                Some(Ok(line))
            }
            Some(_) => Some(Err(self.too_long())),
            None if self.input.len() > MAX_LINE => Some(Err(self.too_long())),
            None => None,
        }
    }

    /// The oldest received descriptor not yet claimed (for a request line that carries one).
    pub(crate) fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Closes received descriptors no request claimed once no input is left that they could
    /// have come with (a descriptor arrives with the bytes of the line it was sent with).
    pub(crate) fn drop_unclaimed_fds(&mut self) {
        if self.input.is_empty() && !self.fds.is_empty() {
            tracing::warn!(
                "closing {} descriptor(s) a control client sent with requests that take none",
                self.fds.len()
            );
            self.fds.clear();
        }
    }

    fn too_long(&mut self) -> ApiError {
        self.input.clear();
        self.fds.clear();
        self.closing = true;
        ApiError::new(
            ApiErrorKind::TooLong,
            format!("request line longer than {MAX_LINE} bytes; closing the connection"),
        )
    }

    /// Stops serving this connection; queued output is still written.
    pub(crate) fn close_after_output(&mut self) {
        self.closing = true;
        self.input.clear();
        self.fds.clear();
    }

    /// Queues a reply line and writes as much as the socket takes now.
    pub(crate) fn send(&mut self, line: &[u8]) {
        if self.dead {
            return;
        }
        if self.output.len() + line.len() > MAX_OUTPUT {
            tracing::warn!(
                "dropping a control client that does not read its replies ({} bytes pending)",
                self.output.len()
            );
            self.dead = true;
            return;
        }
        self.output.extend_from_slice(line);
        self.flush();
    }

    /// Writes pending output without blocking.
    pub(crate) fn flush(&mut self) {
        while !self.output.is_empty() && !self.dead {
            match self.stream.write(&self.output) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
    }

    /// Whether output is waiting for the socket to become writable.
    pub(crate) fn wants_write(&self) -> bool {
        !self.output.is_empty() && !self.dead
    }

    /// Whether the connection should be dropped now.
    pub(crate) fn finished(&self) -> bool {
        self.dead
            || ((self.closing || self.eof) && !self.has_pending_line() && self.output.is_empty())
    }

    /// Whether more input is accepted (the peer has not closed its side, no framing error).
    pub(crate) fn reading(&self) -> bool {
        !self.eof && !self.closing && !self.dead
    }

    /// Whether a complete line is buffered and waiting to be served.
    pub(crate) fn has_pending_line(&self) -> bool {
        !self.closing && !self.dead && self.input.contains(&b'\n')
    }
}
