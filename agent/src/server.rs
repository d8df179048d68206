//! Serving connections: frames in, requests dispatched, responses and events out.
//!
//! Threads per connection: the reader (decodes frames, answers requests inline); stdio threads
//! come from [`crate::stdio`]. A `wait` takes no thread: the process's exit watcher answers it.
//! Connections, pending waits and the time a peer may take to finish a started frame are
//! bounded ([`crate::limits`]); at a bound, or when no thread can be started, the peer gets an
//! error reply (`resource_exhausted`) instead of the agent aborting. A peer that sends garbage
//! gets an error reply and is disconnected; one that disappears only loses its streams:
//! containers keep running.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::frame::{read_frame, FrameError};
use protocol::{ErrorCode, Event, FrameKind, Request, Response, StdioConfig, PROTOCOL_VERSION};

use crate::error::OpError;
use crate::limits::{self, Slot, Slots};
use crate::runtime::Runtime;
use crate::spawn;
use crate::stall::{self, StallGuard};
use crate::stdio::{Out, StreamTable};
use crate::sync::LockOrRecover;
use crate::threads;

/// What every connection of an agent shares: the runtime and the limits.
pub struct Server {
    rt: Arc<Runtime>,
    pid1: bool,
    started: Instant,
    frame_timeout: Duration,
    connections: Arc<Slots>,
    waits: Arc<Slots>,
}

/// Per-connection state.
struct Conn {
    server: Arc<Server>,
    out: Out,
    streams: StreamTable,
    waits: Arc<Slots>,
}

impl Server {
    /// A server for `rt`; `frame_timeout` bounds the time a peer may take to finish a frame
    /// ([`limits::FRAME_TIMEOUT`] unless testing).
    pub fn new(
        rt: Arc<Runtime>,
        pid1: bool,
        started: Instant,
        frame_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            rt,
            pid1,
            started,
            frame_timeout,
            connections: Slots::new(limits::MAX_CONNECTIONS),
            waits: Slots::new(limits::MAX_WAITS),
        })
    }

    /// Serves an accepted connection on its own thread. At the connection limit, or when no
    /// thread can be started, the peer gets an error frame (request id 0) and is closed.
    pub fn accept<S: Connection>(self: &Arc<Self>, stream: S) {
        let Some(slot) = self.connections.try_take() else {
            refuse(
                stream,
                OpError::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "the agent serves at most {} connections at once: close idle ones or \
                         retry later",
                        self.connections.max()
                    ),
                ),
            );
            return;
        };
        let me = self.clone();
        if let Err((e, back)) =
            threads::spawn_with("connection", (stream, slot), move |(s, slot)| {
                me.serve(s);
                drop(slot);
            })
        {
            tracing::warn!("no thread for a connection: {e}");
            if let Some((s, _slot)) = back {
                refuse(s, OpError::no_thread("a connection", &e));
            }
        }
    }

    /// Serves one connection on this thread until the peer closes it, sends something
    /// undecodable, or stalls inside a frame.
    pub fn serve<S: Connection>(self: &Arc<Self>, stream: S) {
        let writer = match stream.try_clone_stream() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cloning a connection: {e}");
                return;
            }
        };
        if let Err(e) = stream.set_read_timeout(Some(stall::poll_interval(self.frame_timeout))) {
            tracing::warn!("setting a connection's receive timeout: {e}");
            return;
        }
        let out = Out::new(writer);
        let conn = Conn {
            server: self.clone(),
            streams: StreamTable::new(out.clone()),
            out,
            waits: Slots::new(limits::MAX_WAITS_PER_CONNECTION),
        };
        let mut reader = StallGuard::new(stream, self.frame_timeout);
        loop {
            let frame = match read_frame(&mut reader) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    tracing::warn!("dropping a connection: {e}");
                    conn.reply(
                        0,
                        Err(OpError::new(
                            ErrorCode::BadFrame,
                            format!("{e}: send whole frames; closing the connection"),
                        )),
                    );
                    break;
                }
                Err(FrameError::Io(_)) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                        _ => ErrorCode::BadFrame,
                    };
                    conn.reply(0, Err(OpError::new(code, e.to_string())));
                    break;
                }
            };
            reader.frame_done();
            match frame.kind {
                FrameKind::Request => match Request::from_frame(&frame) {
                    Ok(Request::Wait { id, exec_id }) => conn.wait(frame.id, id, exec_id),
                    Ok(req) => match known_fields_only(&req, &frame.payload) {
                        Ok(()) => conn.reply(frame.id, conn.handle(req)),
                        Err(e) => conn.reply(frame.id, Err(e)),
                    },
                    Err(e) => conn.reply(
                        frame.id,
                        Err(OpError::new(
                            ErrorCode::BadRequest,
                            format!("undecodable request: {e}"),
                        )),
                    ),
                },
                FrameKind::Data => conn.streams.data(frame.id, frame.payload),
                FrameKind::Close => conn.streams.close(frame.id),
                FrameKind::Window => conn.streams.window(&frame),
                FrameKind::Response | FrameKind::Event => conn.reply(
                    frame.id,
                    Err(OpError::new(
                        ErrorCode::BadRequest,
                        "the agent accepts requests, stdin data and credit only",
                    )),
                ),
            }
        }
        conn.streams.disconnect();
    }
}

