//! Serving: the control plane shared by the idle-shell loop ([`shell_loop`]) and the running
//! VM's device loop ([`device_loop`]). Both frame requests the same way ([`conn`]), answer every
//! request with one typed reply, never block on a client, and bound what each client may cost.

mod conn;
pub mod device_loop;
pub mod shell_loop;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use vmm_api::{encode_error, parse_request, ApiError, ErrorKind as ApiErrorKind, Request};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::accept::{self, Acceptor, Drained};
use crate::control::SocketFile;
use conn::ControlConn;

/// Most control connections served at once; one more gets an error line and is closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Epoll token of the control listener (connections use their fd, below 2^32).
pub(crate) const TOKEN_LISTENER: u64 = u64::MAX - 2;

/// Registers `fd` for input on `epoll` under `token`.
pub(crate) fn epoll_add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Waits for events (at most `timeout_ms`, -1 = no limit), retrying on EINTR; returns how many
/// arrived.
pub(crate) fn epoll_wait(
    epoll: &Epoll,
    events: &mut [EpollEvent],
    timeout_ms: i32,
) -> std::io::Result<usize> {
    loop {
        match epoll.wait(timeout_ms, events) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What a request handler does with a request.
pub(crate) enum Dispatch {
    /// Answer now with this reply line.
    Reply(Vec<u8>),
    /// The loop carries it out itself (a shell's `restore`) and answers through
    /// [`ControlPlane::reply`]; the connection's later lines wait until then.
    Defer(Request),
}

/// A request the handler deferred, with the connection to answer.
pub(crate) struct Deferred {
    pub(crate) token: u64,
    pub(crate) request: Request,
}

/// The control socket (listener and its file), an inherited control connection, and every
/// accepted connection. It outlives a shell's restore: the clone keeps serving the same clients.
#[derive(Default)]
pub struct ControlPlane {
    listener: Option<(UnixListener, SocketFile)>,
    conns: HashMap<u64, ControlConn>,
    /// Accepts without spinning when the process is out of fds.
    acceptor: Acceptor,
    /// Set while the listener is out of the epoll set after [`Drained::Paused`].
    paused_until: Option<Instant>,
}

impl ControlPlane {
    /// A plane listening on `listener` (whose socket file is removed with the plane) and serving
    /// `inherited` (e.g. a socketpair end passed with `--control-fd`).
    pub fn new(
        listener: Option<(UnixListener, SocketFile)>,
        inherited: Option<UnixStream>,
    ) -> std::io::Result<Self> {
        let mut plane = Self {
            listener,
            ..Self::default()
        };
        if let Some(s) = inherited {
            let c = ControlConn::new(s)?;
            plane.conns.insert(c.fd() as u64, c);
        }
        Ok(plane)
    }

    /// A plane listening on a new socket at `path` (see [`crate::control::bind_unix`]).
    pub fn bind(path: &std::path::Path) -> Result<Self, crate::control::ControlError> {
        let listener = crate::control::bind_unix(path)?;
        Ok(Self {
            listener: Some((listener, SocketFile(path.to_path_buf()))),
            ..Self::default()
        })
    }

    /// Whether there is a listening socket.
    pub fn has_listener(&self) -> bool {
        self.listener.is_some()
    }

    /// Registers the listener and every connection with `epoll`.
    pub(crate) fn register(&self, epoll: &Epoll) -> std::io::Result<()> {
        if let Some((l, _)) = &self.listener {
            epoll_add(epoll, l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        for (&token, c) in &self.conns {
            epoll.ctl(
                ControlOperation::Add,
                c.fd(),
                EpollEvent::new(interest(c), token),
            )?;
        }
        Ok(())
    }

    /// Whether `token` belongs to this plane.
    pub(crate) fn owns(&self, token: u64) -> bool {
        token == TOKEN_LISTENER || self.conns.contains_key(&token)
    }

    /// Handles a readiness event for `token` (the listener or a connection), serving complete
    /// request lines with `handle`. Returns the first request `handle` deferred.
    pub(crate) fn on_event(
        &mut self,
        epoll: &Epoll,
        token: u64,
        handle: &mut dyn FnMut(Request, Option<OwnedFd>) -> Dispatch,
    ) -> Option<Deferred> {
        if token == TOKEN_LISTENER {
            self.accept_all(epoll);
            return None;
        }
        let c = self.conns.get_mut(&token)?;
        c.flush();
        c.fill();
        let deferred = serve_lines(token, c, handle);
        self.update(epoll, token);
        deferred
    }

    /// Serves lines that arrived while an earlier request of their connection was deferred.
    pub(crate) fn serve_buffered(
        &mut self,
        epoll: &Epoll,
        handle: &mut dyn FnMut(Request, Option<OwnedFd>) -> Dispatch,
    ) -> Option<Deferred> {
        let pending: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_pending_line())
            .map(|(&t, _)| t)
            .collect();
        for token in pending {
            if let Some(c) = self.conns.get_mut(&token) {
                let deferred = serve_lines(token, c, handle);
                self.update(epoll, token);
                if deferred.is_some() {
                    return deferred;
                }
            }
        }
        None
    }

    /// Answers a deferred request.
    pub(crate) fn reply(&mut self, epoll: &Epoll, token: u64, line: &[u8]) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.send(line);
        }
        self.update(epoll, token);
    }

    /// Queues `line` for connection `token` outside any loop (the next loop registers it for
    /// writing if it could not be written at once).
    pub(crate) fn send_to(&mut self, token: u64, line: &[u8]) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.send(line);
        }
    }

    /// Takes over `other`'s connections, and its listener when this plane has none.
    pub(crate) fn merge(&mut self, mut other: ControlPlane) {
        self.conns.extend(other.conns.drain());
        if self.listener.is_none() {
            self.listener = other.listener.take();
        }
    }

    /// Writes what can be written of every connection's pending replies (before exiting).
    pub(crate) fn flush_all(&mut self) {
        for c in self.conns.values_mut() {
            c.flush();
        }
    }

    /// Forgets every registration with `epoll` (its fds stay open): before the plane moves to
    /// another loop.
    pub(crate) fn unregister(&self, epoll: &Epoll) {
        if let Some((l, _)) = &self.listener {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                l.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for c in self.conns.values() {
            let _ = epoll.ctl(ControlOperation::Delete, c.fd(), EpollEvent::default());
        }
    }

    fn accept_all(&mut self, epoll: &Epoll) {
        let Some((listener, _)) = &self.listener else {
            return;
        };
        let conns = &mut self.conns;
        let drained = self.acceptor.accept_ready(listener, |stream| {
            if conns.len() >= MAX_CONNECTIONS {
                refuse(stream);
                return;
            }
            let Ok(c) = ControlConn::new(stream) else {
                return;
            };
            let token = c.fd() as u64;
            if epoll_add(epoll, c.fd(), token).is_ok() {
                conns.insert(token, c);
            }
        });
        if drained == Drained::Paused {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                listener.as_raw_fd(),
                EpollEvent::default(),
            );
            self.paused_until = Some(Instant::now() + accept::PAUSE);
        }
    }

    /// How long the loop may sleep before [`ControlPlane::tick`] is due (-1: no limit).
    pub(crate) fn poll_timeout_ms(&self) -> i32 {
        match self.paused_until {
            Some(t) => t
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
            None => -1,
        }
    }

    /// Watches the listener again once its back-off after fd exhaustion has passed.
    pub(crate) fn tick(&mut self, epoll: &Epoll) {
        if self.paused_until.is_some_and(|t| Instant::now() >= t) {
            self.paused_until = None;
            if let Some((l, _)) = &self.listener {
                let _ = epoll_add(epoll, l.as_raw_fd(), TOKEN_LISTENER);
            }
        }
    }

    /// Re-arms or drops the connection `token` after it was served.
    fn update(&mut self, epoll: &Epoll, token: u64) {
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        if c.finished() {
            let _ = epoll.ctl(ControlOperation::Delete, c.fd(), EpollEvent::default());
            self.conns.remove(&token);
        } else {
            let _ = epoll.ctl(
                ControlOperation::Modify,
                c.fd(),
                EpollEvent::new(interest(c), token),
            );
        }
    }
}

