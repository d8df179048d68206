//! virtio-vsock (virtio 1.2, section 5.10), stream sockets, with the host side on Unix sockets.
//!
//! Host-initiated: a client connects to `uds_path` and sends `CONNECT <port>\n`; the device sends
//! the guest an `OP_REQUEST` and, once the guest answers `OP_RESPONSE`, replies `OK <host_port>\n`
//! and shuttles bytes. Guest-initiated: an `OP_REQUEST` to CID 2 port P connects to
//! `<uds_path>_<P>`. Flow control is credit based in both directions. The back-end's sockets sit
//! in the device's own epoll, whose fd the device loop watches.
//!
//! Host clients are untrusted: at most [`MAX_PENDING_CLIENTS`] may be unfinished (no complete
//! `CONNECT` line yet, or waiting for the guest's answer); each gets [`CONNECT_DEADLINE`] to
//! finish, enforced by a timerfd in the device's epoll; the line is at most [`MAX_CONNECT_LINE`]
//! bytes. Accepting survives descriptor exhaustion without spinning ([`accept::Acceptor`]).

// Shared accept helper; lives at vmm/src/accept.rs so the control loops can use it once lib.rs
// declares it (then this declaration goes and the path becomes `crate::accept`).
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::accept::{self, Acceptor, Drained};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{device_type, used_if, VirtioDevice};
use crate::control::{bind_unix, ControlError, SocketFile};
use crate::memory::GuestMemory;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;
const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
/// Largest payload accepted from the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Receive buffer the device advertises to the guest per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Bytes held for a host socket that does not read, before the connection is reset.
const MAX_PENDING_TO_HOST: usize = 512 * 1024;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;
/// Most host clients that have not finished connecting (no complete `CONNECT` line yet, or the
/// guest has not answered it); further clients are refused with an `ERR` line.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// How long a host client has to send its `CONNECT` line, and the guest to answer it.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Longest `CONNECT <port>` line, without its newline.
pub const MAX_CONNECT_LINE: usize = 32;