/// Answers a connection the agent will not serve, then closes it.
fn refuse<S: Connection>(stream: S, e: OpError) {
    if let Ok(mut w) = stream.try_clone_stream() {
        // A fresh connection's send buffer is empty: this small frame does not block.
        let _ = w.write_all(&Response::error(e.code, e.message).to_frame(0).to_bytes());
    }
}

impl Conn {
    fn on_exit(
        &self,
        exec_id: Option<String>,
    ) -> impl FnOnce(&str, protocol::ExitStatus) + Send + 'static {
        let out = self.out.clone();
        move |id: &str, status| {
            out.send(
                &Event::Exited {
                    id: id.to_string(),
                    exec_id,
                    status,
                }
                .to_frame(),
            );
        }
    }

    /// Answers request `rid` (a `wait`) when the process exits; no thread waits for it.
    fn wait(&self, rid: u32, id: String, exec_id: Option<String>) {
        let p = match self
            .server
            .rt
            .get(&id)
            .and_then(|c| c.process(exec_id.as_deref()))
        {
            Ok(p) => p,
            Err(e) => return self.reply(rid, Err(e)),
        };
        let slots = match self.wait_slots() {
            Ok(s) => s,
            Err(e) => return self.reply(rid, Err(e)),
        };
        let out = self.out.clone();
        p.when_exited(Box::new(move |status| {
            out.send(
                &Response::Exited {
                    status,
                    id,
                    exec_id,
                }
                .to_frame(rid),
            );
            drop(slots);
        }));
    }

    /// A slot for one more pending wait of this connection and of the agent.
    fn wait_slots(&self) -> Result<(Slot, Slot), OpError> {
        let mine = self.waits.try_take().ok_or_else(|| {
            OpError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "{} waits are pending on this connection, the limit: wait for some to \
                     finish or use another connection",
                    self.waits.max()
                ),
            )
        })?;
        let all = self.server.waits.try_take().ok_or_else(|| {
            OpError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "{} waits are pending in the agent, the limit: retry when processes exit",
                    self.server.waits.max()
                ),
            )
        })?;
        Ok((mine, all))
    }

    fn handle(&self, req: Request) -> Result<Response, OpError> {
        let rt = &self.server.rt;
        Ok(match req {
            Request::Ping => Response::Pong {
                version: PROTOCOL_VERSION,
                uptime_ms: self.server.started.elapsed().as_millis() as u64,
                ready: true,
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
            Request::Create {
                id,
                spec,
                rootfs,
                stdio,
            } => {
                let terminal = spec.process().as_ref().and_then(|p| p.terminal());
                let w = self
                    .streams
                    .wire(with_terminal(stdio, terminal))
                    .map_err(stdio_error)?;
                let c = rt.create(&id, &spec, &rootfs, &w.child, w.io, self.on_exit(None))?;
                Response::Created {
                    id,
                    pid: c.init.pid,
                    streams: w.streams,
                }
            }
            Request::Start { id } => {
                rt.start(&id)?;
                Response::Started { id }
            }
            Request::Exec {
                id,
                exec_id,
                process,
                stdio,
            } => {
                let w = self
                    .streams
                    .wire(with_terminal(stdio, process.terminal()))
                    .map_err(stdio_error)?;
                let pid = rt.exec(
                    &id,
                    &exec_id,
                    &process,
                    &w.child,
                    w.io,
                    self.on_exit(Some(exec_id.clone())),
                )?;
                Response::ExecStarted {
                    id,
                    exec_id,
                    pid,
                    streams: w.streams,
                }
            }
            Request::Signal {
                id,
                exec_id,
                signal,
                all,
            } => {
                rt.signal(&id, exec_id.as_deref(), signal, all)?;
                Response::Ok
            }
            // `serve` registers waits with the process; never block the reader here.
            Request::Wait { .. } => {
                return Err(OpError::new(
                    ErrorCode::Internal,
                    "wait is served by the connection reader",
                ))
            }
            Request::State { id } => Response::State(rt.state(&id)?),
            Request::Ps { id } => Response::Processes {
                pids: rt.ps(&id)?,
                id,
            },
            Request::Stats { id } => Response::Stats(rt.stats(&id)?),
            Request::Update { id, resources } => {
                rt.update(&id, &resources)?;
                Response::Ok
            }
            Request::Pause { id } => {
                rt.set_paused(&id, true)?;
                Response::Ok
            }
            Request::Resume { id } => {
                rt.set_paused(&id, false)?;
                Response::Ok
            }
            Request::Destroy { id } => {
                rt.destroy(&id)?;
                Response::Ok
            }
            Request::ResizeTty {
                id,
                exec_id,
                rows,
                cols,
            } => {
                let p = rt.get(&id)?.process(exec_id.as_deref())?;
                let io = p.io.lock_or_recover();
                io.resize(rows, cols)?;
                Response::Ok
            }
            Request::CloseStdin { id, exec_id } => {
                let p = rt.get(&id)?.process(exec_id.as_deref())?;
                p.io.lock_or_recover().close_stdin();
                Response::Ok
            }
            Request::Reseed { entropy } => {
                crate::pid1::add_entropy(&entropy).map_err(pid1_error)?;
                Response::Ok
            }
            Request::SetClock { unix_nanos } => {
                self.require_pid1("set the clock")?;
                crate::pid1::set_clock(unix_nanos).map_err(pid1_error)?;
                Response::Ok
            }
            Request::SetHostname { hostname } => {
                self.require_pid1("set the hostname")?;
                nix::unistd::sethostname(&hostname)
                    .map_err(|e| OpError::new(ErrorCode::Io, format!("sethostname: {e}")))?;
                Response::Ok
            }
            Request::SetNetwork {
                interfaces,
                routes,
                dns,
            } => {
                self.require_pid1("configure the network")?;
                crate::netconf::apply(
                    &interfaces,
                    &routes,
                    &dns,
                    std::path::Path::new("/etc/resolv.conf"),
                )
                .map_err(|e| {
                    let code = match e {
                        crate::netconf::NetconfError::Bad(_)
                        | crate::netconf::NetconfError::NoInterface(_) => ErrorCode::BadRequest,
                        _ => ErrorCode::Io,
                    };
                    OpError::new(code, e.to_string())
                })?;
                Response::Ok
            }
            Request::List => Response::Containers { ids: rt.list() },
        })
    }

    fn require_pid1(&self, what: &str) -> Result<(), OpError> {
        if self.server.pid1 {
            Ok(())
        } else {
            Err(OpError::new(
                ErrorCode::InvalidState,
                format!("the agent runs as a host process and does not {what} of its host; only as PID 1 in a guest"),
            ))
        }
    }

    fn reply(&self, id: u32, r: Result<Response, OpError>) {
        let resp = r.unwrap_or_else(|e| Response::error(e.code, e.message));
        self.out.send(&resp.to_frame(id));
    }
}

