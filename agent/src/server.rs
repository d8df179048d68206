//! Serving one connection: frames in, requests dispatched, responses, events and stdio out.
//!
//! Threads per connection: the reader (decodes frames, answers quick requests inline, spawns a
//! thread per `Wait`), one pump per output stream (pipe or pty → `Data` frames, bounded by the
//! peer's credit), one writer per stdin stream. All frames go out through one locked writer, so
//! frames never interleave. A peer that sends garbage gets an error reply and is disconnected;
//! one that disappears only loses its streams: containers keep running.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::frame::{read_frame, FrameError};
use protocol::stream::{self, SendWindow};
use protocol::{
    ErrorCode, Event, Frame, FrameKind, Request, Response, StdioConfig, Streams, PROTOCOL_VERSION,
};

use crate::runtime::{OpError, Runtime};
use crate::spawn::ChildStdio;

/// The locked writer half of a connection.
#[derive(Clone)]
pub struct Out(Arc<Mutex<Box<dyn Write + Send>>>);

impl Out {
    /// Sends a frame; false when the peer is gone.
    pub fn send(&self, f: &Frame) -> bool {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&f.to_bytes()).is_ok()
    }
}

/// Credit of one output stream, shared by its pump and the reader that receives `Window`s.
#[derive(Default)]
struct Credit {
    window: Mutex<(SendWindow, bool)>,
    cv: Condvar,
}

/// Agent-side resources of a process's stdio.
#[derive(Default)]
pub struct ProcIo {
    pumps: Vec<JoinHandle<()>>,
    stdin: Option<StdinTx>,
    pty: Option<Arc<OwnedFd>>,
}

/// The sender feeding a stdin writer thread; dropping it ends the thread and closes stdin.
type StdinTx = Arc<Mutex<Option<mpsc::Sender<Option<Vec<u8>>>>>>;

impl ProcIo {
    /// Waits (up to `timeout`) for the output pumps to send everything, then drops the rest.
    pub fn finish(io: &Mutex<ProcIo>, timeout: Duration) {
        let pumps = std::mem::take(&mut io.lock().unwrap_or_else(|p| p.into_inner()).pumps);
        let deadline = Instant::now() + timeout;
        for p in pumps {
            while !p.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        let mut g = io.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = g.stdin.take() {
            tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        g.pty = None;
    }
}

/// Per-connection state.
struct Conn {
    rt: Arc<Runtime>,
    out: Out,
    next_stream: Mutex<u32>,
    credits: Mutex<HashMap<u32, Arc<Credit>>>,
    stdins: Mutex<HashMap<u32, StdinTx>>,
    started: Instant,
    pid1: bool,
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid 2-int array; checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The fds a child gets and what the agent keeps.
struct Wiring {
    child: ChildStdio,
    // Kept open until the child has them (dropped after spawn).
    _child_ends: Vec<OwnedFd>,
    io: ProcIo,
    streams: Streams,
}

impl Conn {
    fn stream_id(&self) -> u32 {
        let mut n = self.next_stream.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    }

    fn pump(&self, id: u32, src: File) -> JoinHandle<()> {
        let credit = Arc::new(Credit::default());
        self.credits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, credit.clone());
        let out = self.out.clone();
        std::thread::spawn(move || {
            let mut src = src;
            let mut buf = vec![0u8; stream::MAX_DATA_CHUNK];
            let mut connected = true;
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) | Err(_) => break, // EOF, or EIO from a pty whose process is gone
                    Ok(n) => n,
                };
                let mut sent = 0;
                while sent < n && connected {
                    let mut w = credit.window.lock().unwrap_or_else(|p| p.into_inner());
                    while w.0.can_send() == 0 && !w.1 {
                        w = credit
                            .cv
                            .wait_timeout(w, Duration::from_millis(200))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    if w.1 {
                        connected = false;
                        break;
                    }
                    let k = (n - sent).min(w.0.can_send());
                    w.0.consume(k);
                    drop(w);
                    connected = out.send(&Frame::new(
                        FrameKind::Data,
                        id,
                        buf[sent..sent + k].to_vec(),
                    ));
                    sent += k;
                }
                // A gone peer: keep draining so the process never blocks on a full pipe.
            }
            if connected {
                out.send(&stream::close_frame(id));
            }
        })
    }