/// A non-blocking one-shot monotonic timerfd.
struct Timer {
    fd: OwnedFd,
    armed_for: Option<Instant>,
}

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall without pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed_for: None,
        })
    }

    /// Fires once at `at` (at least 1 ms from now), or never with `None`.
    fn arm(&mut self, at: Option<Instant>) {
        if at == self.armed_for {
            return;
        }
        let after = at.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec we own; a null old-value pointer is allowed.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r == 0 {
            self.armed_for = at;
        } else {
            tracing::warn!(
                "vsock: arming the connect timer failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Consumes an expiration (non-blocking; nothing to read is fine).
    fn clear(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a buffer we own.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        self.armed_for = None;
    }
}

/// A vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A connection, keyed by (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    /// Host-initiated and still waiting for the guest's `OP_RESPONSE`.
    awaiting_response: bool,
    /// When a connection still awaiting the guest's response is given up.
    deadline: Instant,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received from the guest and handed to the host socket.
    fwd_cnt: u32,
    fwd_cnt_announced: u32,
    to_host: Vec<u8>,
    /// The host socket may have data for the guest (EPOLLIN fired, not yet drained).
    readable: bool,
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, awaiting_response: bool, deadline: Instant) -> Self {
        Self {
            stream,
            awaiting_response,
            deadline,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_announced: 0,
            to_host: Vec::new(),
            readable: false,
            host_eof: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that connected but has not sent its `CONNECT` line yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    /// When the client is dropped if its line is not complete.
    deadline: Instant,
}

/// Error creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be bound.
    #[error("vsock host socket: {0}")]
    Bind(#[from] ControlError),
    /// epoll failed.
    #[error("vsock epoll: {0}")]
    Epoll(std::io::Error),
    /// Invalid guest CID.
    #[error("guest CID {0} is reserved: use 3 or higher")]
    Cid(u64),
    /// Something that is not a socket sits at the host socket path.
    #[error("vsock host socket {0}: a file that is not a socket is there; it is left alone: remove it or choose another path")]
    NotASocket(String),
    /// The connect timer could not be created.
    #[error("vsock connect timer: {0}")]
    Timer(std::io::Error),
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    _socket_file: SocketFile,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, Pending>,
    control: VecDeque<Header>,
    next_host_port: u32,
    config: [u8; 8],
    /// Packets from the guest dropped as malformed.
    pub malformed: u64,
    /// A TRANSPORT_RESET event waits for an event buffer (after a restore).
    pending_reset: bool,
    acceptor: Acceptor,
    timer: Timer,
    /// The listener is out of the epoll set until then (accepting failed; see [`accept`]).
    listener_paused_until: Option<Instant>,
    /// Time a host client gets to finish connecting ([`CONNECT_DEADLINE`]).
    connect_deadline: Duration,
    /// Host clients dropped for missing the deadline, over the pending limit or a bad line.
    pub refused_clients: u64,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        // Never let the bind replace something that is not a socket (a regular file answers
        // connect() with ECONNREFUSED, like a stale socket does).
        if let Ok(m) = std::fs::symlink_metadata(uds_path) {
            if !m.file_type().is_socket() {
                return Err(VsockError::NotASocket(uds_path.display().to_string()));
            }
        }
        let acceptor = Acceptor::new();
        let timer = Timer::new().map_err(VsockError::Timer)?;
        let listener = bind_unix(uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (timer.fd.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VsockError::Epoll)?;
        }
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            _socket_file: SocketFile(uds_path.to_path_buf()),
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_host_port: 1 << 30,
            config: cid.to_le_bytes(),
            malformed: 0,
            pending_reset: false,
            acceptor,
            timer,
            listener_paused_until: None,
            connect_deadline: CONNECT_DEADLINE,
            refused_clients: 0,
        })
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Watches `stream` for reads (one-shot: re-armed once drained) and, if needed, writes.
    fn arm(&self, fd: RawFd, key_fd: u64, want_write: bool) {
        let mut ev = EventSet::IN | EventSet::ONE_SHOT;
        if want_write {
            ev |= EventSet::OUT;
        }
        let event = EpollEvent::new(ev, key_fd);
        if self.epoll.ctl(ControlOperation::Modify, fd, event).is_err() {
            let _ = self.epoll.ctl(ControlOperation::Add, fd, event);
        }
    }

    fn add_conn(&mut self, key: Key, conn: Conn) {
        let fd = conn.stream.as_raw_fd();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
    }

    fn drop_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
    }

    fn reset(&mut self, key: Key) {
        let rst = self.header(key, OP_RST, 0, 0);
        self.drop_conn(key);
        self.control.push_back(rst);
    }

    /// Host clients not yet connected: no complete line yet, or waiting for the guest.
    fn unfinished_clients(&self) -> usize {
        self.pending.len() + self.conns.values().filter(|c| c.awaiting_response).count()
    }

    /// Refuses a host client with an error line (best effort: the socket is non-blocking).
    fn refuse(&mut self, mut stream: UnixStream, why: &str) {
        let _ = stream.write_all(format!("ERR {why}\n").as_bytes());
        self.refused_clients += 1;
    }

    fn accept_clients(&mut self) {
        let mut accepted = Vec::new();
        let drained = self
            .acceptor
            .accept_ready(&self.listener, |s| accepted.push(s));
        for stream in accepted {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.unfinished_clients() >= MAX_PENDING_CLIENTS {
                self.refuse(
                    stream,
                    &format!("too many connections waiting to connect (at most {MAX_PENDING_CLIENTS}); retry later"),
                );
                continue;
            }
            let fd = stream.as_raw_fd();
            let ev = EpollEvent::new(EventSet::IN, fd as u64);
            if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                let deadline = Instant::now() + self.connect_deadline;
                self.pending.insert(
                    fd,
                    Pending {
                        stream,
                        line: Vec::new(),
                        deadline,
                    },
                );
            }
        }
        if drained == Drained::Paused {
            // Stop watching the listener for a while instead of spinning on it.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
            self.listener_paused_until = Some(Instant::now() + accept::PAUSE);
        }
    }

    /// Drops host clients past their deadline, re-watches a paused listener when its pause is
    /// over, and re-arms the timer for the next of these.
    fn on_timer(&mut self) {
        self.timer.clear();
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        let secs = self.connect_deadline.as_secs_f64();
        for fd in expired {
            if let Some(p) = self.pending.remove(&fd) {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                self.refuse(
                    p.stream,
                    &format!("no complete CONNECT <port> line within {secs} s"),
                );
            }
        }
        let unanswered: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.awaiting_response && c.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in unanswered {
            if let Some(c) = self.conns.get_mut(&key) {
                let _ = c.stream.write_all(
                    format!("ERR the guest did not accept within {secs} s\n").as_bytes(),
                );
            }
            self.refused_clients += 1;
            self.reset(key);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
            let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            {
                tracing::warn!("vsock: watching the host socket again failed: {e}");
                self.listener_paused_until = Some(now + accept::PAUSE);
            } else {
                self.accept_clients();
            }
        }
    }

    /// Arms the timer for the earliest deadline or listener pause end.
    fn arm_timer(&mut self) {
        let next = self
            .pending
            .values()
            .map(|p| p.deadline)
            .chain(
                self.conns
                    .values()
                    .filter(|c| c.awaiting_response)
                    .map(|c| c.deadline),
            )
            .chain(self.listener_paused_until)
            .min();
        self.timer.arm(next);
    }

    /// Reads a pending client's `CONNECT <port>\n`; a complete line starts the handshake.
    /// Reads byte by byte so that what the client sends after the line stays in the socket for
    /// the guest; a line longer than [`MAX_CONNECT_LINE`] is refused.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let done: Result<Option<u32>, Option<&str>> = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break Err(None),
                Ok(_) if b[0] == b'\n' => {
                    break std::str::from_utf8(&p.line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|port| port.trim().parse::<u32>().ok())
                        .map(Some)
                        .ok_or(Some("expected CONNECT <port>"))
                }
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => {
                    break Err(Some("expected CONNECT <port>: line too long"))
                }
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err(None),
            }
        };
        if let Ok(None) = done {
            return;
        }
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        // Bytes the client sent after the line wait in the socket until the guest accepts.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        match done {
            Ok(Some(port)) => {
                let host_port = self.next_host_port;
                self.next_host_port = self.next_host_port.wrapping_add(1).max(1 << 30);
                let key = (host_port, port);
                let deadline = Instant::now() + self.connect_deadline;
                self.add_conn(key, Conn::new(p.stream, true, deadline));
                let req = self.header(key, OP_REQUEST, 0, 0);
                self.control.push_back(req);
            }
            Err(Some(why)) => self.refuse(p.stream, why),
            Ok(None) | Err(None) => {}
        }
    }

    /// Writes buffered guest data to the host socket; resets the connection on failure.
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut written = 0;
        let failed = loop {
            if written == c.to_host.len() {
                break false;
            }
            match c.stream.write(&c.to_host[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        c.to_host.drain(..written);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(written as u32);
        if failed {
            self.reset(key);
            return;
        }
        let blocked = !c.to_host.is_empty();
        let fd = c.stream.as_raw_fd();
        let arm = blocked || !c.awaiting_response;
        // Tell the guest about freed space before it runs out of credit.
        let announce = c.fwd_cnt.wrapping_sub(c.fwd_cnt_announced) >= BUF_ALLOC / 2;
        if announce {
            c.fwd_cnt_announced = c.fwd_cnt;
        }
        if arm {
            self.arm(fd, fd as u64, blocked);
        }
        if announce {
            let upd = self.header(key, OP_CREDIT_UPDATE, 0, 0);
            self.control.push_back(upd);
        }
    }

    /// Handles one packet from the guest.
    fn handle_packet(&mut self, h: Header, payload: &[u8]) {
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.kind != TYPE_STREAM {
            self.malformed += 1;
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        let known = self.conns.contains_key(&key);
        match h.op {
            OP_REQUEST if !known => {
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, false, Instant::now());
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        let fd = c.stream.as_raw_fd();
                        self.add_conn(key, c);
                        self.arm(fd, fd as u64, false);
                        let resp = self.header(key, OP_RESPONSE, 0, 0);
                        self.control.push_back(resp);
                    }
                    Err(e) => {
                        tracing::debug!("vsock: guest connect to {path} failed: {e}");
                        let rst = self.header(key, OP_RST, 0, 0);
                        self.control.push_back(rst);
                    }
                }
            }
            OP_RESPONSE if known => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if !c.awaiting_response {
                    self.reset(key);
                    return;
                }
                c.awaiting_response = false;
                let line = format!("OK {}\n", key.0);
                let ok = c.stream.write_all(line.as_bytes()).is_ok();
                let fd = c.stream.as_raw_fd();
                if ok {
                    self.arm(fd, fd as u64, false);
                } else {
                    self.reset(key);
                }
            }
            OP_RW if known => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.awaiting_response || c.to_host.len() + payload.len() > MAX_PENDING_TO_HOST {
                    self.reset(key);
                    return;
                }
                c.to_host.extend_from_slice(payload);
                self.flush_to_host(key);
            }
            OP_CREDIT_UPDATE if known => {
                // More credit: the host socket may have data waiting for it.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.readable = true;
                }
            }
            OP_CREDIT_REQUEST if known => {
                let upd = self.header(key, OP_CREDIT_UPDATE, 0, 0);
                self.control.push_back(upd);
            }
            OP_SHUTDOWN if known => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if h.flags & SHUTDOWN_SEND != 0 && c.to_host.is_empty() {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if h.flags & 3 == 3 {
                    self.reset(key);
                }
            }
            OP_RST => self.drop_conn(key),
            _ => {
                // Unknown op, or a packet for a connection that does not exist.
                self.malformed += u64::from(!matches!(h.op, OP_REQUEST..=OP_CREDIT_REQUEST));
                self.reset(key);
            }
        }
    }

    /// Reads one packet from a tx chain: header, then `len` payload bytes, any descriptor split.
    fn read_packet<M>(
        chain: virtio_queue::DescriptorChain<M>,
        mem: &GuestMemory,
    ) -> Option<(Header, Vec<u8>)>
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let mut reader = chain.reader(mem).ok()?;
        let mut hb = [0u8; HDR_LEN];
        reader.read_exact(&mut hb).ok()?;
        let h = Header::parse(&hb);
        let len = h.len as usize;
        if len > MAX_PKT_PAYLOAD || len > reader.available_bytes() {
            return None;
        }
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).ok()?;
        Some((h, payload))
    }

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match Self::read_packet(chain, mem) {
                Some((h, payload)) => self.handle_packet(h, &payload),
                None => self.malformed += 1,
            }
            if q.add_used(mem, head, 0).is_err() {
                self.malformed += 1;
                break;
            }
            used = true;
        }
        used
    }

    /// Moves control packets, then host data, into the guest's rx buffers.
    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        if !q.ready() {
            return false;
        }
        let mut used = false;
        loop {
            let next_data = self
                .conns
                .iter()
                .find(|(_, c)| {
                    c.readable && !c.awaiting_response && !c.host_eof && c.peer_credit() > 0
                })
                .map(|(k, _)| *k);
            if self.control.is_empty() && next_data.is_none() {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Ok(mut w) = chain.writer(mem) else {
                self.malformed += 1;
                let _ = q.add_used(mem, head, 0);
                used = true;
                continue;
            };
            if w.available_bytes() < HDR_LEN {
                self.malformed += 1;
                let _ = q.add_used(mem, head, 0);
                used = true;
                continue;
            }
            let packet = match (self.control.pop_front(), next_data) {
                (Some(h), _) => Some(h.bytes().to_vec()),
                (None, Some(key)) => self.read_host_data(key, w.available_bytes() - HDR_LEN),
                (None, None) => None,
            };
            match packet {
                Some(bytes) => {
                    let len = if w.write_all(&bytes).is_ok() {
                        bytes.len() as u32
                    } else {
                        0
                    };
                    if q.add_used(mem, head, len).is_err() {
                        break;
                    }
                    used = true;
                }
                None => q.go_to_previous_position(),
            }
        }
        used
    }

    /// Delivers a pending TRANSPORT_RESET into the guest's next event buffer.
    fn deliver_events(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        if !self.pending_reset || !q.ready() {
            return false;
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .writer(mem)
            .ok()
            .is_some_and(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok());
        self.malformed += u64::from(!written);
        let len = if written { 4 } else { 0 };
        self.pending_reset = len == 0;
        q.add_used(mem, head, len).is_ok()
    }

    /// Reads up to `room` bytes of host data for `key` as an RW (or, at EOF, SHUTDOWN) packet.
    fn read_host_data(&mut self, key: Key, room: usize) -> Option<Vec<u8>> {
        let c = self.conns.get_mut(&key)?;
        let want = room.min(c.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
        let mut buf = vec![0u8; HDR_LEN + want];
        match c.stream.read(&mut buf[HDR_LEN..]) {
            Ok(0) => {
                c.host_eof = true;
                c.readable = false;
                let h = self.header(key, OP_SHUTDOWN, 3, 0);
                Some(h.bytes().to_vec())
            }
            Ok(n) => {
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                buf.truncate(HDR_LEN + n);
                let h = self.header(key, OP_RW, 0, n as u32);
                buf[..HDR_LEN].copy_from_slice(&h.bytes());
                Some(buf)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                c.readable = false;
                let fd = c.stream.as_raw_fd();
                let want_write = !c.to_host.is_empty();
                self.arm(fd, fd as u64, want_write);
                None
            }
            Err(_) => {
                self.reset(key);
                self.control.pop_back().map(|h| h.bytes().to_vec())
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize> {
        let tx = (index == TX)
            .then(|| used_if(queues, TX, |q| self.process_tx(q, mem)))
            .flatten();
        let rx = used_if(queues, RX, |q| self.fill_rx(q, mem));
        let event = (index == EVENT)
            .then(|| used_if(queues, EVENT, |q| self.deliver_events(q, mem)))
            .flatten();
        [tx, rx, event].into_iter().flatten().collect()
    }

    fn restored(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        // Every connection the guest had ended with the snapshot: tell its driver to drop them.
        self.pending_reset = true;
        used_if(queues, EVENT, |q| self.deliver_events(q, mem))
            .into_iter()
            .collect()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        let mut events = [EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let token = ev.data();
            if token == TOKEN_LISTENER {
                self.accept_clients();
                continue;
            }
            if token == TOKEN_TIMER {
                self.on_timer();
                continue;
            }
            let fd = token as RawFd;
            if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                let set = ev.event_set();
                if set.contains(EventSet::OUT) {
                    self.flush_to_host(key);
                }
                if let Some(c) = self.conns.get_mut(&key) {
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                        c.readable = true;
                    }
                }
            }
        }
        self.arm_timer();
        used_if(queues, RX, |q| self.fill_rx(q, mem))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, NEXT, WRITE};
    use vm_memory::{Bytes, GuestAddress as GA};

    const GUEST: u64 = 3;
    const RXBUF: u64 = 0x40000;
    const TXBUF: u64 = 0x60000;

    struct Rig {
        mem: GuestMemory,
        rx: TestQueue,
        tx: TestQueue,
        ev: TestQueue,
        dev: Vsock,
        dir: tempfile::TempDir,
        rx_seen: u16,
    }

    impl Rig {
        fn new() -> Self {
            let mem = memory();
            let dir = tempfile::tempdir().unwrap();
            let dev = Vsock::new(GUEST, &dir.path().join("v.sock")).unwrap();
            let mut rig = Self {
                rx: TestQueue::new(&mem, 0x10000),
                tx: TestQueue::new(&mem, 0x20000),
                ev: TestQueue::new(&mem, 0x30000),
                mem,
                dev,
                dir,
                rx_seen: 0,
            };
            for i in 0..8 {
                rig.post_rx(i);
            }
            rig
        }

        fn post_rx(&mut self, i: u16) {
            self.rx.desc(
                &self.mem,
                i,
                RXBUF + u64::from(i) * 0x1000,
                0x1000,
                WRITE,
                0,
            );
            self.rx.submit(&self.mem, i);
        }

        fn queues(&mut self) -> [Queue; 3] {
            let take = |q: &mut Queue| std::mem::replace(q, Queue::new(16).unwrap());
            [
                take(&mut self.rx.queue),
                take(&mut self.tx.queue),
                take(&mut self.ev.queue),
            ]
        }

        fn put_back(&mut self, q: [Queue; 3]) {
            let [rx, tx, ev] = q;
            (self.rx.queue, self.tx.queue, self.ev.queue) = (rx, tx, ev);
        }

        /// Sends a packet; the header is split at `split` bytes into two descriptors, the
        /// payload goes in a third.
        fn send(&mut self, h: Header, payload: &[u8], split: usize) {
            let hb = h.bytes();
            self.mem.write_slice(&hb, GA(TXBUF)).unwrap();
            self.mem.write_slice(payload, GA(TXBUF + 0x100)).unwrap();
            let more = if payload.is_empty() { 0 } else { NEXT };
            self.tx.desc(&self.mem, 0, TXBUF, split as u32, NEXT, 1);
            self.tx.desc(
                &self.mem,
                1,
                TXBUF + split as u64,
                (HDR_LEN - split) as u32,
                more,
                2,
            );
            self.tx
                .desc(&self.mem, 2, TXBUF + 0x100, payload.len() as u32, 0, 0);
            self.tx.submit(&self.mem, 0);
            let mut q = self.queues();
            self.dev.process_queue(TX, &mut q, &self.mem);
            self.put_back(q);
        }

        fn backend(&mut self) {
            let mut q = self.queues();
            self.dev.process_backend(&mut q, &self.mem);
            self.put_back(q);
        }

        /// Next packet the device put in the rx queue, if any.
        fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
            if self.rx.used_idx(&self.mem) == self.rx_seen {
                return None;
            }
            let (id, len) = self.rx.used(&self.mem, self.rx_seen);
            self.rx_seen += 1;
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GA(RXBUF + u64::from(id) * 0x1000))
                .unwrap();
            self.post_rx(id as u16);
            let h = Header::parse(b[..HDR_LEN].try_into().unwrap());
            Some((h, b[HDR_LEN..].to_vec()))
        }

        fn recv_wait(&mut self) -> (Header, Vec<u8>) {
            for _ in 0..200 {
                if let Some(p) = self.recv() {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(5));
                self.backend();
            }
            panic!("no packet from the device");
        }
    }

    fn guest_hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn guest_initiated_with_split_header() {
        let mut rig = Rig::new();
        let listener =
            UnixListener::bind(format!("{}_7000", rig.dir.path().join("v.sock").display()))
                .unwrap();
        rig.send(guest_hdr(1024, 7000, OP_REQUEST, 0), &[], 20);
        let (mut host, _) = listener.accept().unwrap();
        let (h, _) = rig.recv_wait();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RESPONSE, 7000, 1024, GUEST)
        );
        rig.send(guest_hdr(1024, 7000, OP_RW, 5), b"hello", 7);
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        host.write_all(b"world").unwrap();
        let (h, payload) = rig.recv_wait();
        assert_eq!((h.op, h.len, payload.as_slice()), (OP_RW, 5, &b"world"[..]));
        assert_eq!(h.fwd_cnt, 5, "device reports the bytes it forwarded");
        drop(host);
        let (h, _) = rig.recv_wait();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, 3));
        assert_eq!(rig.dev.malformed, 0);
    }

    #[test]
    fn guest_connect_to_nothing_is_reset() {
        let mut rig = Rig::new();
        rig.send(guest_hdr(1024, 7001, OP_REQUEST, 0), &[], 44);
        let (h, _) = rig.recv_wait();
        assert_eq!(h.op, OP_RST);
    }

    #[test]
    fn malformed_packets_are_dropped_and_the_device_keeps_working() {
        let mut rig = Rig::new();
        // Oversized payload.
        rig.send(
            guest_hdr(1, 2, OP_RW, (MAX_PKT_PAYLOAD + 1) as u32),
            &[0; 16],
            44,
        );
        // Length larger than the chain carries.
        rig.send(guest_hdr(1, 2, OP_RW, 4096), &[0; 16], 44);
        // Wrong source CID and wrong socket type.
        let mut h = guest_hdr(1, 2, OP_REQUEST, 0);
        h.src_cid = 99;
        rig.send(h, &[], 44);
        let mut h = guest_hdr(1, 2, OP_REQUEST, 0);
        h.kind = 2;
        rig.send(h, &[], 44);
        // A header in a device-writable descriptor (wrong direction).
        rig.mem
            .write_slice(&guest_hdr(1, 2, OP_REQUEST, 0).bytes(), GA(TXBUF))
            .unwrap();
        rig.tx.desc(&rig.mem, 0, TXBUF, HDR_LEN as u32, WRITE, 0);
        rig.tx.submit(&rig.mem, 0);
        let mut q = rig.queues();
        rig.dev.process_queue(TX, &mut q, &rig.mem);
        rig.put_back(q);
        assert_eq!(rig.dev.malformed, 5);
        assert!(
            rig.recv().is_none(),
            "nothing answered to malformed packets"
        );
        // Still serving.
        rig.send(guest_hdr(1024, 7002, OP_REQUEST, 0), &[], 44);
        assert_eq!(rig.recv_wait().0.op, OP_RST);
    }

    #[test]
    fn host_initiated_connect_and_credit() {
        let mut rig = Rig::new();
        let mut client = UnixStream::connect(rig.dir.path().join("v.sock")).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"CONNECT 80\n").unwrap();
        let (req, _) = rig.recv_wait();
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 80, GUEST));
        let host_port = req.src_port;
        // The guest accepts with an 8-byte receive buffer.
        let mut resp = guest_hdr(80, host_port, OP_RESPONSE, 0);
        resp.buf_alloc = 8;
        rig.send(resp, &[], 44);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {host_port}\n")
        );
        client.write_all(&[7u8; 20]).unwrap();
        let (h, p) = rig.recv_wait();
        assert_eq!(
            (h.op, p.len()),
            (OP_RW, 8),
            "credit limits the first packet"
        );
        std::thread::sleep(Duration::from_millis(20));
        rig.backend();
        assert!(rig.recv().is_none(), "no credit left");
        let mut upd = guest_hdr(80, host_port, OP_CREDIT_UPDATE, 0);
        upd.buf_alloc = 8;
        upd.fwd_cnt = 8;
        rig.send(upd, &[], 44);
        let (h, p) = rig.recv_wait();
        assert_eq!((h.op, p.len()), (OP_RW, 8));
    }

    #[test]
    fn bad_connect_line_is_refused() {
        let mut rig = Rig::new();
        let mut client = UnixStream::connect(rig.dir.path().join("v.sock")).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"HELLO 80\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        rig.backend();
        rig.backend();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("ERR"), "{reply}");
        assert!(rig.recv().is_none());
    }

    /// Reads what the device wrote to a refused client up to EOF.
    fn refusal(c: &mut UnixStream) -> String {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    /// Drives the back-end whenever its epoll fd is readable, until `until` or `done()`.
    fn drive(rig: &mut Rig, until: Instant, done: &mut dyn FnMut(&mut Rig) -> bool) -> bool {
        while Instant::now() < until {
            if done(rig) {
                return true;
            }
            let mut ev = [EpollEvent::default(); 1];
            let epoll = Epoll::new().unwrap();
            epoll
                .ctl(
                    ControlOperation::Add,
                    rig.dev.epoll.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 1),
                )
                .unwrap();
            if epoll.wait(50, &mut ev).unwrap() > 0 {
                rig.backend();
            }
        }
        done(rig)
    }

    #[test]
    fn silent_host_clients_are_bounded_and_dropped_at_the_deadline() {
        let mut rig = Rig::new();
        rig.dev.connect_deadline = Duration::from_millis(400);
        let path = rig.dir.path().join("v.sock");
        let mut silent: Vec<UnixStream> = (0..MAX_PENDING_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let t0 = Instant::now();
        rig.backend();
        assert_eq!(rig.dev.pending.len(), MAX_PENDING_CLIENTS);
        // Over the limit: refused at once, with a reason.
        let mut extra = UnixStream::connect(&path).unwrap();
        rig.backend();
        assert!(refusal(&mut extra).starts_with("ERR too many"));
        // Nothing to do until the deadline: the device's epoll stays quiet (no busy polling).
        let mut ev = [EpollEvent::default(); 4];
        assert_eq!(rig.dev.epoll.wait(100, &mut ev).unwrap(), 0);
        let all_gone = drive(&mut rig, t0 + Duration::from_secs(5), &mut |r| {
            r.dev.pending.is_empty()
        });
        assert!(all_gone, "{} silent clients kept", rig.dev.pending.len());
        assert!(t0.elapsed() >= Duration::from_millis(400));
        for c in &mut silent {
            let r = refusal(c);
            assert!(r.starts_with("ERR no complete CONNECT"), "{r}");
        }
        assert_eq!(rig.dev.refused_clients, MAX_PENDING_CLIENTS as u64 + 1);
        // A well-behaved client still connects; what it sends after its line is kept.
        let mut good = UnixStream::connect(&path).unwrap();
        good.write_all(b"CONNECT 80\nearly").unwrap();
        let (req, _) = rig.recv_wait();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 80));
        let mut resp = guest_hdr(80, req.src_port, OP_RESPONSE, 0);
        resp.buf_alloc = 4096;
        rig.send(resp, &[], 44);
        let (h, p) = rig.recv_wait();
        assert_eq!((h.op, p.as_slice()), (OP_RW, &b"early"[..]));
    }

    #[test]
    fn over_long_connect_line_and_unanswered_connect_are_refused() {
        let mut rig = Rig::new();
        rig.dev.connect_deadline = Duration::from_millis(300);
        let path = rig.dir.path().join("v.sock");
        let mut long = UnixStream::connect(&path).unwrap();
        long.write_all(&[b'7'; MAX_CONNECT_LINE + 1]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        rig.backend();
        rig.backend();
        let r = refusal(&mut long);
        assert!(r.contains("line too long"), "{r}");
        // The guest never answers this one: the client is told, the guest gets a reset.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"CONNECT 81\n").unwrap();
        let (req, _) = rig.recv_wait();
        assert_eq!(req.op, OP_REQUEST);
        let done = drive(
            &mut rig,
            Instant::now() + Duration::from_secs(5),
            &mut |r| r.dev.conns.is_empty(),
        );
        assert!(done, "unanswered connection kept");
        let r = refusal(&mut c);
        assert!(r.starts_with("ERR the guest did not accept"), "{r}");
        let (rst, _) = rig.recv_wait();
        assert_eq!((rst.op, rst.src_port), (OP_RST, req.src_port));
    }

    #[test]
    fn a_file_at_the_socket_path_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data");
        std::fs::write(&f, b"precious").unwrap();
        let e = Vsock::new(3, &f).err().unwrap();
        assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    }

    #[test]
    fn reserved_cid_and_socket_in_use_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Vsock::new(2, &dir.path().join("a")),
            Err(VsockError::Cid(2))
        ));
        let _a = Vsock::new(3, &dir.path().join("a")).unwrap();
        assert!(matches!(
            Vsock::new(4, &dir.path().join("a")),
            Err(VsockError::Bind(_))
        ));
    }
}