/// The stdio of a process whose spec says `terminal: true`: a terminal, whether or not the
/// request's stdio asked for one (the reply's streams say so: no separate stderr).
fn with_terminal(stdio: StdioConfig, spec_terminal: Option<bool>) -> StdioConfig {
    StdioConfig {
        terminal: stdio.terminal || spec_terminal == Some(true),
        ..stdio
    }
}

/// Refuses a create or exec whose spec (or process) has a field that decoding dropped because
/// this build does not know it: a field asked for must be honoured or refused, never ignored.
fn known_fields_only(req: &Request, payload: &[u8]) -> Result<(), OpError> {
    let (key, decoded) = match req {
        Request::Create { spec, .. } => ("spec", serde_json::to_value(spec)),
        Request::Exec { process, .. } => ("process", serde_json::to_value(process)),
        _ => return Ok(()),
    };
    let raw: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| OpError::new(ErrorCode::BadRequest, format!("undecodable request: {e}")))?;
    let decoded = decoded
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("re-encoding the {key}: {e}")))?;
    match raw.get(key).and_then(|r| spawn::unknown_field(r, &decoded)) {
        None => Ok(()),
        Some(field) => {
            let field = if key == "process" {
                format!("process.{field}")
            } else {
                field
            };
            Err(OpError::new(
                ErrorCode::BadRequest,
                format!("{field} is not supported by runv-agent (unknown to its OCI spec version): remove it from the spec"),
            ))
        }
    }
}

fn stdio_error(e: std::io::Error) -> OpError {
    use std::io::ErrorKind;
    let exhausted = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::OutOfMemory)
        || matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
    let code = if exhausted {
        ErrorCode::ResourceExhausted
    } else {
        ErrorCode::Io
    };
    OpError::new(code, format!("stdio: {e}"))
}

fn pid1_error(e: crate::pid1::Pid1Error) -> OpError {
    let code = match e {
        crate::pid1::Pid1Error::EntropySize(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Io,
    };
    OpError::new(code, e.to_string())
}

/// A connection the agent can serve: split into a reader and a writer, reads time out.
pub trait Connection: Read + Send + 'static {
    /// A second handle for writing.
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>>;
    /// Makes blocked reads fail with `WouldBlock`/`TimedOut` after `t`.
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Connection for UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
}

/// A connected socket of another family (AF_VSOCK), as a plain fd.
impl Connection for File {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        let t = t.unwrap_or_default();
        let tv = nix::sys::time::TimeVal::new(
            t.as_secs() as nix::libc::time_t,
            t.subsec_micros() as nix::libc::suseconds_t,
        );
        nix::sys::socket::setsockopt(self, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(std::io::Error::from)
    }
}
