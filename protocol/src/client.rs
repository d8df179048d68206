//! A blocking client of the agent protocol over a Unix socket (tests, benchmarks, the VMM's boot
//! test, and later the shim): host-side crates use it without linking the guest agent.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frame::{read_frame, FrameError};
use crate::stream;
use crate::{Event, Frame, FrameKind, Request, Response};

/// Error talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport.
    #[error("agent connection: {0}")]
    Frame(#[from] FrameError),
    /// Socket.
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// Unexpected reply.
    #[error("agent sent an undecodable message: {0}")]
    Message(#[from] crate::message::MessageError),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for the agent")]
    Timeout,
}

/// One connection to an agent.
pub struct Client {
    stream: UnixStream,
    next_id: u32,
    /// Bytes received per stream.
    pub data: HashMap<u32, Vec<u8>>,
    /// Streams the agent closed.
    pub closed: HashSet<u32>,
    /// Events received.
    pub events: Vec<Event>,
    responses: HashMap<u32, Response>,
}

impl Client {
    /// Connects to an agent listening on the Unix socket `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::from_stream(UnixStream::connect(path)?)
    }

    /// Speaks the protocol over an already connected stream (e.g. a VM's vsock socket after
    /// the `CONNECT <port>` handshake).
    pub fn from_stream(stream: UnixStream) -> Result<Self, ClientError> {
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self {
            stream,
            next_id: 0,
            data: HashMap::new(),
            closed: HashSet::new(),
            events: Vec::new(),
            responses: HashMap::new(),
        })
    }

    /// Sends raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Sends a request, returns its id.
    pub fn send(&mut self, req: &Request) -> Result<u32, ClientError> {
        self.next_id += 1;
        self.stream
            .write_all(&req.to_frame(self.next_id).to_bytes())?;
        Ok(self.next_id)
    }

    /// Sends `req` and waits up to `timeout` for its response.
    pub fn call_timeout(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let id = self.send(req)?;
        self.response(id, timeout)
    }

    /// Sends `req` and waits (30 s at most) for its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.call_timeout(req, Duration::from_secs(30))
    }

    /// Waits for the response to request `id`.
    pub fn response(&mut self, id: u32, timeout: Duration) -> Result<Response, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.responses.remove(&id) {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            self.pump()?;
        }
    }

    /// Writes stdin bytes to `stream`.
    pub fn write_stdin(&mut self, stream_id: u32, bytes: &[u8]) -> Result<(), ClientError> {
        for f in stream::data_frames(stream_id, bytes) {
            self.stream.write_all(&f.to_bytes())?;
        }
        Ok(())
    }

    /// Ends stdin `stream`.
    pub fn close_stdin(&mut self, stream_id: u32) -> Result<(), ClientError> {
        self.stream
            .write_all(&stream::close_frame(stream_id).to_bytes())?;
        Ok(())
    }

    /// Waits until `stream` is closed by the agent; returns its bytes.
    pub fn read_to_close(
        &mut self,
        stream_id: u32,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let deadline = Instant::now() + timeout;
        while !self.closed.contains(&stream_id) {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            self.pump()?;
        }
        Ok(self.data.remove(&stream_id).unwrap_or_default())
    }

    /// Waits until `stream` has at least one byte.
    pub fn first_byte(&mut self, stream_id: u32, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        while self.data.get(&stream_id).is_none_or(|d| d.is_empty()) {
            if Instant::now() >= deadline || self.closed.contains(&stream_id) {
                return Err(ClientError::Timeout);
            }
            self.pump()?;
        }
        Ok(())
    }

    /// Reads one frame (or times out after 100 ms) and files it.
    pub fn pump(&mut self) -> Result<(), ClientError> {
        let f: Frame = match read_frame(&mut self.stream) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ClientError::Closed),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        };
        match f.kind {
            FrameKind::Response => {
                let r = Response::from_frame(&f)?;
                self.responses.insert(f.id, r);
            }
            FrameKind::Event => self.events.push(Event::from_frame(&f)?),
            FrameKind::Data => {
                let n = f.payload.len() as u32;
                self.data
                    .entry(f.id)
                    .or_default()
                    .extend_from_slice(&f.payload);
                self.stream
                    .write_all(&stream::window_frame(f.id, n).to_bytes())?;
            }
            FrameKind::Close => {
                self.closed.insert(f.id);
            }
            FrameKind::Window | FrameKind::Request => {}
        }
        Ok(())
    }
}
