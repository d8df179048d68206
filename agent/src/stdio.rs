//! stdio plumbing of a connection's processes: pipes or a pty per process, one output pump per
//! stream (pipe or pty → `Data` frames, bounded by the peer's credit), one writer per stdin
//! stream, and the per-connection table that routes `Data`, `Close` and `Window` frames to them.
//! All frames go out through one locked writer ([`Out`]), so frames never interleave.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::stream::{self, SendWindow};
use protocol::{ErrorCode, Frame, FrameKind, StdioConfig, Streams};

use crate::error::OpError;
use crate::spawn::ChildStdio;
use crate::sync::LockOrRecover;
use crate::threads;

/// The locked writer half of a connection.
#[derive(Clone)]
pub struct Out(Arc<Mutex<Box<dyn Write + Send>>>);

impl Out {
    /// Wraps the writer half of a connection.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(w)))
    }

    /// Sends a frame; false when the peer is gone.
    pub fn send(&self, f: &Frame) -> bool {
        let mut w = self.0.lock_or_recover();
        w.write_all(&f.to_bytes()).is_ok()
    }
}

/// Credit of one output stream, shared by its pump and the reader that receives `Window`s.
#[derive(Default)]
struct Credit {
    /// The window, and whether the peer is gone (or broke the window).
    window: Mutex<(SendWindow, bool)>,
    cv: Condvar,
}

/// The sender feeding a stdin writer thread; dropping it ends the thread and closes stdin.
type StdinTx = Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>;

/// Agent-side resources of a process's stdio.
#[derive(Default)]
pub struct ProcIo {
    pumps: Vec<JoinHandle<()>>,
    stdin: Option<StdinTx>,
    pty: Option<Arc<OwnedFd>>,
}

impl ProcIo {
    /// Waits (up to `timeout`) for the output pumps to send everything, then drops the rest.
    pub fn finish(io: &Mutex<ProcIo>, timeout: Duration) {
        let pumps = std::mem::take(&mut io.lock_or_recover().pumps);
        let deadline = Instant::now() + timeout;
        for p in pumps {
            while !p.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        let mut g = io.lock_or_recover();
        g.close_stdin();
        g.pty = None;
    }

    /// Sets the terminal size of a process that has a pty.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), OpError> {
        let pty = self
            .pty
            .as_ref()
            .ok_or_else(|| OpError::new(ErrorCode::InvalidState, "the process has no terminal"))?;
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
        Ok(())
    }

    /// Ends the process's stdin (its writer thread exits and closes the pipe or pty side).
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin.take() {
            tx.lock_or_recover().take();
        }
    }
}

/// The fds a child gets and what the agent keeps.
pub struct Wiring {
    /// The child's stdio fds.
    pub child: ChildStdio,
    /// The child's ends, kept open until the child has them (drop after spawning).
    pub child_ends: Vec<OwnedFd>,
    /// What the agent keeps.
    pub io: ProcIo,
    /// Stream ids for the peer.
    pub streams: Streams,
}

/// The streams of one connection: ids, credit windows of output streams, stdin writers.
pub struct StreamTable {
    out: Out,
    next_stream: Mutex<u32>,
    credits: Mutex<HashMap<u32, Arc<Credit>>>,
    stdins: Mutex<HashMap<u32, StdinTx>>,
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn no_thread(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!("starting a stdio thread: {e} (the agent's pids or memory limit is reached)"),
    )
}

impl StreamTable {
    /// The streams of a connection whose frames go out through `out`.
    pub fn new(out: Out) -> Self {
        Self {
            out,
            next_stream: Mutex::new(0),
            credits: Mutex::new(HashMap::new()),
            stdins: Mutex::new(HashMap::new()),
        }
    }

    fn stream_id(&self) -> u32 {
        let mut n = self.next_stream.lock_or_recover();
        *n += 1;
        *n
    }

    fn pump(&self, id: u32, src: File) -> std::io::Result<JoinHandle<()>> {
        let credit = Arc::new(Credit::default());
        let out = self.out.clone();
        let c = credit.clone();
        let h =
            threads::spawn("stdout-pump", move || pump(id, src, &c, &out)).map_err(no_thread)?;
        self.credits.lock_or_recover().insert(id, credit);
        Ok(h)
    }