    fn stdin_writer(&self, id: u32, dst: File) -> StdinTx {
        let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
        let out = self.out.clone();
        std::thread::spawn(move || {
            let mut dst = dst;
            while let Ok(Some(chunk)) = rx.recv() {
                if dst.write_all(&chunk).is_err() {
                    break;
                }
                out.send(&stream::window_frame(id, chunk.len() as u32));
            }
        });
        let tx = Arc::new(Mutex::new(Some(tx)));
        self.stdins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx.clone());
        tx
    }

    fn wire(&self, cfg: StdioConfig) -> std::io::Result<Wiring> {
        let mut io = ProcIo::default();
        if cfg.terminal {
            let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
            let (master, slave) = (pty.master, pty.slave);
            // SAFETY: fcntl on an fd we own.
            unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            let out_id = self.stream_id();
            let master = Arc::new(master);
            io.pumps
                .push(self.pump(out_id, File::from(master.try_clone()?)));
            let stdin = if cfg.stdin {
                let id = self.stream_id();
                io.stdin = Some(self.stdin_writer(id, File::from(master.try_clone()?)));
                Some(id)
            } else {
                None
            };
            io.pty = Some(master);
            let fd = slave.as_raw_fd();
            return Ok(Wiring {
                child: ChildStdio {
                    fds: [fd, fd, fd],
                    controlling_tty: true,
                },
                _child_ends: vec![slave],
                io,
                streams: Streams {
                    stdin,
                    stdout: out_id,
                    stderr: None,
                },
            });
        }
        let (out_r, out_w) = cloexec_pipe()?;
        let (err_r, err_w) = cloexec_pipe()?;
        let (stdout, stderr) = (self.stream_id(), self.stream_id());
        io.pumps.push(self.pump(stdout, File::from(out_r)));
        io.pumps.push(self.pump(stderr, File::from(err_r)));
        let (in_fd, stdin): (OwnedFd, Option<u32>) = if cfg.stdin {
            let (in_r, in_w) = cloexec_pipe()?;
            let id = self.stream_id();
            io.stdin = Some(self.stdin_writer(id, File::from(in_w)));
            (in_r, Some(id))
        } else {
            (OwnedFd::from(File::open("/dev/null")?), None)
        };
        Ok(Wiring {
            child: ChildStdio {
                fds: [in_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                controlling_tty: false,
            },
            _child_ends: vec![in_fd, out_w, err_w],
            io,
            streams: Streams {
                stdin,
                stdout,
                stderr: Some(stderr),
            },
        })
    }

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

    fn handle(&self, req: Request) -> Result<Response, OpError> {
        let rt = &self.rt;
        Ok(match req {
            Request::Ping => Response::Pong {
                version: PROTOCOL_VERSION,
                uptime_ms: self.started.elapsed().as_millis() as u64,
                ready: true,
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
            Request::Create {
                id,
                spec,
                rootfs,
                stdio,
            } => {
                let w = self
                    .wire(stdio)
                    .map_err(|e| OpError::new(ErrorCode::Io, format!("stdio: {e}")))?;
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
                    .wire(stdio)
                    .map_err(|e| OpError::new(ErrorCode::Io, format!("stdio: {e}")))?;
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
            // `serve` answers waits on their own threads; never block the reader here.
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
                let io = p.io.lock().unwrap_or_else(|p| p.into_inner());
                let pty = io.pty.as_ref().ok_or_else(|| {
                    OpError::new(ErrorCode::InvalidState, "the process has no terminal")
                })?;
                let ws = libc::winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ with a valid winsize on a pty master we own.
                if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
                    return Err(OpError::new(
                        ErrorCode::Io,
                        format!("TIOCSWINSZ: {}", std::io::Error::last_os_error()),
                    ));
                }
                Response::Ok
            }
            Request::CloseStdin { id, exec_id } => {
                let p = rt.get(&id)?.process(exec_id.as_deref())?;
                if let Some(tx) = p.io.lock().unwrap_or_else(|p| p.into_inner()).stdin.take() {
                    tx.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                Response::Ok
            }
            Request::Reseed { entropy } => {
                crate::pid1::add_entropy(&entropy).map_err(|e| OpError::new(ErrorCode::Io, e))?;
                Response::Ok
            }
            Request::SetClock { unix_nanos } => {
                self.require_pid1("set the clock")?;
                crate::pid1::set_clock(unix_nanos).map_err(|e| OpError::new(ErrorCode::Io, e))?;
                Response::Ok
            }
            Request::SetHostname { hostname } => {
                self.require_pid1("set the hostname")?;
                nix::unistd::sethostname(&hostname)
                    .map_err(|e| OpError::new(ErrorCode::Io, format!("sethostname: {e}")))?;
                Response::Ok
            }
            Request::List => Response::Containers { ids: rt.list() },
        })
    }

    fn require_pid1(&self, what: &str) -> Result<(), OpError> {
        if self.pid1 {
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

/// Serves one connection until the peer closes it or sends something undecodable.
pub fn serve<S>(rt: Arc<Runtime>, stream: S, pid1: bool, started: Instant)
where
    S: Read + Write + Send + 'static + TryCloneStream,
{
    let writer = match stream.try_clone_stream() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cloning a connection: {e}");
            return;
        }
    };
    let conn = Arc::new(Conn {
        rt,
        out: Out(Arc::new(Mutex::new(writer))),
        next_stream: Mutex::new(0),
        credits: Mutex::new(HashMap::new()),
        stdins: Mutex::new(HashMap::new()),
        started,
        pid1,
    });
    let mut reader = stream;
    loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(FrameError::Io(_)) => break,
            Err(e) => {
                let code = match e {
                    FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                    _ => ErrorCode::BadFrame,
                };
                conn.out
                    .send(&Response::error(code, e.to_string()).to_frame(0));
                break;
            }
        };
        match frame.kind {
            FrameKind::Request => match Request::from_frame(&frame) {
                Ok(Request::Wait { id, exec_id }) => {
                    let c = conn.clone();
                    std::thread::spawn(move || {
                        let r =
                            c.rt.get(&id)
                                .and_then(|ct| ct.process(exec_id.as_deref()))
                                .map(|p| Response::Exited {
                                    status: p.wait(),
                                    id,
                                    exec_id,
                                });
                        c.reply(frame.id, r);
                    });
                }
                Ok(req) => conn.reply(frame.id, conn.handle(req)),
                Err(e) => conn.reply(
                    frame.id,
                    Err(OpError::new(
                        ErrorCode::BadRequest,
                        format!("undecodable request: {e}"),
                    )),
                ),
            },
            FrameKind::Data => {
                let tx = conn
                    .stdins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&frame.id)
                    .cloned();
                if let Some(tx) = tx {
                    if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        let _ = tx.send(Some(frame.payload));
                    }
                }
            }
            FrameKind::Close => {
                let tx = conn
                    .stdins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&frame.id);
                if let Some(tx) = tx {
                    tx.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
            FrameKind::Window => {
                let credit = conn
                    .credits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&frame.id)
                    .cloned();
                if let (Some(c), Ok(n)) = (credit, stream::parse_window(&frame)) {
                    let mut w = c.window.lock().unwrap_or_else(|p| p.into_inner());
                    if w.0.grant(n).is_err() {
                        w.1 = true;
                    }
                    c.cv.notify_all();
                }
            }
            FrameKind::Response | FrameKind::Event => {
                conn.reply(
                    frame.id,
                    Err(OpError::new(
                        ErrorCode::BadRequest,
                        "the agent accepts requests, stdin data and credit only",
                    )),
                );
            }
        }
    }
    // The peer is gone: output pumps stop sending (and keep draining), stdin ends.
    for c in conn
        .credits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
    {
        c.window.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        c.cv.notify_all();
    }
    for tx in conn
        .stdins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
    {
        tx.1.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Streams that can be split into a reader and a writer.
pub trait TryCloneStream {
    /// A second handle for writing.
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl TryCloneStream for File {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
}
