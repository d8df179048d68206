//! A blocking control client: one connection, one request at a time.

use std::io::{BufRead, BufReader, ErrorKind as IoKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::wire::{decode_reply, encode_request, MAX_LINE};
use crate::{
    ActivateReply, ApiError, DiskReply, Request, RestoreOptions, RestoreReply, SnapshotReply,
    StateReply, StatusReply,
};

/// How long a call waits for its reply unless [`ControlClient::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Error talking to a VMM's control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to in time.
    #[error("connecting to the VMM control socket {path}: {source} (is runv-vmm running with --control {path}?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("{op} the VMM control connection: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// No reply came in time.
    #[error("the VMM did not answer {request} within {timeout:?}: it may be stuck; check its log or kill it")]
    Timeout {
        /// The request.
        request: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The VMM closed the connection.
    #[error("the VMM closed the control connection during {request} (did it exit? see its log)")]
    Closed {
        /// The request.
        request: &'static str,
    },
    /// The request cannot be put on the wire.
    #[error("{0}")]
    Encode(String),
    /// A disk to send to the VMM could not be opened here.
    #[error("opening disk {path}{} to pass it to the VMM: {source} (pass an existing regular file or block device, not a symbolic link)", if *read_only { " read-only" } else { "" })]
    Open {
        /// The file.
        path: PathBuf,
        /// Opened read-only.
        read_only: bool,
        /// Cause.
        source: std::io::Error,
    },
    /// The reply is not what the protocol says.
    #[error("bad reply to {request}: {detail}")]
    BadReply {
        /// The request.
        request: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The VMM refused or failed the request.
    #[error("the VMM refused {request}: {error}")]
    Refused {
        /// The request.
        request: &'static str,
        /// Its error reply.
        error: ApiError,
    },
}

/// A connection to one VMM's control socket.
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
}

impl ControlClient {
    /// Connects to the socket at `path`, retrying while it does not exist yet or refuses
    /// connections (a VMM that is still starting), for at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::from_stream(s),
                Err(e)
                    if matches!(e.kind(), IoKind::NotFound | IoKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    /// Wraps a connected stream (e.g. one end of a socketpair whose other end the VMM inherited
    /// through `--control-fd`).
    pub fn from_stream(stream: UnixStream) -> Result<Self, ClientError> {
        let io = |source| ClientError::Io {
            op: "setting up",
            source,
        };
        stream.set_nonblocking(false).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut client = Self {
            writer: stream,
            reader,
            timeout: DEFAULT_TIMEOUT,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(client)
    }

    /// How long each call waits for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let io = |source| ClientError::Io {
            op: "setting a timeout on",
            source,
        };
        self.writer.set_write_timeout(Some(timeout)).map_err(io)?;
        self.writer.set_read_timeout(Some(timeout)).map_err(io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends `req` and decodes its reply as `T`; an error reply is [`ClientError::Refused`].
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        self.call_with_fd(req, None)
    }

    /// [`ControlClient::call`] with `fd` sent along with the request line (`SCM_RIGHTS`).
    pub fn call_with_fd<T: DeserializeOwned>(
        &mut self,
        req: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<T, ClientError> {
        let name = req.name();
        let line = encode_request(req).map_err(ClientError::Encode)?;
        let reply = self.exchange(name, &line, fd)?;
        match decode_reply::<T>(&reply) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(ClientError::Refused {
                request: name,
                error,
            }),
            Err(detail) => Err(ClientError::BadReply {
                request: name,
                detail,
            }),
        }
    }

    /// Sends raw bytes (which should end in a newline) and returns the reply line as JSON: for
    /// tests that probe how the VMM handles malformed input.
    pub fn call_raw(&mut self, bytes: &[u8]) -> Result<serde_json::Value, ClientError> {
        let reply = self.exchange("a raw request", bytes, None)?;
        serde_json::from_slice(&reply).map_err(|e| ClientError::BadReply {
            request: "a raw request",
            detail: e.to_string(),
        })
    }

    fn exchange(
        &mut self,
        name: &'static str,
        line: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Vec<u8>, ClientError> {
        let timeout = self.timeout;
        let fail = |op: &'static str, e: std::io::Error| match e.kind() {
            IoKind::WouldBlock | IoKind::TimedOut => ClientError::Timeout {
                request: name,
                timeout,
            },
            IoKind::BrokenPipe | IoKind::ConnectionReset => ClientError::Closed { request: name },
            _ => ClientError::Io { op, source: e },
        };
        let sent = match fd {
            Some(fd) => loop {
                match crate::fdpass::send_with_fd(self.writer.as_raw_fd(), line, fd) {
                    Err(e) if e.kind() == IoKind::Interrupted => {}
                    r => break r.map_err(|e| fail("writing to", e))?,
                }
            },
            None => 0,
        };
        self.writer
            .write_all(&line[sent..])
            .map_err(|e| fail("writing to", e))?;
        let mut reply = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut reply)
            .map_err(|e| fail("reading from", e))?;
        if n == 0 {
            return Err(ClientError::Closed { request: name });
        }
        if reply.last() != Some(&b'\n') {
            return Err(ClientError::BadReply {
                request: name,
                detail: format!("unterminated reply of {} bytes", reply.len()),
            });
        }
        reply.pop();
        Ok(reply)
    }

    /// `status`.
    pub fn status(&mut self) -> Result<StatusReply, ClientError> {
        self.call(&Request::Status {})
    }

    /// `pause`.
    pub fn pause(&mut self) -> Result<StateReply, ClientError> {
        self.call(&Request::Pause {})
    }

    /// `resume`.
    pub fn resume(&mut self) -> Result<StateReply, ClientError> {
        self.call(&Request::Resume {})
    }

    /// `shutdown`: the VMM answers, then ends.
    pub fn shutdown(&mut self) -> Result<StateReply, ClientError> {
        self.call(&Request::Shutdown {})
    }

    /// `snapshot` into `dir`.
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotReply, ClientError> {
        self.call(&Request::Snapshot {
            dir: dir.to_path_buf(),
        })
    }

    /// `activate` a clone restored paused: identity `clone_id`, fresh entropy, then resume.
    pub fn activate(&mut self, clone_id: &str) -> Result<ActivateReply, ClientError> {
        self.activate_net(clone_id, None)
    }

    /// `activate` with the guest's IPv4 address (`ipv4`) written into the identity page too.
    pub fn activate_net(
        &mut self,
        clone_id: &str,
        ipv4: Option<std::net::Ipv4Addr>,
    ) -> Result<ActivateReply, ClientError> {
        self.call(&Request::Activate {
            clone_id: clone_id.into(),
            ipv4,
        })
    }

    /// `attach_disk`: swap disk slot `slot` to the image at `path`, which is opened here
    /// (`O_NOFOLLOW`, read-write unless `read_only`) and passed to the VMM as a file
    /// descriptor, so a jailed VMM that cannot see `path` gets it too.
    pub fn attach_disk(
        &mut self,
        slot: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<DiskReply, ClientError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| ClientError::Open {
                path: path.to_path_buf(),
                read_only,
                source,
            })?;
        self.attach_disk_fd(slot, file.as_fd(), path, read_only)
    }

    /// `attach_disk` of an image already open as `fd` (read-write unless `read_only`): the
    /// VMM uses its own copy of the descriptor (the caller may close `fd` afterwards);
    /// `label` names the disk in the VMM's errors.
    pub fn attach_disk_fd(
        &mut self,
        slot: usize,
        fd: BorrowedFd<'_>,
        label: &Path,
        read_only: bool,
    ) -> Result<DiskReply, ClientError> {
        self.call_with_fd(
            &Request::AttachDisk {
                slot,
                path: label.to_path_buf(),
                read_only,
                fd: true,
            },
            Some(fd),
        )
    }

    /// `attach_disk` that has the VMM open `path` itself: only for a VMM that can see it (not
    /// jailed, or the file bound into its jail).
    pub fn attach_disk_path(
        &mut self,
        slot: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<DiskReply, ClientError> {
        self.call(&Request::AttachDisk {
            slot,
            path: path.to_path_buf(),
            read_only,
            fd: false,
        })
    }

    /// `detach_disk`: put slot `slot`'s placeholder back.
    pub fn detach_disk(&mut self, slot: usize) -> Result<DiskReply, ClientError> {
        self.call(&Request::DetachDisk { slot })
    }

    /// `restore` into this shell.
    pub fn restore(&mut self, opts: &RestoreOptions) -> Result<RestoreReply, ClientError> {
        self.call(&Request::Restore(opts.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_error, encode_ok, parse_request, ErrorKind, VmState};

    /// A one-connection server answering with the real encoders.
    fn serve_once(path: PathBuf, replies: usize) -> std::thread::JoinHandle<Vec<Request>> {
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut seen = Vec::new();
            for _ in 0..replies {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).unwrap() == 0 {
                    break;
                }
                let req = parse_request(&line[..line.len() - 1]).unwrap();
                let out = match &req {
                    Request::Pause {} => encode_ok(&StateReply {
                        state: VmState::Paused,
                    }),
                    _ => encode_error(&ApiError::new(ErrorKind::InvalidState, "not now")),
                };
                w.write_all(&out).unwrap();
                seen.push(req);
            }
            seen
        })
    }

    #[test]
    fn typed_calls_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let server = serve_once(path.clone(), 2);
        let mut c = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(c.pause().unwrap().state, VmState::Paused);
        let odd = dir.path().join("snap \"q\"\nx");
        match c.snapshot(&odd) {
            Err(ClientError::Refused { request, error }) => {
                assert_eq!((request, error.kind), ("snapshot", ErrorKind::InvalidState))
            }
            other => panic!("{other:?}"),
        }
        let seen = server.join().unwrap();
        assert_eq!(seen[1], Request::Snapshot { dir: odd });
        // The server is gone: a clear error, not a hang.
        assert!(matches!(
            c.status(),
            Err(ClientError::Closed { .. }) | Err(ClientError::Io { .. })
        ));
    }

    #[test]
    fn connect_times_out_with_the_path_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let e = ControlClient::connect(&path, Duration::from_millis(20))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("absent.sock"), "{e}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = ControlClient::from_stream(a).unwrap();
        c.set_timeout(Duration::from_millis(50)).unwrap();
        assert!(matches!(c.status(), Err(ClientError::Timeout { .. })));
    }
}