/// Readable while input is accepted; writable while replies wait.
fn interest(c: &ControlConn) -> EventSet {
    let mut set = EventSet::empty();
    if c.reading() {
        set |= EventSet::IN;
    }
    if c.wants_write() {
        set |= EventSet::OUT;
    }
    set
}

/// Serves every complete line of `c` until one is deferred, handing each line that carries a
/// file descriptor the one it came with.
fn serve_lines(
    token: u64,
    c: &mut ControlConn,
    handle: &mut dyn FnMut(Request, Option<OwnedFd>) -> Dispatch,
) -> Option<Deferred> {
    while let Some(line) = c.next_line() {
        let request = match line.and_then(|l| parse_request(&l)) {
            Ok(r) => r,
            Err(e) => {
                c.drop_unclaimed_fds();
                c.send(&encode_error(&e));
                if e.kind == ApiErrorKind::TooLong {
                    c.close_after_output();
                }
                continue;
            }
        };
        // A descriptor sent with this line is the oldest one not claimed yet.
        let fd = if request.carries_fd() {
            c.take_fd()
        } else {
            None
        };
        let dispatch = handle(request, fd);
        // Descriptors this line brought and did not claim are closed before it is answered: a
        // client that has the reply knows the VMM holds no copy.
        c.drop_unclaimed_fds();
        match dispatch {
            Dispatch::Reply(line) => c.send(&line),
            Dispatch::Defer(request) => return Some(Deferred { token, request }),
        }
    }
    c.drop_unclaimed_fds();
    None
}

/// Tells a client over the connection limit why it is closed.
fn refuse(stream: UnixStream) {
    use std::io::Write;
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(&encode_error(&ApiError::new(
        ApiErrorKind::InvalidState,
        format!("too many control connections (limit {MAX_CONNECTIONS}): close idle ones"),
    )));
}
