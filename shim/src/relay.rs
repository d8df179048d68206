//! Relays one process's stdio between host file descriptors and the agent's streams, and waits
//! for the process's exit.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use protocol::client::{Client, ClientError};
use protocol::{ExitStatus, Response, Streams};

/// How long output may keep arriving after the exit is known.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Error relaying stdio.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The agent connection failed.
    #[error("agent connection: {0}")]
    Client(#[from] ClientError),
    /// The agent answered the wait with something else.
    #[error("waiting for the process: the agent answered {0:?}")]
    Unexpected(Box<Response>),
}

/// The host side of a process's stdio.
pub struct HostIo {
    /// Read and forwarded as the process's stdin (until EOF).
    pub input: Option<File>,
    /// Receives stdout (or the terminal's output).
    pub out: File,
    /// Receives stderr.
    pub err: File,
}

/// Starts a thread that reads `input` and hands chunks over; an empty chunk means EOF.
fn stdin_reader(mut input: File) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Vec::new());
                        return;
                    }
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if spawned.is_err() {
        // No thread: behave as if stdin were empty.
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Vec::new());
        return rx;
    }
    rx
}

fn flush(c: &mut Client, stream: Option<u32>, to: &mut File) {
    if let Some(bytes) = stream.and_then(|s| c.data.remove(&s)) {
        // A gone reader must not stop the relay (the process would block on a full pipe).
        let _ = to.write_all(&bytes);
    }
}

/// Relays `streams` to `io` until the response to the `wait` request `wait_id` arrives, then
/// drains the output and returns the exit status.
pub fn relay(
    c: &mut Client,
    streams: Streams,
    wait_id: u32,
    mut io: HostIo,
) -> Result<ExitStatus, RelayError> {
    let input = io.input.take().map(stdin_reader);
    relay_from(c, streams, wait_id, input, io)
}

/// Like [`relay`], but stdin arrives as chunks on `input` (an empty chunk is EOF; `None` closes
/// the process's stdin at once), for callers whose stdin source must be opened lazily (a
/// containerd fifo nobody may ever write to). `io.input` is ignored.
pub fn relay_from(
    c: &mut Client,
    streams: Streams,
    wait_id: u32,
    input: Option<mpsc::Receiver<Vec<u8>>>,
    mut io: HostIo,
) -> Result<ExitStatus, RelayError> {
    let mut stdin = match (streams.stdin, input) {
        (Some(s), Some(rx)) => Some((s, rx)),
        (Some(s), None) => {
            c.close_stdin(s)?;
            None
        }
        (None, _) => None,
    };
    let status = loop {
        c.pump()?;
        flush(c, Some(streams.stdout), &mut io.out);
        flush(c, streams.stderr, &mut io.err);
        if let Some((s, rx)) = &stdin {
            let s = *s;
            let mut done = false;
            while let Ok(chunk) = rx.try_recv() {
                if chunk.is_empty() {
                    // The process may be gone already; its stdin then needs no closing.
                    let _ = c.close_stdin(s);
                    done = true;
                    break;
                }
                if c.write_stdin(s, &chunk).is_err() {
                    done = true;
                    break;
                }
            }
            if done {
                stdin = None;
            }
        }
        match c.response(wait_id, Duration::ZERO) {
            Ok(Response::Exited { status, .. }) => break status,
            Ok(other) => return Err(RelayError::Unexpected(Box::new(other))),
            Err(ClientError::Timeout) => {}
            Err(e) => return Err(e.into()),
        }
    };
    for (s, to) in [
        (Some(streams.stdout), &mut io.out),
        (streams.stderr, &mut io.err),
    ] {
        if let Some(s) = s {
            let _ = c.read_to_close(s, DRAIN_TIMEOUT).map(|b| to.write_all(&b));
        }
    }
    Ok(status)
}