    fn stdin_writer(&self, id: u32, dst: File) -> std::io::Result<StdinTx> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let out = self.out.clone();
        threads::spawn("stdin-writer", move || {
            let mut dst = dst;
            while let Ok(chunk) = rx.recv() {
                if dst.write_all(&chunk).is_err() {
                    break;
                }
                out.send(&stream::window_frame(id, chunk.len() as u32));
            }
        })
        .map_err(no_thread)?;
        let tx = Arc::new(Mutex::new(Some(tx)));
        self.stdins.lock_or_recover().insert(id, tx.clone());
        Ok(tx)
    }

    /// Creates the pipes or pty of a new process and starts its pumps and stdin writer.
    pub fn wire(&self, cfg: StdioConfig) -> std::io::Result<Wiring> {
        let mut io = ProcIo::default();
        if cfg.terminal {
            let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
            let (master, slave) = (pty.master, pty.slave);
            nix::fcntl::fcntl(
                master.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
            let out_id = self.stream_id();
            let master = Arc::new(master);
            io.pumps
                .push(self.pump(out_id, File::from(master.try_clone()?))?);
            let stdin = if cfg.stdin {
                let id = self.stream_id();
                io.stdin = Some(self.stdin_writer(id, File::from(master.try_clone()?))?);
                Some(id)
            } else {
                None
            };
            io.pty = Some(master);
            let fd = slave.as_raw_fd();
            let tty_path = nix::unistd::ttyname(&slave)
                .ok()
                .and_then(|p| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).ok());
            return Ok(Wiring {
                child: ChildStdio {
                    fds: [fd, fd, fd],
                    controlling_tty: true,
                    tty_path,
                },
                child_ends: vec![slave],
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
        io.pumps.push(self.pump(stdout, File::from(out_r))?);
        io.pumps.push(self.pump(stderr, File::from(err_r))?);
        let (in_fd, stdin): (OwnedFd, Option<u32>) = if cfg.stdin {
            let (in_r, in_w) = cloexec_pipe()?;
            let id = self.stream_id();
            io.stdin = Some(self.stdin_writer(id, File::from(in_w))?);
            (in_r, Some(id))
        } else {
            (OwnedFd::from(File::open("/dev/null")?), None)
        };
        Ok(Wiring {
            child: ChildStdio {
                fds: [in_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                controlling_tty: false,
                tty_path: None,
            },
            child_ends: vec![in_fd, out_w, err_w],
            io,
            streams: Streams {
                stdin,
                stdout,
                stderr: Some(stderr),
            },
        })
    }

    /// Stdin bytes from the peer for stream `id` (unknown or closed streams are ignored).
    pub fn data(&self, id: u32, payload: Vec<u8>) {
        let tx = self.stdins.lock_or_recover().get(&id).cloned();
        if let Some(tx) = tx {
            if let Some(tx) = tx.lock_or_recover().as_ref() {
                let _ = tx.send(payload);
            }
        }
    }

    /// The peer ended stdin stream `id`.
    pub fn close(&self, id: u32) {
        let tx = self.stdins.lock_or_recover().remove(&id);
        if let Some(tx) = tx {
            tx.lock_or_recover().take();
        }
    }

    /// Credit from the peer for output stream `id`; a window that overflows stops the stream.
    pub fn window(&self, f: &Frame) {
        let credit = self.credits.lock_or_recover().get(&f.id).cloned();
        if let (Some(c), Ok(n)) = (credit, stream::parse_window(f)) {
            let mut w = c.window.lock_or_recover();
            if w.0.grant(n).is_err() {
                w.1 = true;
            }
            c.cv.notify_all();
        }
    }

    /// The peer is gone: output pumps stop sending (and keep draining), stdin ends.
    pub fn disconnect(&self) {
        for c in self.credits.lock_or_recover().values() {
            c.window.lock_or_recover().1 = true;
            c.cv.notify_all();
        }
        for (_, tx) in self.stdins.lock_or_recover().drain() {
            tx.lock_or_recover().take();
        }
    }
}

/// Copies `src` to the peer as `Data` frames of stream `id` within the credit, then `Close`.
fn pump(id: u32, mut src: File, credit: &Credit, out: &Out) {
    let mut buf = vec![0u8; stream::MAX_DATA_CHUNK];
    let mut connected = true;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break, // EOF, or EIO from a pty whose process is gone
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n && connected {
            let mut w = credit.window.lock_or_recover();
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
}
